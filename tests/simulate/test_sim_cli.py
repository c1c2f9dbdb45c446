"""`ltau relax`, `ltau report` and `ltau md` run in-process on stand-in calculators."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from ase.io import read, write

from sim_standins import batch_systems, make_slab
from ltau_ase.cli import md, relax, report


def _run(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args([str(a) for a in argv]))


def test_relax_then_report(tmp_path, capsys):
    systems = batch_systems(n=8, bad=True)
    write(tmp_path / "init.extxyz", systems)
    refs = [a for a in systems if a.info["name"] != "sys03"]  # the initial structures as "references"
    write(tmp_path / "refs.extxyz", refs)
    db = tmp_path / "relax.db"
    assert _run(relax, ["--factory", "sim_standins:STANDIN_FACTORY", "--structures", tmp_path / "init.extxyz",
                        "--db", db, "--optimizer", "FIRE", "--fmax", "0.05", "--steps", "200",
                        "--references", tmp_path / "refs.extxyz", "--no-progress", "--workers", "2"]) == 0
    assert "10 systems: 8 done, 0 unconverged, 2 failed, 0 already in" in capsys.readouterr().out
    out = tmp_path / "rep"
    with pytest.warns(UserWarning, match="1 of 8 system"):
        assert _run(report, ["--db", db, "--output", out, "--bins", "3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "rmsd_vs_uq.png").stat().st_size > 1000
    assert metrics["missing_references"] == ["sys03"]
    assert sorted(f["name"] for f in metrics["failed"]) == ["overlap", "unknown"]
    assert metrics["n_scored"] == 7 and set(metrics["analysis"]["groups"]) == {"in", "out", "all"}
    finals = {a.info["name"]: a for a in read(tmp_path / "init.extxyz", ":")}
    from ltau_ase.simulate.batch import load_results

    relaxed = {r["name"]: r for r in load_results(db)}
    for row in metrics["systems"]:
        ref = finals[row["name"]]
        final = relaxed[row["name"]]["atoms"]
        free = ref.get_tags() > 0
        d = np.linalg.norm(final.positions[free] - ref.positions[free], axis=1)  # small moves: no wrap
        assert row["rmsd"] == pytest.approx(np.sqrt(np.mean(d**2)), rel=1e-6)
        assert row["d_mean"] == pytest.approx(d.mean(), rel=1e-6)
        assert row["uq_final"] == pytest.approx(relaxed[row["name"]]["uq_final"])
    # failure probabilities from a model fitted elsewhere (synthetic calibration relaxations)
    from ltau_ase.is2rs import FailureModel

    rng = np.random.default_rng(0)
    calib = [{"uq_initial": u, "uq_max": u, "uq_mean": u, "uq_final": u, "nsteps": 10, "rmsd": r}
             for u, r in zip(rng.uniform(0, 1, 40), np.r_[np.full(20, 0.1), np.full(20, 0.9)])]
    model = FailureModel(rmsd_threshold=0.5).fit(calib)
    (tmp_path / "fail.json").write_text(json.dumps(model.to_dict()))
    with pytest.warns(UserWarning, match="1 of 8 system"):
        assert _run(report, ["--db", db, "--output", out, "--failure-model", tmp_path / "fail.json"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    np.testing.assert_allclose([row["p_fail"] for row in metrics["systems"]], model.predict_proba(metrics["systems"]))
    assert metrics["failure_model"]["mean_p_fail"] == pytest.approx(np.mean([r["p_fail"] for r in metrics["systems"]]))
    with pytest.raises(ValueError, match="at least 5 relaxations"), pytest.warns(UserWarning):
        _run(report, ["--db", db, "--output", out, "--fit-failure-model", tmp_path / "f2.json"])
    with pytest.raises(ValueError, match="no reference structure"):
        _run(report, ["--db", db, "--output", out, "--strict"])
    with pytest.raises(ValueError, match="either --factory or --model"):
        _run(relax, ["--factory", "sim_standins:STANDIN_FACTORY", "--model", "m.ckpt", "--structures",
                     tmp_path / "init.extxyz", "--db", db])


def _write_reference_runs(tmp_path, slab, values, n_runs=19, n_steps=3):
    """n_runs reference runs of n_steps frames, per-atom ``ltau_uncertainties`` = values(run, step);
    also writes start.extxyz (the slab). Returns the run files."""
    refs = []
    for r in range(n_runs):
        frames = []
        for step in range(n_steps):
            a = slab.copy()
            a.arrays["ltau_uncertainties"] = values(r, step)
            a.info["md_step"] = step
            frames.append(a)
        write(tmp_path / f"ref{r}.extxyz", frames)
        refs.append(tmp_path / f"ref{r}.extxyz")
    write(tmp_path / "start.extxyz", slab)
    return refs


@pytest.mark.parametrize("ensemble, interval, frames", [("nve", 1, [0, 1, 2, 3, 4, 5]), ("langevin", 2, [0, 2, 4, 5])])
def test_md_stops_and_writes_uq_columns(ensemble, interval, frames, tmp_path, capsys):
    write(tmp_path / "start.extxyz", make_slab())
    traj = tmp_path / "md.extxyz"
    assert _run(md, ["--factory", "sim_standins:scripted_md_calculator", "--structure", tmp_path / "start.extxyz",
                     "--ensemble", ensemble, "--threshold", "0.5", "--steps", "50", "--trajectory", traj,
                     "--interval", interval, "--save-to", tmp_path / "trigger.extxyz"]) == 0
    out = capsys.readouterr().out
    assert "stopped at step 5 (t = 5 fs)" in out and "> threshold 0.5" in out
    images = read(traj, ":")
    assert [a.info["md_step"] for a in images] == frames
    w = np.linspace(0.25, 1.0, len(images[0]))
    np.testing.assert_allclose(images[-1].arrays["ltau_uncertainties"], 0.9 * w, rtol=1e-7)
    np.testing.assert_allclose(images[0].arrays["ltau_uncertainties"], 0.1 * w, rtol=1e-7)
    assert read(tmp_path / "trigger.extxyz").info["ltau_stop_step"] == 5


def test_md_with_ltau_calculator_runs_to_the_end(tmp_path, capsys):
    write(tmp_path / "start.extxyz", make_slab())
    traj = tmp_path / "md.extxyz"
    assert _run(md, ["--factory", "sim_standins:STANDIN_FACTORY", "--structure", tmp_path / "start.extxyz",
                     "--ensemble", "nve", "--threshold", "1.0", "--steps", "5", "--trajectory", traj]) == 0
    assert "completed 5 steps without stopping" in capsys.readouterr().out
    images = read(traj, ":")
    assert len(images) == 6
    for key in ("uncertainties", "confidences", "expected_force_errors", "latent_distances"):
        assert images[-1].arrays["ltau_" + key].shape == (len(images[-1]),)
    with pytest.raises(ValueError, match="--stop-threshold is required"):
        _run(md, ["--factory", "sim_standins:STANDIN_FACTORY", "--structure", tmp_path / "start.extxyz"])


def test_md_threshold_from_reference_runs(tmp_path, capsys):
    # 19 in-domain reference runs whose max-atom uncertainty peaks at 0.05, 0.10, ..., 0.95 (patience 1)
    slab = make_slab()
    refs = _write_reference_runs(tmp_path, slab, lambda r, step: np.full(len(slab), (0.01, 0.05 * (r + 1), 0.02)[step]))
    base = ["--factory", "sim_standins:scripted_md_calculator", "--structure", tmp_path / "start.extxyz",
            "--steps", "20", "--trajectory", tmp_path / "md.extxyz"]
    assert _run(md, base + ["--false-alarm-rate", "0.1", "--reference-runs", *refs]) == 0
    out = capsys.readouterr().out
    # rank ceil(20 * 0.9) = 18 -> the 18th smallest peak, 0.90; the scripted run reaches 0.9, never above it
    assert "stop threshold 0.9 from 19 reference runs" in out and "completed 20 steps without stopping" in out
    with pytest.raises(ValueError, match="at least 39 in-domain reference runs"):
        _run(md, base + ["--false-alarm-rate", "0.025", "--reference-runs", *refs])
    with pytest.raises(ValueError, match="go together"):
        _run(md, base + ["--reference-runs", *refs])
    # a rate below 1/20 with the extreme-value fit: the Gumbel 97.5 % quantile of the peaks 0.05..0.95
    from scipy.stats import gumbel_r

    expected = gumbel_r(*gumbel_r.fit(0.05 * np.arange(1, 20))).ppf(0.975)
    assert _run(md, base + ["--false-alarm-rate", "0.025", "--threshold-method", "gumbel",
                            "--reference-runs", *refs]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("stop threshold"))
    assert float(line.split()[2]) == pytest.approx(expected, rel=1e-4) and "gumbel" in line


def test_md_element_quantile_scales_each_element_by_its_reference_range(tmp_path, capsys):
    # 19 reference runs of 3 steps: every Cu atom at 1.0; the O atom at 0.01 except 0.05 (r + 1) at step 1
    slab = make_slab()  # 12 Cu, then O

    def values(r, step):
        v = np.full(len(slab), 1.0)
        v[-1] = 0.05 * (r + 1) if step == 1 else 0.01
        return v

    refs = _write_reference_runs(tmp_path, slab, values)
    base = ["--factory", "sim_standins:scripted_md_calculator", "--structure", tmp_path / "start.extxyz",
            "--steps", "20", "--trajectory", tmp_path / "md.extxyz", "--false-alarm-rate", "0.15",
            "--reference-runs", *refs]
    # raw: every run peaks at 1.0 (a Cu atom); the scripted run's max is 0.9: no stop
    assert _run(md, base) == 0
    assert "completed 20 steps without stopping" in capsys.readouterr().out
    # median scales: Cu 1.0; O: 38 of its 57 values are 0.01 -> 0.01. Normalised peaks 5, 10, ..., 95;
    # rank ceil(20 * 0.85) = 17 -> 85. The scripted O atom: 0.1 / 0.01 = 10, then 0.9 / 0.01 = 90 > 85
    assert _run(md, base + ["--element-quantile", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "stop threshold 85 from 19 reference runs" in out and "Z=8: 0.01, Z=29: 1" in out
    assert "stopped at step 5" in out and "element-normalised" in out
    with pytest.raises(ValueError, match="--element-quantile needs --reference-runs"):
        _run(md, base[:8] + ["--stop-threshold", "1", "--element-quantile", "0.5"])
