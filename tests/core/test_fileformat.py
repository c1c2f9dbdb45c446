"""The .ltau container (format 2): round trip, memory mapping, digests, and clear errors for truncated,
corrupt, foreign, malicious and format-1 files."""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
import zipfile

import numpy as np
import pytest
from ltau_file_tools import save_v1, small_estimator

from ltau_ase.core.estimator import LTAUEstimator
from ltau_ase.core.fileformat import (
    FORMAT_VERSION,
    MAGIC,
    MAGIC_BYTES,
    read_container,
    sha256_file,
    verify_container,
    write_container,
)


class _Payload:
    """Unpickling this object would create a marker file (what a malicious .ltau would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture()
def estimator_file(tmp_path):
    est, _ = small_estimator()
    path = tmp_path / "est.ltau"
    est.save(path)
    return path


def test_round_trip_layout(tmp_path):
    arrays = {
        "a": np.arange(5, dtype=np.int64), "b": np.eye(3, dtype=np.float32), "s": np.float64(2.5),
        "big_endian": np.arange(4, dtype=">f8"), "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "empty": np.zeros((0, 3)),
    }
    path = tmp_path / "c.ltau"
    write_container(path, {"settings": {"k": 3}, "metadata": {"x": [1, 2]}}, arrays)
    raw = path.read_bytes()
    assert raw[:8] == MAGIC_BYTES and struct.unpack("<I", raw[8:12])[0] == FORMAT_VERSION == 2
    header, got = read_container(path)
    assert header["magic"] == MAGIC and header["format_version"] == 2
    assert header["settings"] == {"k": 3} and header["metadata"] == {"x": [1, 2]}
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)
        assert got[k].shape == np.shape(v)
    # Offsets are 64-byte aligned and each digest is the SHA-256 of the array's bytes (independent check).
    data_start = -(-(56 + struct.unpack("<Q", raw[16:24])[0]) // 64) * 64
    for name, spec in header["arrays"].items():
        assert spec["offset"] % 64 == 0
        nbytes = got[name].nbytes
        blob = raw[data_start + spec["offset"] : data_start + spec["offset"] + nbytes]
        assert hashlib.sha256(blob).hexdigest() == spec["sha256"]
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="JSON"):
        write_container(tmp_path / "x.ltau", {"metadata": {"bad": object()}}, {})
    with pytest.raises(ValueError, match="without pickle"):
        write_container(tmp_path / "x.ltau", {}, {"o": np.array([None], dtype=object)})
    with pytest.raises(ValueError, match="reserved"):
        write_container(tmp_path / "x.ltau", {"arrays": 1}, {})
    with pytest.raises(ValueError, match="not storable"):
        write_container(tmp_path / "x.ltau", {}, {"c": np.ones(2, complex)})


def test_large_arrays_are_memory_mapped_and_verified_on_request(tmp_path):
    path = tmp_path / "m.ltau"
    big = np.arange(100_000, dtype=np.float64)
    write_container(path, {}, {"small": np.arange(3.0), "big": big})
    _, arrays = read_container(path, eager_bytes=1 << 16)
    assert isinstance(arrays["big"], np.memmap) and not isinstance(arrays["small"], np.memmap)
    assert not arrays["big"].flags.writeable
    np.testing.assert_array_equal(arrays["big"], big)
    # Flip one byte of the big array: open (lazy) still works, verify=True and verify_container catch it.
    raw = bytearray(path.read_bytes())
    raw[-8 * 500] ^= 0x01
    path.write_bytes(bytes(raw))
    read_container(path, eager_bytes=1 << 16)
    with pytest.raises(ValueError, match="'big' does not match its SHA-256"):
        read_container(path, eager_bytes=1 << 16, verify=True)
    with pytest.raises(ValueError, match="SHA-256"):
        verify_container(path)
    with pytest.raises(ValueError, match="SHA-256"):
        read_container(path)  # default eager_bytes (64 MiB): read and checked at open


def test_sha256_file(tmp_path):
    data = np.random.default_rng(0).bytes(3_000_000)
    (tmp_path / "m.bin").write_bytes(data)
    assert sha256_file(tmp_path / "m.bin") == hashlib.sha256(data).hexdigest()


def test_truncated_and_corrupt(estimator_file, tmp_path):
    data = estimator_file.read_bytes()
    header_len = struct.unpack("<Q", data[16:24])[0]
    cases = {
        "preamble": (data[:30], "truncated"),
        "header": (data[: 56 + header_len // 2], "truncated"),
        "arrays": (data[: len(data) // 2 + 200], "truncated"),
        "last byte": (data[:-1], "truncated"),
        "trailing": (data + b"\0" * 64, "trailing bytes"),
    }
    for name, (blob, match) in cases.items():
        p = tmp_path / f"{name}.ltau"
        p.write_bytes(blob)
        with pytest.raises(ValueError, match=match):
            LTAUEstimator.load(p)
    for where, match in ((60, "header's SHA-256"), (len(data) - 20, "SHA-256 digest")):
        corrupt = bytearray(data)
        corrupt[where] ^= 0x10
        (tmp_path / "corrupt.ltau").write_bytes(bytes(corrupt))
        with pytest.raises(ValueError, match=match):
            LTAUEstimator.load(tmp_path / "corrupt.ltau")
    (tmp_path / "empty.ltau").write_bytes(b"")
    with pytest.raises(ValueError, match="not an ltau-ase estimator file"):
        LTAUEstimator.load(tmp_path / "empty.ltau")
    with pytest.raises(FileNotFoundError):
        LTAUEstimator.load(tmp_path / "missing.ltau")


def test_wrong_version_and_foreign_files(tmp_path, estimator_file):
    data = bytearray(estimator_file.read_bytes())
    data[8:12] = struct.pack("<I", 99)
    (tmp_path / "v99.ltau").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="format version 99"):
        read_container(tmp_path / "v99.ltau")
    p = tmp_path / "v.npz"
    np.savez(p, __header__=np.frombuffer(json.dumps({"magic": MAGIC, "format_version": 99}).encode(), np.uint8))
    with pytest.raises(ValueError, match="format version 99"):
        read_container(p)
    np.savez(p, __header__=np.frombuffer(json.dumps({"magic": "something-else", "format_version": 1}).encode(), np.uint8))
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
    # A valid container missing the estimator's arrays and sections.
    write_container(tmp_path / "partial.ltau", {"settings": {"k": 3}}, {})
    with pytest.raises(ValueError, match="lacks its settings"):
        LTAUEstimator.load(tmp_path / "partial.ltau")


def test_format_1_files_still_load(tmp_path):
    for index in ("flat", "hnsw", "ivfpq"):
        for distribution in ("compact", "exact"):
            params = {"index_params": {"refine": 0, "nlist": 2, "m": 2, "nbits": 4}} if index == "ivfpq" else {}
            est, q = small_estimator(index, distribution, n=200, **params)
            for compress in (False, True):
                p = tmp_path / f"{index}-{distribution}-{compress}.ltau"
                save_v1(est, p, compress=compress)
                loaded = LTAUEstimator.load(p)
                for key, value in est.predict(q).items():
                    np.testing.assert_array_equal(loaded.predict(q)[key], value)
                # ... and re-saving writes format 2 with the same predictions.
                loaded.save(tmp_path / "v2.ltau")
                again = LTAUEstimator.load(tmp_path / "v2.ltau")
                np.testing.assert_array_equal(again.predict(q)["confidence"], est.predict(q)["confidence"])


def test_pickle_payload_never_executes(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.ltau").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match="pickle"):
        LTAUEstimator.load(tmp_path / "evil.ltau")
    (tmp_path / "evil0.ltau").write_bytes(pickle.dumps(_Payload(marker), protocol=0))
    with pytest.raises(ValueError, match="pickle"):
        LTAUEstimator.load(tmp_path / "evil0.ltau")
    # A format-1 npz archive with a valid header whose array is a pickled object.
    evil_npz = tmp_path / "evil_npz.ltau"
    buf = io.BytesIO()
    np.save(buf, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(evil_npz, "w") as zf:
        zf.writestr("__header__.npy", _npy_bytes(np.frombuffer(json.dumps({"magic": MAGIC, "format_version": 1}).encode(), np.uint8)))
        zf.writestr("confidence_train_.npy", buf.getvalue())
    with pytest.raises(ValueError, match="pickle"):
        LTAUEstimator.load(evil_npz)
    # A format-2 file whose table declares an object dtype.
    write_container(tmp_path / "o.ltau", {}, {"a": np.arange(3.0)})
    header, _ = read_container(tmp_path / "o.ltau")
    header["arrays"]["a"]["dtype"] = "|O"
    _write_raw(tmp_path / "o.ltau", header, np.arange(3.0).tobytes())
    with pytest.raises(ValueError, match="no pickled objects"):
        read_container(tmp_path / "o.ltau")
    assert not marker.exists()


def _write_raw(path, header, data: bytes):
    text = json.dumps(header).encode()
    pre = struct.pack("<8sIIQ32s", MAGIC_BYTES, 2, 0, len(text), hashlib.sha256(text).digest())
    start = -(-(56 + len(text)) // 64) * 64
    path.write_bytes(pre + text + b"\0" * (start - 56 - len(text)) + data)


def _npy_bytes(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_ltau_convert_and_verify_cli(tmp_path, capsys):
    from ltau_ase.cli import main

    est, q = small_estimator("hnsw", "compact", n=150)
    save_v1(est, tmp_path / "old.ltau", compress=True)
    assert main(["convert", str(tmp_path / "old.ltau"), str(tmp_path / "new.ltau")]) == 0
    assert (tmp_path / "new.ltau").read_bytes()[:8] == MAGIC_BYTES
    np.testing.assert_array_equal(LTAUEstimator.load(tmp_path / "new.ltau").predict(q)["confidence"], est.predict(q)["confidence"])
    assert main(["convert", "--verify", str(tmp_path / "new.ltau")]) == 0
    assert "every digest and value checked" in capsys.readouterr().out
    raw = bytearray((tmp_path / "new.ltau").read_bytes())
    raw[-3] ^= 1
    (tmp_path / "bad.ltau").write_bytes(bytes(raw))
    assert main(["convert", "--verify", str(tmp_path / "bad.ltau")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ltau convert: error:") and "SHA-256" in err and "\n" not in err
    assert main(["convert", str(tmp_path / "new.ltau")]) == 2
    assert "OUTPUT" in capsys.readouterr().err


def test_streamed_bytes_write_the_same_file_as_the_array_and_a_changing_producer_saves_nothing(tmp_path):
    from ltau_ase.core.fileformat import StreamedBytes, read_container, write_container

    blob = np.random.default_rng(0).integers(0, 256, size=3_000_001, dtype=np.uint8)
    chunks = [blob[i : i + (1 << 20)].tobytes() for i in range(0, blob.size, 1 << 20)]
    arrays = {"small": np.arange(5.0)}
    write_container(tmp_path / "a.ltau", {"x": 1}, {**arrays, "blob": blob})
    write_container(tmp_path / "s.ltau", {"x": 1}, {**arrays, "blob": StreamedBytes(lambda write: [write(c) for c in chunks])})
    assert (tmp_path / "a.ltau").read_bytes() == (tmp_path / "s.ltau").read_bytes()
    _, got = read_container(tmp_path / "s.ltau", verify=True)
    np.testing.assert_array_equal(got["blob"], blob)
    passes = []

    def drifting(write):  # a producer whose second pass differs: refused, no file left behind
        passes.append(1)
        write(bytes([len(passes)]) * 10)

    with pytest.raises(ValueError, match="different bytes on its second pass"):
        write_container(tmp_path / "d.ltau", {}, {"blob": StreamedBytes(drifting)})
    assert not (tmp_path / "d.ltau").exists() and not (tmp_path / "d.ltau.tmp").exists()
