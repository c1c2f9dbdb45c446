"""Batch relaxations on Dask with an SQLite ase.db: kill + resume, failures, contents, bad inputs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.db import connect
from ase.io import write

import sim_standins
from sim_standins import StandInFactory, batch_systems, expected_uncertainty, make_slab
from ltau_ase.simulate.batch import (
    OC20_LBFGS,
    RelaxationFailure,
    _check_finite,
    content_name,
    load_results,
    make_optimizer,
    read_structures,
    relax_batch,
)

HERE = Path(__file__).resolve().parent
SCRIPT = f"""
import sys
sys.path.insert(0, {str(HERE)!r})
from sim_standins import StandInFactory, batch_systems
from ltau_ase.simulate.batch import relax_batch
relax_batch(batch_systems(), sys.argv[1], StandInFactory(delay=0.03), progress=False, n_workers=1)
"""


def _names(db_path):
    with connect(db_path) as db:
        return [row.get("name") for row in db.select(include_data=False)]


def test_batch_killed_halfway_then_resumed_gives_each_system_once(tmp_path):
    db_path = str(tmp_path / "relax.db")
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, db_path], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    n_total = len(batch_systems())
    deadline = time.monotonic() + 90
    n = 0
    while time.monotonic() < deadline and proc.poll() is None:
        n = len(_names(db_path)) if os.path.exists(db_path) else 0
        if n >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the batch ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    before = {row.get("name"): (row.id, row.ctime) for row in connect(db_path).select(include_data=False)}
    assert 3 <= len(before) < n_total, f"killed after {len(before)} of {n_total} systems"

    sim_standins.FACTORY_CALLS.clear()
    counts = relax_batch(batch_systems(), db_path, StandInFactory(), progress=False, n_workers=2)
    names = _names(db_path)
    assert sorted(names) == sorted(a.info["name"] for a in batch_systems())  # each exactly once
    assert counts["skipped"] == len(before) and counts["total"] == n_total
    assert counts["done"] + counts["unconverged"] + counts["failed"] == n_total - len(before)
    # rows from before the kill are kept as they were, not rewritten
    after = {row.get("name"): (row.id, row.ctime) for row in connect(db_path).select(include_data=False)}
    assert all(after[k] == v for k, v in before.items())
    # calculators were built once per worker thread, not once per system
    assert 1 <= len(sim_standins.FACTORY_CALLS) == len(set(sim_standins.FACTORY_CALLS)) <= 2
    # a third run does nothing
    again = relax_batch(batch_systems(), db_path, StandInFactory(), progress=False)
    assert again["skipped"] == n_total and len(_names(db_path)) == n_total

    records = {r["name"]: r for r in load_results(db_path)}
    assert records["overlap"]["status"] == "failed"
    assert "exploding forces" in records["overlap"]["reason"]
    assert records["unknown"]["status"] == "failed" and "never seen" in records["unknown"]["reason"]
    for name, rec in records.items():
        if name in ("overlap", "unknown"):
            continue
        assert rec["status"] == "done" and rec["converged"], (name, rec["reason"])
        atoms = rec["atoms"]
        free = atoms.get_tags() > 0
        # independent checks: EMT forces on the stored final structure, stand-in UQ formula
        ref = atoms.copy()
        ref.calc = EMT()
        assert np.linalg.norm(ref.get_forces(), axis=1).max() <= 0.05 + 1e-9
        np.testing.assert_allclose(atoms.get_forces(), ref.get_forces(), atol=1e-10)
        z = atoms.positions[:, 2]
        d = np.stack([z - z.mean(), atoms.numbers / 10.0], 1)
        assert rec["uq_final"] == pytest.approx(expected_uncertainty(d)[free].mean(), rel=1e-6)
        np.testing.assert_allclose(rec["per_atom"]["ltau_uncertainties"], expected_uncertainty(d), rtol=1e-6)
        t = rec["trace"]
        assert len(t) == rec["nsteps"] + 1
        assert (rec["uq_initial"], rec["uq_max"], rec["uq_mean"], rec["uq_final"]) == pytest.approx(
            (t[0], t.max(), t.mean(), t[-1]))
        assert rec["wall_time"] > 0 and rec["group"] in ("in", "out")
        assert atoms.constraints and np.array_equal(atoms.constraints[0].get_indices(), np.flatnonzero(~free))


def test_batch_from_extxyz_with_references_and_retry(tmp_path):
    systems = batch_systems(n=3, bad=False)
    write(tmp_path / "init.extxyz", systems)
    refs = []
    for a in systems:
        r = a.copy()
        r.positions[:, 2] += 0.01
        refs.append(r)
    write(tmp_path / "refs.extxyz", refs[:2])  # the last system has no reference
    db_path = tmp_path / "r.db"
    counts = relax_batch(str(tmp_path / "init.extxyz"), db_path, StandInFactory(), optimizer="oc20",
                         references=str(tmp_path / "refs.extxyz"), progress=False, steps=2)
    assert counts["unconverged"] == 3  # 2 steps are not enough
    recs = load_results(db_path)
    assert [r["status"] for r in recs] == ["unconverged"] * 3 and all(r["nsteps"] == 2 for r in recs)
    assert "not converged in 2 steps" in recs[0]["reason"]
    by_name = {r["name"]: r for r in recs}
    ref = by_name["sys00"]["reference"]
    np.testing.assert_allclose(ref.positions, refs[0].positions, atol=1e-7)  # extxyz digits
    assert np.array_equal(ref.constraints[0].get_indices(), systems[0].constraints[0].get_indices())
    assert by_name["sys02"]["reference"] is None
    with pytest.raises(ValueError, match="statuses"):
        load_results(db_path, statuses=["ok"])
    # retry_failed deletes failed rows and relaxes them again; other rows stay
    with connect(db_path) as db:
        db.update(1, status="failed")
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:  # an "existing" cluster
        counts = relax_batch(str(tmp_path / "init.extxyz"), db_path, StandInFactory(), retry_failed=True,
                             progress=False, steps=2, scheduler=cluster.scheduler_address)
    assert counts["skipped"] == 2 and counts["unconverged"] == 1 and len(_names(db_path)) == 3


def test_read_structures_from_ase_db(tmp_path):
    systems = batch_systems(n=2, bad=False)
    with connect(tmp_path / "in.db") as db:
        db.write(systems[0], name="first")
        db.write(systems[1])  # no name: derived from its content
    pairs = read_structures(tmp_path / "in.db")
    assert [n for n, _ in pairs] == ["first", content_name(systems[1])]
    np.testing.assert_array_equal(pairs[0][1].get_tags(), systems[0].get_tags())
    np.testing.assert_allclose(pairs[1][1].positions, systems[1].positions)
    assert pairs[0][1].constraints[0].get_indices().tolist() == systems[0].constraints[0].get_indices().tolist()


def test_batch_bad_inputs(tmp_path):
    systems = batch_systems(n=2, bad=False)
    dup = systems + [systems[0].copy()]
    with pytest.raises(ValueError, match="duplicate structure name 'sys00'"):
        relax_batch(dup, tmp_path / "x.db", StandInFactory(), progress=False)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        relax_batch(systems, tmp_path / "x.db", StandInFactory(), optimizer="GPMin", progress=False)
    with pytest.raises(TypeError, match="hashable"):
        relax_batch(systems, tmp_path / "x.db", type("F", (), {"__call__": lambda s: EMT(), "__hash__": None})(),
                    progress=False)
    wrong = make_slab(size=(2, 2, 3))
    wrong.info["name"] = "sys00"
    with pytest.raises(ValueError, match="reference for 'sys00' has 13 atoms, the initial structure 9"):
        relax_batch(systems, tmp_path / "x.db", StandInFactory(), references=[wrong], progress=False)
    with pytest.raises(FileNotFoundError):
        read_structures(tmp_path / "missing.extxyz")
    with pytest.raises(ValueError, match="key must be one of"):
        relax_batch(systems, tmp_path / "x.db", StandInFactory(), key="uncertainty", progress=False)
    with pytest.raises(ValueError, match="fmax"):
        relax_batch(systems, tmp_path / "x.db", StandInFactory(), fmax=-1, progress=False)
    assert not (tmp_path / "x.db").exists()  # nothing was written for refused inputs


def test_failure_guard_and_oc20_optimizer(monkeypatch):
    a = make_slab()
    a.calc = SinglePointCalculator(a, energy=float("nan"), forces=np.zeros((len(a), 3)))
    with pytest.raises(RelaxationFailure, match="non-finite energy"):
        _check_finite(a, 1e3)
    f = np.zeros((len(a), 3))
    f[2, 1] = np.inf
    a.calc = SinglePointCalculator(a, energy=0.0, forces=f)
    with pytest.raises(RelaxationFailure, match="non-finite forces on 1 atom"):
        _check_finite(a, 1e3)
    a.calc = EMT()
    import ase.optimize

    seen = {}

    class SpyLBFGS(ase.optimize.LBFGS):
        def __init__(self, atoms, **kwargs):
            seen.update(kwargs)
            super().__init__(atoms, **kwargs)

    monkeypatch.setattr(ase.optimize, "LBFGS", SpyLBFGS)
    opt = make_optimizer(a, "oc20")
    assert isinstance(opt, SpyLBFGS) and opt.maxstep == 0.04
    assert {k: seen[k] for k in OC20_LBFGS} == {"maxstep": 0.04, "memory": 50, "damping": 1.0, "alpha": 70.0}
