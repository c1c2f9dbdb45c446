"""End to end: `python -m ltau_ase.demo --quick` as a user runs it (the shared `quick_demo_dir` fixture).

Checks that every required metrics.json key exists and is a finite number, and that report.md
refers only to PNGs that were written.
"""
import json
import math
import re

import pytest

pytest.importorskip("nequip")

# issue 5 §2 (the list is spelled out here, independently of ltau_ase.demo.REQUIRED_METRICS)
REQUIRED = [
    f"calibration.{d}.miscalibration_area.{w}" for d in ("in_domain", "out_of_domain") for w in ("before", "after")
] + [
    "spearman.in_domain", "spearman.out_of_domain",
] + [
    f"is2rs.{d}.{k}" for d in ("in_domain", "out_of_domain")
    for k in ("adwt", "spearman_initial", "spearman_max", "spearman_mean", "spearman_final", "auroc_initial",
              "auroc_max")
] + [
    "overhead.uq_fraction_of_step",
    "ensemble.n_members",
    "ensemble.cost.committee_over_single",
    "ensemble.cost.ltau_over_single",
] + [
    f"ensemble.{d}.{m}.{k}" for d in ("in_domain", "out_of_domain") for m in ("ltau", "committee")
    for k in ("spearman", "auroc", "miscalibration_area")
] + [
    f"ensemble.is2rs.{m}.{d}.adwt" for m in ("ltau", "committee") for d in ("in_domain", "out_of_domain")
] + ["md.stopped_at_step"]


@pytest.fixture(scope="module")
def demo_run(quick_demo_dir):
    return quick_demo_dir


def _lookup(tree, dotted):
    node = tree
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"metrics.json lacks {dotted}"
        node = node[part]
    return node


def test_every_required_metric_exists_and_is_finite(demo_run):
    metrics = json.loads((demo_run / "metrics.json").read_text())
    bad = []
    for key in REQUIRED:
        value = _lookup(metrics, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            bad.append((key, value))
    assert not bad, bad
    assert metrics["ensemble"]["n_members"] >= 3
    # probabilities and ratios in range
    for d in ("in_domain", "out_of_domain"):
        assert 0 <= metrics["is2rs"][d]["adwt"] <= 1
        assert -1 <= metrics["spearman"][d] <= 1
    assert 0 < metrics["overhead"]["uq_fraction_of_step"] < 1
    assert metrics["ensemble"]["cost"]["committee_over_single"] > 1


def test_report_refers_to_written_pngs(demo_run):
    report = (demo_run / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(images) >= 8
    for name in images:
        path = demo_run / name
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for section in ("Data", "Ensemble training", "IS2RS", "UncertaintyStop", "deep ensemble", "Table A2"):
        assert section in report


def test_a_second_run_into_the_same_output_is_refused_or_replaces_only_the_demo_files(tmp_path, capsys):
    """Rerunning `make demo` used to die after a minute of data generation in a traceback (the models'
    error logs refuse to be appended to): now it is refused at once, or --overwrite replaces the run."""
    from ltau_ase.demo import main, prepare_output

    out = tmp_path / "demo_output"
    (out / "models" / "member1" / "ltau_errors").mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
    (out / "fig1_calibration_k1.png").write_bytes(b"png")
    (out / "my_notes.txt").write_text("keep")
    assert main(["--output", str(out), "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a demo run" in err[0] and "--overwrite" in err[0]
    assert (out / "metrics.json").exists()
    prepare_output(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["my_notes.txt"]
    prepare_output(tmp_path / "new", overwrite=False)  # absent: nothing to do
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        prepare_output(tmp_path / "file", overwrite=True)
