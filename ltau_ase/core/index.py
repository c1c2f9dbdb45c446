"""FAISS nearest-neighbour index over training-atom descriptors (paper Algorithm 2, App. A.2).

Index kinds:

* ``"flat"``: exact search over the (N, D) float32 vectors, which may be a read-only memory map of the
  estimator file; memory 4·D bytes per atom. From 4096 atoms up to 256 MiB of vectors the search is
  pruned by cluster bounds (:mod:`ltau_ase.core.exact_search`: the same neighbours, a fraction of the
  work, plus a second 4·D bytes per atom); otherwise it is a brute-force scan (``faiss.knn``).
* ``"hnsw"``: ``IndexHNSWFlat``; params ``M`` (32), ``efConstruction`` (40), ``efSearch`` (16).
* ``"ivfpq"``: ``IndexIVFPQ`` with exact re-ranking; params ``nlist`` (≈ 4·√N up to 4096 lists, at
  least 39 training points per list; above ~2.5·10⁶ atoms N/610 lists, at most 65536, so that a probe
  scans a list of fixed size and the query cost stops growing with N), ``m`` (sub-quantizers: D/4
  when 4 divides D, i.e. one code byte per 4 dimensions, else the largest divisor of D ≤ D/4),
  ``nbits`` (8, fewer for tiny N), ``nprobe`` (min(nlist, 8)), ``train_size`` (points used to train,
  default min(N, max(64·nlist, 256·2^nbits)), 40·nlist above 4096 lists), ``seed`` (0) and
  ``refine`` (4): the PQ search returns a shortlist of refine·k candidates, which are re-ranked by
  their exact distances to the full float32 vectors, computed in place (FAISS
  ``fvec_L2sqr_by_idx``) on the very array the index was given: the fit's descriptors after
  :meth:`NeighbourIndex.build` with ``copy=False`` (what ``LTAUEstimator.fit`` does: no second copy),
  the memory-mapped vectors of the estimator file after a load (only the touched rows become
  resident). ``refine=0`` returns the PQ approximations without re-ranking and keeps no vectors. The
  coarse quantizer is exact (``IndexFlatL2``) up to 4096 lists and an HNSW graph over the centroids
  (M 32, efSearch :func:`quantizer_ef_search`) above, where a brute-force scan of the centroids would
  dominate the query time. FAISS's precomputed residual tables are not kept (nlist·m·2^nbits·4
  bytes, no measured speed gain). Resident memory ≈ (m·nbits/8 + 8) bytes per atom plus the
  centroids, plus the touched (evictable, page-cache) pages of the vector map.
  Measured (``benchmarks/knn_scaling.py``): see the README's kNN table.

Why re-ranking against the given (or memory-mapped) vectors rather than FAISS's ``IndexRefineFlat``:
the latter keeps a second, full float32 copy of every vector in RAM (4·D bytes per atom on top of
the codes), i.e. more resident memory than the flat index itself, which defeats the purpose of a
compressed index.

``index="auto"`` (:func:`choose_index`) picks flat below 10⁵ atoms, HNSW below 10⁶ and IVF-PQ with
re-ranking (default settings above) from 10⁶ on (HNSW took 374 s to build at 10⁶ on the 2-core
reference machine); the built index's ``reason`` names the choice and its settings.

Descriptors are converted to C-contiguous float32 here. :meth:`NeighbourIndex.search` returns
*Euclidean* distances (the square root of squared L2) and a validity mask: approximate indexes may
return id −1 when fewer than k neighbours are reached, and those slots are masked, never used to
index the training arrays. ``search`` requires 1 ≤ k ≤ N; the estimator clamps k to N.

Stored indexes (:meth:`NeighbourIndex.to_arrays` / :meth:`NeighbourIndex.from_arrays`) are plain
arrays: flat keeps only its vectors; hnsw and ivfpq keep a FAISS blob that is deserialised with
FAISS's per-vector byte limit set to the blob's own length (no declared size can allocate more than
the blob holds) and then checked structurally (exact class, D, N, parameters, graph neighbour ids,
inverted-list ids) before any search touches it.
"""
from __future__ import annotations

import math
import mmap
import threading
from typing import Any

import faiss
import numpy as np

from ltau_ase.core.checks import check_int
from ltau_ase.core.exact_search import PRUNED_MAX_BYTES, PRUNED_MIN_ATOMS, PrunedExactSearch
from ltau_ase.core.fileformat import StreamedBytes

INDEX_KINDS = ("flat", "hnsw", "ivfpq")
INDEX_CHOICES = INDEX_KINDS + ("auto",)
#: index="auto": flat below this many training atoms, ...
AUTO_HNSW_ATOMS = 100_000
#: ... HNSW below this many, IVF-PQ with exact re-ranking from here on
AUTO_IVFPQ_ATOMS = 1_000_000
#: IVF coarse quantizer: exact below/at this many lists, HNSW above (scanning all centroids would
#: dominate a query above a few thousand lists)
HNSW_QUANTIZER_NLIST = 4096
#: default lists: 4·√N up to HNSW_QUANTIZER_NLIST (exact quantizer); from there on, once N exceeds
#: HNSW_QUANTIZER_NLIST lists of this many atoms, N / this many lists (HNSW quantizer): a probe then
#: scans a fixed-size list, so the query cost stops growing with N (10⁷ atoms: 16 393 lists;
#: measured there: 4096 lists, nprobe 8 took 195-204 µs per query, 16 384 lists 83-107 µs)
LARGE_LIST_ATOMS = 610
#: default nlist cap (k-means training costs train_size·nlist·D flops per iteration)
MAX_DEFAULT_NLIST = 65536
#: training points per list (FAISS warns below 39): exact quantizer / HNSW quantizer (where k-means
#: over many lists dominates the build)
TRAIN_PER_LIST = 64
TRAIN_PER_LIST_LARGE = 40
#: search-time parameters whose change needs no rebuild
SEARCH_PARAMS = {"hnsw": {"efSearch"}, "ivfpq": {"nprobe", "refine"}, "flat": set()}
#: sane ranges (inclusive) for every index parameter; files and users outside them are refused
PARAM_RANGES = {
    "M": (2, 256),
    "efConstruction": (1, 4096),
    "efSearch": (1, 4096),
    "nlist": (1, 1 << 20),
    "m": (1, 4096),
    "nbits": (1, 16),
    "nprobe": (1, 1 << 20),
    "train_size": (1, 1 << 40),
    "seed": (0, 2**31 - 1),
    "refine": (0, 64),
}
#: queries × indexed atoms × D up to which :meth:`NeighbourIndex.search` runs FAISS on one thread
SERIAL_SEARCH_WORK = 1 << 25
_ALLOWED = {
    "flat": set(),
    "hnsw": {"M", "efConstruction", "efSearch"},
    "ivfpq": {"nlist", "m", "nbits", "nprobe", "train_size", "seed", "refine"},
}
_FAISS_LIMIT_LOCK = threading.Lock()
_PRUNED_BUILD_LOCK = threading.Lock()
_QUERY_CHUNK = 4096


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
    bad = _nonfinite_rows(out)
    if bad.size:
        raise ValueError(f"{name} contain NaN or inf (or overflow float32) in {bad.size} rows, e.g. {bad[:5].tolist()}")
    return out


def _nonfinite_rows(x: np.ndarray, block: int = 1 << 16) -> np.ndarray:
    """Sorted row numbers of a 2-d array holding NaN or inf, checked in blocks of rows: a whole-array
    mask would be a temporary of N·D bytes (320 MB at 10⁷ × 32), held while a fit's other arrays are."""
    if x.shape[0] <= block and np.isfinite(x).all():  # the per-step case: one small finite batch
        return np.empty(0, dtype=np.int64)
    bad = [start + np.nonzero(~np.isfinite(x[start : start + block]).all(axis=1))[0]
           for start in range(0, x.shape[0], block)]
    return np.concatenate(bad) if bad else np.empty(0, dtype=np.int64)


def choose_index(n_atoms: int) -> tuple[str, str]:
    """The ``index="auto"`` policy: (kind, one-line reason) for N training atoms."""
    n = int(n_atoms)
    if n < AUTO_HNSW_ATOMS:
        return "flat", f"auto: flat (exact) index for {n} < {AUTO_HNSW_ATOMS} training atoms"
    if n < AUTO_IVFPQ_ATOMS:
        return "hnsw", f"auto: hnsw index for {AUTO_HNSW_ATOMS} <= {n} < {AUTO_IVFPQ_ATOMS} training atoms"
    return "ivfpq", f"auto: ivfpq index with exact re-ranking for {n} >= {AUTO_IVFPQ_ATOMS} training atoms"


def describe_index(kind: str, params: dict[str, int]) -> str:
    """One line naming the index and its settings, e.g. for ``index="auto"``'s report."""
    if kind == "flat":
        return "flat (exact search)"
    if kind == "hnsw":
        return f"hnsw M={params['M']}, efConstruction={params['efConstruction']}, efSearch={params['efSearch']}"
    quantizer = "HNSW" if params["nlist"] > HNSW_QUANTIZER_NLIST else "exact"
    shortlist = (f"a shortlist of {params['refine']}·k re-ranked exactly" if params["refine"] > 0
                 else "PQ distances, no re-ranking")
    return (f"ivfpq nlist={params['nlist']} ({quantizer} coarse quantizer), m={params['m']}, nbits={params['nbits']}, "
            f"nprobe={params['nprobe']}, {shortlist}")


def quantizer_ef_search(nprobe: int) -> int:
    """efSearch of an HNSW coarse quantizer that must return the nprobe nearest lists: 2·nprobe, at
    least 16 (measured at 10⁷ atoms, 16 384 lists, nprobe 8: efSearch 16 / 32 / 64 gave recall@10
    0.979 / 0.981 / 0.981 at 10 / 16 / 26 µs of quantizer time per query)."""
    return max(16, 2 * int(nprobe))


def default_params(kind: str, n: int, d: int) -> dict[str, int]:
    """Defaults for ``kind`` given N training atoms of dimension D (see module docstring)."""
    if kind == "flat":
        return {}
    if kind == "hnsw":
        return {"M": 32, "efConstruction": 40, "efSearch": 16}
    if kind == "ivfpq":
        nlist = max(1, min(int(round(4 * math.sqrt(n))), n // 39))
        if nlist > HNSW_QUANTIZER_NLIST:
            nlist = min(max(HNSW_QUANTIZER_NLIST, n // LARGE_LIST_ATOMS), MAX_DEFAULT_NLIST)
        per_list = TRAIN_PER_LIST if nlist <= HNSW_QUANTIZER_NLIST else TRAIN_PER_LIST_LARGE
        if d % 4 == 0:
            m = d // 4
        else:
            m = max(x for x in range(1, max(1, d // 4) + 1) if d % x == 0)
        nbits = max(1, min(8, int(math.log2(max(2, n // 39)))))
        return {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": min(nlist, 8),
                "train_size": min(n, max(per_list * nlist, 256 * 2**nbits)), "seed": 0, "refine": 4}
    raise ValueError(f"unknown index kind {kind!r}; expected one of {INDEX_KINDS}")


def resolve_params(kind: str, params: dict[str, Any] | None, n: int, d: int, strict: bool = False) -> dict[str, int]:
    """Merge user ``index_params`` into the defaults, checking names and values.

    ``strict=True`` (used for stored files) refuses what would otherwise be adjusted (nprobe > nlist,
    train_size > N) and requires every parameter to be given.
    """
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {INDEX_KINDS}")
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"index_params must be a dict or None; got {type(params).__name__}")
    params = dict(params or {})
    unknown = set(params) - _ALLOWED[kind]
    if unknown:
        raise ValueError(f"unknown index_params {sorted(unknown)} for index {kind!r}; allowed: {sorted(_ALLOWED[kind])}")
    if strict and set(params) != _ALLOWED[kind]:
        raise ValueError(f"stored index parameters {sorted(params)} for {kind!r}; expected {sorted(_ALLOWED[kind])}")
    out = default_params(kind, n, d)
    for key, value in params.items():
        check_int(value, f"index_params[{key!r}]", minimum=None)
        lo, hi = PARAM_RANGES[key]
        if not lo <= int(value) <= hi:
            raise ValueError(f"index_params[{key!r}] must lie in [{lo}, {hi}]; got {value}")
        out[key] = int(value)
    if kind == "ivfpq":
        if out["m"] > d or d % out["m"] != 0:
            raise ValueError(f"ivfpq m={out['m']} must divide the descriptor dimension D={d}")
        if out["nlist"] > n:
            raise ValueError(f"ivfpq nlist={out['nlist']} exceeds the {n} training atoms; expected nlist <= N")
        if out["nprobe"] > out["nlist"]:
            if strict:
                raise ValueError(f"ivfpq nprobe={out['nprobe']} exceeds nlist={out['nlist']}")
            out["nprobe"] = out["nlist"]
        if out["train_size"] > n:
            if strict:
                raise ValueError(f"ivfpq train_size={out['train_size']} exceeds the {n} training atoms")
            out["train_size"] = n
        need = max(out["nlist"], 2 ** out["nbits"])
        if out["train_size"] < need:
            raise ValueError(
                f"ivfpq needs at least max(nlist, 2**nbits) = {need} training points; got train_size={out['train_size']}"
            )
    return out


def _deserialize(blob: np.ndarray, expected: type) -> "faiss.Index":
    """Deserialise a FAISS blob without letting a declared size allocate more than the blob holds.

    IVF-PQ's precomputed tables (sized by the blob's nlist·m·2^nbits, not by its length) are skipped;
    the index searches without them.
    """
    buf = np.asarray(blob, dtype=np.uint8).reshape(-1)
    pos = 0

    def read(size: int) -> bytes:
        # Streamed in pieces from the (possibly memory-mapped) array: no second full copy of the blob.
        nonlocal pos
        piece = buf[pos : pos + size].tobytes()
        pos += len(piece)
        return piece

    with _FAISS_LIMIT_LOCK:  # the limits are process-wide
        old_bytes, old_loops = faiss.get_deserialization_vector_byte_limit(), faiss.get_deserialization_loop_limit()
        try:
            faiss.set_deserialization_vector_byte_limit(max(1, int(buf.size)))
            faiss.set_deserialization_loop_limit(max(1, int(buf.size)))
            index = faiss.read_index(faiss.PyCallbackIOReader(read, 1 << 20), faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE)
        except (RuntimeError, MemoryError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"the stored FAISS index is corrupt: {first}") from None
        finally:
            faiss.set_deserialization_vector_byte_limit(old_bytes)
            faiss.set_deserialization_loop_limit(old_loops)
    if type(index) is not expected:
        raise ValueError(f"the stored FAISS index is a {type(index).__name__}; expected {expected.__name__}")
    return index


def _view(vec: Any, dtype: Any, n: int) -> np.ndarray:
    """A numpy view of a FAISS std::vector (no copy)."""
    if n == 0:
        return np.empty(0, dtype=dtype)
    return faiss.rev_swig_ptr(vec.data(), n).view(dtype)


def _check_hnsw_graph(hnsw: Any, n: int, what: str) -> None:
    """Neighbour ids, levels and offsets of an HNSW graph must describe n nodes (else FAISS reads out of bounds)."""
    levels = _view(hnsw.levels, np.int32, hnsw.levels.size())
    offsets = _view(hnsw.offsets, np.uint64, hnsw.offsets.size())
    cum = _view(hnsw.cum_nneighbor_per_level, np.int32, hnsw.cum_nneighbor_per_level.size())
    neighbors = _view(hnsw.neighbors, np.int32, hnsw.neighbors.size())
    bad = f"the stored {what} HNSW graph is corrupt"
    if levels.size != n or offsets.size != n + 1 or cum.size < 2:
        raise ValueError(f"{bad}: {levels.size} levels / {offsets.size} offsets for {n} nodes")
    if np.any(np.diff(cum) < 0) or cum[0] != 0:
        raise ValueError(f"{bad}: neighbour counts per level are not increasing")
    if n and (levels.min() < 1 or levels.max() >= cum.size or hnsw.max_level != int(levels.max()) - 1):
        raise ValueError(f"{bad}: node levels out of range")
    if offsets[0] != 0 or np.any(np.diff(offsets.astype(np.int64)) != cum[levels].astype(np.int64)) or int(offsets[-1]) != neighbors.size:
        raise ValueError(f"{bad}: adjacency offsets disagree with the node levels")
    if neighbors.size and (neighbors.min() < -1 or neighbors.max() >= n):
        raise ValueError(f"{bad}: neighbour ids outside [-1, {n})")
    if n and not 0 <= hnsw.entry_point < n:
        raise ValueError(f"{bad}: entry point {hnsw.entry_point} outside [0, {n})")


class NeighbourIndex:
    """A built nearest-neighbour index with its kind and parameters.

    Use :meth:`build` or :meth:`from_arrays`. ``index`` is the FAISS object (None for flat);
    ``vectors`` the (N, D) float32 vectors (flat; ivfpq with refine > 0), possibly a read-only
    ``np.memmap``; None for hnsw (its vectors live in the FAISS object).
    """

    def __init__(self, kind: str, params: dict[str, int], index: "faiss.Index | None", vectors: np.ndarray | None,
                 n: int, d: int, reason: str | None = None) -> None:
        self.kind = kind
        self.params = dict(params)
        self.index = index
        self.vectors = vectors
        self._n, self._d = int(n), int(d)
        #: why this kind was chosen (index="auto"), else None
        self.reason = reason
        self._pruned: PrunedExactSearch | None = None  # flat's fast path, built on first search
        self.apply_search_params()

    @classmethod
    def build(cls, descriptors: Any, kind: str = "flat", params: dict[str, Any] | None = None,
              copy: bool = True) -> "NeighbourIndex":
        """Build over (N, D) descriptors; ``kind="auto"`` applies :func:`choose_index`.

        ``copy=True`` (the default) gives the index its own float32 vectors, so that it does not change
        when the caller's array does. ``copy=False`` keeps C-contiguous float32 ``descriptors`` (an
        ndarray or a read-only memory map) as the index's ``vectors`` itself (flat; ivfpq with
        refine > 0): no second N·D·4 bytes; the caller must then not modify the array (other dtypes or
        layouts are converted, i.e. copied, either way). :meth:`LTAUEstimator.fit
        <ltau_ase.core.estimator.LTAUEstimator.fit>` builds this way.
        """
        x = as_float32(descriptors)
        if copy and np.may_share_memory(x, descriptors):
            x = x.copy()  # the index must not change when the caller's array does
        n, d = x.shape
        reason = None
        if kind == "auto":
            if params:
                raise ValueError("index_params need an explicit index kind (flat, hnsw or ivfpq), not 'auto'")
            kind, reason = choose_index(n)
        p = resolve_params(kind, params, n, d)
        if reason is not None:
            reason = f"{reason}: {describe_index(kind, p)}"
        if kind == "flat":
            return cls(kind, p, None, x, n, d, reason)
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, p["M"])
            index.hnsw.efConstruction = p["efConstruction"]
            index.add(x)
            return cls(kind, p, index, None, n, d, reason)
        if p["nlist"] > HNSW_QUANTIZER_NLIST:
            quantizer = faiss.IndexHNSWFlat(d, 32)
            quantizer.hnsw.efConstruction = 40
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
        _drop_precomputed_table(index)
        return cls(kind, p, index, x if p["refine"] > 0 else None, n, d, reason)

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
            quantizer = faiss.downcast_index(self.index.quantizer)
            if isinstance(quantizer, faiss.IndexHNSWFlat):
                quantizer.hnsw.efSearch = quantizer_ef_search(self.params["nprobe"])

    def __getstate__(self) -> dict[str, Any]:
        # the pruned search is a cache (FAISS lists and a lock): copies and pickles rebuild it on first use
        state = dict(self.__dict__)
        state["_pruned"] = None
        return state

    def _pruned_search(self) -> PrunedExactSearch | None:
        """The flat index's exact pruned search (built on first use: a fit or load that never predicts
        does not pay for it), or None where a plain scan is used (see :mod:`ltau_ase.core.exact_search`)."""
        if self.kind != "flat" or not (PRUNED_MIN_ATOMS <= self._n and self._n * self._d * 4 <= PRUNED_MAX_BYTES):
            return None
        if self._pruned is not None:  # the per-step path: no lock once built
            return self._pruned
        with _PRUNED_BUILD_LOCK:
            if self._pruned is None:
                self._pruned = PrunedExactSearch(np.asarray(self.vectors))
        return self._pruned

    @property
    def ntotal(self) -> int:
        return self._n

    @property
    def dim(self) -> int:
        return self._d

    def training_vectors(self) -> np.ndarray | None:
        """The (N, D) float32 indexed vectors, or None when the index keeps only compressed codes."""
        if self.vectors is not None:
            return self.vectors
        if self.kind == "hnsw":
            storage = faiss.downcast_index(self.index.storage)
            return faiss.rev_swig_ptr(storage.get_xb(), self._n * self._d).reshape(self._n, self._d).copy()
        return None

    def with_params(self, kind: str, params: dict[str, Any] | None) -> "NeighbourIndex":
        """This index under a new kind / params: search-time changes apply in place, others rebuild.

        Raises ValueError when a rebuild is needed but the index keeps no full vectors (ivfpq with
        refine=0).
        """
        reason = None
        if kind == "auto":
            if params:
                raise ValueError("index_params need an explicit index kind (flat, hnsw or ivfpq), not 'auto'")
            kind, reason = choose_index(self._n)
        p = resolve_params(kind, params, self._n, self._d)
        if kind == self.kind:
            changed = {key for key in p if p[key] != self.params.get(key)}
            if changed <= SEARCH_PARAMS[kind] and not ("refine" in changed and self.vectors is None):
                self.params = p
                self.reason = None if reason is None else f"{reason}: {describe_index(kind, p)}"
                self.apply_search_params()
                return self
        x = self.training_vectors()
        if x is None:
            raise ValueError(
                f"cannot change the {self.kind} index to {kind} {p} after fit: it keeps only compressed codes, "
                "not the training descriptors; call fit(...) again"
            )
        # the vectors are this index's own (or a read-only map of the estimator file): shared, not copied
        rebuilt = NeighbourIndex.build(x, kind, p, copy=False)
        rebuilt.reason = None if reason is None else f"{reason}: {describe_index(kind, p)}"
        return rebuilt

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """k nearest training atoms of each query.

        Returns:
            distances: (n, k) float64 Euclidean distances, +inf where no neighbour was found;
            ids: (n, k) int64 training-atom indices, 0 where no neighbour was found (masked);
            valid: (n, k) bool, False where the index found fewer than k neighbours.
        """
        q = as_float32(queries, "query descriptors", self.dim)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 or k > self.ntotal:
            raise ValueError(f"k must lie in [1, {self.ntotal}] (the number of indexed atoms); got {k!r}")
        return self.search_checked(q, int(k))

    def search_checked(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`search` for queries already validated by :func:`as_float32` (C-contiguous, finite
        float32 of this index's dimension) and 1 ≤ k ≤ N: the per-step path, which checks once."""
        n_threads = faiss.omp_get_max_threads()
        serial = q.shape[0] * self.ntotal * self.dim <= SERIAL_SEARCH_WORK and n_threads > 1
        if serial:
            # a per-step search (tens to hundreds of atoms) is too small to share: OpenMP's start-up and
            # barrier cost more than the search itself, and on a busy machine an idle-spinning second
            # thread made it 20x slower (measured: 40 ms vs 2 ms for 29 queries over 12.5 k x 16)
            faiss.omp_set_num_threads(1)
        try:
            if self.kind == "flat":
                d2, ids = self._exact_search(q, k)
            elif self.kind == "ivfpq" and self.params["refine"] > 0:
                d2, ids = self._refined_search(q, k)
            else:
                d2, ids = self.index.search(q, k)
        finally:
            if serial:
                faiss.omp_set_num_threads(n_threads)
        valid = ids >= 0
        # Float32 round-off can give tiny negative squared distances.
        dist = np.where(valid, np.sqrt(np.maximum(d2.astype(np.float64), 0.0)), np.inf)
        return dist, np.where(valid, ids, 0).astype(np.int64), valid

    def _exact_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The flat index's search: pruned by cluster bounds where built, else a brute-force scan."""
        pruned = self._pruned_search()
        return faiss.knn(q, self.vectors, k) if pruned is None else pruned.search(q, k)

    def _refined_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """PQ shortlist of refine·k candidates, re-ranked by exact squared distances to the full vectors.

        The distances are computed in place on the stored vectors (FAISS ``fvec_L2sqr_by_idx``: no
        gathered copy of the candidate rows; 10x faster than a numpy gather at 40 candidates).
        """
        short = min(self._n, self.params["refine"] * k)
        vectors = self.vectors
        if not vectors.flags.c_contiguous or vectors.dtype != np.float32:  # (checked at build / load)
            raise RuntimeError("ivfpq re-ranking needs C-contiguous float32 vectors")
        d2_out = np.empty((q.shape[0], k), dtype=np.float32)
        ids_out = np.empty((q.shape[0], k), dtype=np.int64)
        for start in range(0, q.shape[0], _QUERY_CHUNK):
            qc = np.ascontiguousarray(q[start : start + _QUERY_CHUNK])
            _, cand = self.index.search(qc, short)
            ok = cand >= 0
            rows = np.ascontiguousarray(np.where(ok, cand, 0))  # -1 (no candidate) must not be read
            d2 = np.empty(rows.shape, dtype=np.float32)
            faiss.fvec_L2sqr_by_idx(faiss.swig_ptr(d2), faiss.swig_ptr(qc), faiss.swig_ptr(vectors),
                                    faiss.swig_ptr(rows), self._d, qc.shape[0], short)
            d2[~ok] = np.inf
            top = np.argsort(d2, axis=1, kind="stable")[:, :k]
            sel_d2 = np.take_along_axis(d2, top, axis=1)
            sel_ids = np.take_along_axis(cand, top, axis=1)
            sel_ids[~np.isfinite(sel_d2)] = -1
            d2_out[start : start + qc.shape[0]] = sel_d2
            ids_out[start : start + qc.shape[0]] = sel_ids
        return d2_out, ids_out

    # ------------------------------------------------------------------ storage
    def to_arrays(self, streamed: bool = False) -> dict[str, Any]:
        """Plain arrays for the estimator file: ``index_vectors`` (flat; ivfpq with refine) and/or
        ``faiss_index`` (a (B,) uint8 FAISS blob: hnsw, ivfpq).

        ``streamed=True`` gives the blob as a :class:`~ltau_ase.core.fileformat.StreamedBytes` that
        :func:`~ltau_ase.core.fileformat.write_container` serialises straight into the file in 1 MB
        pieces (``serialize_index`` would hold it twice in RAM: 2 × 170 MB at 10⁷ atoms).
        """
        out: dict[str, Any] = {}
        if self.vectors is not None:
            out["index_vectors"] = self.vectors
        if self.index is not None:
            if streamed:
                index = self.index
                out["faiss_index"] = StreamedBytes(
                    lambda write: faiss.write_index(index, faiss.PyCallbackIOWriter(write, 1 << 20)))
            else:
                out["faiss_index"] = np.asarray(faiss.serialize_index(self.index), dtype=np.uint8)
        return out

    def to_bytes(self) -> np.ndarray:
        """The FAISS-serialised form of the searchable structure (flat: an IndexFlatL2 of the vectors)."""
        if self.index is None:
            flat = faiss.IndexFlatL2(self._d)
            flat.add(np.ascontiguousarray(self.vectors))
            return np.asarray(faiss.serialize_index(flat), dtype=np.uint8)
        return np.asarray(faiss.serialize_index(self.index), dtype=np.uint8)

    @staticmethod
    def stored_arrays(kind: str, params: dict[str, int]) -> set[str]:
        """Names of the arrays :meth:`to_arrays` writes for ``kind`` / ``params``."""
        if kind == "flat":
            return {"index_vectors"}
        if kind == "ivfpq" and params.get("refine", 0) > 0:
            return {"faiss_index", "index_vectors"}
        return {"faiss_index"}

    @classmethod
    def from_arrays(cls, kind: str, params: dict[str, Any], arrays: dict[str, np.ndarray], n: int, d: int,
                    check_values: bool = True) -> "NeighbourIndex":
        """Rebuild a stored index, checking it against the expected kind, N, D and parameters.

        ``check_values=False`` skips the O(N·D) finiteness scan of memory-mapped vectors (``verify`` does it).
        """
        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown stored index kind {kind!r}; expected one of {INDEX_KINDS}")
        if not isinstance(params, dict):
            raise ValueError("stored index parameters are not a mapping")
        p = resolve_params(kind, params, n, d, strict=True)
        if set(arrays) != cls.stored_arrays(kind, p):
            raise ValueError(f"a stored {kind} index needs arrays {sorted(cls.stored_arrays(kind, p))}; got {sorted(arrays)}")
        vectors = arrays.get("index_vectors")
        if vectors is not None:
            if vectors.dtype != np.float32 or vectors.shape != (n, d):
                raise ValueError(f"stored index vectors are {vectors.dtype} {vectors.shape}; expected float32 ({n}, {d})")
            if check_values:
                _check_finite_rows(vectors)
            if kind == "ivfpq":
                _advise_random(vectors)
        if kind == "flat":
            return cls(kind, p, None, vectors, n, d)
        blob = arrays["faiss_index"]
        if blob.dtype != np.uint8 or blob.ndim != 1:
            raise ValueError("the stored FAISS index must be a 1-d uint8 array")
        if kind == "hnsw":
            index = _deserialize(blob, faiss.IndexHNSWFlat)
            _check_common(index, n, d, kind)
            if index.hnsw.nb_neighbors(1) != p["M"] or index.hnsw.nb_neighbors(0) != 2 * p["M"]:
                raise ValueError(f"the stored HNSW graph has M={index.hnsw.nb_neighbors(1)}; the header says {p['M']}")
            storage = faiss.downcast_index(index.storage)
            if type(storage) is not faiss.IndexFlatL2 or storage.ntotal != n or storage.d != d:
                raise ValueError("the stored HNSW index's vector storage does not hold N x D float32 vectors")
            _check_hnsw_graph(index.hnsw, n, "training")
            return cls(kind, p, index, None, n, d)
        index = _deserialize(blob, faiss.IndexIVFPQ)
        _check_common(index, n, d, kind)
        if index.nlist != p["nlist"] or index.pq.M != p["m"] or index.pq.nbits != p["nbits"] or index.pq.d != d:
            raise ValueError(
                f"the stored IVF-PQ index has nlist={index.nlist}, m={index.pq.M}, nbits={index.pq.nbits}; "
                f"the header says {p['nlist']}, {p['m']}, {p['nbits']}"
            )
        if index.pq.centroids.size() != p["m"] * (2 ** p["nbits"]) * (d // p["m"]):
            raise ValueError("the stored IVF-PQ codebooks have the wrong size")
        quantizer = faiss.downcast_index(index.quantizer)
        expect_q = faiss.IndexHNSWFlat if p["nlist"] > HNSW_QUANTIZER_NLIST else faiss.IndexFlatL2
        if type(quantizer) is not expect_q or quantizer.ntotal != p["nlist"] or quantizer.d != d:
            raise ValueError(f"the stored IVF-PQ coarse quantizer is not a {expect_q.__name__} of {p['nlist']} centroids")
        if expect_q is faiss.IndexHNSWFlat:
            _check_hnsw_graph(quantizer.hnsw, p["nlist"], "coarse-quantizer")
        invlists = faiss.extract_index_ivf(index).invlists
        if invlists.nlist != p["nlist"] or invlists.code_size != index.pq.code_size:
            raise ValueError("the stored IVF-PQ inverted lists disagree with nlist / code size")
        sizes = [invlists.list_size(lst) for lst in range(p["nlist"])]
        if sum(sizes) != n:
            raise ValueError(f"the stored IVF-PQ inverted lists hold {sum(sizes)} entries; expected N={n}")
        # N entries in all (checked above), each in [0, N), together covering [0, N): every atom once.
        seen = np.zeros(n, dtype=bool)
        for lst, size in enumerate(sizes):
            if size:
                ids = faiss.rev_swig_ptr(invlists.get_ids(lst), size).view(np.int64)
                if ids.min() < 0 or ids.max() >= n:
                    raise ValueError(f"the stored IVF-PQ index holds atom ids outside [0, {n})")
                seen[ids] = True
        if not seen.all():
            raise ValueError("the stored IVF-PQ index does not hold every training atom exactly once")
        del seen
        _drop_precomputed_table(index)  # (skipped while deserialising, and not rebuilt)
        return cls(kind, p, index, vectors, n, d)

    @classmethod
    def from_bytes(cls, data: np.ndarray, kind: str, params: dict[str, Any]) -> "NeighbourIndex":
        """Rebuild from a FAISS blob alone (format-1 estimator files); sizes come from the blob and are checked."""
        expected = {"flat": faiss.IndexFlatL2, "hnsw": faiss.IndexHNSWFlat, "ivfpq": faiss.IndexIVFPQ}[kind]
        index = _deserialize(data, expected)
        n, d = int(index.ntotal), int(index.d)
        if kind == "flat":
            vectors = faiss.rev_swig_ptr(index.get_xb(), n * d).reshape(n, d).copy() if n else np.empty((0, d), np.float32)
            return cls.from_arrays("flat", {}, {"index_vectors": vectors}, n, d)
        p = {key: int(v) for key, v in params.items()}
        if kind == "ivfpq":
            p.setdefault("refine", 0)  # format 1 kept no full vectors
            if p["refine"] != 0:
                raise ValueError("a FAISS-only ivfpq blob cannot be re-ranked (no full vectors); expected refine=0")
        return cls.from_arrays(kind, p, {"faiss_index": np.asarray(data, dtype=np.uint8)}, n, d)


def _check_common(index: "faiss.Index", n: int, d: int, kind: str) -> None:
    if index.ntotal != n or index.d != d or index.metric_type != faiss.METRIC_L2 or not index.is_trained:
        raise ValueError(
            f"the stored {kind} FAISS index holds {index.ntotal} vectors of dimension {index.d}; the header says N={n}, D={d}"
        )


def _drop_precomputed_table(index: "faiss.IndexIVFPQ") -> None:
    """Search without IVF-PQ's precomputed residual tables: they cost nlist·m·2^nbits·4 bytes
    (33 MB at nlist 4096, m 8: half of the rest of the index at 10⁶ atoms) and measured no faster here
    (300k atoms, nlist 2000: 46-48 µs per query without versus 50-60 µs with)."""
    index.use_precomputed_table = -1
    index.precomputed_table.clear()


def _advise_random(vectors: np.ndarray) -> None:
    """Re-ranking reads scattered rows: on a memory map, turn off read-ahead so that only the touched
    pages become resident (best effort; a no-op for in-memory arrays)."""
    mm = getattr(vectors, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        try:
            mm.madvise(mmap.MADV_RANDOM)
        except (OSError, ValueError):
            pass


def _check_finite_rows(vectors: np.ndarray, block: int = 1 << 18) -> None:
    for start in range(0, vectors.shape[0], block):
        if not np.all(np.isfinite(vectors[start : start + block])):
            raise ValueError("the stored index vectors contain NaN or inf")
