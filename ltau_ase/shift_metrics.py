"""Metrics of the shift benchmark (numpy/scipy only): bootstrap CIs over structures, the split-conformal
baseline for methods without their own bounds, MD stop detection delays and false alarms (the stop
threshold itself is :func:`ltau_ase.simulate.observers.stop_threshold`).

Units: errors, bounds and force statistics in eV/Å; steps are MD steps (1 fs).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = ["bootstrap_ci", "conformal_quantile", "normalised_conformal_bound", "coverage", "stop_step",
           "stop_outcomes", "species_aware", "summarise_ci"]


def bootstrap_ci(groups: np.ndarray, statistic: Callable[[np.ndarray], float], n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Point value and percentile bootstrap CI of ``statistic`` resampling whole groups (structures).

    Args:
        groups: (n,) group label of every item (e.g. the system each atom belongs to).
        statistic: function of an index array into the n items (items of a resampled group appear
            as often as the group was drawn) returning a float; NaN or a ValueError (e.g. AUROC with
            one class) counts as an undefined resample.
        n_boot: number of resamples (each draws as many groups as there are, with replacement).
        level: confidence level of the two-sided percentile interval.
    Returns:
        ``{"value", "low", "high", "n_boot", "n_undefined", "n_groups"}``; low/high are NaN when more
        than half of the resamples are undefined.
    """
    groups = np.asarray(groups)
    if groups.ndim != 1 or groups.size == 0:
        raise ValueError(f"groups must be a non-empty 1-d array, got shape {groups.shape}")
    if not (0 < level < 1):
        raise ValueError(f"level must be in (0, 1), got {level}")
    labels, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(labels.size + 1))
    members = [order[starts[g]:starts[g + 1]] for g in range(labels.size)]

    def safe(idx: np.ndarray) -> float:
        try:
            v = float(statistic(idx))
        except ValueError:
            return math.nan
        return v

    value = safe(np.arange(groups.size))
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    for b in range(n_boot):
        pick = rng.integers(0, labels.size, size=labels.size)
        draws[b] = safe(np.concatenate([members[g] for g in pick]))
    ok = np.isfinite(draws)
    low = high = math.nan
    if ok.sum() > n_boot / 2:
        alpha = (1 - level) / 2
        low, high = (float(v) for v in np.quantile(draws[ok], [alpha, 1 - alpha]))
    return {"value": value, "low": low, "high": high, "n_boot": int(n_boot), "n_undefined": int((~ok).sum()),
            "n_groups": int(labels.size)}


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """Split-conformal quantile of unsorted ``scores``: :func:`ltau_ase.core.conformal.conformal_quantile`
    (the ⌈(n + 1) q⌉-th smallest, inf if that rank exceeds n) after checking and sorting them."""
    from ltau_ase.core.conformal import conformal_quantile as sorted_quantile

    s = np.sort(np.asarray(scores, dtype=np.float64))
    if s.ndim != 1 or s.size == 0 or not np.all(np.isfinite(s)):
        raise ValueError("scores must be a non-empty finite 1-d array")
    return sorted_quantile(s, coverage)


def normalised_conformal_bound(sigma_cal: np.ndarray, err_cal: np.ndarray, sigma_test: np.ndarray,
                               coverage: float) -> np.ndarray:
    """Per-atom error bound q̂ · σ from normalised split conformal (scores |ΔF| / σ on the calibration set).

    The baseline the benchmark gives LTAU-as-in-the-paper (σ = expected error) and the committee
    (σ = force spread); σ is floored at 1e-12 eV/Å.
    """
    sc = np.maximum(np.asarray(sigma_cal, dtype=np.float64), 1e-12)
    q = conformal_quantile(np.asarray(err_cal, dtype=np.float64) / sc, coverage)
    return q * np.maximum(np.asarray(sigma_test, dtype=np.float64), 1e-12)


def coverage(bounds: np.ndarray, errors: np.ndarray) -> float:
    """Fraction of atoms whose true error is at or below its bound."""
    b, e = np.asarray(bounds, dtype=np.float64), np.asarray(errors, dtype=np.float64)
    if b.shape != e.shape or b.ndim != 1 or b.size == 0:
        raise ValueError(f"bounds {b.shape} and errors {e.shape} must be equal non-empty 1-d shapes")
    return float(np.mean(e <= b))


def stop_step(trace: np.ndarray, threshold: float, patience: int = 1) -> int | None:
    """First step at which ``trace`` has been strictly above ``threshold`` for ``patience`` consecutive
    steps (what :class:`~ltau_ase.simulate.observers.UncertaintyStop` does online), or None."""
    above = np.asarray(trace, dtype=np.float64) > threshold
    run = 0
    for step, a in enumerate(above):
        run = run + 1 if a else 0
        if run >= patience:
            return step
    return None


def stop_outcomes(stat_traces: Sequence[np.ndarray], error_traces: Sequence[np.ndarray],
                  threshold: float | Sequence[float], error_bound: float, patience: int = 1,
                  on_time: int = 10) -> dict[str, Any]:
    """Stop behaviour over MD runs (``threshold``: one for all runs, or one per run).

    Breakdown of a run: the first step whose true max-atom force error exceeds ``error_bound``.
    Detection delay: stop step − breakdown step (negative: the stop fired before the breakdown).
    A false alarm: the stop fires in a run that has not broken down by then.

    Returns per-run ``stop``, ``breakdown`` and ``delay`` lists (None where undefined) and summaries:
    ``n_runs``, ``n_broken``, ``n_false_alarms``, ``false_alarm_rate``, ``n_on_time`` (broken runs
    stopped at most ``on_time`` steps after breakdown, or earlier), ``on_time_rate`` (over broken runs),
    ``median_delay`` (over broken runs that were stopped), ``n_missed`` (broken runs never stopped).
    """
    stops, breaks, delays = [], [], []
    thresholds = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (len(stat_traces),))
    for stat, err, thr in zip(stat_traces, error_traces, thresholds, strict=True):
        s = stop_step(stat, float(thr), patience)
        over = np.flatnonzero(np.asarray(err) > error_bound)
        b = int(over[0]) if over.size else None
        stops.append(s)
        breaks.append(b)
        delays.append(None if s is None or b is None else int(s - b))
    n = len(stops)
    false_alarms = sum(s is not None and (b is None or s < b) for s, b in zip(stops, breaks))
    broken = [i for i in range(n) if breaks[i] is not None]
    on_time = sum(stops[i] is not None and delays[i] <= on_time for i in broken)
    stopped_delays = [delays[i] for i in broken if delays[i] is not None]
    return {"stop": stops, "breakdown": breaks, "delay": delays, "n_runs": n, "n_broken": len(broken),
            "n_false_alarms": int(false_alarms), "false_alarm_rate": false_alarms / n if n else math.nan,
            "n_on_time": int(on_time), "on_time_rate": on_time / len(broken) if broken else math.nan,
            "median_delay": float(np.median(stopped_delays)) if stopped_delays else math.nan,
            "n_missed": int(sum(stops[i] is None for i in broken))}


def species_aware(uncertainty: np.ndarray, unseen: np.ndarray) -> np.ndarray:
    """Rank atoms of unseen elements above every other atom (their order among themselves kept)."""
    u = np.asarray(uncertainty, dtype=np.float64)
    unseen = np.asarray(unseen, dtype=bool)
    if u.shape != unseen.shape:
        raise ValueError(f"uncertainty {u.shape} and unseen {unseen.shape} differ")
    return u + unseen * (np.ptp(u) + 1.0) if u.size else u


def summarise_ci(ci: Mapping[str, Any], digits: int = 3) -> str:
    """``value [low, high]`` for a table."""
    def f(x: float | None) -> str:
        return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"
    if ci["low"] is None or not math.isfinite(ci["low"]):
        return f(ci["value"])
    return f"{f(ci['value'])} [{f(ci['low'])}, {f(ci['high'])}]"
