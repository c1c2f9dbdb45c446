"""Error-log store: round trip against an in-memory numpy reference, windows, durability, bad input."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ltau_ase.core.errorlog import EpochWindow, ErrorLog, ErrorLogWriter, load_error_logs


def _write_log(path, ids, epochs, rng, missing=0.2, components=False):
    """Write ``epochs`` epochs of random errors with shuffled ids and missing atoms; return the (E, N) reference."""
    order = np.argsort(ids)
    ref = np.full((epochs, ids.size), np.nan, dtype=np.float32)
    with ErrorLogWriter(path, ids, components=components, metadata={"seed": 1}) as w:
        for e in range(epochs):
            present = rng.random(ids.size) >= missing
            sel = rng.permutation(np.nonzero(present)[0])
            errs = rng.random(sel.size).astype(np.float32) * 2
            comps = rng.random((sel.size, 3)).astype(np.float32) if components else None
            w.append_epoch(ids[sel], errs, epoch=e, components=comps)
            # Reference row in sorted-id order.
            rank = np.searchsorted(ids[order], ids[sel])
            ref[e, rank] = errs
    return ref


def test_round_trip_matches_reference(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.choice(10**9, size=300, replace=False)  # unsorted, sparse ids
    ref = _write_log(tmp_path / "run", ids, 7, rng)
    log = ErrorLog(tmp_path / "run")
    assert np.array_equal(log.atom_ids, np.sort(ids))
    assert log.n_epochs == 7 and log.n_atoms == 300
    assert log.epochs == list(range(7))
    assert log.metadata == {"seed": 1}
    errs = log.errors()
    assert isinstance(errs, np.memmap)  # memory-mapped, not loaded
    np.testing.assert_array_equal(errs, ref)  # NaN positions equal too
    chunks = [(sl, block) for sl, block in log.iter_atom_chunks(64)]
    assert [sl.start for sl, _ in chunks] == [0, 64, 128, 192, 256]
    np.testing.assert_array_equal(np.concatenate([b for _, b in chunks], axis=1), ref)


def test_components_round_trip(tmp_path):
    ids = np.array([5, 3, 9])
    comps = np.arange(9, dtype=np.float32).reshape(3, 3)
    with ErrorLogWriter(tmp_path / "r", ids, components=True) as w:
        w.append_epoch([9, 5], [1.0, 2.0], components=comps[:2])
        with pytest.raises(ValueError, match="components"):
            w.append_epoch([9], [1.0])
    log = ErrorLog(tmp_path / "r")
    c = log.components()
    assert c.shape == (1, 3, 3)
    np.testing.assert_array_equal(c[0, 2], comps[0])  # id 9 is row 2
    np.testing.assert_array_equal(c[0, 1], comps[1])  # id 5 is row 1
    np.testing.assert_array_equal(c[0, 0], np.full(3, np.nan, np.float32))  # id 3 (row 0) not logged
    np.testing.assert_array_equal(log.errors()[0], np.array([np.nan, 2.0, 1.0], np.float32))


def test_windows(tmp_path):
    ids = np.arange(4)
    with ErrorLogWriter(tmp_path / "r", ids) as w:
        for e in range(10):
            w.append_epoch(ids, np.full(4, e, np.float32))
    log = ErrorLog(tmp_path / "r")
    assert log.errors(EpochWindow(skip=3))[:, 0].tolist() == list(range(3, 10))
    assert log.errors(EpochWindow(last=4))[:, 0].tolist() == [6, 7, 8, 9]
    assert log.errors({"skip": 8, "last": 5})[:, 0].tolist() == [8, 9]
    assert log.errors((2, 3))[:, 0].tolist() == [7, 8, 9]
    windowed = ErrorLog(tmp_path / "r", window=EpochWindow(skip=9))
    assert windowed.errors()[:, 0].tolist() == [9]
    with pytest.raises(ValueError, match="leaves no epoch"):
        log.errors(EpochWindow(skip=10))
    for bad in (dict(skip=-1), dict(last=0), dict(skip=1.5)):
        with pytest.raises(ValueError):
            EpochWindow(**bad)


def test_torn_row_is_ignored_and_resume_truncates(tmp_path):
    ids = np.arange(5)
    with ErrorLogWriter(tmp_path / "r", ids) as w:
        w.append_epoch(ids, np.ones(5))
        w.append_epoch(ids, 2 * np.ones(5))
    # Simulate a crash after writing part of a third row but before the meta commit.
    with open(tmp_path / "r" / "errors.f32", "ab") as fh:
        fh.write(np.full(3, 7.0, np.float32).tobytes())
    log = ErrorLog(tmp_path / "r")
    assert log.n_epochs == 2
    np.testing.assert_array_equal(log.errors()[:, 0], [1.0, 2.0])
    with pytest.raises(FileExistsError):
        ErrorLogWriter(tmp_path / "r", ids)
    with ErrorLogWriter(tmp_path / "r", ids, resume=True) as w:
        w.append_epoch(ids, 3 * np.ones(5))
    log = ErrorLog(tmp_path / "r")
    np.testing.assert_array_equal(log.errors()[:, 4], [1.0, 2.0, 3.0])
    assert os.path.getsize(tmp_path / "r" / "errors.f32") == 3 * 5 * 4
    with pytest.raises(ValueError, match="atom ids differ"):
        ErrorLogWriter(tmp_path / "r", np.arange(6), resume=True)


def test_truncated_and_foreign_logs_raise(tmp_path):
    ids = np.arange(5)
    with ErrorLogWriter(tmp_path / "r", ids) as w:
        w.append_epoch(ids, np.ones(5))
        w.append_epoch(ids, np.ones(5))
    os.truncate(tmp_path / "r" / "errors.f32", 30)
    with pytest.raises(ValueError, match="truncated"):
        ErrorLog(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    meta["version"] = 99
    (tmp_path / "r" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="version 99"):
        ErrorLog(tmp_path / "r")
    (tmp_path / "r" / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ErrorLog(tmp_path / "r")
    with pytest.raises(FileNotFoundError):
        ErrorLog(tmp_path / "nothing")


@pytest.mark.parametrize(
    "ids, errs, match",
    [
        ([0, 99], [1.0, 1.0], "not known"),
        ([0, 0], [1.0, 1.0], "at most once"),
        ([0, 1], [1.0, -0.5], "negative"),
        ([0, 1], [1.0, np.inf], "inf"),
        ([0, 1], [1.0], "shape"),
        ([[0, 1]], [[1.0, 1.0]], "1-d"),
    ],
)
def test_append_bad_input(tmp_path, ids, errs, match):
    with ErrorLogWriter(tmp_path / "r", np.arange(3)) as w:
        with pytest.raises(ValueError, match=match):
            w.append_epoch(ids, errs)
        assert w.n_epochs == 0  # nothing committed by a rejected epoch


def test_writer_rejects_bad_ids(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        ErrorLogWriter(tmp_path / "a", [1, 2, 2])
    with pytest.raises(ValueError, match="empty"):
        ErrorLogWriter(tmp_path / "b", [])
    with pytest.raises(ValueError, match="integers"):
        ErrorLogWriter(tmp_path / "c", [0.5, 1.5])


def test_load_error_logs_ensemble(tmp_path):
    rng = np.random.default_rng(1)
    ids = np.arange(20) * 7
    _write_log(tmp_path / "a", ids, 4, rng)
    _write_log(tmp_path / "b", ids, 6, rng)
    logs = load_error_logs([tmp_path / "a", tmp_path / "b"], window=EpochWindow(skip=1))
    assert [log.n_selected_epochs() for log in logs] == [3, 5]
    _write_log(tmp_path / "c", ids + 1, 4, rng)
    with pytest.raises(ValueError, match="different atom ids"):
        load_error_logs([tmp_path / "a", tmp_path / "c"])
    with pytest.raises(ValueError, match="no error-log paths"):
        load_error_logs([])


def test_full_sorted_epoch_and_shuffled_epoch_give_the_same_row(tmp_path):
    rng = np.random.default_rng(4)
    ids = np.sort(rng.choice(10**6, 500, replace=False)).astype(np.int64)
    err = rng.random(500).astype(np.float32)
    comp = rng.random((500, 3)).astype(np.float32)
    perm = rng.permutation(500)
    with ErrorLogWriter(tmp_path / "log", ids, components=True) as w:
        w.append_epoch(ids, err, epoch=0, components=comp)  # every atom in log order
        w.append_epoch(ids[perm], err[perm], epoch=1, components=comp[perm])  # shuffled
        w.append_epoch(ids[::-1][:499], err[::-1][:499], epoch=2, components=comp[::-1][:499])  # one missing
    log = ErrorLog(tmp_path / "log")
    e = np.asarray(log.errors())
    np.testing.assert_array_equal(e[0], err)
    np.testing.assert_array_equal(e[1], err)
    np.testing.assert_array_equal(e[2][1:], err[1:])
    assert np.isnan(e[2][0])
    np.testing.assert_array_equal(np.asarray(log.components())[1], comp)
