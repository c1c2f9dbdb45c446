"""Calibration and UQ quality metrics for per-atom uncertainties (numpy + scipy only).

The calibration curve follows the LTAU paper (Figs. 1-2): test atoms are binned by their predicted
confidence p_j (the predicted probability that the force error is at or below a threshold), and in
every bin the observed fraction of atoms whose true error is at or below that threshold is compared
with the bin's mean predicted confidence. A calibrated metric lies on y = x.

Scaling factor s (paper Sec. 4.1, App. D). The paper's calibrated curves count test errors
``<= atol * s`` against predicted p_j = training CDF at ``atol``. Because the training CDF of errors
scaled by s, evaluated at ``atol * s``, equals the unscaled training CDF at ``atol``, this is the same
as predicting with ``LTAUEstimator.predict(threshold=atol * s)`` (which evaluates the training CDF at
``threshold / scale``) and passing ``threshold = atol * s`` here. In short: pass the threshold the
errors are compared against, i.e. ``atol * s`` (or per atom ``(atol + rtol |F_ref|) * s``).

Other metrics: Spearman rank correlation between predicted uncertainty and true error, AUROC for
flagging atoms whose error exceeds a threshold, sharpness and dispersion (Tran et al. 2020,
doi:10.1088/2632-2153/ab7e1a) and uniformity of probability integral transform (PIT) values.
Units: errors and thresholds in eV/Å; confidences and uncertainties are probabilities in [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from ltau_ase.core.checks import check_int

__all__ = [
    "CalibrationCurve",
    "calibration_curve",
    "miscalibration_area",
    "spearman",
    "auroc",
    "sharpness",
    "dispersion",
    "pit_values",
    "pit_uniformity",
    "uq_metrics",
    "search_scale",
]


# --------------------------------------------------------------------------- validation helpers
def _vector(name: str, values, *, min_size: int = 1) -> np.ndarray:
    """(n,) float64 copy of ``values``; raises ValueError for wrong rank, too few entries, NaN/inf."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of shape (n,); got shape {arr.shape}")
    if arr.size < min_size:
        raise ValueError(f"{name} must hold at least {min_size} value(s); got {arr.size}")
    bad = ~np.isfinite(arr)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} contains {int(bad.sum())} NaN/inf value(s) (first at index {first}); expected finite values"
        )
    return arr


def _same_length(**arrays: np.ndarray) -> None:
    sizes = {name: a.shape[0] for name, a in arrays.items()}
    if len(set(sizes.values())) > 1:
        described = ", ".join(f"{name} has {n}" for name, n in sizes.items())
        raise ValueError(f"length mismatch: {described}; expected one value per atom in each")


# Averages of probabilities (e.g. distance-weighted kNN means) can overshoot [0, 1] by rounding;
# values within this tolerance are accepted and snapped to the interval, anything further raises.
_PROB_ROUNDING = 1e-9


def _probabilities(name: str, values) -> np.ndarray:
    arr = _vector(name, values)
    outside = (arr < -_PROB_ROUNDING) | (arr > 1.0 + _PROB_ROUNDING)
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        raise ValueError(
            f"{name} must lie in [0, 1]; {int(outside.sum())} value(s) outside (first: {arr[first]!r} at index {first})"
        )
    return np.clip(arr, 0.0, 1.0)


def _errors(name: str, values) -> np.ndarray:
    arr = _vector(name, values)
    if (arr < 0.0).any():
        first = int(np.flatnonzero(arr < 0.0)[0])
        raise ValueError(f"{name} must be non-negative error magnitudes; got {arr[first]!r} at index {first}")
    return arr


def _threshold(threshold, n: int) -> np.ndarray:
    """Scalar or (n,) threshold broadcast to (n,)."""
    thr = np.asarray(threshold, dtype=np.float64)
    if thr.ndim == 0:
        thr = np.full(n, float(thr))
    elif thr.ndim != 1 or thr.shape[0] != n:
        raise ValueError(f"threshold must be a scalar or an array of shape ({n},); got shape {thr.shape}")
    if not np.isfinite(thr).all() or (thr < 0).any():
        raise ValueError("threshold must be finite and non-negative (eV/Å)")
    return thr


# --------------------------------------------------------------------------- calibration curve
@dataclass(frozen=True)
class CalibrationCurve:
    """Calibration curve over the non-empty confidence bins.

    Attributes:
        edges: (n_bins + 1,) bin edges in confidence (all bins, including empty ones).
        predicted: (b,) mean predicted confidence of the atoms in each non-empty bin.
        observed: (b,) fraction of those atoms whose true error is <= threshold.
        counts: (b,) number of atoms in each non-empty bin.
        bins: (b,) index into the ``n_bins`` bins of each non-empty bin.
    """

    edges: np.ndarray
    predicted: np.ndarray
    observed: np.ndarray
    counts: np.ndarray
    bins: np.ndarray

    @property
    def n_atoms(self) -> int:
        return int(self.counts.sum())

    @property
    def miscalibration_area(self) -> float:
        """Count-weighted mean of |observed - predicted| over the non-empty bins."""
        return float(np.sum(self.counts * np.abs(self.observed - self.predicted)) / self.counts.sum())


def _bin_edges(confidence: np.ndarray, n_bins: int, strategy: str) -> np.ndarray:
    if strategy == "uniform":
        return np.linspace(0.0, 1.0, n_bins + 1)
    if strategy == "quantile":
        # Repeated confidences (ties) collapse quantile edges: keep the distinct ones only.
        edges = np.unique(np.quantile(confidence, np.linspace(0.0, 1.0, n_bins + 1)))
        if edges.size == 1:  # all confidences equal: one degenerate bin
            edges = np.array([edges[0], edges[0]])
        return edges
    raise ValueError(f"strategy must be 'uniform' or 'quantile'; got {strategy!r}")


def _assign_bins(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index of each value; bins are [e_i, e_{i+1}) except the last, which is closed."""
    idx = np.searchsorted(edges, values, side="right") - 1
    return np.clip(idx, 0, edges.size - 2)


def calibration_curve(
    confidence,
    errors,
    threshold,
    n_bins: int = 10,
    strategy: str = "uniform",
) -> CalibrationCurve:
    """Calibration curve of predicted confidences (paper Figs. 1-2).

    Args:
        confidence: (n,) predicted probability p_j in [0, 1] that atom j's error is <= threshold.
        errors: (n,) true per-atom force error magnitudes (eV/Å), non-negative.
        threshold: scalar or (n,) threshold (eV/Å) the errors are compared against. For the paper's
            scaled curves pass ``atol * s`` (see the module docstring for why this is the same as
            evaluating the training CDF at ``threshold / s``).
        n_bins: number of confidence bins.
        strategy: ``"uniform"`` (equal-width bins on [0, 1]) or ``"quantile"`` (equal-count bins;
            tied quantiles are merged, so fewer bins may result).
    Returns:
        :class:`CalibrationCurve` over the non-empty bins.
    """
    conf = _probabilities("confidence", confidence)
    err = _errors("errors", errors)
    _same_length(confidence=conf, errors=err)
    thr = _threshold(threshold, conf.shape[0])
    check_int(n_bins, "n_bins")
    edges = _bin_edges(conf, int(n_bins), strategy)
    idx = _assign_bins(conf, edges)
    n_total = edges.size - 1
    counts = np.bincount(idx, minlength=n_total)
    hit = (err <= thr).astype(np.float64)
    keep = np.flatnonzero(counts > 0)
    predicted = np.bincount(idx, weights=conf, minlength=n_total)[keep] / counts[keep]
    observed = np.bincount(idx, weights=hit, minlength=n_total)[keep] / counts[keep]
    return CalibrationCurve(
        edges=edges, predicted=predicted, observed=observed, counts=counts[keep].astype(np.int64), bins=keep
    )


def miscalibration_area(
    confidence, errors, threshold, n_bins: int = 10, strategy: str = "uniform"
) -> float:
    """Miscalibration of predicted confidences: sum_b n_b |observed_b - predicted_b| / sum_b n_b.

    The gap between the calibration curve and y = x is averaged over the non-empty bins of
    :func:`calibration_curve`, each bin weighted by its number of atoms (count-weighted, so sparsely
    populated bins do not dominate). 0 is perfect calibration, 1 the worst possible. Arguments as in
    :func:`calibration_curve`.
    """
    return calibration_curve(confidence, errors, threshold, n_bins=n_bins, strategy=strategy).miscalibration_area


# --------------------------------------------------------------------------- ranking metrics
def spearman(predicted, true) -> float:
    """Spearman rank correlation between predicted uncertainty (or error) and true error.

    Ties get average ranks. Returns NaN when either input is constant (the correlation is undefined).

    Args:
        predicted: (n,) predicted uncertainties or expected errors, n >= 2.
        true: (n,) true errors.
    """
    p = _vector("predicted", predicted, min_size=2)
    t = _vector("true", true, min_size=2)
    _same_length(predicted=p, true=t)
    rp, rt = stats.rankdata(p), stats.rankdata(t)
    rp -= rp.mean()
    rt -= rt.mean()
    denom = np.sqrt(np.sum(rp * rp) * np.sum(rt * rt))
    if denom == 0.0:
        return float("nan")
    return float(np.clip(np.sum(rp * rt) / denom, -1.0, 1.0))


def auroc(scores, positives) -> float:
    """Area under the ROC curve of ``scores`` for flagging the ``positives``.

    Computed as the Mann-Whitney statistic: the probability that a random positive scores higher
    than a random negative, ties counting one half.

    Args:
        scores: (n,) score per item (e.g. predicted uncertainty); higher means "more likely positive".
        positives: (n,) bool, True for items to flag (e.g. true error > threshold).
    Raises:
        ValueError: if there are no positives or no negatives (AUROC undefined).
    """
    s = _vector("scores", scores)
    pos = np.asarray(positives)
    if pos.dtype != np.bool_:
        raise ValueError(f"positives must be a boolean array; got dtype {pos.dtype}")
    if pos.ndim != 1:
        raise ValueError(f"positives must be 1-D of shape (n,); got shape {pos.shape}")
    _same_length(scores=s, positives=pos)
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"AUROC needs both classes; got {n_pos} positive(s) and {n_neg} negative(s)"
        )
    ranks = stats.rankdata(s)  # average ranks for ties -> ties count 1/2
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


# --------------------------------------------------------------------------- sharpness / dispersion
def sharpness(uncertainties) -> float:
    """Sharpness sqrt(mean(sigma^2)) of the predicted uncertainties (Tran et al. 2020); smaller is sharper."""
    u = _vector("uncertainties", uncertainties)
    if (u < 0).any():
        raise ValueError("uncertainties must be non-negative")
    return float(np.sqrt(np.mean(u * u)))


def dispersion(uncertainties) -> float:
    """Dispersion: coefficient of variation of the uncertainties, sample std (ddof=1) / mean.

    Tran et al. 2020, Eq. for C_v; larger means the uncertainties discriminate more between atoms.

    Raises:
        ValueError: for fewer than two values, negative values, or a zero mean.
    """
    u = _vector("uncertainties", uncertainties, min_size=2)
    if (u < 0).any():
        raise ValueError("uncertainties must be non-negative")
    mean = u.mean()
    if mean == 0.0:
        raise ValueError("dispersion is undefined when all uncertainties are zero (zero mean)")
    return float(np.std(u, ddof=1) / mean)


# --------------------------------------------------------------------------- PIT
def pit_values(cdf_values, cdf_left=None, seed: int | None = None) -> np.ndarray:
    """Probability integral transform values u_j = CDF_j(true error_j).

    For a calibrated predicted distribution these are Uniform(0, 1). LTAU's per-atom distributions
    are empirical (step) CDFs, for which plain PIT values are not uniform even when calibrated; give
    ``cdf_left`` = CDF_j just below the true error (P(e < e_j)) to get the randomised PIT
    u_j = cdf_left_j + V (cdf_j - cdf_left_j), V ~ Uniform(0, 1) (Czado et al. 2009).

    Args:
        cdf_values: (n,) predicted CDF evaluated at each true error, in [0, 1].
        cdf_left: optional (n,) left limits of the CDF at the true error, each <= cdf_values.
        seed: seed of the random draws for the randomised PIT.
    Returns:
        (n,) float64 PIT values in [0, 1].
    """
    upper = _probabilities("cdf_values", cdf_values)
    if cdf_left is None:
        return upper
    lower = _probabilities("cdf_left", cdf_left)
    _same_length(cdf_values=upper, cdf_left=lower)
    if (lower > upper).any():
        first = int(np.flatnonzero(lower > upper)[0])
        raise ValueError(f"cdf_left must be <= cdf_values; index {first} has {lower[first]} > {upper[first]}")
    v = np.random.default_rng(seed).uniform(size=upper.size)
    return lower + v * (upper - lower)


def pit_uniformity(pit) -> dict[str, float]:
    """Kolmogorov-Smirnov test of PIT values against Uniform(0, 1).

    Returns:
        ``{"ks_statistic": D, "p_value": p}``; small D (large p) is consistent with calibration.
    """
    u = _probabilities("pit", pit)
    res = stats.kstest(u, "uniform")
    return {"ks_statistic": float(res.statistic), "p_value": float(res.pvalue)}


# --------------------------------------------------------------------------- bundle
def uq_metrics(uncertainty, errors, threshold, n_bins: int = 10) -> dict[str, float]:
    """All scalar UQ metrics for per-atom uncertainties u_j = 1 - p_j.

    Args:
        uncertainty: (n,) predicted uncertainty in [0, 1] (LTAU: 1 - confidence).
        errors: (n,) true force error magnitudes (eV/Å).
        threshold: scalar or (n,) threshold (eV/Å), e.g. ``atol * s``.
        n_bins: confidence bins of the miscalibration area.
    Returns:
        dict with ``miscalibration_area`` (confidence = 1 - uncertainty, uniform bins, count-weighted),
        ``spearman`` (uncertainty vs error), ``auroc`` (uncertainty flagging errors > threshold; NaN
        when all or no atoms exceed the threshold, see ``n_exceeding``), ``sharpness``,
        ``dispersion`` (NaN when fewer than 2 atoms or all uncertainties are 0), ``n_atoms``,
        ``n_exceeding``.
    """
    u = _probabilities("uncertainty", uncertainty)
    err = _errors("errors", errors)
    _same_length(uncertainty=u, errors=err)
    thr = _threshold(threshold, u.shape[0])
    exceeding = err > thr
    n_exc = int(exceeding.sum())
    out = {
        "miscalibration_area": miscalibration_area(1.0 - u, err, thr, n_bins=n_bins),
        "spearman": spearman(u, err) if u.size >= 2 else float("nan"),
        "auroc": auroc(u, exceeding) if 0 < n_exc < u.size else float("nan"),
        "sharpness": sharpness(u),
        "dispersion": dispersion(u) if u.size >= 2 and u.mean() > 0 else float("nan"),
        "n_atoms": int(u.size),
        "n_exceeding": n_exc,
    }
    return out


# --------------------------------------------------------------------------- scale search
def search_scale(
    miscalibration_of,
    bounds: tuple[float, float] = (0.05, 100.0),
    n_grid: int = 60,
    refine: bool = True,
    current: float = 1.0,
) -> dict[str, float]:
    """The one scale search behind every recalibration by a multiplicative factor (``LTAUEstimator.fit_scale``,
    ``LTAUEstimator.fit_calibration``'s per-element factors, ``committee.fit_committee_scale``).

    ``miscalibration_of(s)`` is evaluated on a log grid of ``n_grid`` points over ``bounds`` (plus
    ``current``); with ``refine`` a bounded scalar minimisation in log s between the neighbours of the
    best grid point follows. The current scale is kept when nothing found is strictly better.

    Args:
        miscalibration_of: callable s -> miscalibration (float >= 0) at scale s.
        bounds: (low, high) search interval, 0 < low < high.
        n_grid: grid points (>= 2).
        refine: polish the best grid point with ``scipy.optimize.minimize_scalar``.
        current: the scale in use before the search (its value is reported as ``before``).
    Returns:
        dict(scale=best s, before=miscalibration at ``current``, after=at the best s).
    """
    import math

    from scipy.optimize import minimize_scalar

    lo, hi = (float(b) for b in bounds)
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ValueError(f"bounds must satisfy 0 < low < high (finite); got {bounds}")
    if int(n_grid) != n_grid or n_grid < 2:
        raise ValueError(f"n_grid must be an integer >= 2; got {n_grid!r}")
    current = float(current)
    if not (math.isfinite(current) and current > 0):
        raise ValueError(f"current scale must be a finite number > 0; got {current!r}")
    before = float(miscalibration_of(current))
    grid = np.geomspace(lo, hi, int(n_grid))
    values = np.array([float(miscalibration_of(float(s))) for s in grid])
    i = int(np.argmin(values))
    best_s, best_v = float(grid[i]), float(values[i])
    if refine:
        res = minimize_scalar(
            lambda ls: float(miscalibration_of(float(np.exp(ls)))),
            bounds=(math.log(grid[max(i - 1, 0)]), math.log(grid[min(i + 1, grid.size - 1)])),
            method="bounded",
            options={"xatol": 1e-3},
        )
        if res.success and float(res.fun) < best_v:
            best_s, best_v = float(np.exp(res.x)), float(res.fun)
    if before <= best_v:  # the current scale is already at least as good: keep it
        best_s, best_v = current, before
    return {"scale": best_s, "before": before, "after": best_v}
