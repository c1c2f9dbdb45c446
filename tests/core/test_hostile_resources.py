"""Hostile estimator files, class 2 of issue 9: resource exhaustion from tiny files.

Each case is a small file that declares (or would make FAISS allocate) far more memory than it holds,
or stores search parameters that would cost huge memory per query. Every one must be refused with a
ValueError, and the reader's peak resident memory (kernel high-water mark, so FAISS's C++ allocations
count) must stay far below what the file declares.
"""
from __future__ import annotations

import hashlib
import json
import struct
import zipfile

import numpy as np
import pytest
from ltau_file_tools import peak_rss_growth, rewrite, save_v1, small_estimator

from ltau_ase.core.estimator import LTAUEstimator
from ltau_ase.core.fileformat import MAGIC_BYTES

MiB = 1 << 20
#: peak RSS growth allowed while refusing a hostile file (allocator noise, lazily imported modules)
SLACK = 24 * MiB


def _refuse(path, match: str, declared: int = 0) -> None:
    growth, out = peak_rss_growth(lambda: LTAUEstimator.load(path))
    assert isinstance(out, ValueError), f"expected ValueError, got {out!r}"
    assert __import__("re").search(match, str(out)), str(out)
    assert growth < SLACK, f"peak RSS grew by {growth / MiB:.1f} MiB while refusing a file declaring {declared / MiB:.0f} MiB"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile_resources")
    out = {}
    for index in ("flat", "hnsw", "ivfpq"):
        params = {"index_params": {"nlist": 4, "m": 2, "nbits": 4}} if index == "ivfpq" else {}
        est, _ = small_estimator(index, n=300, **params)
        out[index] = est
        est.save(tmp / f"{index}.ltau")
        out[f"{index}_path"] = tmp / f"{index}.ltau"
    return tmp, out


# ------------------------------------------------------------------ format 1 (npz) bombs
def _v1_with_member(tmp, est, name: str, declared_bytes: int, shape: tuple, dtype="<f8"):
    """A format-1 file whose member ``name`` is a deflated npy of ``declared_bytes`` zeros (a bomb)."""
    path = tmp / f"bomb-{name}.ltau"
    save_v1(est, path)
    src = zipfile.ZipFile(path)
    members = {i.filename: src.read(i) for i in src.infolist() if i.filename != f"{name}.npy"}
    src.close()
    header = ("{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (dtype, shape)).encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for fname, data in members.items():
            zf.writestr(fname, data)
        with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
            fh.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header)
            chunk = bytes(4 * MiB)
            for _ in range(declared_bytes // len(chunk)):
                fh.write(chunk)
    return path


def test_npz_decompression_bombs_are_refused_before_inflating(files):
    tmp, est = files[0], files[1]["flat"]
    cases = [
        ("junk", 256 * MiB, (32 * MiB,), "expansion"),  # refused by the expansion cap
        ("junk", 32 * MiB, (4 * MiB,), "unknown arrays"),  # unknown member
        ("confidence_train_", 32 * MiB, (4 * MiB,), "expected <f8 \\(300,\\)"),  # known name, wrong size
        ("dist_counts", 32 * MiB, (2, 300, 1 << 16), "expected"),
    ]
    for name, size, shape, match in cases:
        path = _v1_with_member(tmp, est, name, size, shape)
        assert path.stat().st_size < 2 * MiB
        _refuse(path, match, size)


def test_npz_header_member_capped(files):
    tmp = files[0]
    path = tmp / "bigheader.ltau"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("__header__.npy", b"\x93NUMPY\x01\x00" + b"\0" * (20 * MiB))
    _refuse(path, "header", 20 * MiB)


def test_npz_faiss_blob_declaring_a_gigabyte(files):
    """The issue's example: a 12 KB file whose FAISS blob declares a 1 GB vector array."""
    tmp, est = files[0], files[1]["flat"]
    blob = est.index_.to_bytes().tobytes()
    at = blob.find(struct.pack("<Q", 300 * 4))
    assert at > 0
    evil = blob[:at] + struct.pack("<Q", (1 << 30) // 4) + blob[at + 8 :]

    path = tmp / "blob-bomb.ltau"
    save_v1(est, path)
    with zipfile.ZipFile(path) as src:
        members = {i.filename: src.read(i) for i in src.infolist()}
    import io

    buf = io.BytesIO()
    np.save(buf, np.frombuffer(evil, np.uint8))
    members["faiss_index.npy"] = buf.getvalue()
    with zipfile.ZipFile(path, "w") as zf:
        for fname, data in members.items():
            zf.writestr(fname, data)
    assert path.stat().st_size < 128 * 1024
    _refuse(path, "FAISS index is corrupt", 1 << 30)


# ------------------------------------------------------------------ format 2
def _raw(path, header: dict, data: bytes, size_override: int | None = None):
    text = json.dumps(header).encode()
    n = len(text) if size_override is None else size_override
    pre = struct.pack("<8sIIQ32s", MAGIC_BYTES, 2, 0, n, hashlib.sha256(text).digest())
    start = -(-(56 + len(text)) // 64) * 64
    path.write_bytes(pre + text + b"\0" * (start - 56 - len(text)) + data)


def test_declared_sizes_beyond_the_file(files):
    tmp = files[0]
    huge = {"magic": "ltau-ase-estimator", "format_version": 2,
            "arrays": {"confidence_train_": {"dtype": "<f8", "shape": [1 << 27], "offset": 0, "sha256": "0" * 64}}}
    _raw(tmp / "huge-array.ltau", huge, b"\0" * 64)
    _refuse(tmp / "huge-array.ltau", "truncated", 1 << 30)
    overflow = dict(huge, arrays={"a": {"dtype": "<f8", "shape": [1 << 40, 1 << 40], "offset": 0, "sha256": "0" * 64}})
    _raw(tmp / "overflow.ltau", overflow, b"")
    _refuse(tmp / "overflow.ltau", "truncated", 1 << 62)
    _raw(tmp / "huge-header.ltau", huge, b"", size_override=1 << 40)
    _refuse(tmp / "huge-header.ltau", "header", 1 << 40)
    _raw(tmp / "deep.ltau", {"x": 1}, b"")
    text = b"[" * 200_000
    (tmp / "deep.ltau").write_bytes(struct.pack("<8sIIQ32s", MAGIC_BYTES, 2, 0, len(text), hashlib.sha256(text).digest()) + text)
    _refuse(tmp / "deep.ltau", "JSON")


def test_unknown_or_misshapen_members_refused(files):
    tmp, f = files
    src = f["flat_path"]
    cases = [
        (lambda a: a.__setitem__("payload", np.zeros(10)), "unknown arrays"),
        (lambda a: a.__setitem__("confidence_train_", np.zeros(301)), "expected <f8 \\(300,\\)"),
        (lambda a: a.__setitem__("index_vectors", np.zeros((300, 4))), "expected <f4"),
        (lambda a: a.pop("dist_counts"), "missing arrays"),
        (lambda a: a.__setitem__("dist_edges", np.zeros(1 << 17)), "bin edges"),
    ]
    for i, (mutate, match) in enumerate(cases):
        _refuse(rewrite(src, tmp / f"member{i}.ltau", arrays_fn=mutate), match)


def _set_learned(key, value):
    return lambda h: h["learned"].__setitem__(key, value)


def _set_index_param(key, value):
    return lambda h: h["learned"]["index_params_"].__setitem__(key, value)


SEARCH_PARAM_CASES = [
    ("hnsw", _set_index_param("efSearch", 1 << 26), r"efSearch.*\[1, 4096\]"),
    ("hnsw", _set_index_param("efSearch", -3), r"efSearch"),
    ("hnsw", _set_index_param("M", 1 << 20), r"M"),
    ("hnsw", _set_index_param("efConstruction", 0), r"efConstruction"),
    ("ivfpq", _set_index_param("nprobe", 1 << 26), r"nprobe"),
    ("ivfpq", _set_index_param("nprobe", 0), r"nprobe"),
    ("ivfpq", _set_index_param("nprobe", 5), r"nprobe=5 exceeds nlist=4"),
    ("ivfpq", _set_index_param("nlist", 1 << 20), r"nlist"),
    ("ivfpq", _set_index_param("refine", 1 << 20), r"refine"),
    ("ivfpq", _set_index_param("nbits", 40), r"nbits"),
    ("ivfpq", _set_index_param("train_size", 1 << 40), r"train_size"),
    ("flat", lambda h: h["settings"].__setitem__("k", 1 << 40), r"k must be at most"),
    ("flat", lambda h: h["settings"].__setitem__("k", -1), r"k must be a positive"),
    ("flat", _set_learned("k_eff_", 1 << 40), r"k_eff_"),
    ("flat", _set_learned("n_train_atoms_", 1 << 40), r"expected <f8|n_train_atoms_"),
    ("flat", _set_learned("n_features_in_", 1 << 20), r"n_features_in_"),
    ("flat", lambda h: h["distributions"].__setitem__("n_runs", 1 << 20), r"n_runs"),
    # a bins setting used to be validated by making its edges: 5e8 of them took 20 s and 7.6 GB
    ("flat", lambda h: h["settings"].__setitem__("bins", 500_000_000), r"bin edges must lie in \[1, 65536\]"),
    ("hnsw", lambda h: h["settings"].__setitem__("bins", ["log", 1 << 40]), r"bin edges must lie in"),
]


@pytest.mark.parametrize("kind,mutate,match", SEARCH_PARAM_CASES)
def test_search_and_size_settings_bounded(files, kind, mutate, match):
    tmp, f = files
    _refuse(rewrite(f[f"{kind}_path"], tmp / "param.ltau", header_fn=mutate), match)


def _blob_edit(find: bytes, replace: bytes, nth: int = 0):
    def edit(arrays):
        blob = arrays["faiss_index"].tobytes()
        at = -1
        for _ in range(nth + 1):
            at = blob.find(find, at + 1)
        assert at >= 0
        arrays["faiss_index"] = np.frombuffer(blob[:at] + replace + blob[at + len(find) :], np.uint8).copy()
    return edit


def test_faiss_blobs_checked_before_use(files):
    """Blobs with valid digests (a deliberate forgery) declaring huge vectors or out-of-range graph ids."""
    tmp, f = files
    hnsw = f["hnsw"].index_.index
    n_neighbors = hnsw.hnsw.neighbors.size()
    cases = [
        # the HNSW vector storage declares 1 GiB of floats
        ("hnsw", _blob_edit(struct.pack("<Q", 300 * 4), struct.pack("<Q", 1 << 28)), "corrupt"),
        # the HNSW neighbour list declares 1 GiB
        ("hnsw", _blob_edit(struct.pack("<Q", n_neighbors), struct.pack("<Q", 1 << 28)), "corrupt"),
        # the IVF-PQ codebook declares 1 GiB
        ("ivfpq", _blob_edit(struct.pack("<Q", 2 * 16 * 2), struct.pack("<Q", 1 << 28)), "corrupt|codebooks"),
        ("hnsw", lambda a: a.__setitem__("faiss_index", np.frombuffer(b"IHNf" + b"\xff" * 200, np.uint8).copy()), "corrupt|plausible"),
        ("hnsw", lambda a: a.__setitem__("faiss_index", np.zeros(1 << 24, np.uint8)), "plausible"),
    ]
    for i, (kind, mutate, match) in enumerate(cases):
        _refuse(rewrite(f[f"{kind}_path"], tmp / f"blob{i}.ltau", arrays_fn=mutate), match, 1 << 30)


def test_hnsw_graph_ids_out_of_range_refused(files):
    """A forged HNSW graph pointing outside the vectors would make FAISS read out of bounds."""
    import faiss

    tmp, f = files
    est = f["hnsw"]
    for bad in (10**6, -7):
        index = faiss.deserialize_index(faiss.serialize_index(est.index_.index))
        neigh = faiss.rev_swig_ptr(index.hnsw.neighbors.data(), index.hnsw.neighbors.size()).view(np.int32)
        neigh[3] = bad
        blob = np.asarray(faiss.serialize_index(index), dtype=np.uint8)
        path = rewrite(f["hnsw_path"], tmp / "graph.ltau", arrays_fn=lambda a: a.__setitem__("faiss_index", blob))
        _refuse(path, "neighbour ids outside|out of range")


def test_ivf_ids_out_of_range_or_duplicated_refused(files):
    import faiss

    tmp, f = files
    est = f["ivfpq"]
    for bad, match in ((10**9, "outside"), (0, "exactly once")):
        index = faiss.deserialize_index(faiss.serialize_index(est.index_.index))
        invlists = faiss.extract_index_ivf(index).invlists
        lst = next(i for i in range(invlists.nlist) if invlists.list_size(i) > 1)
        ids = faiss.rev_swig_ptr(invlists.get_ids(lst), invlists.list_size(lst)).view(np.int64)
        ids[1] = bad if bad else ids[0]
        blob = np.asarray(faiss.serialize_index(index), dtype=np.uint8)
        path = rewrite(f["ivfpq_path"], tmp / "ivf.ltau", arrays_fn=lambda a: a.__setitem__("faiss_index", blob))
        _refuse(path, match)
