"""Class 7 of issue 9, as a hostile user: every CLI failure is one line on stderr with exit status 2.

Whatever goes wrong (a permission, a corrupt or foreign SQLite file, an empty or garbled extxyz, an
unreachable scheduler, a missing factory module, running out of memory) the command prints
``ltau <command>: error: ...`` on one line and exits 2; ``--debug`` shows the traceback instead.
Checks run before the expensive work: nothing is relaxed, fitted or written when an argument is bad.
The in-process Dask cluster listens on 127.0.0.1 only and serves no dashboard unless asked.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from ase.io import write

from sim_standins import StandInFactory, batch_systems, make_slab
from ltau_ase.cli import main
from ltau_ase.simulate.batch import relax_batch
from ltau_ase.simulate.observers import UncertaintyStop

HERE = Path(__file__).resolve().parent
UNWRITABLE = Path("/proc/ltau-cannot-write-here")  # no file can be created under /proc, even as root


# ----------------------------------------------------------------------------- factories that fail
def _raises(exc):
    def factory():
        raise exc
    return factory


raise_permission = _raises(PermissionError(13, "Permission denied", "/models/m.ckpt"))
raise_memory = _raises(MemoryError())
raise_runtime = _raises(RuntimeError("CUDA error: device-side assert\ntriggered"))
raise_key = _raises(KeyError("species"))
raise_os = _raises(OSError(28, "No space left on device"))
raise_interrupt = _raises(KeyboardInterrupt())
not_callable = 42


@dataclass(frozen=True)
class ListeningSockets:
    """Factory that records the sockets this process listens on while the batch runs."""

    def __call__(self):
        import psutil

        seen = {c.laddr.ip for c in psutil.Process().net_connections() if c.status == "LISTEN"}
        LISTENING.update(seen)
        return StandInFactory()()


LISTENING: set = set()


def _one_line(capsys, command):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"ltau {command}: error: ")
    return err[0]


@pytest.fixture
def structure(tmp_path):
    write(tmp_path / "start.extxyz", make_slab())
    return tmp_path / "start.extxyz"


@pytest.fixture
def batch_file(tmp_path):
    write(tmp_path / "init.extxyz", batch_systems(n=2, bad=False))
    return tmp_path / "init.extxyz"


def _md(structure, tmp_path, *extra):
    return ["md", "--structure", str(structure), "--stop-threshold", "0.5", "--steps", "3",
            "--trajectory", str(tmp_path / "md.extxyz"), *extra]


def _relax(batch_file, tmp_path, *extra, factory="sim_standins:STANDIN_FACTORY"):
    return ["relax", "--factory", factory, "--structures", str(batch_file), "--db", str(tmp_path / "r.db"),
            "--no-progress", "--steps", "2", *extra]


# ----------------------------------------------------------------------------- every exception type
@pytest.mark.parametrize("factory, expected", [
    ("test_hostile_cli:raise_permission", "PermissionError: [Errno 13] Permission denied: '/models/m.ckpt'"),
    ("test_hostile_cli:raise_memory", "out of memory (MemoryError)"),
    ("test_hostile_cli:raise_runtime", "RuntimeError: CUDA error: device-side assert triggered"),
    ("test_hostile_cli:raise_key", "KeyError: 'species'"),
    ("test_hostile_cli:raise_os", "OSError: [Errno 28] No space left on device"),
    ("no_such_module_xyz:make", "cannot import module 'no_such_module_xyz'"),
    ("test_hostile_cli:no_such_name", "has no attribute 'no_such_name'"),
    ("test_hostile_cli:not_callable", "is a int, not a callable"),
])
@pytest.mark.parametrize("command", ["md", "relax"])
def test_any_exception_is_one_line_and_status_2(command, factory, expected, structure, batch_file, tmp_path, capsys):
    argv = (_md(structure, tmp_path, "--factory", factory) if command == "md"
            else _relax(batch_file, tmp_path, factory=factory))
    assert main(argv) == 2
    assert expected in _one_line(capsys, command)
    assert not (tmp_path / "r.db").exists()  # relax: the factory is tried before any system is submitted


def test_debug_shows_the_traceback(structure, tmp_path, monkeypatch):
    argv = _md(structure, tmp_path, "--factory", "test_hostile_cli:raise_runtime")
    with pytest.raises(RuntimeError, match="CUDA error"):
        main([*argv, "--debug"])
    with pytest.raises(RuntimeError, match="CUDA error"):
        main(["--debug", *argv])
    monkeypatch.setenv("LTAU_DEBUG", "1")
    with pytest.raises(RuntimeError, match="CUDA error"):
        main(argv)


def test_interrupt_is_one_line_and_status_130(structure, tmp_path, capsys):
    assert main(_md(structure, tmp_path, "--factory", "test_hostile_cli:raise_interrupt")) == 130
    assert capsys.readouterr().err.strip() == "ltau md: interrupted"


# ----------------------------------------------------------------------------- bad files
@pytest.mark.parametrize("content", [b"", b"\x00\xff garbage \x13\x37" * 50, b"3\ncomment\nH 0 0\n",
                                     b"not a number\n\nH 0 0 0\n"])
def test_empty_or_garbled_extxyz(content, tmp_path, capsys):
    bad = tmp_path / "bad.extxyz"
    bad.write_bytes(content)
    assert main(_relax(bad, tmp_path)) == 2
    line = _one_line(capsys, "relax")
    assert "cannot read structures" in line or "no structures" in line
    assert main(_md(bad, tmp_path, "--factory", "sim_standins:scripted_md_calculator")) == 2
    line = _one_line(capsys, "md")
    assert "cannot read a structure" in line or "holds no atoms" in line


@pytest.mark.parametrize("which", ["--db", "--structures"])
def test_corrupt_or_foreign_sqlite(which, batch_file, tmp_path, capsys):
    bad = tmp_path / "corrupt.db"
    bad.write_bytes(b"SQLite format 3\x00" + os.urandom(3000))
    argv = _relax(batch_file, tmp_path)
    argv[argv.index(which) + 1] = str(bad)
    assert main(argv) == 2
    assert "database" in _one_line(capsys, "relax")


@pytest.mark.parametrize("where", ["unwritable", "directory", "file as parent"])
def test_unusable_db_path_fails_before_any_work(where, batch_file, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    target = {"unwritable": UNWRITABLE / "r.db", "directory": tmp_path,
              "file as parent": tmp_path / "a_file" / "r.db"}[where]
    argv = _relax(batch_file, tmp_path)
    argv[argv.index("--db") + 1] = str(target)
    assert main(argv) == 2
    assert "--db" in _one_line(capsys, "relax")


def test_unreachable_scheduler(batch_file, tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(_relax(batch_file, tmp_path, "--scheduler", f"tcp://127.0.0.1:{port}", "--scheduler-timeout", "1")) == 2
    assert "ConnectionError: cannot reach the Dask scheduler" in _one_line(capsys, "relax")


def test_garbage_model_and_estimator_fail_before_any_system_is_submitted(batch_file, tmp_path, capsys):
    (tmp_path / "m.ckpt").write_bytes(b"garbage")
    (tmp_path / "e.ltau").write_bytes(b"garbage")
    argv = ["relax", "--model", str(tmp_path / "m.ckpt"), "--estimator", str(tmp_path / "e.ltau"),
            "--structures", str(batch_file), "--db", str(tmp_path / "r.db"), "--no-progress"]
    assert main(argv) == 2
    _one_line(capsys, "relax")
    assert not (tmp_path / "r.db").exists()


def test_console_script_prints_one_line_and_exits_2(batch_file, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "ltau_ase.cli", *_relax(batch_file, tmp_path, "--workers", "-1")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "argument --workers: expected a positive integer, got -1" in proc.stderr


# ----------------------------------------------------------------------------- checks before the work
def test_fit_output_directory_fails_up_front_and_leaves_nothing(tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = ["fit", str(tmp_path / "run"), "--train-file", str(tmp_path / "t.extxyz"), "--output", str(out_dir)]
    assert main(argv) == 2
    assert "--output" in _one_line(capsys, "fit") and list(out_dir.iterdir()) == []
    argv[-1] = str(UNWRITABLE / "e.ltau")
    assert main(argv) == 2
    assert "cannot create files" in _one_line(capsys, "fit")
    assert list(tmp_path.glob("**/*.tmp")) == []


def test_fit_missing_inputs_fail_before_descriptors(tmp_path, capsys):
    argv = ["fit", str(tmp_path / "no_run"), "--train-file", str(tmp_path / "no.extxyz"),
            "--output", str(tmp_path / "e.ltau")]
    assert main(argv) == 2
    assert "--train-file" in _one_line(capsys, "fit")


@pytest.mark.parametrize("option", ["--trajectory", "--save-to"])
def test_md_outputs_checked_before_running(option, structure, tmp_path, capsys):
    argv = _md(structure, tmp_path, "--factory", "sim_standins:scripted_md_calculator")
    if option in argv:
        argv[argv.index(option) + 1] = str(tmp_path)
    else:
        argv += [option, str(tmp_path)]
    assert main(argv) == 2
    assert f"{option} {tmp_path} is a directory" in _one_line(capsys, "md")
    assert not (tmp_path / "md.extxyz").exists() or option == "--save-to"


@pytest.mark.parametrize("target", ["dir", "missing dir", "unwritable"])
def test_uncertainty_stop_checks_save_to_at_construction(target, tmp_path):
    from ase.md.verlet import VelocityVerlet

    atoms = make_slab()
    atoms.calc = StandInFactory()()
    dyn = VelocityVerlet(atoms, timestep=1.0)
    path = {"dir": tmp_path, "missing dir": tmp_path / "nope" / "f.extxyz", "unwritable": UNWRITABLE / "f.extxyz"}[target]
    with pytest.raises(ValueError, match="save_to"):
        UncertaintyStop(dyn, threshold=0.5, save_to=path)


def test_report_output_that_is_a_file(tmp_path, capsys):
    (tmp_path / "report").write_text("x")
    (tmp_path / "r.db").write_text("")
    assert main(["report", "--db", str(tmp_path / "r.db"), "--output", str(tmp_path / "report")]) == 2
    assert "is a file; expected a directory" in _one_line(capsys, "report")


@pytest.mark.parametrize("argv", [["relax"], ["md", "--structure"], ["fit"], ["report", "--bogus"], ["nope"], []])
def test_usage_errors_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- Dask on localhost only
def test_in_process_cluster_listens_on_localhost_only(tmp_path):
    LISTENING.clear()
    relax_batch(batch_systems(n=1, bad=False), tmp_path / "r.db", ListeningSockets(), progress=False, steps=1)
    assert LISTENING and LISTENING <= {"127.0.0.1", "::1"}, LISTENING


@pytest.mark.parametrize("dashboard, status", [(None, 404), ("127.0.0.1:0", 200)])
def test_dashboard_pages_only_when_asked(dashboard, status):
    import urllib.error
    import urllib.request

    from ltau_ase.simulate.batch import local_cluster

    with local_cluster(1, dashboard) as cluster:
        port = next(iter(cluster.scheduler.http_server._sockets.values())).getsockname()[1]
        try:
            got = urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10).status
        except urllib.error.HTTPError as exc:
            got = exc.code
    assert got == status
