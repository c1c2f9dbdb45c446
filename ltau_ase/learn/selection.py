"""Choosing which explored frames to label (numpy only).

Three rules, one per selection method of a campaign:

* ``ltau``: among the *flagged* frames (stop statistic above the threshold), keep the
  ``pool_factor × budget`` most uncertain, then pick ``budget`` of them by farthest-point sampling
  on per-structure latent features of their uncertain atoms, starting from the most uncertain
  frame. Ten near-identical frames of one event are then one label, not ten.
* ``random``: ``budget`` frames drawn uniformly among all explored frames.
* ``committee`` (DP-GEN): frames whose committee force deviation lies in the trust window
  ``lo < deviation <= hi`` (eV/Å), ``budget`` of them drawn uniformly.
"""
from __future__ import annotations

import numpy as np

SELECTION_METHODS = ("ltau", "random", "committee")


def _check_budget(budget: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget must be a positive integer number of frames to label, got {budget!r}")
    return int(budget)


def structure_feature(descriptors: np.ndarray, uncertainties: np.ndarray, atom_threshold: float) -> np.ndarray:
    """Latent feature of one structure: the mean descriptor of its uncertain atoms.

    Args:
        descriptors: (N, D) per-atom latent descriptors.
        uncertainties: (N,) per-atom uncertainties.
        atom_threshold: atoms with uncertainty strictly above it count as uncertain; when none is,
            the single most uncertain atom is used (a frame flagged by a mean statistic can have
            no atom above a per-atom bound).
    Returns:
        (D,) float64.
    """
    descriptors = np.asarray(descriptors, dtype=np.float64)
    uncertainties = np.asarray(uncertainties, dtype=np.float64)
    if descriptors.ndim != 2 or uncertainties.shape != (descriptors.shape[0],) or not len(uncertainties):
        raise ValueError(f"descriptors must be (N, D) and uncertainties (N,) with N >= 1; got "
                         f"{descriptors.shape} and {uncertainties.shape}")
    mask = uncertainties > atom_threshold
    if not mask.any():
        mask = uncertainties == np.nanmax(uncertainties)
    return descriptors[mask].mean(axis=0)


def farthest_point_sampling(features: np.ndarray, k: int, first: int = 0) -> np.ndarray:
    """Greedy farthest-point sampling: ``first``, then repeatedly the not yet chosen point farthest
    (Euclidean) from all points chosen so far (ties: lowest index). Every index appears at most once,
    also when points coincide.

    Args:
        features: (n, D) points.
        k: how many to choose (at most n).
        first: index of the first point.
    Returns:
        (min(k, n),) int64 indices in the order chosen.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be (n, D), got shape {features.shape}")
    n = features.shape[0]
    k = min(int(k), n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if not 0 <= first < n:
        raise ValueError(f"first must index one of the {n} points, got {first}")
    chosen = [int(first)]
    dist = np.linalg.norm(features - features[first], axis=1)
    dist[first] = -np.inf  # never chosen twice, even when other points coincide with it (distance 0)
    for _ in range(k - 1):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(features - features[nxt], axis=1))
        dist[chosen] = -np.inf
    return np.asarray(chosen, dtype=np.int64)


def select_ltau(statistic: np.ndarray, flagged: np.ndarray, features: np.ndarray, budget: int,
                pool_factor: float = 2.0, fill: bool = False) -> np.ndarray:
    """Indices of the frames to label: uncertain *and* diverse (see the module docstring).

    Args:
        statistic: (n,) stop statistic of each explored frame (higher = more uncertain).
        flagged: (n,) bool, frames whose statistic exceeded the campaign's threshold.
        features: (n, D) per-structure latent features (:func:`structure_feature`).
        budget: labels available this iteration (>= 1).
        pool_factor: the candidate pool is the ``ceil(pool_factor * budget)`` most uncertain
            flagged frames (>= 1).
        fill: when fewer than ``budget`` frames are flagged, fill the batch with unflagged frames
            chosen by the same rule (most uncertain pool, then diversity); otherwise the batch is
            smaller than the budget.
    Returns:
        int64 indices into the n frames, at most ``budget`` of them, in the order chosen (flagged
        frames first).
    """
    budget = _check_budget(budget)
    if not pool_factor >= 1.0:
        raise ValueError(f"pool_factor must be >= 1, got {pool_factor}")
    statistic = np.asarray(statistic, dtype=np.float64)
    flagged = np.asarray(flagged, dtype=bool)
    features = np.asarray(features, dtype=np.float64)
    if flagged.shape != statistic.shape or features.shape[:1] != statistic.shape:
        raise ValueError(f"statistic {statistic.shape}, flagged {flagged.shape} and features {features.shape} "
                         "must describe the same frames")
    picked = _uncertain_and_diverse(np.flatnonzero(flagged), statistic, features, budget, pool_factor)
    if fill and picked.size < budget:
        rest = _uncertain_and_diverse(np.flatnonzero(~flagged), statistic, features, budget - picked.size,
                                      pool_factor)
        picked = np.concatenate([picked, rest])
    return picked


def _uncertain_and_diverse(candidates: np.ndarray, statistic: np.ndarray, features: np.ndarray, budget: int,
                           pool_factor: float) -> np.ndarray:
    if candidates.size == 0:
        return np.zeros(0, dtype=np.int64)
    # most uncertain first (NaN statistics are maximally uncertain); stable for ties
    key = np.where(np.isnan(statistic[candidates]), np.inf, statistic[candidates])
    order = candidates[np.argsort(-key, kind="stable")]
    pool = order[: int(np.ceil(pool_factor * budget))]
    return pool[farthest_point_sampling(features[pool], budget, first=0)].astype(np.int64)


def select_random(n_frames: int, budget: int, rng: np.random.Generator) -> np.ndarray:
    """``min(budget, n_frames)`` distinct indices drawn uniformly (sorted)."""
    budget = _check_budget(budget)
    return np.sort(rng.choice(n_frames, size=min(budget, n_frames), replace=False)).astype(np.int64)


def select_committee(deviation: np.ndarray, budget: int, lo: float, hi: float,
                     rng: np.random.Generator, fill: bool = False) -> np.ndarray:
    """DP-GEN: frames with ``lo < deviation <= hi``, at most ``budget`` drawn uniformly (sorted).

    Args:
        deviation: (n,) max over atoms of the committee force deviation (eV/Å).
        lo, hi: trust levels (eV/Å); frames above ``hi`` are taken as broken, not as candidates.
        fill: when fewer than ``budget`` frames lie in the window, add the frames below ``lo`` with
            the largest deviation (never frames above ``hi``).
    """
    budget = _check_budget(budget)
    if not (np.isfinite(lo) and np.isfinite(hi) and 0 <= lo < hi):
        raise ValueError(f"trust levels must satisfy 0 <= lo < hi (eV/Å), got lo={lo}, hi={hi}")
    deviation = np.asarray(deviation, dtype=np.float64)
    candidates = np.flatnonzero((deviation > lo) & (deviation <= hi))
    if candidates.size > budget:
        return np.sort(rng.choice(candidates, size=budget, replace=False)).astype(np.int64)
    if fill and candidates.size < budget:
        below = np.flatnonzero(deviation <= lo)
        below = below[np.argsort(-deviation[below], kind="stable")][: budget - candidates.size]
        candidates = np.sort(np.concatenate([candidates, below]))
    return candidates.astype(np.int64)
