"""Per-atom error distributions from logged error trajectories (paper Sec. 3.4, Algorithm 1).

For each training atom i and each run m (ensemble member) the logged errors ε_i^t (eV/Å) over the
selected epochs define an empirical CDF F_{m,i}. The LTAU confidence at a threshold t is the
fraction of *logged* epochs with error ≤ t:

    p_{m,i}(t) = #{e : ε_{m,i}^e ≤ t} / #{e : ε_{m,i}^e logged}

NaN entries are missing epochs and are excluded from both counts; an atom with no logged epoch in
some run raises (it is never treated as confident). Over M runs, µ_M(p_i) is the mean of the per-run
fractions (not a pooled fraction, so runs with different epoch counts weigh equally) and σ_M(p_i)
the population standard deviation over runs (ddof = 0).

Two representations:

* :class:`ExactDistributions` keeps every logged error, sorted per atom: M × E × N float32 in memory.
* :class:`CompactDistributions` keeps per-run histograms, M × N × (K + 1) counts on K bin edges
  e_0 < … < e_{K-1} (default 64 log-spaced edges between the smallest positive and the largest error),
  using ≤ semantics: bin 0 is [0, e_0] (exact zeros included), bin j is (e_{j-1}, e_j], bin K is the
  overflow (e_{K-1}, ∞). Counts are uint8 when every run has ≤ 255 epochs (14.6 M atoms × 65 bins:
  0.95 GB per run). Its CDF is exact at bin edges, at the fitted threshold (counted exactly while
  streaming) and above an atom's largest error; elsewhere it interpolates linearly inside the bin
  that holds the threshold, so it differs from the exact CDF by at most that bin's share.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import numpy as np

from ltau_ase.core.errorlog import EpochWindow, ErrorLog
from ltau_ase.core.fileformat import streamed_as

DEFAULT_N_EDGES = 64
#: most bin edges a ``bins`` setting may ask for: the histograms hold M·N·(K+1) counts, and a
#: setting read from a file must not make even the edges themselves (K floats) a memory bomb
MAX_BIN_EDGES = 1 << 16
_EVAL_CHUNK = 1 << 16


class ErrorRun:
    """One run's (E, N) error trajectories, from memory or from an :class:`ErrorLog` (streamed from disk)."""

    def __init__(self, source: np.ndarray | ErrorLog, window: EpochWindow | dict | tuple | None = None) -> None:
        self.source = source
        if isinstance(source, ErrorLog):
            self.atom_ids: np.ndarray | None = source.atom_ids
            self._log: ErrorLog | None = source
            self._window = window  # None: the log's own window
            self._data = None
            self.n_epochs, self.n_atoms = source.n_selected_epochs(window), source.n_atoms
        else:
            arr = np.asarray(source)
            if arr.ndim != 2:
                raise ValueError(f"an error run must be a 2-d (epochs, atoms) array; got shape {arr.shape}")
            if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"errors must be numeric; got dtype {arr.dtype}")
            self.atom_ids = None
            self._log = None
            self._data = arr[EpochWindow.coerce(window).select(arr.shape[0])] if arr.shape[0] else arr
            self.n_epochs, self.n_atoms = (int(s) for s in self._data.shape)
        if self.n_epochs == 0 or self.n_atoms == 0:
            raise ValueError(f"an error run is empty ({self.n_epochs} epochs, {self.n_atoms} atoms); expected both > 0")

    def iter_chunks(self, chunk_size: int) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield (atom_slice, (E, chunk) float32 block), validated (no inf, no negative values)."""
        if self._log is not None:
            for sl, block in self._log.iter_atom_chunks(chunk_size, self._window):
                _validate_block(block)
                yield sl, block
            return
        for start in range(0, self.n_atoms, chunk_size):
            sl = slice(start, min(start + chunk_size, self.n_atoms))
            block = np.array(self._data[:, sl], dtype=np.float32)
            _validate_block(block)
            yield sl, block

    def last_row(self) -> np.ndarray:
        row = self._log.last_row(self._window) if self._log is not None else np.array(self._data[-1], dtype=np.float32)
        _validate_block(row)
        return row


def _validate_block(block: np.ndarray) -> None:
    if np.any(np.isinf(block)):
        raise ValueError("errors contain inf; expected finite non-negative errors (NaN marks a missing epoch)")
    if np.any(block < 0):
        raise ValueError(f"errors contain negative values (min {np.nanmin(block)}); expected error norms >= 0")


def as_runs(errors: Any, window: EpochWindow | dict | tuple | None = None) -> list[ErrorRun]:
    """Normalise every accepted error input to a list of M :class:`ErrorRun`.

    Accepts (E, N), (M, E, N), a list of M (E_m, N) arrays, an :class:`ErrorLog`, or a list of them.
    An ErrorLog's own window applies unless ``window`` is given.
    """
    if isinstance(errors, ErrorLog):
        return [ErrorRun(errors, window)]
    if isinstance(errors, (list, tuple)):
        if len(errors) == 0:
            raise ValueError("errors is an empty list; expected at least one run")
        runs = [ErrorRun(e, window) for e in errors]
    else:
        arr = np.asarray(errors)
        if arr.ndim == 2:
            runs = [ErrorRun(arr, window)]
        elif arr.ndim == 3:
            if arr.shape[0] == 0:
                raise ValueError("errors has zero runs; expected shape (M, E, N) with M >= 1")
            runs = [ErrorRun(a, window) for a in arr]
        else:
            raise ValueError(
                f"errors has shape {arr.shape}; expected (E, N), (M, E, N), a list of (E_m, N) arrays or ErrorLog(s)"
            )
    n = {r.n_atoms for r in runs}
    if len(n) != 1:
        raise ValueError(f"runs log different numbers of atoms {sorted(n)}; expected the same N in every run")
    ids = [r.atom_ids for r in runs if r.atom_ids is not None]
    if any(not np.array_equal(ids[0], other) for other in ids[1:]):
        raise ValueError("error logs hold different atom ids; expected every run to log the same atoms")
    return runs


def default_atol(runs: Sequence[ErrorRun]) -> float:
    """MAE of the final model: per run the mean over atoms of its last (windowed) epoch, averaged over runs."""
    maes = []
    for m, run in enumerate(runs):
        last = run.last_row()
        if np.all(np.isnan(last)):
            raise ValueError(f"the last epoch of run {m} logs no atom; cannot compute the default atol (MAE)")
        maes.append(float(np.nanmean(last, dtype=np.float64)))
    return float(np.mean(maes))


def _count_dtype(max_count: int) -> type:
    for dt in (np.uint8, np.uint16, np.uint32):
        if max_count <= np.iinfo(dt).max:
            return dt
    return np.uint64


def _check_threshold(threshold: Any, n_atoms: int) -> np.ndarray | float:
    t = np.asarray(threshold, dtype=np.float64)
    if t.ndim == 0:
        value = float(t)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"threshold must be a finite number >= 0 (eV/Å); got {value}")
        # A NumPy float64 (not a Python float) so that comparisons with float32 errors happen in
        # float64 instead of rounding the threshold to float32 (NEP 50 weak scalars).
        return np.float64(value)
    if t.shape != (n_atoms,):
        raise ValueError(f"threshold has shape {t.shape}; expected a scalar or ({n_atoms},), one per training atom")
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise ValueError("per-atom thresholds must be finite and >= 0 (eV/Å)")
    return t


def _same_threshold(a: np.ndarray | float, b: np.ndarray | float) -> bool:
    if np.ndim(a) != np.ndim(b):
        return False
    return bool(np.array_equal(a, b))


def _logged_dtype(n_bins: int, count_dtype: Any) -> type:
    """The smallest dtype holding a sum of n_bins counts of ``count_dtype`` without overflow."""
    dt = np.dtype(count_dtype)
    cap = n_bins * (int(np.iinfo(dt).max) if np.issubdtype(dt, np.integer) else 2**62)
    return np.uint16 if cap <= np.iinfo(np.uint16).max else np.uint32 if cap <= np.iinfo(np.uint32).max else np.int64


def _logged_counts(counts: np.ndarray, block: int = 1 << 16) -> np.ndarray:
    """(M, N) logged epochs per run and atom, the sum of (M, N, K+1) counts over the bins.

    Summed in atom blocks into the smallest dtype that cannot overflow (uint16 for uint8 counts up to
    257 bins): an int64 result would be 8·M·N bytes (160 MB at 10⁷ atoms, M = 2) beside the counts.
    """
    out = np.empty(counts.shape[:2], dtype=_logged_dtype(counts.shape[2], counts.dtype))
    for start in range(0, counts.shape[1], block):
        out[:, start : start + block] = counts[:, start : start + block].sum(axis=2, dtype=np.int64)
    return out


def _report_unlogged(n_logged: np.ndarray, atom_ids: np.ndarray | None) -> None:
    bad_runs, bad_atoms = np.nonzero(n_logged == 0)
    if bad_runs.size:
        names = atom_ids[bad_atoms[:5]].tolist() if atom_ids is not None else bad_atoms[:5].tolist()
        what = "atom ids" if atom_ids is not None else "atom indices"
        raise ValueError(
            f"{bad_atoms.size} (run, atom) pairs have no logged epoch (all NaN), e.g. run {int(bad_runs[0])}, "
            f"{what} {names}; expected every training atom to be logged at least once in every run "
            "(choose another epoch window or drop those atoms)"
        )


class _Distributions:
    """Shared ensemble logic; subclasses implement :meth:`_fractions` for a chunk of atoms."""

    kind = ""

    n_runs: int
    n_atoms: int
    n_logged: np.ndarray  # (M, N) number of logged epochs
    mean_error_: np.ndarray  # (N,) mean over runs of each run's mean logged error (eV/Å)
    fitted_threshold: np.ndarray | float  # scalar or (N,) (eV/Å)
    fitted_counts: np.ndarray  # (M, N) exact counts of errors <= fitted_threshold

    def _fractions(self, threshold: np.ndarray | float, atoms: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def confidence_per_run(self, threshold: Any, atoms: np.ndarray | None = None) -> np.ndarray:
        """(M, n) per-run fractions p_{m,i}(threshold) for ``atoms`` (indices; default all N).

        ``threshold`` is a scalar or (N,) (one per training atom, e.g. atol + rtol·|F_ref|), eV/Å.
        """
        t = _check_threshold(threshold, self.n_atoms)
        if _same_threshold(t, self.fitted_threshold):
            if atoms is None:  # a slice, not a fancy index: no (M, N) copies of the counts
                return self.fitted_counts / self.n_logged
            idx = np.asarray(atoms, dtype=np.int64)
            return self.fitted_counts[:, idx] / self.n_logged[:, idx]
        idx = np.arange(self.n_atoms) if atoms is None else np.asarray(atoms, dtype=np.int64)
        out = np.empty((self.n_runs, idx.size), dtype=np.float64)
        for start in range(0, idx.size, _EVAL_CHUNK):
            sub = idx[start : start + _EVAL_CHUNK]
            out[:, start : start + sub.size] = self._fractions(t if np.ndim(t) == 0 else t[sub], sub)
        return out

    def confidence(self, threshold: Any, atoms: np.ndarray | None = None) -> np.ndarray:
        """µ_M(p_i): mean over runs of the per-run fraction with error ≤ threshold, (n,) in [0, 1]."""
        return self.confidence_per_run(threshold, atoms).mean(axis=0)

    mean_confidence = confidence

    def pair_confidence(self, atoms: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
        """µ_M(p_{atoms[j]}(thresholds[j])) for pairs (training atom, threshold), shape (n,).

        Unlike :meth:`confidence` (one threshold per training atom), each pair has its own threshold:
        the distance-aware estimator evaluates a neighbour's CDF at the query atom's own T / s(d).
        Atoms may repeat. Evaluated in chunks to bound memory.
        """
        idx = np.asarray(atoms, dtype=np.int64).ravel()
        t = np.asarray(thresholds, dtype=np.float64).ravel()
        if t.shape != idx.shape:
            raise ValueError(f"thresholds has {t.size} values for {idx.size} atoms; expected one per pair")
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_atoms):
            raise ValueError(f"atom indices must lie in [0, {self.n_atoms})")
        if not np.all(t >= 0):  # also rejects NaN
            raise ValueError("thresholds must be >= 0 (eV/Å)")
        out = np.empty(idx.size, dtype=np.float64)
        for start in range(0, idx.size, _EVAL_CHUNK):
            sl = slice(start, start + _EVAL_CHUNK)
            out[sl] = self._fractions(t[sl], idx[sl]).mean(axis=0)
        return out

    def std(self, threshold: Any, atoms: np.ndarray | None = None) -> np.ndarray:
        """σ_M(p_i): population standard deviation over runs of the per-run fractions, (n,)."""
        return self.confidence_per_run(threshold, atoms).std(axis=0)

    def mean_error(self) -> np.ndarray:
        """(N,) mean over runs of each run's mean logged error (eV/Å)."""
        return self.mean_error_.copy()


class ExactDistributions(_Distributions):
    """Empirical CDFs from every logged error: ``sorted_errors[m]`` is (E_m, N), NaN sorted last."""

    kind = "exact"

    def __init__(self, sorted_errors: list[np.ndarray], fitted_threshold: Any) -> None:
        self.sorted_errors = [np.asarray(s, dtype=np.float32) for s in sorted_errors]
        self.n_runs = len(self.sorted_errors)
        self.n_atoms = int(self.sorted_errors[0].shape[1])
        self.n_logged = np.stack([(~np.isnan(s)).sum(axis=0) for s in self.sorted_errors]).astype(np.int64)
        _report_unlogged(self.n_logged, None)
        self.mean_error_ = np.mean([np.nanmean(s, axis=0, dtype=np.float64) for s in self.sorted_errors], axis=0)
        self.fitted_threshold = _check_threshold(fitted_threshold, self.n_atoms)
        self.fitted_counts = np.stack([(s <= self.fitted_threshold).sum(axis=0) for s in self.sorted_errors])

    @classmethod
    def from_runs(cls, runs: Sequence[ErrorRun], threshold: Any, chunk_size: int = _EVAL_CHUNK) -> "ExactDistributions":
        """Load and sort every run (M × E × N float32 in memory)."""
        sorted_runs = []
        for run in runs:
            full = np.empty((run.n_epochs, run.n_atoms), dtype=np.float32)
            for sl, block in run.iter_chunks(chunk_size):
                full[:, sl] = np.sort(block, axis=0)
            sorted_runs.append(full)
        n_logged = np.stack([(~np.isnan(s)).sum(axis=0) for s in sorted_runs])
        _report_unlogged(n_logged, runs[0].atom_ids)
        return cls(sorted_runs, threshold)

    def _fractions(self, threshold: np.ndarray | float, atoms: np.ndarray) -> np.ndarray:
        return np.stack([(s[:, atoms] <= threshold).sum(axis=0) for s in self.sorted_errors]) / self.n_logged[:, atoms]

    def quantile(self, q: float) -> np.ndarray:
        """(N,) lower q-quantile of the run mixture (each run weighs 1/M): min{x : µ_M(p(x)) ≥ q}."""
        q = _check_q(q)
        out = np.empty(self.n_atoms, dtype=np.float64)
        for start in range(0, self.n_atoms, _EVAL_CHUNK):
            sl = slice(start, min(start + _EVAL_CHUNK, self.n_atoms))
            vals = np.concatenate([s[:, sl] for s in self.sorted_errors], axis=0).astype(np.float64)
            w = np.concatenate(
                [np.broadcast_to(1.0 / (self.n_runs * n[sl]), s[:, sl].shape) for s, n in zip(self.sorted_errors, self.n_logged)],
                axis=0,
            )
            w = np.where(np.isnan(vals), 0.0, w)
            order = np.argsort(vals, axis=0, kind="stable")  # NaN last, weight 0
            vals = np.take_along_axis(vals, order, axis=0)
            cum = np.cumsum(np.take_along_axis(w, order, axis=0), axis=0)
            # First position whose cumulative weight reaches q (tolerance for float summation).
            pos = np.argmax(cum >= q - 1e-12, axis=0)
            out[sl] = vals[pos, np.arange(vals.shape[1])]
        return out

    def to_arrays(self, streamed: bool = False) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(info, arrays) for the estimator file (``streamed``: as in CompactDistributions; all arrays here are stored as held)."""
        arrays = {f"sorted_errors_{m}": s for m, s in enumerate(self.sorted_errors)}
        arrays["fitted_threshold"] = np.asarray(self.fitted_threshold, dtype=np.float64)
        return {"kind": self.kind, "n_runs": self.n_runs, "n_atoms": self.n_atoms}, arrays

    @classmethod
    def from_arrays(cls, info: dict[str, Any], arrays: dict[str, np.ndarray]) -> "ExactDistributions":
        runs = [arrays[f"sorted_errors_{m}"] for m in range(int(info["n_runs"]))]
        thr = arrays["fitted_threshold"]
        return cls(runs, float(thr) if thr.ndim == 0 else thr)


def n_bin_edges(bins: Any) -> int:
    """Number of edges K that :func:`make_edges` makes from the ``bins`` setting (before seeing data)."""
    if bins is None:
        return DEFAULT_N_EDGES
    if isinstance(bins, (int, np.integer)) and not isinstance(bins, bool):
        return int(bins)
    if isinstance(bins, (tuple, list)) and len(bins) == 2 and isinstance(bins[0], str):
        return int(bins[1])
    return int(np.asarray(bins).size)


def estimate_memory(
    kind: str, n_atoms: int, n_epochs: Sequence[int], bins: Any = None, chunk_size: int = _EVAL_CHUNK
) -> dict[str, int]:
    """Peak bytes of building ``kind`` (``"compact"`` or ``"exact"``) distributions by streaming.

    Args:
        n_atoms: N training atoms.
        n_epochs: selected epochs of each of the M runs.
    Returns:
        ``{"distributions": bytes kept, "streaming": bytes of temporaries at the peak}``, from the
        array sizes of :meth:`CompactDistributions.from_runs` / :meth:`ExactDistributions.from_runs`.
    """
    n_runs, e_max = len(n_epochs), max(n_epochs)
    per_run = n_runs * n_atoms * 8  # one (M, N) int64/float64 array
    blocks = 8 * e_max * min(chunk_size, n_atoms) * 4  # the streamed block and its temporaries
    if kind == "compact":
        n_bins = n_bin_edges(bins) + 1
        count_dtype = _count_dtype(e_max)
        logged_bytes = np.dtype(_logged_dtype(n_bins, count_dtype)).itemsize
        # counts, n_logged, fitted_counts (the counts' dtype), max_error and mean_error (float64)
        count_bytes = np.dtype(count_dtype).itemsize
        kept = n_runs * n_atoms * ((n_bins + 1) * count_bytes + logged_bytes) + 2 * n_atoms * 8
        # from_runs holds n_logged, fitted_counts and sums next to the counts (+ max_error);
        # the constructor recomputes n_logged (in atom blocks) while from_runs' copy is alive.
        return {"distributions": kept, "streaming": 2 * per_run + blocks}
    if kind == "exact":
        kept = sum(n_epochs) * n_atoms * 4 + 2 * per_run + n_atoms * 8
        return {"distributions": kept, "streaming": e_max * n_atoms + per_run + blocks}
    raise ValueError(f"distribution must be 'compact' or 'exact'; got {kind!r}")


def _check_q(q: float) -> float:
    q = float(q)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile level must lie in [0, 1]; got {q}")
    return q


def make_edges(bins: Any, min_positive: float, max_error: float) -> np.ndarray:
    """Bin edges from the ``bins`` setting.

    ``bins`` is None (64 log-spaced edges), an int n (n log-spaced edges), ``("log", n)`` or
    ``("linear", n)``, or an explicit strictly increasing array of edges ≥ 0 (eV/Å). Generated edges
    span the data: log edges from max(smallest positive error, 1e-6 × largest) to the largest error,
    linear edges from 0 to the largest error; the largest error is always the last edge.
    """
    spacing, n = "log", DEFAULT_N_EDGES
    if bins is None:
        pass
    elif isinstance(bins, (int, np.integer)) and not isinstance(bins, bool):
        n = int(bins)
    elif isinstance(bins, (tuple, list)) and len(bins) == 2 and isinstance(bins[0], str):
        spacing, n = bins[0], int(bins[1])
        if spacing not in ("log", "linear"):
            raise ValueError(f"bin spacing must be 'log' or 'linear'; got {spacing!r}")
    else:
        edges = np.asarray(bins, dtype=np.float64)
        if edges.ndim != 1 or edges.size == 0 or edges.size > MAX_BIN_EDGES:
            raise ValueError(f"bin edges must be a non-empty 1-d array of at most {MAX_BIN_EDGES}; got shape {edges.shape}")
        if not np.all(np.isfinite(edges)) or edges[0] < 0 or np.any(np.diff(edges) <= 0):
            raise ValueError("bin edges must be finite, >= 0 and strictly increasing (eV/Å)")
        return edges
    if n < 1 or n > MAX_BIN_EDGES:
        raise ValueError(f"number of bin edges must lie in [1, {MAX_BIN_EDGES}]; got {n}")
    if max_error <= 0:
        return np.array([0.0])  # all errors are exactly zero: bin 0 holds them
    if spacing == "linear":
        return np.linspace(0.0, max_error, n + 1)[1:]
    lo = max(min_positive, max_error * 1e-6)
    if n == 1 or lo >= max_error:
        return np.array([max_error])
    edges = np.geomspace(lo, max_error, n)
    edges[-1] = max_error  # geomspace rounding must not leave the maximum in the overflow bin
    return edges


class CompactDistributions(_Distributions):
    """Per-run histograms of each atom's logged errors.

    Attributes:
        edges: (K,) float64 bin edges (eV/Å); bins [0, e_0], (e_{j-1}, e_j], (e_{K-1}, ∞).
        counts: (M, N, K + 1) unsigned counts.
        max_error: (N,) each atom's largest logged error over all runs (eV/Å).
    """

    kind = "compact"

    def __init__(
        self,
        edges: np.ndarray,
        counts: np.ndarray,
        max_error: np.ndarray,
        mean_error: np.ndarray,
        fitted_threshold: Any,
        fitted_counts: np.ndarray,
    ) -> None:
        self.edges = np.asarray(edges, dtype=np.float64)
        self.counts = np.asarray(counts)
        self.n_runs, self.n_atoms = int(self.counts.shape[0]), int(self.counts.shape[1])
        if self.counts.shape[2] != self.edges.size + 1:
            raise ValueError(f"counts have {self.counts.shape[2]} bins; expected {self.edges.size + 1} for {self.edges.size} edges")
        self.max_error = np.asarray(max_error, dtype=np.float64)
        self.mean_error_ = np.asarray(mean_error, dtype=np.float64)
        self.n_logged = _logged_counts(self.counts)
        _report_unlogged(self.n_logged, None)
        self.fitted_threshold = _check_threshold(fitted_threshold, self.n_atoms)
        fitted = np.asarray(fitted_counts)
        # integer counts keep their dtype (from_runs: that of the counts, 1 byte for <= 255 epochs)
        self.fitted_counts = fitted if np.issubdtype(fitted.dtype, np.integer) else fitted.astype(np.int64)

    @classmethod
    def from_runs(
        cls,
        runs: Sequence[ErrorRun],
        threshold: Any,
        bins: Any = None,
        chunk_size: int = _EVAL_CHUNK,
        progress: bool = False,
    ) -> "CompactDistributions":
        """Stream every run twice in atom chunks (statistics, then histograms).

        Memory: the counts (M × N × (K + 1) bytes for ≤ 255 epochs: 0.95 GB per run for 14.6 M atoms
        and 65 bins), 3 × M × N int64/float64 running statistics (0.35 GB per run at 14.6 M atoms),
        and temporaries of about 8 blocks of E × chunk × 4 bytes (100 epochs × 65 536 atoms: 0.2 GB;
        measured: 1 M atoms × 100 epochs, peak RSS 0.38 GB with 65 536-atom chunks, 0.20 GB with 16 384).
        """
        from tqdm.auto import tqdm

        n_atoms = runs[0].n_atoms
        thr = _check_threshold(threshold, n_atoms)
        n_runs = len(runs)
        n_logged = np.zeros((n_runs, n_atoms), dtype=np.int64)
        # at most the run's epochs each: held in the counts' dtype (8x smaller than int64 at <= 255 epochs)
        fitted_counts = np.zeros((n_runs, n_atoms), dtype=_count_dtype(max(r.n_epochs for r in runs)))
        sums = np.zeros((n_runs, n_atoms), dtype=np.float64)
        max_error = np.full(n_atoms, -np.inf)
        min_pos, max_all = np.inf, 0.0
        n_chunks = sum(math.ceil(n_atoms / chunk_size) for _ in runs)
        bar = tqdm(total=2 * n_chunks, disable=not progress, desc="error distributions", unit="chunk")
        for m, run in enumerate(runs):
            for sl, block in run.iter_chunks(chunk_size):
                n_logged[m, sl] = np.count_nonzero(~np.isnan(block), axis=0)
                sums[m, sl] = np.nansum(block, axis=0, dtype=np.float64)
                t = thr if np.ndim(thr) == 0 else thr[sl]
                fitted_counts[m, sl] = np.count_nonzero(block <= t, axis=0)
                max_error[sl] = np.fmax(max_error[sl], np.fmax.reduce(block, axis=0))  # fmax skips NaN
                positive = block > 0
                if positive.any():
                    min_pos = min(min_pos, float(np.min(block, where=positive, initial=np.inf)))
                    max_all = max(max_all, float(np.max(block, where=positive, initial=0.0)))
                bar.update()
        _report_unlogged(n_logged, runs[0].atom_ids)
        edges = make_edges(bins, min_pos, max_all)
        n_bins = edges.size + 1
        counts = np.zeros((n_runs, n_atoms, n_bins), dtype=_count_dtype(max(r.n_epochs for r in runs)))
        for m, run in enumerate(runs):
            for sl, block in run.iter_chunks(chunk_size):
                c = block.shape[1]
                # side="left": a value equal to an edge lands in the bin that edge closes (≤ semantics).
                b = np.searchsorted(edges, block, side="left")
                b[np.isnan(block)] = n_bins  # an extra slot for missing values, dropped below
                b += np.arange(c) * (n_bins + 1)  # one slot range per atom (broadcast over epochs)
                hist = np.bincount(b.ravel(), minlength=c * (n_bins + 1)).reshape(c, n_bins + 1)
                counts[m, sl] = hist[:, :n_bins]
                bar.update()
        bar.close()
        mean_error = (sums / n_logged).mean(axis=0)
        return cls(edges, counts, max_error, mean_error, thr, fitted_counts)

    def _fractions(self, threshold: np.ndarray | float, atoms: np.ndarray) -> np.ndarray:
        # written for per-step sizes too (tens of pairs): few numpy calls, direct (run, atom, bin) indexing
        counts = self.counts[:, atoms, :]  # (M, n, K+1)
        n = atoms.size
        t = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (n,))
        j = np.searchsorted(self.edges, t, side="left")  # bin holding t: t in (e_{j-1}, e_j]
        in_bin = counts[:, np.arange(n), j].astype(np.float64)  # (M, n)
        # counts of the bins below j: a masked sum (exact in float64), 3x faster than a cumsum of the block
        below = np.arange(counts.shape[2])[None, :] < j[:, None]  # (n, K+1)
        lower = np.einsum("mnk,nk->mn", counts.astype(np.float64), below.astype(np.float64))
        ext = np.concatenate([[0.0], self.edges, [np.inf]])
        lo, hi = ext[j], ext[j + 1]
        width = hi - lo
        inside = np.isfinite(hi) & (width > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(inside, np.minimum(np.maximum((t - lo) / width, 0.0), 1.0),
                            np.where(width > 0, 0.0, 1.0))  # overflow bin: 0; degenerate [0, 0] bin: t >= 0 holds it
        est = (lower + frac * in_bin) / self.n_logged[:, atoms]
        # Above an atom's largest error the CDF is exactly 1 (also resolves the overflow bin).
        return np.where((t >= self.max_error[atoms])[None, :], 1.0, est)

    def quantile(self, q: float) -> np.ndarray:
        """(N,) q-quantile of the run mixture, resolved to bin precision: the upper edge of the bin in
        which µ_M(p) first reaches q, capped at the atom's largest error (an upper bound of the exact
        lower quantile, within one bin of it)."""
        q = _check_q(q)
        out = np.empty(self.n_atoms, dtype=np.float64)
        ext_hi = np.concatenate([self.edges, [np.inf]])
        for start in range(0, self.n_atoms, _EVAL_CHUNK):
            sl = slice(start, min(start + _EVAL_CHUNK, self.n_atoms))
            cdf = (np.cumsum(self.counts[:, sl, :], axis=2, dtype=np.float64) / self.n_logged[:, sl, None]).mean(axis=0)
            j = np.argmax(cdf >= q - 1e-12, axis=1)
            out[sl] = np.minimum(ext_hi[j], self.max_error[sl])
        return out

    def to_arrays(self, streamed: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
        """(info, arrays) for the estimator file; ``fitted_counts`` is stored as int64: converted
        here, or with ``streamed=True`` handed over as a
        :func:`~ltau_ase.core.fileformat.streamed_as` that converts block by block while writing."""
        fitted: Any = self.fitted_counts
        if fitted.dtype != np.int64:
            fitted = streamed_as(fitted, np.int64) if streamed else fitted.astype(np.int64)
        arrays = {
            "edges": self.edges,
            "counts": self.counts,
            "max_error": self.max_error,
            "mean_error": self.mean_error_,
            "fitted_threshold": np.asarray(self.fitted_threshold, dtype=np.float64),
            "fitted_counts": fitted,
        }
        return {"kind": self.kind, "n_runs": self.n_runs, "n_atoms": self.n_atoms}, arrays

    @classmethod
    def from_arrays(cls, info: dict[str, Any], arrays: dict[str, np.ndarray]) -> "CompactDistributions":
        thr = arrays["fitted_threshold"]
        return cls(
            arrays["edges"],
            arrays["counts"],
            arrays["max_error"],
            arrays["mean_error"],
            float(thr) if thr.ndim == 0 else thr,
            arrays["fitted_counts"],
        )


def distributions_from_arrays(info: dict[str, Any], arrays: dict[str, np.ndarray]) -> ExactDistributions | CompactDistributions:
    """Rebuild either representation from :meth:`to_arrays` output (used by the estimator file)."""
    kinds = {"exact": ExactDistributions, "compact": CompactDistributions}
    if info.get("kind") not in kinds:
        raise ValueError(f"unknown distribution kind {info.get('kind')!r}; expected 'exact' or 'compact'")
    return kinds[info["kind"]].from_arrays(info, arrays)
