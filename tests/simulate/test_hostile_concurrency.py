"""Class 5 of issue 9, as a hostile user: two runs on one database never store a system twice.

Before: two ``ltau relax`` processes on one database both relaxed and stored every system, and both
reported success (the name check and the write were separate steps). Now each run claims its systems
in one SQLite transaction, SQLite itself refuses a second row for a name (a unique index), and a
claim of a process that died is taken over.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ase.db import connect

from sim_standins import StandInFactory, batch_systems
from ltau_ase.simulate.batch import (
    CLAIMS_TABLE,
    ClaimOwner,
    _write_row,
    claim_systems,
    load_results,
    open_store,
    relax_batch,
    RelaxSettings,
)

HERE = Path(__file__).resolve().parent
N_SYSTEMS = 6
RELAX = f"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, {str(HERE)!r})
from sim_standins import StandInFactory, batch_systems
from ltau_ase.simulate.batch import relax_batch
Path(sys.argv[2]).touch()  # imports done: ready
while not Path(sys.argv[3]).exists():
    time.sleep(0.005)
counts = relax_batch(batch_systems(n={N_SYSTEMS}, bad=False), sys.argv[1], StandInFactory(delay=0.01),
                     progress=False, steps=4)
print(json.dumps(counts))
"""
CLAIM_AND_WAIT = """
import sys, time
from ltau_ase.simulate.batch import ClaimOwner, claim_systems, open_store
open_store(sys.argv[1])
claimed, _, _ = claim_systems(sys.argv[1], sys.argv[2].split(","), ClaimOwner.this_process())
print(",".join(claimed), flush=True)
time.sleep(600)
"""


def _names(db_path):
    with connect(db_path) as db:
        return [row.get("name") for row in db.select(include_data=False)]


def _relaxed(counts):
    return counts["done"] + counts["unconverged"] + counts["failed"]


def test_two_real_processes_on_one_database_store_each_system_once(tmp_path):
    db_path = tmp_path / "shared.db"
    go = tmp_path / "go"
    procs = []
    for i in range(2):
        procs.append(subprocess.Popen([sys.executable, "-c", RELAX, str(db_path), str(tmp_path / f"ready{i}"), str(go)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), procs[0].stderr.read()[-2000:]
        time.sleep(0.01)
    go.touch()  # both start at once
    outputs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    counts = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    names = _names(db_path)
    assert sorted(names) == sorted(a.info["name"] for a in batch_systems(n=N_SYSTEMS, bad=False))  # once each
    assert sum(_relaxed(c) for c in counts) == N_SYSTEMS  # no system relaxed and counted twice
    for c in counts:  # every system accounted for by each process: relaxed here, already there, or left
        assert _relaxed(c) + c["skipped"] + c["busy"] == N_SYSTEMS == c["total"]
    with sqlite3.connect(db_path) as con:
        assert con.execute(f"SELECT COUNT(*) FROM {CLAIMS_TABLE}").fetchone()[0] == 0  # all claims ended


def test_sqlite_refuses_a_second_row_for_a_name_whatever_writes_it(tmp_path):
    db_path = tmp_path / "r.db"
    db = open_store(db_path)
    atoms = batch_systems(n=1, bad=False)[0]
    result = {"name": "sys00", "status": "done", "reason": "", "converged": True, "nsteps": 1,
              "wall_time": 0.1, "atoms": atoms, "summary": None, "trace": None, "per_atom": {}}
    assert _write_row(db, result, atoms, RelaxSettings(), None) > 0
    assert _write_row(db, result, atoms, RelaxSettings(), None) == 0  # our own writer: refused, reported
    with pytest.raises(sqlite3.IntegrityError):  # ASE directly, bypassing every check of ours
        connect(db_path).write(atoms, name="sys00", status="done")
    assert _names(db_path) == ["sys00"]
    connect(db_path).write(atoms, name="other")  # other names still go in
    assert sorted(_names(db_path)) == ["other", "sys00"]


def test_database_with_duplicates_from_before_is_refused_clearly(tmp_path):
    db_path = tmp_path / "old.db"
    atoms = batch_systems(n=1, bad=False)[0]
    with connect(db_path) as db:  # as an old version racing with itself left it
        db.write(atoms, name="sys00", status="done")
        db.write(atoms, name="sys00", status="done")
    with pytest.raises(ValueError, match=r"several rows for the names \['sys00'\]"):
        relax_batch(batch_systems(n=1, bad=False), db_path, StandInFactory(), progress=False)


def test_live_claim_is_left_alone_and_dead_claim_is_taken_over(tmp_path):
    db_path = tmp_path / "r.db"
    systems = batch_systems(n=3, bad=False)
    held = [systems[0].info["name"], systems[1].info["name"]]
    other = subprocess.Popen([sys.executable, "-c", CLAIM_AND_WAIT, str(db_path), ",".join(held)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = other.stdout.readline().strip()
        assert line.split(",") == held, other.stderr.read()[-2000:]
        with pytest.warns(UserWarning, match="2 system.* claimed by another running process"):
            counts = relax_batch(systems, db_path, StandInFactory(), progress=False, steps=3)
        assert counts["busy"] == 2 and _relaxed(counts) == 1 and _names(db_path) == [systems[2].info["name"]]
    finally:
        os.kill(other.pid, signal.SIGKILL)
        other.wait(timeout=30)
        other.stdout.close()
        other.stderr.close()
    counts = relax_batch(systems, db_path, StandInFactory(), progress=False, steps=3)  # the holder is dead
    assert counts["busy"] == 0 and _relaxed(counts) == 2 and counts["skipped"] == 1
    assert sorted(_names(db_path)) == sorted(a.info["name"] for a in systems)


def test_recycled_pid_and_foreign_host_claims(tmp_path):
    db_path = tmp_path / "r.db"
    open_store(db_path)
    me = ClaimOwner.this_process()
    recycled = ClaimOwner(token="old", host=socket.gethostname(), pid=os.getpid(), started=1.0)  # not this process
    remote = ClaimOwner(token="far", host="another-host.invalid", pid=1, started=1.0)
    assert claim_systems(db_path, ["a"], recycled)[0] == ["a"]
    assert claim_systems(db_path, ["b"], remote)[0] == ["b"]
    claimed, already, busy = claim_systems(db_path, ["a", "b"], me)
    assert claimed == ["a"] and already == []  # a pid now running another process does not hold a claim
    assert busy == {"b": "pid 1 on another-host.invalid"}  # another host cannot be checked: left alone


def test_rows_of_a_finished_run_are_not_claimed_again(tmp_path):
    db_path = tmp_path / "r.db"
    systems = batch_systems(n=2, bad=False)
    relax_batch(systems, db_path, StandInFactory(), progress=False, steps=2)
    claimed, already, busy = claim_systems(db_path, [a.info["name"] for a in systems], ClaimOwner.this_process())
    assert claimed == [] and sorted(already) == sorted(a.info["name"] for a in systems) and busy == {}
    assert len(load_results(db_path)) == 2
