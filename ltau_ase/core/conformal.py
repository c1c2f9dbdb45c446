"""Split-conformal error bounds, Mondrian by group (numpy only).

Given n calibration nonconformity scores a_j (here |ΔF_j| / σ_j, the true force-error norm over the
distance-aware expected error), the split-conformal bound at coverage q is the ⌈(n+1)q⌉-th smallest
score (the finite-sample quantile ⌈(n+1)q⌉/n); for an exchangeable test atom
P(a ≤ that score) ≥ q, and < q + 1/(n+1) without ties (Vovk et al. 2005; Lei et al. 2018). When
⌈(n+1)q⌉ > n no finite bound has the guarantee and the bound is +inf. Mondrian: each group (e.g. an
element) gets its own quantile from its own scores, so the guarantee holds per group; a group with
fewer than ``min_count`` calibration scores, or (given the structure of each score) from fewer than
``min_clusters`` structures, uses the pooled scores instead (stated in ``groups_``). Scores of one
structure are correlated, so a new structure is exchangeable with the calibration *structures*, not
with their atoms: a group quantile from one or two structures (e.g. a metal present in few
calibration slabs) is that of those structures and under-covers the next one.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["check_coverage", "conformal_rank", "conformal_quantile", "MondrianConformal"]


def check_coverage(coverage: Any) -> float:
    """``coverage`` as a float in the open interval (0, 1); raises ValueError otherwise."""
    ok = isinstance(coverage, (int, float, np.integer, np.floating)) and not isinstance(coverage, bool)
    if not ok or not (0.0 < float(coverage) < 1.0):
        raise ValueError(f"coverage must be a number in the open interval (0, 1), e.g. 0.9; got {coverage!r}")
    return float(coverage)


def conformal_rank(n: int, coverage: float) -> int:
    """1-based rank ⌈(n+1)q⌉ of the conformal quantile among n sorted scores (may exceed n)."""
    q = check_coverage(coverage)
    # (n + 1) q computed in floating point can land just above an integer; the 1e-9 keeps exact products exact
    return int(math.ceil((n + 1) * q - 1e-9))


def conformal_quantile(sorted_scores: np.ndarray, coverage: float) -> float:
    """The ⌈(n+1)q⌉-th smallest of ``sorted_scores`` (ascending, (n,)); +inf if that rank exceeds n."""
    n = int(sorted_scores.size)
    r = conformal_rank(n, coverage)
    return float(sorted_scores[r - 1]) if 1 <= r <= n else math.inf


class MondrianConformal:
    """Per-group split-conformal quantiles of nonconformity scores.

    Attributes (after :meth:`fit`):
        groups_: (G,) int64 group labels with their own scores (count >= min_count).
        pooled_: (n,) all scores, ascending.
        scores_: list of G ascending score arrays, one per group in ``groups_``.
    """

    def __init__(self, min_count: int = 50, min_clusters: int = 1) -> None:
        for name, value in (("min_count", min_count), ("min_clusters", min_clusters)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        self.min_count = int(min_count)
        self.min_clusters = int(min_clusters)

    def fit(self, scores: Any, groups: Any = None, clusters: Any = None) -> "MondrianConformal":
        """Store the scores (n,) (finite, >= 0), their group labels (n,) ints (None: one pool) and
        optionally their structure labels ``clusters`` (n,) ints, counted against ``min_clusters``."""
        a = np.asarray(scores, dtype=np.float64)
        if a.ndim != 1 or a.size == 0 or not np.all(np.isfinite(a)) or np.any(a < 0):
            raise ValueError(f"scores must be a non-empty (n,) array of finite values >= 0; got shape {a.shape}")
        self.pooled_ = np.sort(a)
        self.groups_ = np.empty(0, dtype=np.int64)
        self.scores_: list[np.ndarray] = []
        if groups is not None:
            g = np.asarray(groups)
            if g.shape != a.shape or not np.issubdtype(g.dtype, np.integer):
                raise ValueError(f"groups must be ({a.size},) integers, one per score; got shape {g.shape}, dtype {g.dtype}")
            labels, counts = np.unique(g, return_counts=True)
            keep = labels[counts >= self.min_count]
            if clusters is not None:
                c = np.asarray(clusters)
                if c.shape != a.shape or not np.issubdtype(c.dtype, np.integer):
                    raise ValueError(f"clusters must be ({a.size},) integers, one per score; got shape {c.shape}")
                n_clusters = np.array([np.unique(c[g == label]).size for label in keep], dtype=np.int64)
                keep = keep[n_clusters >= self.min_clusters]
            self.groups_ = keep.astype(np.int64)
            self.scores_ = [np.sort(a[g == label]) for label in keep]
        return self

    def quantiles(self, coverage: float) -> tuple[np.ndarray, float]:
        """((G,) per-group quantiles in ``groups_`` order, pooled quantile) at ``coverage``."""
        per_group = np.array([conformal_quantile(s, coverage) for s in self.scores_], dtype=np.float64)
        return per_group, conformal_quantile(self.pooled_, coverage)

    def quantile_for(self, groups: Any, coverage: float) -> np.ndarray:
        """(n,) the conformal quantile that applies to each label in ``groups`` (None: pooled for one atom)."""
        per_group, pooled = self.quantiles(coverage)
        if groups is None:
            return np.array([pooled])
        g = np.asarray(groups)
        out = np.full(g.shape, pooled, dtype=np.float64)
        if self.groups_.size:
            pos = np.searchsorted(self.groups_, g)
            pos = np.clip(pos, 0, self.groups_.size - 1)
            hit = self.groups_[pos] == g
            out[hit] = per_group[pos[hit]]
        return out

    # ---------------------------------------------------------------- persistence
    def to_arrays(self) -> dict[str, np.ndarray]:
        counts = np.array([s.size for s in self.scores_], dtype=np.int64)
        grouped = np.concatenate(self.scores_) if self.scores_ else np.empty(0)
        return {"pooled": self.pooled_, "groups": self.groups_, "group_counts": counts, "group_scores": grouped}

    @classmethod
    def from_arrays(cls, min_count: int, arrays: dict[str, np.ndarray], min_clusters: int = 1) -> "MondrianConformal":
        """Rebuild from :meth:`to_arrays`; raises ValueError when the arrays are inconsistent."""
        obj = cls(min_count, min_clusters)
        pooled = np.asarray(arrays["pooled"], dtype=np.float64)
        groups = np.asarray(arrays["groups"])
        counts = np.asarray(arrays["group_counts"])
        grouped = np.asarray(arrays["group_scores"], dtype=np.float64)
        ok = (
            pooled.ndim == 1 and pooled.size > 0 and np.all(np.isfinite(pooled)) and np.all(np.diff(pooled) >= 0)
            and groups.ndim == 1 and np.issubdtype(groups.dtype, np.integer) and np.all(np.diff(groups) > 0)
            and counts.shape == groups.shape and np.issubdtype(counts.dtype, np.integer)
            and np.all(counts >= 1) and grouped.ndim == 1 and int(counts.sum()) == grouped.size
            and np.all(np.isfinite(grouped)) and grouped.size <= pooled.size
        )
        if not ok:
            raise ValueError("conformal calibration arrays are malformed (scores, groups and counts disagree)")
        obj.pooled_ = pooled
        obj.groups_ = groups.astype(np.int64)
        obj.scores_ = np.split(grouped, np.cumsum(counts)[:-1]) if counts.size else []
        return obj
