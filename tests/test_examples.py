"""The scripts in examples/ run as a user runs them, against a `--quick` demo output made once here.

Each example is a subprocess with small settings; the checks read what it wrote back from disk and
verify it independently of the package (file hashes, the stop condition, the uncertainty contract).
"""
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nequip")
pytestmark = pytest.mark.slow

from ase.db import connect  # noqa: E402
from ase.io import read  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def demo_dir(quick_demo_dir):
    return quick_demo_dir


def run_example(name: str, demo_dir: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), "--demo-dir", str(demo_dir), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def test_relax_with_uncertainty(demo_dir, tmp_path):
    stdout = run_example("relax_with_uncertainty.py", demo_dir, "--steps", "15", "--output", str(tmp_path))
    nsteps = int(re.search(r"nsteps=(\d+)", stdout).group(1))
    assert 1 <= nsteps <= 15
    # the BFGS trajectory holds the initial structure and every step
    assert len(read(tmp_path / "relax.traj", index=":")) == nsteps + 1
    back = read(tmp_path / "relaxed_with_uq.extxyz", format="extxyz")
    u, p = back.arrays["ltau_uncertainties"], back.arrays["ltau_confidences"]
    assert u.shape == (len(back),) and np.all((u >= 0) & (u <= 1))
    np.testing.assert_allclose(u, 1.0 - p, atol=1e-7)
    assert np.all(back.arrays["ltau_expected_force_errors"] >= 0)
    assert back.info["ltau_max_uncertainty"] == pytest.approx(u.max())
    # uq_final = mean uncertainty of the free atoms (FixAtoms read back from move_mask) at the end
    free = np.ones(len(back), dtype=bool)
    free[[i for c in back.constraints for i in c.get_indices()]] = False
    assert 0 < free.sum() < len(back)
    assert back.info["ltau_uq_final"] == pytest.approx(u[free].mean(), rel=1e-6)  # extxyz keeps ~8 digits
    assert back.info["ltau_uq_nsteps"] == nsteps


def test_md_uncertainty_stop_fires_after_patience(demo_dir, tmp_path):
    # threshold 0: every mean uncertainty exceeds it, so the stop fires at the 3rd check (step 2)
    stdout = run_example("md_uncertainty_stop.py", demo_dir, "--threshold", "0", "--patience", "3",
                         "--steps", "50", "--output", str(tmp_path))
    assert "on_trigger: step 2" in stdout and "stopped at step 2 of 50" in stdout
    frames = read(tmp_path / "md.extxyz", index=":")
    assert [f.info["md_step"] for f in frames] == [0, 1, 2]
    for f in frames:
        assert f.arrays["ltau_uncertainties"].mean() > 0
        assert f.get_forces().shape == (len(f), 3)
    saved = read(tmp_path / "uncertain_frames.extxyz", index=":")
    assert len(saved) == 1 and saved[0].info["ltau_stop_step"] == 2
    np.testing.assert_allclose(saved[0].get_positions(), frames[-1].get_positions(), atol=1e-6)


def test_batch_relax_and_report_resumes(demo_dir, tmp_path):
    stdout = run_example("batch_relax_and_report.py", demo_dir, "--max-systems", "1", "--steps", "8",
                         "--output", str(tmp_path))
    first = re.search(r"first run: \{'done': (\d+), 'unconverged': (\d+), 'failed': (\d+)", stdout)
    assert sum(map(int, first.groups())) == 2
    assert "re-run: {'done': 0, 'unconverged': 0, 'failed': 0, 'skipped': 2, 'busy': 0, 'total': 2}" in stdout
    rows = list(connect(str(tmp_path / "is2rs.db")).select())
    assert sorted(r.group for r in rows) == ["in_domain", "out_of_domain"]  # one row each, no duplicates
    assert all(r.nsteps <= 8 and 0 <= r.uq_initial <= 1 for r in rows)
    assert (tmp_path / "rmsd_vs_uq.png").stat().st_size > 0
    assert '"adwt"' in (tmp_path / "is2rs_metrics.json").read_text()


def test_fit_estimator_from_runs(demo_dir, tmp_path):
    from ltau_ase.core.estimator import LTAUEstimator

    path = tmp_path / "my.ltau"
    stdout = run_example("fit_estimator_from_runs.py", demo_dir, "--k", "5", "--output", str(path))
    est = LTAUEstimator.load(path)
    model = demo_dir / "models" / "member1" / "run" / "last.ckpt"
    assert est.metadata["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert est.k == 5 and est.metadata["n_runs"] == 3 and est.metadata["epoch_window"] == {"skip": 1, "last": None}
    n_atoms = sum(len(a) for a in read(demo_dir / "data" / "train.extxyz", index=":"))
    assert est.n_train_atoms_ == n_atoms
    scale, before, after = map(float, re.search(
        r"s=([\d.]+), miscalibration area ([\d.]+) -> ([\d.]+)", stdout).groups())
    assert est.scale_ == pytest.approx(scale, abs=1e-3) and after <= before + 1e-3
