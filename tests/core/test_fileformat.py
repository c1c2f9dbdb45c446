"""The .ltau container: round trip, and clear errors for truncated, corrupt, foreign or malicious files."""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import zipfile

import numpy as np
import pytest

from ltau_ase.core.estimator import LTAUEstimator
from ltau_ase.core.fileformat import MAGIC, read_container, sha256_file, write_container


class _Payload:
    """Unpickling this object would create a marker file (what a malicious .ltau would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture()
def estimator_file(tmp_path):
    rng = np.random.default_rng(0)
    est = LTAUEstimator(k=3, metadata={"model_sha256": "ab" * 32}).fit(
        rng.normal(size=(50, 4)), rng.random((6, 50))
    )
    path = tmp_path / "est.ltau"
    est.save(path)
    return path


def test_round_trip(tmp_path):
    arrays = {"a": np.arange(5, dtype=np.int64), "b": np.eye(3, dtype=np.float32)}
    for compress in (False, True):
        path = tmp_path / f"c{compress}.ltau"
        write_container(path, {"settings": {"k": 3}, "metadata": {"x": [1, 2]}}, arrays, compress=compress)
        header, got = read_container(path)
        assert header["magic"] == MAGIC and header["format_version"] == 1
        assert header["settings"] == {"k": 3} and header["metadata"] == {"x": [1, 2]}
        for k, v in arrays.items():
            np.testing.assert_array_equal(got[k], v)
            assert got[k].dtype == v.dtype
    with pytest.raises(ValueError, match="JSON"):
        write_container(tmp_path / "x.ltau", {"metadata": {"bad": object()}}, {})
    with pytest.raises(ValueError, match="object"):
        write_container(tmp_path / "x.ltau", {}, {"o": np.array([None], dtype=object)})


def test_sha256_file(tmp_path):
    data = np.random.default_rng(0).bytes(3_000_000)
    (tmp_path / "m.bin").write_bytes(data)
    assert sha256_file(tmp_path / "m.bin") == hashlib.sha256(data).hexdigest()


def test_truncated_and_corrupt(estimator_file, tmp_path):
    data = estimator_file.read_bytes()
    (tmp_path / "trunc.ltau").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        LTAUEstimator.load(tmp_path / "trunc.ltau")
    corrupt = bytearray(data)
    # Flip bytes inside the stored arrays (past the first local header): CRC check must catch it.
    mid = len(corrupt) // 2
    corrupt[mid : mid + 16] = bytes(b ^ 0xFF for b in corrupt[mid : mid + 16])
    (tmp_path / "corrupt.ltau").write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="corrupt"):
        LTAUEstimator.load(tmp_path / "corrupt.ltau")
    (tmp_path / "empty.ltau").write_bytes(b"")
    with pytest.raises(ValueError, match="not an ltau-ase estimator file"):
        LTAUEstimator.load(tmp_path / "empty.ltau")
    with pytest.raises(FileNotFoundError):
        LTAUEstimator.load(tmp_path / "missing.ltau")


def _npz_with_header(path, header: dict, **arrays):
    np.savez(path, __header__=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)


def test_wrong_version_and_foreign_files(tmp_path):
    p = tmp_path / "v.npz"
    _npz_with_header(p, {"magic": MAGIC, "format_version": 99})
    with pytest.raises(ValueError, match="format version 99"):
        read_container(p)
    _npz_with_header(p, {"magic": "something-else", "format_version": 1})
    with pytest.raises(ValueError, match="magic"):
        read_container(p)
    np.savez(p, x=np.ones(3))
    with pytest.raises(ValueError, match="no header"):
        read_container(p)
    (tmp_path / "t.ltau").write_text("hello, I am text")
    with pytest.raises(ValueError, match="not an ltau-ase estimator file"):
        read_container(tmp_path / "t.ltau")
    np.save(tmp_path / "a.npy", np.ones(3))
    with pytest.raises(ValueError, match="not an ltau-ase estimator file"):
        read_container(tmp_path / "a.npy")
    np.savez(p, __header__=np.frombuffer(b"\xff\xfe{", np.uint8))
    with pytest.raises(ValueError, match="corrupt JSON header"):
        read_container(p)
    # A valid container missing the estimator's arrays.
    write_container(tmp_path / "partial.ltau", {"settings": {"k": 3}}, {})
    with pytest.raises(ValueError, match="missing or malformed"):
        LTAUEstimator.load(tmp_path / "partial.ltau")


def test_pickle_payload_never_executes(tmp_path):
    marker = tmp_path / "pwned"
    # 1. A bare pickle renamed to the estimator extension.
    (tmp_path / "evil.ltau").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match="pickle"):
        LTAUEstimator.load(tmp_path / "evil.ltau")
    (tmp_path / "evil0.ltau").write_bytes(pickle.dumps(_Payload(marker), protocol=0))
    with pytest.raises(ValueError, match="pickle"):
        LTAUEstimator.load(tmp_path / "evil0.ltau")
    # 2. A real npz archive with a valid header whose array is a pickled object.
    evil_npz = tmp_path / "evil_npz.ltau"
    buf = io.BytesIO()
    np.save(buf, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(evil_npz, "w") as zf:
        zf.writestr("__header__.npy", _npy_bytes(np.frombuffer(json.dumps({"magic": MAGIC, "format_version": 1}).encode(), np.uint8)))
        zf.writestr("confidence_train_.npy", buf.getvalue())
    with pytest.raises(ValueError, match="pickle"):
        LTAUEstimator.load(evil_npz)
    assert not marker.exists()


def _npy_bytes(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()
