"""FAISS nearest-neighbour index over training-atom descriptors (paper Algorithm 2, App. A.2).

Index kinds:

* ``"flat"``: ``IndexFlatL2``, exact search; memory 4·D bytes per atom.
* ``"hnsw"``: ``IndexHNSWFlat``; params ``M`` (32), ``efConstruction`` (40), ``efSearch`` (16).
* ``"ivfpq"``: ``IndexIVFPQ`` (compressed, for ≥ 10⁷ atoms); params ``nlist`` (≈ 4·√N, at least
  39 training points per list), ``m`` (sub-quantizers; D/8 when D is divisible by 8, i.e. one code
  byte per 8 dimensions, else the largest divisor of D ≤ D/4), ``nbits`` (8, fewer for tiny N),
  ``nprobe`` (min(nlist, 16)), ``train_size`` (points used to train, default min(N, max(64·nlist, 256·2^nbits))),
  ``seed`` (0). Memory ≈ (m·nbits/8 + 8) bytes per atom plus centroids.

Descriptors are converted to C-contiguous float32 here. :meth:`NeighbourIndex.search` returns
*Euclidean* distances (the square root of FAISS's squared L2) and a validity mask: approximate
indexes may return id −1 when fewer than k neighbours are reached, and those slots are masked,
never used to index the training arrays. For ivfpq the distances are the product-quantised
approximations FAISS computes, not exact ones. Search-time parameters (efSearch, nprobe) are applied
after building and again after deserialisation. ``search`` requires 1 ≤ k ≤ N; the estimator clamps
k to N (with a warning) before searching.
"""
from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np

INDEX_KINDS = ("flat", "hnsw", "ivfpq")
#: queries × indexed atoms × D up to which :meth:`NeighbourIndex.search` runs FAISS on one thread
SERIAL_SEARCH_WORK = 1 << 25
_ALLOWED = {
    "flat": set(),
    "hnsw": {"M", "efConstruction", "efSearch"},
    "ivfpq": {"nlist", "m", "nbits", "nprobe", "train_size", "seed"},
}


def as_float32(x: Any, name: str = "descriptors", dim: int | None = None) -> np.ndarray:
    """Validate a (n, D) real array and return it C-contiguous float32; raises ValueError otherwise."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-d (atoms, features) array; got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); expected at least one atom and one feature")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be real numbers; got dtype {arr.dtype}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name} have {arr.shape[1]} features; expected {dim}, the dimension used at fit")
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are reported below
        out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(out)):
        bad = np.unique(np.nonzero(~np.isfinite(out))[0])
        raise ValueError(f"{name} contain NaN or inf (or overflow float32) in {bad.size} rows, e.g. {bad[:5].tolist()}")
    return out


def default_params(kind: str, n: int, d: int) -> dict[str, int]:
    """Defaults for ``kind`` given N training atoms of dimension D (see module docstring)."""
    if kind == "flat":
        return {}
    if kind == "hnsw":
        return {"M": 32, "efConstruction": 40, "efSearch": 16}
    if kind == "ivfpq":
        nlist = max(1, min(int(round(4 * math.sqrt(n))), n // 39))
        if d % 8 == 0:
            m = d // 8
        else:
            m = max(x for x in range(1, max(1, d // 4) + 1) if d % x == 0)
        nbits = max(1, min(8, int(math.log2(max(2, n // 39)))))
        return {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": min(nlist, 16), "train_size": min(n, max(64 * nlist, 256 * 2**nbits)), "seed": 0}
    raise ValueError(f"unknown index kind {kind!r}; expected one of {INDEX_KINDS}")


def resolve_params(kind: str, params: dict[str, Any] | None, n: int, d: int) -> dict[str, int]:
    """Merge user ``index_params`` into the defaults, checking names and values."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {INDEX_KINDS}")
    params = dict(params or {})
    unknown = set(params) - _ALLOWED[kind]
    if unknown:
        raise ValueError(f"unknown index_params {sorted(unknown)} for index {kind!r}; allowed: {sorted(_ALLOWED[kind])}")
    out = default_params(kind, n, d)
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"index_params[{key!r}] must be an integer; got {value!r}")
        out[key] = int(value)
    for key, value in out.items():
        if key != "seed" and value < 1:
            raise ValueError(f"index_params[{key!r}] must be >= 1; got {value}")
    if kind == "ivfpq":
        if d % out["m"] != 0:
            raise ValueError(f"ivfpq m={out['m']} must divide the descriptor dimension D={d}")
        if out["nbits"] > 16:
            raise ValueError(f"ivfpq nbits must be <= 16; got {out['nbits']}")
        if out["nlist"] > n:
            raise ValueError(f"ivfpq nlist={out['nlist']} exceeds the {n} training atoms; expected nlist <= N")
        if out["nprobe"] > out["nlist"]:
            out["nprobe"] = out["nlist"]
        out["train_size"] = min(out["train_size"], n)
        need = max(out["nlist"], 2 ** out["nbits"])
        if out["train_size"] < need:
            raise ValueError(
                f"ivfpq needs at least max(nlist, 2**nbits) = {need} training points; got train_size={out['train_size']}"
            )
    return out


class NeighbourIndex:
    """A built FAISS index with its kind and parameters.

    Use :meth:`build` or :meth:`from_bytes`; ``index`` is the underlying ``faiss.Index``.
    """

    def __init__(self, kind: str, params: dict[str, int], index: "faiss.Index") -> None:
        self.kind = kind
        self.params = dict(params)
        self.index = index
        self.apply_search_params()

    @classmethod
    def build(cls, descriptors: Any, kind: str = "flat", params: dict[str, Any] | None = None) -> "NeighbourIndex":
        x = as_float32(descriptors)
        n, d = x.shape
        p = resolve_params(kind, params, n, d)
        if kind == "flat":
            index = faiss.IndexFlatL2(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, p["M"])
            index.hnsw.efConstruction = p["efConstruction"]
        else:
            quantizer = faiss.IndexFlatL2(d)
            index = faiss.IndexIVFPQ(quantizer, d, p["nlist"], p["m"], p["nbits"])
            rng = np.random.default_rng(p["seed"])
            train = x if p["train_size"] >= n else x[np.sort(rng.choice(n, p["train_size"], replace=False))]
            index.cp.seed = p["seed"]
            # Polysemous codes only speed up Hamming-filtered search, which is not used; training them
            # dominates build time (simulated annealing).
            index.do_polysemous_training = False
            index.train(train)
        index.add(x)
        return cls(kind, p, index)

    def apply_search_params(self) -> None:
        """Set efSearch / nprobe on the FAISS object and check that they took effect."""
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = self.params["efSearch"]
            if self.index.hnsw.efSearch != self.params["efSearch"]:
                raise RuntimeError("FAISS did not accept efSearch")
        elif self.kind == "ivfpq":
            self.index.nprobe = self.params["nprobe"]
            if self.index.nprobe != self.params["nprobe"]:
                raise RuntimeError("FAISS did not accept nprobe")

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """k nearest training atoms of each query.

        Returns:
            distances: (n, k) float64 Euclidean distances, +inf where no neighbour was found;
            ids: (n, k) int64 training-atom indices, 0 where no neighbour was found (masked);
            valid: (n, k) bool, False where FAISS returned −1.
        """
        q = as_float32(queries, "query descriptors", self.dim)
        if k < 1 or k > self.ntotal:
            raise ValueError(f"k must lie in [1, {self.ntotal}] (the number of indexed atoms); got {k}")
        if q.shape[0] * self.ntotal * self.dim <= SERIAL_SEARCH_WORK and faiss.omp_get_max_threads() > 1:
            # a per-step search (tens to hundreds of atoms) is too small to share: OpenMP's start-up and
            # barrier cost more than the search itself, and on a busy machine an idle-spinning second
            # thread made it 20x slower (measured: 40 ms vs 2 ms for 29 queries over 12.5 k x 16)
            n_threads = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)
            try:
                d2, ids = self.index.search(q, int(k))
            finally:
                faiss.omp_set_num_threads(n_threads)
        else:
            d2, ids = self.index.search(q, int(k))
        valid = ids >= 0
        # Float32 round-off can give tiny negative squared distances.
        dist = np.where(valid, np.sqrt(np.maximum(d2.astype(np.float64), 0.0)), np.inf)
        return dist, np.where(valid, ids, 0).astype(np.int64), valid

    def to_bytes(self) -> np.ndarray:
        """Serialised index as a (B,) uint8 array."""
        return np.asarray(faiss.serialize_index(self.index), dtype=np.uint8)

    @classmethod
    def from_bytes(cls, data: np.ndarray, kind: str, params: dict[str, Any]) -> "NeighbourIndex":
        buf = np.ascontiguousarray(np.asarray(data, dtype=np.uint8))
        try:
            index = faiss.deserialize_index(buf)
        except RuntimeError as exc:
            raise ValueError(f"the stored FAISS index is corrupt: {str(exc).splitlines()[0] if str(exc) else exc}") from None
        expected = {"flat": faiss.IndexFlatL2, "hnsw": faiss.IndexHNSWFlat, "ivfpq": faiss.IndexIVFPQ}[kind]
        if not isinstance(index, expected):
            raise ValueError(f"the stored FAISS index is a {type(index).__name__}; expected {expected.__name__} for {kind!r}")
        return cls(kind, {k: int(v) for k, v in params.items()}, index)
