"""``ltau calibrate`` end to end on the tiny real nequip run (issue 11 contract and bad inputs)."""
from __future__ import annotations

import numpy as np
import pytest
from ase.io import read, write

from ltau_ase.cli import main
from ltau_ase.core.estimator import MIN_CALIBRATION_ATOMS, LTAUEstimator
from ltau_ase.nequip.fit import fit_estimator_from_runs


@pytest.fixture(scope="module")
def tiny_estimator(tiny_nequip_run, tmp_path_factory):
    run = tiny_nequip_run
    path = tmp_path_factory.mktemp("calibrate") / "est.ltau"
    fit_estimator_from_runs([run.error_log_dir], run.train_files, path, k=3, model=run.checkpoint, progress=False)
    return path


def test_ltau_calibrate_end_to_end(tiny_nequip_run, tiny_estimator, tmp_path, capsys):
    cal_file = tiny_nequip_run.train_files[1]  # 30 labelled frames of 13 atoms
    out = tmp_path / "cal.ltau"
    rc = main(["calibrate", "--estimator", str(tiny_estimator), "--calibration-file", str(cal_file),
               "--output", str(out), "--k-grid", "1,3,8"])
    text = capsys.readouterr().out
    assert rc == 0 and "k by miscalibration" in text and f"wrote {out}" in text
    est = LTAUEstimator.load(out)
    frames = read(cal_file, index=":")
    n = sum(len(a) for a in frames)
    assert est.is_calibrated and est.k in (1, 3, 8) and est.calibration_info_["n_atoms"] == n
    assert est.calibration_info_["split"] == "structures"
    # the stored calibration predicts from the model's descriptors: bounds are finite and positive
    from ltau_ase.simulate.calculator import LTAUCalculator

    calc = LTAUCalculator.from_nequip(tiny_nequip_run.checkpoint, out, coverage=0.9)
    atoms = frames[0].copy()
    atoms.calc = calc
    bounds = calc.get_property("force_error_bounds", atoms)
    assert bounds.shape == (len(atoms),) and np.all(np.isfinite(bounds)) and np.all(bounds > 0)


def test_ltau_calibrate_refuses_bad_inputs(tiny_nequip_run, tiny_estimator, tmp_path, capsys):
    cal_file = tiny_nequip_run.train_files[1]
    frames = read(cal_file, index=":")
    base = ["calibrate", "--estimator", str(tiny_estimator), "--output", str(tmp_path / "x.ltau")]

    def error(argv):
        try:
            code = main(base + argv)
        except SystemExit as exc:  # argparse refuses bad option values itself, with exit code 2
            code = exc.code
        assert code == 2
        return capsys.readouterr().err

    assert "--coverage: expected a number in (0, 1), got 1.0" in error(["--calibration-file", str(cal_file), "--coverage", "1.0"])
    unlabelled = [a.copy() for a in frames]  # copies carry no calculator: no reference forces
    write(tmp_path / "nolabels.extxyz", unlabelled)
    assert "has no reference forces" in error(["--calibration-file", str(tmp_path / "nolabels.extxyz")])
    write(tmp_path / "small.extxyz", frames[:5])
    assert f"at least {MIN_CALIBRATION_ATOMS}" in error(["--calibration-file", str(tmp_path / "small.extxyz")])
    other = tiny_nequip_run.run_dir / "epochs" / "epoch0000.ckpt"
    assert "was fitted for a model with sha256" in error(["--calibration-file", str(cal_file), "--model", str(other)])
    assert not (tmp_path / "x.ltau").exists()
