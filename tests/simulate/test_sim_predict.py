"""`ltau predict` / predict_batch: per-atom UQ of many structures on Dask into an ase.db; a run killed
mid-way and resumed scores every structure exactly once; values checked against EMT and the
stand-in estimator's closed form."""
from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.db import connect
from ase.io import write

from sim_standins import StandInFactory, batch_systems, expected_uncertainty
from ltau_ase.cli import main as cli_main
from ltau_ase.simulate.predict import load_predictions, predict_batch

HERE = Path(__file__).resolve().parent
N_GOOD = 40  # + 'overlap' and 'unknown': 42 structures, 21 chunks of 2
SCRIPT = f"""
import sys
sys.path.insert(0, {str(HERE)!r})
from sim_standins import StandInFactory, batch_systems
from ltau_ase.simulate.predict import predict_batch
predict_batch(batch_systems(n={N_GOOD}), sys.argv[1], StandInFactory(delay=0.05), chunk_size=2, progress=False)
"""


@dataclass  # eq without frozen: instances are unhashable
class UnhashableFactory:
    def __call__(self):
        return StandInFactory()()


def _rows(db_path):
    with connect(db_path) as db:
        return {row.get("name"): (row.id, row.ctime) for row in db.select(include_data=False)}


def _check_scored(atoms):
    """Independent references: EMT energy/forces, the stand-in UQ formula on (z - mean z, Z / 10)."""
    ref = atoms.copy()
    ref.calc = EMT()
    np.testing.assert_allclose(atoms.get_forces(), ref.get_forces(), atol=1e-10)
    assert atoms.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-10)
    z = atoms.positions[:, 2]
    u = expected_uncertainty(np.stack([z - z.mean(), atoms.numbers / 10.0], 1))
    np.testing.assert_allclose(atoms.arrays["ltau_uncertainties"], u, rtol=1e-6)  # descriptors pass through float32
    np.testing.assert_allclose(atoms.arrays["ltau_confidences"], 1 - u, rtol=1e-6)  # descriptors pass through float32
    assert atoms.info["ltau_max_uncertainty"] == pytest.approx(u.max(), rel=1e-6)
    assert atoms.info["ltau_mean_uncertainty"] == pytest.approx(u.mean(), rel=1e-6)


def test_predict_killed_mid_run_then_resumed_scores_each_structure_once(tmp_path):
    db_path = str(tmp_path / "uq.db")
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, db_path], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    systems = batch_systems(n=N_GOOD)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if os.path.exists(db_path) and len(_rows(db_path)) >= 6:
                break
        except sqlite3.OperationalError:  # the writer holds the lock (or is creating the tables): poll again
            pass
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    before = _rows(db_path)
    assert 6 <= len(before) < len(systems), f"killed after {len(before)} of {len(systems)}"
    assert len(before) % 2 == 0  # chunks of 2 are committed whole or not at all

    counts = predict_batch(systems, db_path, StandInFactory(), n_workers=2, chunk_size=3, progress=False)
    after = _rows(db_path)
    assert sorted(after) == sorted(a.info["name"] for a in systems)  # every structure, exactly once
    assert len(after) == len(systems)
    assert all(after[k] == v for k, v in before.items())  # rows from before the kill are untouched
    assert counts == {"done": counts["done"], "failed": counts["failed"], "skipped": len(before), "busy": 0,
                      "total": len(systems)}
    assert counts["done"] + counts["failed"] == len(systems) - len(before)
    again = predict_batch(systems, db_path, StandInFactory(), progress=False)
    assert again["skipped"] == len(systems) and len(_rows(db_path)) == len(systems)

    scored = {a.info["name"]: a for a in load_predictions(db_path)}
    assert set(scored) == {a.info["name"] for a in systems} - {"overlap", "unknown"}
    inputs = {a.info["name"]: a for a in systems}
    for name, atoms in scored.items():
        np.testing.assert_allclose(atoms.positions, inputs[name].positions)  # scored as given, not moved
        _check_scored(atoms)
    failed = {a.info["name"]: a.info["reason"] for a in load_predictions(db_path, statuses=("failed",))}
    assert "exploding forces" in failed["overlap"] and "never seen" in failed["unknown"]


def test_predict_cli_from_extxyz_and_bad_inputs(tmp_path, capsys):
    systems = batch_systems(n=4)
    write(tmp_path / "in.extxyz", systems)
    db = tmp_path / "uq.db"
    argv = ["predict", "--factory", "sim_standins:STANDIN_FACTORY", "--structures", str(tmp_path / "in.extxyz"),
            "--db", str(db), "--no-progress"]
    assert cli_main(argv) == 0
    assert "6 structures: 4 scored, 2 failed, 0 already in" in capsys.readouterr().out
    for atoms in load_predictions(db):
        _check_scored(atoms)
    assert cli_main(argv + ["--retry-failed"]) == 0
    assert "6 structures: 0 scored, 2 failed, 4 already in" in capsys.readouterr().out
    assert len(_rows(str(db))) == 6

    assert cli_main(argv[:4] + [str(tmp_path / "missing.extxyz"), "--db", str(db)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ltau predict: error:") and "does not exist" in err and "\n" not in err
    with pytest.raises(SystemExit) as exit_info:  # refused by the argument parser, one line
        cli_main(argv + ["--chunk-size", "0"])
    assert exit_info.value.code == 2
    assert "--chunk-size: expected a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        predict_batch(systems, db, StandInFactory(), chunk_size=0, progress=False)
    assert cli_main(["predict", "--structures", str(tmp_path / "in.extxyz"), "--db", str(db)]) == 2
    assert "--model and --estimator are required" in capsys.readouterr().err
    with pytest.raises(TypeError, match="hashable"):
        predict_batch(systems, db, UnhashableFactory(), progress=False)
