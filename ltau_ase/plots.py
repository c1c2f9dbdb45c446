"""Figures of the LTAU analyses, one function per figure, each writing a PNG (matplotlib, Agg).

Figures are built on :class:`matplotlib.figure.Figure` objects rendered with the Agg canvas, never
through ``pyplot``: no global state, no GUI backend, safe in worker processes and threads. Every
function takes plain arrays (or the result objects of :mod:`ltau_ase.core.calibration`,
:mod:`ltau_ase.is2rs`, :mod:`ltau_ase.cartography`) and an output path, and returns the path.

Paper figures reproduced: Figs. 1-2 (calibration curves), Fig. 3 (training curves), Fig. 4 (RMSD
binned by UQ), Fig. C3 (convergence with M), Fig. D5 (latent map), Figs. E1-E2 (cartography,
error distributions).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from scipy import stats

from ltau_ase.core.calibration import CalibrationCurve

__all__ = [
    "plot_calibration_curves",
    "plot_rmsd_vs_uq",
    "plot_cartography",
    "plot_latent_map",
    "pca_2d",
    "plot_training_curves",
    "mean_and_ci95",
    "plot_error_distributions",
    "convergence_with_M",
    "plot_convergence_with_M",
]

_DPI = 150


def _new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (5.0, 4.0)):
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"figures are written as PNG; got a path ending in {path.suffix!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, format="png")
    return path


def _vector(name: str, values, allow_nan: bool = False) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array; got shape {arr.shape}")
    if not allow_nan and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN/inf")
    return arr


# --------------------------------------------------------------------------- Figs. 1-2
def plot_calibration_curves(
    curves: Mapping[str, CalibrationCurve], path: str | Path, title: str | None = None
) -> Path:
    """Calibration curves of several groups on one axis with the ideal y = x (paper Figs. 1-2).

    Args:
        curves: group name -> :class:`~ltau_ase.core.calibration.CalibrationCurve`.
        path: output PNG.
        title: optional axis title.
    """
    if not curves:
        raise ValueError("no calibration curves to plot")
    fig, axes = _new_figure()
    ax = axes[0, 0]
    ax.plot([0, 1], [0, 1], "r--", lw=1.2, label="ideal")
    for name, curve in curves.items():
        if not isinstance(curve, CalibrationCurve):
            raise TypeError(f"curve {name!r} is a {type(curve).__name__}; expected a CalibrationCurve")
        ax.plot(
            curve.predicted, curve.observed, "o-", ms=4,
            label=f"{name} (n={curve.n_atoms}, MCA={curve.miscalibration_area:.3f})",
        )
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted confidence $p_j$", ylabel="observed fraction with error ≤ threshold")
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


# --------------------------------------------------------------------------- Fig. 4
def plot_rmsd_vs_uq(
    binned: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]],
    path: str | Path,
    threshold: float | None = 0.5,
    title: str | None = None,
) -> Path:
    """RMSD binned by the initial/final/max/mean UQ of each relaxation, one series per group (Fig. 4).

    Args:
        binned: ``binned[statistic][group] = {"centers", "mean", "sem", "counts"}``, the ``"binned"``
            entry of :func:`ltau_ase.is2rs.uq_rmsd_analysis` (up to four statistics, one panel each).
        path: output PNG.
        threshold: RMSD drawn as a dotted line (the 0.5 Å ADwT ceiling); None for none.
    """
    if not binned:
        raise ValueError("nothing to plot: binned is empty")
    stats_order = [s for s in ("initial", "final", "max", "mean") if s in binned] + [
        s for s in binned if s not in ("initial", "final", "max", "mean")
    ]
    ncols = 2 if len(stats_order) > 1 else 1
    nrows = int(np.ceil(len(stats_order) / ncols))
    fig, axes = _new_figure(nrows, ncols, size=(4.5, 3.5))
    for ax in axes.flat[len(stats_order):]:
        ax.set_visible(False)
    for ax, stat in zip(axes.flat, stats_order):
        for group, b in binned[stat].items():
            x, y, e = (np.asarray(b[k], dtype=float) for k in ("centers", "mean", "sem"))
            ax.errorbar(x, y, yerr=np.nan_to_num(e), fmt="o-", ms=4, capsize=3, label=group)
        if threshold is not None:
            ax.axhline(threshold, color="gray", ls=":", lw=1)
        ax.set(xlabel=f"{stat} UQ", ylabel="RMSD (Å), mean ± s.e.", title=f"RMSD vs {stat} UQ")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# --------------------------------------------------------------------------- Fig. E1
def plot_cartography(
    confidence,
    variability,
    path: str | Path,
    groups: Sequence[str] | None = None,
    thresholds: Mapping[str, float] | None = None,
    max_points: int = 50_000,
    seed: int = 0,
) -> Path:
    """Dataset map: confidence µ_M(p_i) against variability σ_M(p_i) (paper Fig. E1).

    All atoms are shown as a log-density hexbin; when ``groups`` (e.g. config_type per atom) are
    given, a random subsample of at most ``max_points`` atoms is overlaid, coloured by group (the
    number shown is stated in the legend).

    Args:
        confidence, variability: (N,) per-atom µ and σ.
        groups: optional (N,) group label per atom.
        thresholds: optional ``{"easy_threshold", "hard_threshold", "ambiguous_variability"}`` drawn
            as region boundaries (see :func:`ltau_ase.cartography.regions`).
    """
    mu = _vector("confidence", confidence)
    sigma = _vector("variability", variability)
    if mu.shape != sigma.shape:
        raise ValueError(f"confidence has {mu.size} atoms but variability has {sigma.size}")
    fig, axes = _new_figure(size=(5.5, 4.5))
    ax = axes[0, 0]
    hb = ax.hexbin(sigma, mu, gridsize=40, extent=(0, 0.5, 0, 1), cmap="Greys", norm=LogNorm(), mincnt=1)
    fig.colorbar(hb, ax=ax, label="atoms per cell")
    if groups is not None:
        g = np.asarray(groups).astype(str)
        if g.shape != mu.shape:
            raise ValueError(f"groups has {g.size} entries; expected one per atom ({mu.size})")
        rng = np.random.default_rng(seed)
        shown = rng.choice(mu.size, size=min(max_points, mu.size), replace=False)
        for name in np.unique(g):
            sel = shown[g[shown] == name]
            ax.scatter(sigma[sel], mu[sel], s=4, alpha=0.5, label=f"{name} ({sel.size} shown)")
        ax.legend(fontsize=7, markerscale=3, loc="lower right")
    if thresholds:
        if "ambiguous_variability" in thresholds:
            ax.axvline(thresholds["ambiguous_variability"], color="k", ls="--", lw=0.8)
        for key in ("easy_threshold", "hard_threshold"):
            if key in thresholds:
                ax.axhline(thresholds[key], color="k", ls=":", lw=0.8)
    ax.set(xlim=(0, 0.5), ylim=(0, 1), xlabel="variability $\\sigma_M(p_i)$", ylabel="confidence $\\mu_M(p_i)$")
    ax.set_title(f"dataset map ({mu.size} atoms)")
    return _save(fig, path)


# --------------------------------------------------------------------------- Fig. D5
def pca_2d(descriptors) -> np.ndarray:
    """(n, 2) projection of (n, D) descriptors on their first two principal components (numpy SVD)."""
    x = np.asarray(descriptors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"descriptors must have shape (n >= 2, D); got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("descriptors contain NaN/inf")
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    proj = x @ vt[:2].T
    if proj.shape[1] < 2:  # D == 1
        proj = np.column_stack([proj[:, 0], np.zeros(len(proj))])
    return proj


def plot_latent_map(
    descriptors,
    values,
    path: str | Path,
    label: str = "$p_i$",
    max_points: int = 50_000,
    seed: int = 0,
) -> Path:
    """2-D PCA map of latent descriptors coloured by a per-atom value (paper Fig. D5, PCA for UMAP).

    Args:
        descriptors: (N, D) latent descriptors.
        values: (N,) colour values (e.g. µ_M(p_i)).
        max_points: atoms plotted at most (a random subsample, stated in the title); PCA uses all.
    """
    proj = pca_2d(descriptors)
    v = _vector("values", values)
    if v.size != proj.shape[0]:
        raise ValueError(f"values has {v.size} entries but there are {proj.shape[0]} descriptors")
    shown = np.random.default_rng(seed).choice(v.size, size=min(max_points, v.size), replace=False)
    fig, axes = _new_figure(size=(5.5, 4.5))
    ax = axes[0, 0]
    sc = ax.scatter(proj[shown, 0], proj[shown, 1], c=v[shown], s=3, cmap="viridis")
    fig.colorbar(sc, ax=ax, label=label)
    ax.set(xlabel="PC 1", ylabel="PC 2", title=f"latent space (PCA), {shown.size} of {v.size} atoms")
    return _save(fig, path)


# --------------------------------------------------------------------------- Fig. 3
def mean_and_ci95(runs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over runs and its 95 % confidence interval per epoch (Student t, n - 1 dof).

    Args:
        runs: (R, E) values per run and epoch; NaN marks epochs a run did not reach.
    Returns:
        (mean, low, high), each (E,); the band is the mean where only one run has a value.
    """
    r = np.asarray(runs, dtype=np.float64)
    if r.ndim != 2 or r.size == 0:
        raise ValueError(f"runs must have shape (R, E); got {r.shape}")
    n = np.sum(np.isfinite(r), axis=0)
    if (n == 0).any():
        raise ValueError(f"epoch(s) {np.flatnonzero(n == 0)[:10].tolist()} have no value in any run")
    mean = np.nanmean(r, axis=0)
    half = np.zeros_like(mean)
    multi = n > 1
    if multi.any():
        sd = np.nanstd(r[:, multi], axis=0, ddof=1)
        half[multi] = stats.t.ppf(0.975, n[multi] - 1) * sd / np.sqrt(n[multi])
    return mean, mean - half, mean + half


def plot_training_curves(
    curves: Mapping[str, Mapping[str, np.ndarray]],
    path: str | Path,
    ylabel: str = "force MAE (eV/Å)",
    log_y: bool = True,
    title: str | None = None,
) -> Path:
    """Training (solid) and validation (dashed) curves per scheme with 95 % bands (paper Fig. 3).

    Args:
        curves: scheme -> {"train": (R, E), "val": (R, E)} metric per run and epoch (NaN = absent).
        path: output PNG.
    """
    if not curves:
        raise ValueError("no training curves to plot")
    fig, axes = _new_figure(size=(6.0, 4.0))
    ax = axes[0, 0]
    colors = iter(f"C{i}" for i in range(100))
    for scheme, parts in curves.items():
        missing = {"train", "val"} - set(parts)
        if missing:
            raise ValueError(f"curves[{scheme!r}] lacks {sorted(missing)}; expected 'train' and 'val' arrays (R, E)")
        color = next(colors)
        for part, style in (("train", "-"), ("val", "--")):
            mean, lo, hi = mean_and_ci95(parts[part])
            epochs = np.arange(1, mean.size + 1)
            n_runs = np.asarray(parts[part]).shape[0]
            ax.plot(epochs, mean, style, color=color, label=f"{scheme} {part} (M={n_runs})")
            ax.fill_between(epochs, lo, hi, color=color, alpha=0.2, lw=0)
    if log_y:
        ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel=ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


# --------------------------------------------------------------------------- Fig. E2
def plot_error_distributions(
    errors: Mapping[str, np.ndarray],
    path: str | Path,
    clip: float | None = None,
    bins: int = 60,
    xlabel: str = "force error (eV/Å)",
) -> Path:
    """Test-error distributions per scheme (paper Fig. E2).

    Left: histograms on [0, clip] (default clip: the 99th percentile of all errors); the fraction
    of errors beyond it is given in the legend, not hidden. Right: the full distributions on
    logarithmic bins; exact zeros, which a log axis cannot show, are counted in the legend.

    Args:
        errors: scheme -> (n,) non-negative per-atom errors.
    """
    if not errors:
        raise ValueError("no error distributions to plot")
    data = {}
    for name, e in errors.items():
        arr = _vector(f"errors[{name!r}]", e)
        if (arr < 0).any():
            raise ValueError(f"errors[{name!r}] contains negative values; expected error magnitudes")
        data[name] = arr
    every = np.concatenate(list(data.values()))
    if clip is None:
        clip = float(np.quantile(every, 0.99))
    if not clip > 0:
        raise ValueError(f"clip must be positive; got {clip}")
    positive = every[every > 0]
    fig, axes = _new_figure(1, 2, size=(5.0, 3.8))
    lin_bins = np.linspace(0.0, clip, bins + 1)
    log_bins = (
        np.geomspace(positive.min(), positive.max() * (1 + 1e-9), bins + 1) if positive.size and positive.min() < positive.max() else bins
    )
    for name, arr in data.items():
        beyond = float(np.mean(arr > clip))
        axes[0, 0].hist(arr[arr <= clip], bins=lin_bins, histtype="step", lw=1.5,
                        label=f"{name}: MAE {arr.mean():.3g}, {100 * beyond:.1f}% > {clip:.3g}")
        zeros = int(np.sum(arr == 0))
        axes[0, 1].hist(arr[arr > 0], bins=log_bins, histtype="step", lw=1.5,
                        label=name + (f" ({zeros} zeros not shown)" if zeros else ""))
    axes[0, 0].set(xlabel=xlabel, ylabel="atoms", title=f"errors ≤ {clip:.3g}")
    axes[0, 1].set(xlabel=xlabel, ylabel="atoms", xscale="log", title="full distribution")
    for ax in axes.flat:
        ax.legend(fontsize=7)
    return _save(fig, path)


# --------------------------------------------------------------------------- Fig. C3
def convergence_with_M(p_runs, n_permutations: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """How µ_m(p_i) and σ_m(p_i) converge as runs are added (paper Fig. C3).

    For m = 1..M runs (random run orders, averaged over ``n_permutations``), the atom-averaged
    µ_m and σ_m (population std over the m runs) and the mean absolute deviation of µ_m and σ_m
    from their values over all M runs.

    Args:
        p_runs: (M, N) confidence p_i of every atom in each of M runs.
    Returns:
        dict of (M,) arrays: ``m``, ``mean_mu``, ``mean_sigma``, ``mad_mu``, ``mad_sigma``.
    """
    p = np.asarray(p_runs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] < 1:
        raise ValueError(f"p_runs must have shape (M, N); got {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("p_runs must be finite probabilities in [0, 1]")
    m_total = p.shape[0]
    mu_all, sigma_all = p.mean(axis=0), p.std(axis=0)
    rng = np.random.default_rng(seed)
    acc = np.zeros((4, m_total))
    for _ in range(int(n_permutations)):
        q = p[rng.permutation(m_total)]
        csum, csq = np.cumsum(q, axis=0), np.cumsum(q * q, axis=0)
        m = np.arange(1, m_total + 1)[:, None]
        mu = csum / m
        sigma = np.sqrt(np.maximum(csq / m - mu * mu, 0.0))
        acc += np.stack([
            mu.mean(axis=1), sigma.mean(axis=1),
            np.abs(mu - mu_all).mean(axis=1), np.abs(sigma - sigma_all).mean(axis=1),
        ])
    acc /= int(n_permutations)
    return {"m": np.arange(1, m_total + 1), "mean_mu": acc[0], "mean_sigma": acc[1], "mad_mu": acc[2], "mad_sigma": acc[3]}


def plot_convergence_with_M(p_runs, path: str | Path, n_permutations: int = 20, seed: int = 0) -> Path:
    """Convergence of µ_M(p_i) and σ_M(p_i) with the number of runs M (paper Fig. C3).

    Args:
        p_runs: (M, N) per-run confidences; see :func:`convergence_with_M`.
    """
    c = convergence_with_M(p_runs, n_permutations=n_permutations, seed=seed)
    fig, axes = _new_figure(1, 2, size=(4.5, 3.5))
    for ax, key, name in ((axes[0, 0], "mu", "\\mu_m(p_i)"), (axes[0, 1], "sigma", "\\sigma_m(p_i)")):
        ax.plot(c["m"], c[f"mean_{key}"], "o-", label=f"mean ${name}$")
        ax.plot(c["m"], c[f"mad_{key}"], "s--", label=f"mean $|{name} - {name.replace('_m', '_M')}|$")
        ax.set(xlabel="runs m", title=f"${name}$")
        ax.legend(fontsize=7)
    return _save(fig, path)
