"""Dataset cartography and confidence-based loss weights (paper Sec. 4.2, App. E; torch-free).

Every training atom i has a confidence µ_M(p_i) (mean over M runs of the fraction of its logged
epochs with error <= atol) and a variability σ_M(p_i) (population std over the runs), both
probabilities' statistics: 0 <= µ <= 1 and 0 <= σ <= sqrt(µ(1 - µ)) <= 0.5. Following
Swayamdipta et al. 2020 ("Dataset Cartography", arXiv:2009.10795) the map splits into

* ``"ambiguous"``: high variability, σ >= ``ambiguous_variability`` (default 0.2, 40 % of the
  largest possible σ): the runs disagree on whether the atom is learned;
* ``"easy-to-learn"``: low variability and µ >= ``easy_threshold`` (default 0.5);
* ``"hard-to-learn"``: low variability and µ < ``hard_threshold`` (default 0.5);
* low-variability atoms with ``hard_threshold <= µ < easy_threshold`` (only when the two
  thresholds differ) are neither clearly easy nor hard and are labelled ``"ambiguous"`` too.

Loss weights (App. E): up-weight easy w_i = exp[λ(µ_i + σ_i)], up-weight hard
w_i = exp[λ(1 − µ_i + σ_i)], or uniform w_i = 1; every scheme is normalised to mean 1 over the
atoms given, so the overall loss scale (and the learning-rate tuning) is unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ltau_ase.core.atom_ids import frame_ids_of, global_atom_ids

__all__ = [
    "REGIONS",
    "regions",
    "aggregate_per_frame",
    "loss_weights",
    "values_for_frames",
    "cartography_frames",
    "export_extxyz",
]

EASY, HARD, AMBIGUOUS = "easy-to-learn", "hard-to-learn", "ambiguous"
#: Region labels, in a fixed order.
REGIONS = (EASY, HARD, AMBIGUOUS)
_AGGREGATES = ("mean", "min", "max")


def _check_map(confidence, variability) -> tuple[np.ndarray, np.ndarray]:
    """Validate the (N,) confidence/variability pair and return float64 copies."""
    mu = np.asarray(confidence, dtype=np.float64)
    sigma = np.asarray(variability, dtype=np.float64)
    for name, arr in (("confidence", mu), ("variability", sigma)):
        if arr.ndim != 1:
            raise ValueError(f"{name} must be a 1-D array of shape (N,); got shape {arr.shape}")
        if arr.size == 0:
            raise ValueError(f"{name} is empty; expected one value per training atom")
        bad = ~np.isfinite(arr)
        if bad.any():
            raise ValueError(
                f"{name} contains {int(bad.sum())} NaN/inf value(s) (first at atom {int(np.flatnonzero(bad)[0])}); "
                "every atom needs a logged confidence"
            )
    if mu.shape != sigma.shape:
        raise ValueError(f"confidence has {mu.size} atoms but variability has {sigma.size}")
    if (mu < 0).any() or (mu > 1).any():
        raise ValueError("confidence must lie in [0, 1]")
    if (sigma < 0).any() or (sigma > 0.5 + 1e-12).any():
        raise ValueError("variability (std of probabilities over runs) must lie in [0, 0.5]")
    return mu, sigma


def regions(
    confidence,
    variability,
    easy_threshold: float = 0.5,
    hard_threshold: float = 0.5,
    ambiguous_variability: float = 0.2,
) -> np.ndarray:
    """Cartography region of each atom (see the module docstring for the rules and defaults).

    Args:
        confidence: (N,) µ_M(p_i) in [0, 1].
        variability: (N,) σ_M(p_i) in [0, 0.5].
        easy_threshold: µ at or above which a low-variability atom is easy-to-learn.
        hard_threshold: µ below which a low-variability atom is hard-to-learn (<= easy_threshold).
        ambiguous_variability: σ at or above which an atom is ambiguous.
    Returns:
        (N,) array of str, each one of :data:`REGIONS`.
    """
    mu, sigma = _check_map(confidence, variability)
    if not 0.0 <= hard_threshold <= easy_threshold <= 1.0:
        raise ValueError(
            f"thresholds must satisfy 0 <= hard_threshold <= easy_threshold <= 1; got {hard_threshold}, {easy_threshold}"
        )
    if not ambiguous_variability > 0.0:
        raise ValueError(f"ambiguous_variability must be positive; got {ambiguous_variability}")
    labels = np.full(mu.shape, AMBIGUOUS, dtype=f"<U{max(map(len, REGIONS))}")
    steady = sigma < ambiguous_variability
    labels[steady & (mu >= easy_threshold)] = EASY
    labels[steady & (mu < hard_threshold)] = HARD
    return labels


def aggregate_per_frame(values, frame_index, how: str = "mean", n_frames: int | None = None) -> np.ndarray:
    """Reduce per-atom values to one value per frame.

    Args:
        values: (N,) per-atom values.
        frame_index: (N,) integer frame index of each atom, in [0, n_frames).
        how: ``"mean"``, ``"min"`` or ``"max"``.
        n_frames: number of frames F (default: max(frame_index) + 1).
    Returns:
        (F,) float64 aggregate per frame.
    Raises:
        ValueError: shape mismatch, NaN values, or a frame without atoms.
    """
    v = np.asarray(values, dtype=np.float64)
    idx = np.asarray(frame_index)
    if v.ndim != 1 or idx.shape != v.shape:
        raise ValueError(f"values and frame_index must be 1-D of equal length; got {v.shape} and {idx.shape}")
    if v.size == 0:
        raise ValueError("no atoms to aggregate")
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"frame_index must hold integers; got dtype {idx.dtype}")
    if not np.isfinite(v).all():
        raise ValueError("values contain NaN/inf")
    n = int(idx.max()) + 1 if n_frames is None else int(n_frames)
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"frame_index must lie in [0, {n}); got range [{idx.min()}, {idx.max()}]")
    counts = np.bincount(idx, minlength=n)
    if (counts == 0).any():
        raise ValueError(f"frame(s) {np.flatnonzero(counts == 0)[:10].tolist()} have no atoms")
    if how == "mean":
        return np.bincount(idx, weights=v, minlength=n) / counts
    if how == "min":
        out = np.full(n, np.inf)
        np.minimum.at(out, idx, v)
        return out
    if how == "max":
        out = np.full(n, -np.inf)
        np.maximum.at(out, idx, v)
        return out
    raise ValueError(f"how must be one of {_AGGREGATES}; got {how!r}")


def loss_weights(confidence, variability, scheme: str = "easy", lam: float = 2.0) -> np.ndarray:
    """Per-atom force-loss weights of the paper's App. E, normalised to mean 1.

    * ``"easy"``: w_i ∝ exp[λ(µ_i + σ_i)];
    * ``"hard"``: w_i ∝ exp[λ(1 − µ_i + σ_i)];
    * ``"uniform"``: w_i = 1.

    The paper used λ = 2.0 (easy) and λ = 4.5 (hard). Dividing by the mean keeps the loss scale.

    Args:
        confidence: (N,) µ_M(p_i). variability: (N,) σ_M(p_i). lam: λ, finite.
    Returns:
        (N,) float64 weights with mean exactly 1 (up to rounding).
    """
    mu, sigma = _check_map(confidence, variability)
    if not np.isfinite(lam):
        raise ValueError(f"lam must be finite; got {lam!r}")
    if scheme == "easy":
        exponent = lam * (mu + sigma)
    elif scheme == "hard":
        exponent = lam * (1.0 - mu + sigma)
    elif scheme == "uniform":
        return np.ones_like(mu)
    else:
        raise ValueError(f"scheme must be 'easy', 'hard' or 'uniform'; got {scheme!r}")
    # Subtracting the max before exp avoids overflow for large λ; it cancels in the normalisation.
    w = np.exp(exponent - exponent.max())
    return w / w.mean()


def values_for_frames(frames: Sequence, atom_ids, *values) -> tuple[np.ndarray, ...]:
    """Reorder per-atom values keyed by global atom ids into the atom order of ``frames``.

    Args:
        frames: training :class:`ase.Atoms` with ``info["frame_id"]``.
        atom_ids: (N,) global ids (``frame_id * 2**20 + local index``) the values are ordered by.
        *values: (N,) arrays in ``atom_ids`` order.
    Returns:
        The arrays reordered to frame order then local order (sum of frame sizes entries each).
    Raises:
        ValueError: duplicate ids, or atoms of ``frames`` that have no value (their count and the
        first missing frame are named). Values for atoms not in ``frames`` are ignored, as a
        training subset of a larger log is legitimate.
    """
    ids = np.asarray(atom_ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"atom_ids must be 1-D; got shape {ids.shape}")
    if ids.size == 0:
        raise ValueError("atom_ids is empty; expected the ids of the atoms the values belong to")
    if np.unique(ids).size != ids.size:
        raise ValueError("atom_ids contain duplicates")
    arrays = [np.asarray(v) for v in values]
    for k, arr in enumerate(arrays):
        if arr.shape[:1] != ids.shape:
            raise ValueError(f"value array {k} has {arr.shape[0] if arr.ndim else 0} entries but there are {ids.size} atom ids")
    fids = frame_ids_of(frames)  # raises on missing or repeated ids
    wanted = global_atom_ids(fids, [len(a) for a in frames])
    order = np.argsort(ids, kind="stable")
    pos = np.searchsorted(ids, wanted, sorter=order)
    pos = np.minimum(pos, ids.size - 1)
    found = ids[order[pos]] == wanted
    if not found.all():
        first = int(np.flatnonzero(~found)[0])
        frame_of = np.repeat(np.arange(len(frames)), [len(a) for a in frames])[first]
        raise ValueError(
            f"{int((~found).sum())} atom(s) of the training frames have no logged value "
            f"(first: frame_id {fids[frame_of]}); the estimator/error logs do not cover this training set"
        )
    take = order[pos]
    return tuple(arr[take] for arr in arrays)


def cartography_frames(
    frames: Sequence,
    confidence,
    variability,
    weights=None,
    easy_threshold: float = 0.5,
    hard_threshold: float = 0.5,
    ambiguous_variability: float = 0.2,
) -> list:
    """Copies of ``frames`` annotated with the cartography map (the content of :func:`export_extxyz`).

    Per-atom arrays: ``ltau_confidence``, ``ltau_variability``, ``ltau_region`` (str) and, when
    ``weights`` is given, ``ltau_weight``. Per-frame ``info``: ``ltau_confidence_{mean,min,max}``,
    ``ltau_variability_{mean,min,max}``, ``ltau_weight_mean`` (with weights) and the counts
    ``ltau_n_easy``, ``ltau_n_hard``, ``ltau_n_ambiguous``. Reference results of the frames'
    calculators (energy, forces, ...) are kept.

    Args:
        frames: sequence of :class:`ase.Atoms`; per-atom values are in frame order then atom order.
        confidence, variability, weights: (N,) arrays, N = total number of atoms in ``frames``.
    """
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = list(frames)
    if not frames:
        raise ValueError("no frames to annotate")
    sizes = np.array([len(a) for a in frames])
    n_total = int(sizes.sum())
    mu, sigma = _check_map(confidence, variability)
    if mu.size != n_total:
        raise ValueError(
            f"confidence/variability have {mu.size} values but the {len(frames)} frames hold {n_total} atoms; "
            "expected one value per atom in frame order"
        )
    w = None
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (n_total,):
            raise ValueError(f"weights have shape {w.shape} but the frames hold {n_total} atoms; expected ({n_total},)")
        if not np.isfinite(w).all() or (w < 0).any():
            raise ValueError("weights must be finite and non-negative")
    labels = regions(mu, sigma, easy_threshold, hard_threshold, ambiguous_variability)
    frame_index = np.repeat(np.arange(len(frames)), sizes)
    if (sizes == 0).any():
        raise ValueError(f"frame(s) {np.flatnonzero(sizes == 0)[:10].tolist()} have no atoms")
    aggregates = {
        f"ltau_{name}_{how}": aggregate_per_frame(vals, frame_index, how, n_frames=len(frames))
        for name, vals in (("confidence", mu), ("variability", sigma))
        for how in _AGGREGATES
    }
    if w is not None:
        aggregates["ltau_weight_mean"] = aggregate_per_frame(w, frame_index, "mean", n_frames=len(frames))
    out = []
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for f, atoms in enumerate(frames):
        sl = slice(starts[f], starts[f + 1])
        new = atoms.copy()
        if atoms.calc is not None and getattr(atoms.calc, "results", None):
            new.calc = SinglePointCalculator(new, **atoms.calc.results)
        new.arrays["ltau_confidence"] = mu[sl].copy()
        new.arrays["ltau_variability"] = sigma[sl].copy()
        new.arrays["ltau_region"] = labels[sl].copy()
        if w is not None:
            new.arrays["ltau_weight"] = w[sl].copy()
        for key, vals in aggregates.items():
            new.info[key] = float(vals[f])
        for label in REGIONS:
            new.info[f"ltau_n_{label.split('-')[0]}"] = int(np.sum(labels[sl] == label))
        out.append(new)
    return out


def export_extxyz(
    frames: Sequence,
    confidence,
    variability,
    path: str | Path,
    weights=None,
    easy_threshold: float = 0.5,
    hard_threshold: float = 0.5,
    ambiguous_variability: float = 0.2,
) -> Path:
    """Write an extxyz copy of the training set annotated as in :func:`cartography_frames`.

    Floats are written with extxyz's 8 decimals, so arrays read back agree to within 5e-9.

    Returns:
        The path written.
    """
    import ase.io

    annotated = cartography_frames(
        frames, confidence, variability, weights, easy_threshold, hard_threshold, ambiguous_variability
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(path, annotated, format="extxyz")
    return path
