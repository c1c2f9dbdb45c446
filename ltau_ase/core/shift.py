"""Distance-aware scaling of LTAU uncertainties (issue 11; numpy + scipy + faiss only).

The paper's scaling factor s (Sec. 4.1, App. D) assumes test errors are s × training errors, with one s
per test set; under distribution shift the right s grows with how far an atom is from the training
set (the paper needs a new s per temperature and per group). Here s depends on the atom:

    s_j = c_{Z_j} · g(r_j),      r_j = d_j / median(d_ref)

* d_j: the query atom's mean latent distance to its k nearest training atoms (``predict``'s
  ``distance``); d_ref: each training atom's leave-one-out mean distance to its k nearest *other*
  training atoms, computed once at fit (a random sample of at most ``REFERENCE_SAMPLE`` atoms). So
  r = 1 is a typical training-set neighbourhood, whatever the latent units. With structure groups at
  fit (``LTAUEstimator.fit(groups=...)``, e.g. the system or trajectory each training frame comes
  from) the neighbours are taken from *other groups* only (leave one group out): frames of one MD run
  or relaxation are near-duplicates, so an atom's nearest other atoms are usually its own copies in the
  neighbouring frames and the plain leave-one-out median is a near-zero yardstick (r in the tens for
  ordinary in-domain MD). r is a constant rescaling of d either way, so g, the confidences and any
  threshold chosen from reference runs give the same decisions; the group rule makes the number mean
  "as far as a new structure of the training distribution".
* g: monotone non-decreasing in r, fitted by isotonic regression of the calibration atoms' error ratio
  |ΔF_j| / m_j (m_j: the neighbours' mean logged error) on log r, linear between the isotonic blocks'
  centres; beyond the largest calibration r a power law g ∝ r^α continues it (α from a log-log fit of
  binned mean ratios, never below 0), so the uncertainty keeps growing out of domain.
* c_Z: one multiplicative factor per element (pooled for elements with too few calibration atoms),
  found by the shared scale search (:func:`ltau_ase.core.calibration.search_scale`) minimising the
  miscalibration area of the resulting confidences.

Confidence of atom j: mean over its neighbours i of CDF_i(T / s_j); expected error s_j · m_j.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "structure_ratios",
    "MAX_GROUP_SEARCH",
    "MAX_TAIL_EXPONENT",
    "REFERENCE_RULES",
    "REFERENCE_SAMPLE",
    "reference_distances",
    "DistanceScale",
]

# At most this many training atoms get a leave-one-out neighbour search at fit: the reference is a
# distribution (its median sets r = 1), which a random sample of 20k atoms pins to well under 1 %.
REFERENCE_SAMPLE = 20_000
#: how the reference neighbours are chosen: every other training atom, or atoms of other structure groups
REFERENCE_RULES = ("atoms", "groups")
#: leave one group out: an atom's neighbour list doubles until it holds k atoms of other groups or this many
#: entries (an atom whose group fills all of them keeps the other-group atoms it found; none: left out)
MAX_GROUP_SEARCH = 4096
#: neighbour-list entries per search call (bounds the (rows, k') arrays of one call: 2^22 entries ~ 70 MB)
_SEARCH_BLOCK = 1 << 22


def reference_distances(index: Any, descriptors: np.ndarray, k: int, max_atoms: int = REFERENCE_SAMPLE,
                        seed: int = 0, groups: np.ndarray | None = None) -> np.ndarray:
    """Ascending (m,) leave-one-out mean distances of training atoms to their k nearest other training atoms.

    Args:
        index: the fitted :class:`ltau_ase.core.index.NeighbourIndex` over ``descriptors``.
        descriptors: (N, D) float32 training descriptors (row i = index entry i).
        k: neighbours per atom (the estimator's k_eff_); the atom itself is excluded.
        max_atoms: at most this many atoms (a seeded random sample) are searched.
        groups: optional (N,) int64 structure group of each atom; then only atoms of *other* groups
            count as neighbours (leave one group out). The search list grows by doubling up to
            ``MAX_GROUP_SEARCH`` entries (or N); an atom that still has fewer than k other-group atoms
            in it averages those it has (they are its nearest other-group atoms), one with none is
            left out (so m can be smaller than the sample).
    Returns:
        (m,) float64, m <= min(N, max_atoms); empty when N < 2 (or every group is the same).
    """
    n = descriptors.shape[0]
    if n < 2:
        return np.empty(0, dtype=np.float64)
    rows = np.arange(n)
    if n > max_atoms:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=max_atoms, replace=False))
    if groups is not None:
        return _leave_group_out(index, descriptors, int(min(k, n - 1)), rows, np.asarray(groups, dtype=np.int64))
    k_self = int(min(k, n - 1)) + 1
    dist, ids, valid = index.search(descriptors[rows], k_self)
    # drop the atom itself (or, when an exact duplicate took its place, the farthest hit)
    is_self = ids == rows[:, None]
    no_self = ~is_self.any(axis=1)
    is_self[no_self, -1] = True
    keep = valid & ~is_self
    counts = keep.sum(axis=1)
    ok = counts > 0
    mean = np.where(keep, dist, 0.0).sum(axis=1)[ok] / counts[ok]
    return np.sort(mean.astype(np.float64))


def _leave_group_out(index: Any, descriptors: np.ndarray, k: int, rows: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Mean distance of each of ``rows`` to its k nearest atoms of other groups (see reference_distances)."""
    n = descriptors.shape[0]
    cap = int(min(n, max(MAX_GROUP_SEARCH, k)))
    width = int(min(cap, 4 * (k + 1)))
    means = np.full(rows.size, np.nan)
    todo = np.arange(rows.size)
    while todo.size:
        last = width >= cap
        short = []
        block = max(1, _SEARCH_BLOCK // width)
        for start in range(0, todo.size, block):
            part = todo[start:start + block]
            dist, ids, valid = index.search(descriptors[rows[part]], width)
            other = valid & (groups[ids] != groups[rows[part]][:, None])
            keep = other & (np.cumsum(other, axis=1) <= k)  # hits come nearest first
            counts = keep.sum(axis=1)
            done = (counts >= k) | last
            has = done & (counts > 0)
            means[part[has]] = np.where(keep[has], dist[has], 0.0).sum(axis=1) / counts[has]
            short.append(part[~done])
        todo = np.concatenate(short)
        width = int(min(cap, 2 * width))
    return np.sort(means[np.isfinite(means)])


#: Largest tail exponent α :meth:`DistanceScale.fit` gives by default (g(r) ∝ r^α past the calibration range);
#: a loaded calibration with a larger one is refused (a hostile α overflows every bound past the range to inf).
MAX_TAIL_EXPONENT = 4.0


class DistanceScale:
    """g(r): monotone non-decreasing scale of the distance ratio r (see the module docstring).

    Attributes:
        log_ratio: (K,) ascending knots in log r (isotonic block centres).
        values: (K,) non-decreasing g at the knots (> 0).
        tail_exponent: α >= 0, g(r) = values[-1] · (r / exp(log_ratio[-1]))^α beyond the last knot.
    """

    def __init__(self, log_ratio: np.ndarray, values: np.ndarray, tail_exponent: float) -> None:
        x = np.asarray(log_ratio, dtype=np.float64)
        y = np.asarray(values, dtype=np.float64)
        alpha = float(tail_exponent)
        ok = (
            x.ndim == 1 and x.size >= 1 and y.shape == x.shape and np.all(np.isfinite(x)) and np.all(np.isfinite(y))
            and np.all(np.diff(x) > 0) and np.all(np.diff(y) >= 0) and np.all(y > 0)
            and np.isfinite(alpha) and alpha >= 0
        )
        if not ok:
            raise ValueError("a DistanceScale needs ascending finite knots with non-decreasing positive values "
                             "and a finite tail exponent >= 0")
        self.log_ratio, self.values, self.tail_exponent = x, y, alpha

    def __call__(self, ratio: Any) -> np.ndarray:
        """g at distance ratios ``ratio`` (n,) >= 0 (0 maps to the first knot's value)."""
        r = np.asarray(ratio, dtype=np.float64)
        with np.errstate(divide="ignore"):
            lr = np.log(np.maximum(r, 0.0))
        out = np.interp(lr, self.log_ratio, self.values)  # constant below the first knot
        beyond = lr > self.log_ratio[-1]
        if np.any(beyond):
            out[beyond] = self.values[-1] * np.exp(self.tail_exponent * (lr[beyond] - self.log_ratio[-1]))
        return out

    @classmethod
    def fit(cls, ratio: np.ndarray, error_ratio: np.ndarray, n_tail_bins: int = 10,
            max_exponent: float = MAX_TAIL_EXPONENT) -> "DistanceScale":
        """Isotonic fit of ``error_ratio`` (n,) (|ΔF| / m, >= 0) on log ``ratio`` (n,) (> 0), with its tail.

        The tail exponent α is the least-squares slope of log(mean error ratio) against mean log r over
        ``n_tail_bins`` equal-count bins of r, clipped to [0, max_exponent].
        """
        from scipy.optimize import isotonic_regression

        r = np.asarray(ratio, dtype=np.float64)
        y = np.asarray(error_ratio, dtype=np.float64)
        if r.ndim != 1 or y.shape != r.shape or r.size < 2 or not np.all(r > 0) or not np.all(np.isfinite(r)):
            raise ValueError("ratio must be (n,) finite > 0 with n >= 2 and error_ratio the same shape")
        if not np.all(np.isfinite(y)) or np.any(y < 0):
            raise ValueError("error_ratio must be finite and >= 0")
        order = np.argsort(r, kind="stable")
        lr, ys = np.log(r[order]), y[order]
        fitted = isotonic_regression(ys, increasing=True).x
        # one knot per constant block of the isotonic fit, at the block's mean log r
        starts = np.flatnonzero(np.r_[True, np.diff(fitted) != 0])
        ends = np.r_[starts[1:], fitted.size]
        knots_x = np.array([lr[a:b].mean() for a, b in zip(starts, ends)])
        knots_y = fitted[starts]
        # ties in mean log r (possible with repeated r) would break strict ascent: merge them
        keep = np.r_[True, np.diff(knots_x) > 0]
        knots_x, knots_y = knots_x[keep], np.maximum.accumulate(knots_y[keep])
        # a zero block (all errors 0) would give a zero scale: floor at a small share of the mean ratio
        floor = max(1e-6, 1e-3 * float(ys.mean()) if ys.mean() > 0 else 1e-6)
        knots_y = np.maximum(knots_y, floor)
        edges = np.unique(np.quantile(lr, np.linspace(0, 1, int(n_tail_bins) + 1)))
        alpha = 0.0
        if edges.size >= 3:
            b = np.clip(np.searchsorted(edges, lr, side="right") - 1, 0, edges.size - 2)
            cnt = np.bincount(b, minlength=edges.size - 1)
            use = cnt > 0
            bx = np.bincount(b, weights=lr, minlength=edges.size - 1)[use] / cnt[use]
            by = np.bincount(b, weights=ys, minlength=edges.size - 1)[use] / cnt[use]
            pos = by > 0
            if pos.sum() >= 2 and np.ptp(bx[pos]) > 0:
                alpha = float(np.polyfit(bx[pos], np.log(by[pos]), 1)[0])
        alpha = float(np.clip(alpha, 0.0, max_exponent))
        return cls(knots_x, knots_y, alpha)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"log_ratio": self.log_ratio, "values": self.values,
                "tail_exponent": np.asarray(self.tail_exponent, dtype=np.float64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "DistanceScale":
        return cls(arrays["log_ratio"], arrays["values"], float(np.asarray(arrays["tail_exponent"])))


def structure_ratios(ratio: np.ndarray, structure_index: np.ndarray, floor: float,
                     include: np.ndarray | None = None) -> np.ndarray:
    """(n,) each atom's structure-level shift statistic: the geometric mean of r over its structure.

    R_f = exp(mean over the atoms j of structure f of log max(r_j, floor)), given to every atom of f.
    Why a structure statistic: under a temperature shift the normalised errors |ΔF| / σ grow at a fixed
    per-atom r (shift benchmark: 80 % quantile at r < 0.5 1.28 in domain, 1.98 at 600 K, 2.16 at 1200 K),
    while the frame's mean log r separates the temperatures (0.21 in domain, 0.60-0.72 at 600 K, 1.13 at
    1200 K). The geometric mean is a distance ratio again (R = 1: a typical training neighbourhood), so the
    same :class:`DistanceScale` form serves as the structure scale h(R).

    Args:
        ratio: (n,) per-atom distance ratios r_j >= 0 (finite where ``include``).
        structure_index: (n,) int64 structure of each atom, values in [0, n) (checked by the caller).
        floor: > 0, the smallest ratio used in the log (an exact training match, r = 0, sits there).
        include: optional (n,) bool, the atoms whose r enters the mean (None: all). ``predict`` leaves out
            the atoms of unseen elements flagged under ``unknown_species="flag"``: their latent distance to
            a training set without their element means nothing (their reported r is +inf), while the seen
            atoms' own r already reflect such a neighbour through their environments. Every atom still gets
            its structure's R_f; a structure without an included atom gets +inf (no defined distance).
    """
    lr = np.log(np.maximum(np.asarray(ratio, dtype=np.float64), floor))
    idx = np.asarray(structure_index, dtype=np.int64)
    weights = np.ones(idx.shape) if include is None else np.asarray(include, dtype=np.float64)
    counts = np.bincount(idx, weights=weights, minlength=1)
    sums = np.bincount(idx, weights=np.where(weights > 0, lr, 0.0), minlength=1)
    mean = np.divide(sums, counts, out=np.full_like(sums, np.inf), where=counts > 0)
    return np.exp(mean[idx])
