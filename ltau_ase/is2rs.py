"""OC20 IS2RS-style analysis of relaxations with uncertainties (torch-free).

* :func:`min_diff` reproduces the per-atom displacement of fairchem's IS2RS evaluator
  (``fairchem/core/modules/evaluator.py``): a fractional-coordinate wrap, which is a minimum image
  only for orthogonal cells.
* :func:`system_distances` gives, over the free atoms of one system, the mean displacement d_s
  (used by ADwT) and the RMSD (used by the paper's Fig. 4), both in Å.
* :func:`adwt` is OC20's Average Distance within Threshold.
* :func:`uq_rmsd_analysis` relates per-system UQ statistics (initial, final, max and mean over a
  relaxation, as recorded by ``RelaxationUQObserver``) to the RMSD: Spearman ρ, AUROC for flagging
  RMSD above a threshold (default 0.5 Å, the ADwT ceiling) and RMSD binned by UQ, per group.
* :class:`FailureModel` turns a relaxation's UQ trace into a calibrated probability that its RMSD
  exceeds the threshold (a small logistic regression fitted on calibration relaxations).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ltau_ase.core.calibration import auroc, spearman
from ltau_ase.core.checks import check_int

__all__ = [
    "ADWT_THRESHOLDS",
    "UQ_STATISTICS",
    "min_diff",
    "free_atom_mask",
    "system_distances",
    "adwt",
    "match_references",
    "system_table",
    "bin_rmsd_by_uq",
    "uq_rmsd_analysis",
    "FAILURE_FEATURES",
    "FailureModel",
    "DISTANCE_FEATURES",
    "FAILURE_FEATURES_WITH_DISTANCE",
    "ELEMENT_NORMALISED_STATISTICS",
    "ELEMENT_NORMALISED_FEATURES",
    "FAILURE_FEATURES_WITH_ELEMENT_NORMALISED",
    "FAILURE_TRANSFORMS",
    "FAILURE_L2_GRID",
    "select_failure_features",
]

#: β values of OC20's ADwT, in Å (490 values).
ADWT_THRESHOLDS = np.arange(0.01, 0.5, 0.001)
#: The four per-relaxation UQ statistics of the paper's Fig. 4; record key is ``"uq_" + name``.
UQ_STATISTICS = ("initial", "final", "max", "mean")


def min_diff(pos_pred: np.ndarray, pos_ref: np.ndarray, cell: np.ndarray, pbc: Sequence[bool]) -> np.ndarray:
    """Per-atom displacement ``pos_pred - pos_ref`` wrapped as in fairchem's IS2RS evaluator.

    The Cartesian difference is converted to fractional coordinates (solve(cellᵀ, Δᵀ)); along each
    periodic axis the fraction is reduced with ``%= 1.0`` twice (the second catches values that
    round to exactly 1.0) and values > 0.5 have 1 subtracted; the result is converted back to
    Cartesian. fairchem subtracts 1 from fractions > 0.5 on every axis; OC20 systems are periodic
    along all three axes, where the two agree. Here non-periodic axes are left unwrapped.

    Args:
        pos_pred: (n, 3) predicted positions (Å).
        pos_ref: (n, 3) reference positions (Å).
        cell: (3, 3) cell vectors as rows (Å).
        pbc: (3,) periodicity flags.
    Returns:
        (n, 3) displacement vectors (Å).
    """
    pred = np.asarray(pos_pred, dtype=np.float64)
    ref = np.asarray(pos_ref, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool).reshape(-1)
    if pred.ndim != 2 or pred.shape[1] != 3 or pred.shape != ref.shape:
        raise ValueError(f"positions must both have shape (n, 3); got {pred.shape} and {ref.shape}")
    if cell.shape != (3, 3):
        raise ValueError(f"cell must have shape (3, 3); got {cell.shape}")
    if pbc.shape != (3,):
        raise ValueError(f"pbc must have 3 entries; got {pbc.shape}")
    if pbc.any() and abs(np.linalg.det(cell)) < 1e-12:
        raise ValueError("cell is singular (zero volume): cannot wrap displacements along periodic axes")
    diff = pred - ref
    if not pbc.any():
        return diff
    fractional = np.linalg.solve(cell.T, diff.T).T
    for axis in np.flatnonzero(pbc):
        fractional[:, axis] %= 1.0
        fractional[:, axis] %= 1.0
        fractional[fractional[:, axis] > 0.5, axis] -= 1.0
    return fractional @ cell


def _tags(atoms) -> np.ndarray | None:
    tags = atoms.arrays.get("tags")
    if tags is None or not np.any(tags):
        return None
    return np.asarray(tags)


def free_atom_mask(atoms) -> np.ndarray:
    """(n,) bool mask of the atoms that relax.

    OC20 convention when the structure carries non-zero tags: tags 1 (surface) and 2 (adsorbate)
    are free, tag 0 (bulk) is fixed. Without tags (or with all tags 0), the atoms not fixed by a
    :class:`ase.constraints.FixAtoms` constraint are free.
    """
    tags = _tags(atoms)
    if tags is not None:
        return np.isin(tags, (1, 2))
    from ase.constraints import FixAtoms

    mask = np.ones(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            mask[constraint.get_indices()] = False
    return mask


def system_distances(pred, ref, cell_tolerance: float = 1e-4) -> dict[str, float]:
    """Displacement of an ML-relaxed structure from its reference over the free atoms.

    Free atoms come from the reference (:func:`free_atom_mask`); distances use the reference cell.

    Args:
        pred: ML-relaxed :class:`ase.Atoms`.
        ref: reference-relaxed :class:`ase.Atoms` of the same system.
        cell_tolerance: largest allowed |cell_pred - cell_ref| entry (Å).
    Returns:
        ``{"d_mean": mean |Δ_i| (Å), "rmsd": sqrt(mean |Δ_i|²) (Å), "n_free": int}``.
    Raises:
        ValueError: different atom counts, species order, cells, pbc or tags; no free atoms.
    """
    if len(pred) != len(ref):
        raise ValueError(f"predicted structure has {len(pred)} atoms but the reference has {len(ref)}")
    zp, zr = pred.get_atomic_numbers(), ref.get_atomic_numbers()
    if not np.array_equal(zp, zr):
        i = int(np.flatnonzero(zp != zr)[0])
        raise ValueError(
            f"species order differs from the reference: first mismatch at atom {i} "
            f"(predicted Z={zp[i]}, reference Z={zr[i]}); expected identical atom order"
        )
    cp, cr = np.asarray(pred.cell), np.asarray(ref.cell)
    if not np.allclose(cp, cr, rtol=0.0, atol=cell_tolerance):
        raise ValueError(
            f"cells differ by up to {np.abs(cp - cr).max():.3g} Å (tolerance {cell_tolerance} Å); "
            "IS2RS compares structures in the same cell"
        )
    if not np.array_equal(pred.pbc, ref.pbc):
        raise ValueError(f"pbc differ: predicted {pred.pbc.tolist()}, reference {ref.pbc.tolist()}")
    tp, tr = _tags(pred), _tags(ref)
    if tp is not None and tr is not None and not np.array_equal(tp, tr):
        i = int(np.flatnonzero(tp != tr)[0])
        raise ValueError(f"tags differ from the reference: first at atom {i} ({tp[i]} vs {tr[i]})")
    mask = free_atom_mask(ref)
    if not mask.any():
        raise ValueError("the reference structure has no free atoms (tags 1/2 or atoms not fixed by FixAtoms)")
    diff = min_diff(pred.positions[mask], ref.positions[mask], cr, ref.pbc)
    dist = np.linalg.norm(diff, axis=1)
    return {"d_mean": float(dist.mean()), "rmsd": float(np.sqrt(np.mean(dist**2))), "n_free": int(mask.sum())}


def adwt(d_s) -> float:
    """OC20 Average Distance within Threshold.

    Mean over β in ``np.arange(0.01, 0.5, 0.001)`` Å of the fraction of systems with d_s < β.

    Args:
        d_s: (n_systems,) mean free-atom displacement per system (Å).
    """
    d = np.asarray(d_s, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"d_s must be a non-empty 1-D array (one value per system); got shape {d.shape}")
    if not np.isfinite(d).all() or (d < 0).any():
        raise ValueError("d_s must be finite, non-negative distances (Å)")
    # #{s : d_s < β} for every β via a sorted search: O((n + 490) log n) time, O(n) memory.
    below = np.searchsorted(np.sort(d), ADWT_THRESHOLDS, side="left")
    return float(below.mean() / d.size)


def match_references(
    pred: Mapping[str, Any], refs: Mapping[str, Any]
) -> tuple[dict[str, tuple[Any, Any]], list[str]]:
    """Pair predicted structures with their references by system name.

    Returns:
        ``(matched, missing)``: ``matched[name] = (pred_atoms, ref_atoms)`` in the order of ``pred``;
        ``missing`` lists the names that have no reference. A warning names them too: systems
        without a reference are never dropped silently.
    """
    matched: dict[str, tuple[Any, Any]] = {}
    missing: list[str] = []
    for name, atoms in pred.items():
        if name in refs:
            matched[name] = (atoms, refs[name])
        else:
            missing.append(name)
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        warnings.warn(
            f"{len(missing)} of {len(pred)} system(s) have no reference structure and are not scored: {shown}",
            stacklevel=2,
        )
    return matched, missing


def system_table(
    pred: Mapping[str, Any],
    refs: Mapping[str, Any],
    groups: Mapping[str, str] | str = "all",
    cell_tolerance: float = 1e-4,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Per-system records for :func:`uq_rmsd_analysis` from ML-relaxed and reference structures.

    The UQ statistics are read from ``atoms.info["ltau_uq_initial" | "_final" | "_max" | "_mean"]``
    of each ML-relaxed structure (written by ``RelaxationUQObserver``).

    Args:
        pred: system name -> ML-relaxed :class:`ase.Atoms`.
        refs: system name -> reference-relaxed :class:`ase.Atoms`.
        groups: system name -> group, or one group name for every system.
    Returns:
        ``(records, missing)``: one dict per system with a reference (``name``, ``group``,
        ``uq_*``, ``rmsd``, ``d_mean``, ``n_free``), and the names without a reference (also warned
        about by :func:`match_references`).
    """
    matched, missing = match_references(pred, refs)
    records = []
    for name, (p, r) in matched.items():
        absent = [f"ltau_uq_{s}" for s in UQ_STATISTICS if f"ltau_uq_{s}" not in p.info]
        if absent:
            raise ValueError(f"system {name!r} lacks {absent} in atoms.info; relax it with RelaxationUQObserver attached")
        if isinstance(groups, str):
            group = groups
        elif name in groups:
            group = groups[name]
        else:
            raise ValueError(f"system {name!r} has no group in the groups mapping")
        uq = {s: p.info[f"ltau_uq_{s}"] for s in UQ_STATISTICS}
        records.append(_system_row(name, group, uq, p, r, cell_tolerance))
    return records, missing


def _system_row(name: str, group: str, uq: Mapping[str, float], pred, ref, cell_tolerance: float) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name, "group": str(group)}
    row.update({f"uq_{s}": float(uq[s]) for s in UQ_STATISTICS})
    row.update(system_distances(pred, ref, cell_tolerance=cell_tolerance))
    return row


def records_table(
    records: Sequence[Any],
    references: Mapping[str, Any] | None = None,
    strict: bool = False,
    cell_tolerance: float = 1e-4,
) -> tuple[list[dict[str, Any]], list[str]]:
    """The per-system IS2RS table of relaxation records (the one path from a database to the metrics).

    Args:
        records: :class:`ltau_ase.simulate.batch.RelaxationRecord` objects (``load_results(db)``;
            anything with ``name``, ``group``, ``status``, ``nsteps``, ``uq_initial|_final|_max|_mean``,
            ``atoms`` and ``reference`` attributes). Failed relaxations are skipped: count them from
            the records' ``status``.
        references: system name -> reference relaxed :class:`ase.Atoms`; None: each record's stored
            ``reference``.
        strict: a relaxed system without a reference raises ValueError instead of being listed.
    Returns:
        ``(table, missing)``: one row per relaxed system with a reference (``name``, ``group``,
        ``uq_*``, ``rmsd`` (Å), ``d_mean`` (Å), ``n_free``, ``status``, ``nsteps``, and
        ``distance_ratio_*`` where the record has a finite distance trace), in record order, and
        the names without a reference (also warned about).
    """
    relaxed = [r for r in records if r.status != "failed"]
    if references is None:
        references = {r.name: r.reference for r in relaxed if r.reference is not None}
    pred = {r.name: r for r in relaxed}
    if strict:
        missing = [n for n in pred if n not in references]
        if missing:
            raise ValueError(f"{len(missing)} system(s) have no reference structure: {missing[:10]}")
    matched, missing = match_references(pred, references)
    table = []
    for name, (rec, ref) in matched.items():
        row = _system_row(name, rec.group, {s: getattr(rec, f"uq_{s}") for s in UQ_STATISTICS}, rec.atoms, ref,
                          cell_tolerance)
        row.update(status=rec.status, nsteps=rec.nsteps)
        for s in UQ_STATISTICS:  # the distance trace, where recorded (calibrated estimator) and finite
            value = getattr(rec, f"distance_ratio_{s}", math.nan)
            if value is not None and math.isfinite(value):
                row[f"distance_ratio_{s}"] = float(value)
        table.append(row)
    return table, missing


def bin_rmsd_by_uq(uq, rmsd, n_bins: int = 5, strategy: str = "quantile") -> dict[str, np.ndarray]:
    """RMSD binned by a per-system UQ statistic (the paper's Fig. 4).

    Args:
        uq: (n,) UQ statistic per system.
        rmsd: (n,) RMSD per system (Å).
        n_bins: number of bins.
        strategy: ``"quantile"`` (equal-count bins; tied edges merged) or ``"uniform"``
            (equal-width bins between min and max of ``uq``).
    Returns:
        dict of arrays over the non-empty bins: ``edges`` (all bin edges), ``centers`` (mean UQ of
        the bin's systems), ``mean`` and ``sem`` (standard error std(ddof=1)/sqrt(n); NaN for a
        single system) of the RMSD, ``counts``.
    """
    u = np.asarray(uq, dtype=np.float64)
    r = np.asarray(rmsd, dtype=np.float64)
    if u.ndim != 1 or r.ndim != 1 or u.shape != r.shape:
        raise ValueError(f"uq and rmsd must be 1-D of equal length; got shapes {u.shape} and {r.shape}")
    if u.size == 0:
        raise ValueError("no systems to bin")
    if not (np.isfinite(u).all() and np.isfinite(r).all()):
        raise ValueError("uq and rmsd must be finite")
    check_int(n_bins, "n_bins")
    if strategy == "quantile":
        edges = np.unique(np.quantile(u, np.linspace(0.0, 1.0, int(n_bins) + 1)))
    elif strategy == "uniform":
        edges = np.linspace(u.min(), u.max(), int(n_bins) + 1)
    else:
        raise ValueError(f"strategy must be 'quantile' or 'uniform'; got {strategy!r}")
    if edges.size == 1:
        edges = np.array([edges[0], edges[0]])
    idx = np.clip(np.searchsorted(edges, u, side="right") - 1, 0, edges.size - 2)
    centers, mean, sem, counts = [], [], [], []
    for b in range(edges.size - 1):
        sel = idx == b
        n = int(sel.sum())
        if n == 0:
            continue
        centers.append(u[sel].mean())
        mean.append(r[sel].mean())
        sem.append(r[sel].std(ddof=1) / np.sqrt(n) if n > 1 else np.nan)
        counts.append(n)
    return {
        "edges": edges,
        "centers": np.array(centers),
        "mean": np.array(mean),
        "sem": np.array(sem),
        "counts": np.array(counts, dtype=np.int64),
    }


_RECORD_KEYS = ("name", "group", "rmsd", "d_mean") + tuple(f"uq_{s}" for s in UQ_STATISTICS)


def _records_to_columns(table: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    if len(table) == 0:
        raise ValueError("the table holds no systems")
    for i, rec in enumerate(table):
        absent = [k for k in _RECORD_KEYS if k not in rec]
        if absent:
            raise ValueError(f"record {i} ({rec.get('name', '?')!r}) lacks key(s) {absent}; expected {list(_RECORD_KEYS)}")
    cols: dict[str, np.ndarray] = {
        "name": np.array([str(r["name"]) for r in table], dtype=object),
        "group": np.array([str(r["group"]) for r in table], dtype=object),
    }
    for key in _RECORD_KEYS[2:]:
        values = np.array([r[key] for r in table], dtype=np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            names = ", ".join(cols["name"][bad][:5])
            raise ValueError(f"{int(bad.sum())} system(s) have a non-finite {key!r}: {names}; remove or fix them")
        cols[key] = values
    return cols


def uq_rmsd_analysis(
    table: Sequence[Mapping[str, Any]],
    groups: Sequence[str] | None = None,
    threshold: float = 0.5,
    n_bins: int = 5,
    strategy: str = "quantile",
) -> dict[str, Any]:
    """Relate per-system UQ statistics to relaxation RMSD (paper Fig. 4), per group.

    Args:
        table: one record per system: dicts with ``name``, ``group`` (e.g. "in-domain" /
            "out-of-domain"), ``uq_initial``, ``uq_final``, ``uq_max``, ``uq_mean``, ``rmsd`` (Å)
            and ``d_mean`` (Å).
        groups: groups to report, in order; None = every group in order of first appearance. The
            pooled group ``"all"`` is always added (unless a group is already named so).
        threshold: RMSD (Å) above which a system counts as failed for AUROC.
        n_bins, strategy: binning of :func:`bin_rmsd_by_uq`.
    Returns:
        JSON-serialisable dict: ``threshold``; ``groups[g]`` with ``n_systems``, ``adwt``,
        ``mean_rmsd``, ``fraction_above`` and for each statistic ``stats[s] = {"spearman",
        "auroc", "n_above"}`` (AUROC NaN when all or none of the group are above the threshold;
        Spearman NaN when an input is constant); ``binned[s][g]`` = :func:`bin_rmsd_by_uq` output
        as lists (the input of :func:`ltau_ase.plots.plot_rmsd_vs_uq`).
    """
    cols = _records_to_columns(table)
    if not np.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"threshold must be a positive RMSD in Å; got {threshold!r}")
    present = list(dict.fromkeys(cols["group"].tolist()))
    if groups is None:
        groups = present
    else:
        unknown = [g for g in groups if g not in present]
        if unknown:
            raise ValueError(f"group(s) {unknown} have no systems; groups present: {present}")
        groups = list(groups)
    selections = {g: cols["group"] == g for g in groups}
    if "all" not in selections:
        selections["all"] = np.ones(cols["name"].size, dtype=bool)

    out: dict[str, Any] = {"threshold": float(threshold), "groups": {}, "binned": {s: {} for s in UQ_STATISTICS}}
    for g, sel in selections.items():
        rmsd = cols["rmsd"][sel]
        above = rmsd > threshold
        n_above = int(above.sum())
        entry: dict[str, Any] = {
            "n_systems": int(sel.sum()),
            "adwt": adwt(cols["d_mean"][sel]),
            "mean_rmsd": float(rmsd.mean()),
            "fraction_above": float(above.mean()),
            "stats": {},
        }
        for s in UQ_STATISTICS:
            uq = cols[f"uq_{s}"][sel]
            entry["stats"][s] = {
                "spearman": spearman(uq, rmsd) if uq.size >= 2 else float("nan"),
                "auroc": auroc(uq, above) if 0 < n_above < uq.size else float("nan"),
                "n_above": n_above,
            }
            binned = bin_rmsd_by_uq(uq, rmsd, n_bins=n_bins, strategy=strategy)
            out["binned"][s][g] = {k: v.tolist() for k, v in binned.items()}
        out["groups"][g] = entry
    return out


# ---------------------------------------------------------------------------- failure probability
#: Trace features of :class:`FailureModel` (row keys; ``nsteps`` enters as log(1 + nsteps)).
FAILURE_FEATURES = ("uq_initial", "uq_max", "uq_mean", "uq_final", "nsteps")
#: Latent-distance trace features: the structure's distance ratio r (the calculator's
#: ``latent_distance_ratios`` reduced like the UQ) at the initial step, its maximum, mean and final
#: value. Ratios are scale variables (r = 1 typical of training, far structures 10-100×), so they enter
#: as log r; 0 < r < inf is required.
DISTANCE_FEATURES = ("distance_ratio_initial", "distance_ratio_max", "distance_ratio_mean", "distance_ratio_final")
#: The UQ trace and the distance trace together.
FAILURE_FEATURES_WITH_DISTANCE = FAILURE_FEATURES + DISTANCE_FEATURES
#: Statistics of an element-normalised trace (``ltau_ase.simulate.observers.element_normalised_trace``): the
#: initial, largest and final per-step max over the free atoms of the per-atom value divided by its element's
#: in-domain scale (dimensionless, > 0; they enter as log, like the distance ratios), and the largest per-step
#: fraction of free atoms above their element's scale (in [0, 1], entered as is).
ELEMENT_NORMALISED_STATISTICS = ("initial", "max", "final", "frac")
#: Element-normalised traces of the calibrated estimator's expected force error and distance ratio (row keys
#: ``<quantity>_elnorm_<statistic>``). Any row key ending in ``_elnorm_<statistic>`` is read this way, e.g. a
#: committee's ``uq_elnorm_max``.
ELEMENT_NORMALISED_FEATURES = tuple(f"{q}_elnorm_{s}" for q in ("expected_error", "distance_ratio")
                                    for s in ELEMENT_NORMALISED_STATISTICS)
#: The UQ and distance traces plus the element-normalised traces: the features the shift benchmark's
#: pre-registered rule chose on calibration relaxations (fail5, 2026-11-27; README, IS2RS failure).
FAILURE_FEATURES_WITH_ELEMENT_NORMALISED = FAILURE_FEATURES_WITH_DISTANCE + ELEMENT_NORMALISED_FEATURES
# Fitting a probability needs failures and successes to learn from: fewer than this many of either
# class cannot separate a trend from chance.
MIN_FAILURE_CLASS = 5
#: Feature maps of :class:`FailureModel` (applied after log r / log(1 + nsteps), before standardising):
#: ``"log"`` none (linear in the logs: extrapolates without bound beyond the fit rows); ``"clip"`` each
#: feature clipped to the fit rows' [min, max]; ``"rank"`` each feature through the fit rows' empirical
#: CDF (mid-ranks, 0 below the smallest fit value, 1 above the largest). ``"clip"`` and ``"rank"``
#: bound every feature by what the calibration relaxations showed, so a relaxation far outside them
#: gets at most the probability of the most extreme calibration corner, not p -> 1.
FAILURE_TRANSFORMS = ("log", "clip", "rank")
#: L2 penalties tried when ``l2="auto"`` (on standardised coefficients; n = 100 rows: weak to strong).
FAILURE_L2_GRID = (0.1, 1.0, 10.0)
#: Tail slopes tried when ``tail="auto"``: beyond the fit rows' range a bounded map continues with
#: ``tail`` × its slope at the edge (clip: the identity's; rank: the empirical CDF's mean slope over the
#: outer 10 % of the fit rows), so 0 saturates (ties every row beyond the range) and 1 keeps extrapolating;
#: between, rows beyond the range keep their order with a damped effect on p.
FAILURE_TAIL_GRID = (0.0, 0.3, 1.0)
# the share of fit rows over which the rank map's edge slope is measured
_EDGE_SHARE = 0.1
# Cross-validation of FailureModel(transform="auto" / l2="auto"): repeated stratified K-fold for
# relaxations like the fit rows, and extrapolation folds (for each feature, the rows with its top
# EXTRAPOLATION_SHARE of values held out) for relaxations beyond them -- the case under shift.
CV_FOLDS, CV_REPEATS, EXTRAPOLATION_SHARE = 5, 2, 0.2


def _is_elnorm_scale(key: str) -> bool:
    """True for an element-normalised trace statistic that is a scale variable (enters as its log)."""
    return any(key.endswith(f"_elnorm_{s}") for s in ELEMENT_NORMALISED_STATISTICS if s != "frac")


def _fit_logistic(design: np.ndarray, y: np.ndarray, l2: float, monotone: bool = False) -> np.ndarray:
    """L2-penalised (not the intercept, column 0) maximum-likelihood logistic coefficients.

    ``monotone``: every coefficient but the intercept is constrained to >= 0 (box bounds of L-BFGS-B),
    so the probability cannot decrease in any (non-decreasingly mapped) feature.
    """
    from scipy.optimize import minimize

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = design @ w
        # log(1 + e^z) - y z, stable for large |z|
        nll = np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * np.sum(w[1:] ** 2)
        p = 0.5 * (1.0 + np.tanh(0.5 * z))
        grad = design.T @ (p - y)
        grad[1:] += l2 * w[1:]
        return float(nll), grad

    bounds = [(None, None)] + [(0.0, None) if monotone else (None, None)] * (design.shape[1] - 1)
    res = minimize(loss, np.zeros(design.shape[1]), jac=True, method="L-BFGS-B", bounds=bounds)
    if not res.success:
        raise RuntimeError(f"the failure-model fit did not converge: {res.message}")
    return np.asarray(res.x, dtype=np.float64)


def _log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-12, 1.0 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def _empirical_cdf(sorted_ref: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Mid-rank empirical CDF of ascending ``sorted_ref`` (n,) at ``x``: (#below + #equal / 2) / n."""
    below = np.searchsorted(sorted_ref, x, side="left")
    upto = np.searchsorted(sorted_ref, x, side="right")
    return (below + 0.5 * (upto - below)) / sorted_ref.size


class _FeatureMap:
    """One transform (``FAILURE_TRANSFORMS``) with tail slope ``tail``, fitted on rows x (n, k), then standardised."""

    def __init__(self, transform: str, x: np.ndarray, tail: float = 0.0) -> None:
        self.transform, self.tail = transform, float(tail)
        self.low, self.high = x.min(axis=0), x.max(axis=0)
        self.ref = np.sort(x, axis=0)
        t = self.apply_raw(x)
        self.mean = t.mean(axis=0)
        std = t.std(axis=0)
        self.std = np.where(std > 0, std, 1.0)

    def edge_slopes(self) -> tuple[np.ndarray, np.ndarray]:
        """(k,) slopes of the map at the lower and upper edge of the fit range (before ``tail``)."""
        if self.transform == "clip":
            return np.ones(self.low.shape), np.ones(self.high.shape)
        # the empirical CDF rises by _EDGE_SHARE over its outer _EDGE_SHARE of fit rows on each side
        q_lo, q_hi = np.quantile(self.ref, [_EDGE_SHARE, 1.0 - _EDGE_SHARE], axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            lo = np.where(q_lo > self.low, _EDGE_SHARE / (q_lo - self.low), 0.0)
            hi = np.where(self.high > q_hi, _EDGE_SHARE / (self.high - q_hi), 0.0)
        return lo, hi

    def apply_raw(self, x: np.ndarray) -> np.ndarray:
        if self.transform == "log":
            return x
        if self.transform == "clip":
            t = np.clip(x, self.low, self.high)
        else:
            t = np.column_stack([_empirical_cdf(self.ref[:, j], x[:, j]) for j in range(x.shape[1])])
        if self.tail > 0:
            lo, hi = self.edge_slopes()
            t = t + self.tail * (hi * np.maximum(x - self.high, 0.0) - lo * np.maximum(self.low - x, 0.0))
        return t

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (self.apply_raw(x) - self.mean) / self.std


def _candidate_name(transform: str, tail: float, l2: float) -> str:
    return f"{transform}/l2={l2:g}" if transform == "log" else f"{transform}/tail={tail:g}/l2={l2:g}"


def _design(xs: np.ndarray) -> np.ndarray:
    return np.hstack([np.ones((xs.shape[0], 1)), xs])


def _cv_folds(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Held-out index sets: stratified K-fold (CV_REPEATS times) and per-feature top-share extrapolation."""
    rng = np.random.default_rng(seed)
    shuffled: list[np.ndarray] = []
    for _ in range(CV_REPEATS):
        folds: list[list[int]] = [[] for _ in range(CV_FOLDS)]
        for cls in (0.0, 1.0):
            idx = rng.permutation(np.flatnonzero(y == cls))
            for f in range(CV_FOLDS):
                folds[f].extend(idx[f::CV_FOLDS].tolist())
        shuffled.extend(np.sort(np.array(f, dtype=np.int64)) for f in folds if f)
    n_out = max(1, int(round(EXTRAPOLATION_SHARE * y.size)))
    extrapolation: list[np.ndarray] = []
    for j in range(x.shape[1]):
        if np.ptp(x[:, j]) == 0:
            continue
        top = np.argsort(x[:, j], kind="stable")[-n_out:]
        rest = np.setdiff1d(np.arange(y.size), top)
        if 0 < y[rest].sum() < rest.size:  # the remaining rows must hold both classes to fit on
            extrapolation.append(np.sort(top))
    return shuffled, extrapolation


class FailureModel:
    """Calibrated probability that a relaxation's final RMSD exceeds a threshold, from its UQ trace.

    A logistic regression (L2-penalised, fitted by maximum likelihood with ``scipy.optimize``) on the
    per-relaxation features ``features`` (default :data:`FAILURE_FEATURES`: initial, max, mean and
    final structure UQ of ``RelaxationUQObserver`` and log(1 + steps);
    :data:`FAILURE_FEATURES_WITH_DISTANCE` adds the latent-distance trace, initial / max / mean /
    final distance ratio, as log r; :data:`FAILURE_FEATURES_WITH_ELEMENT_NORMALISED` adds the
    element-normalised traces of the expected error and distance ratio, scale statistics as their log,
    fractions as is), each mapped by ``transform`` (:data:`FAILURE_TRANSFORMS`) and standardised.
    Maximum-likelihood logistic fits are calibrated on their training distribution (the
    mean predicted probability equals the observed failure rate); fit it on calibration relaxations
    with reference structures, apply it to new ones.

    Under shift, new relaxations can lie far outside the calibration relaxations (distance ratios
    10x beyond them): a model linear in the features then extrapolates to p -> 1 for all of them. The
    bounded maps ``"clip"`` / ``"rank"`` cap each feature at what calibration showed, or, with a
    ``tail`` slope > 0, let it grow beyond that range at a damped rate (rows beyond the range keep
    their order). With ``"auto"`` the map, the tail (:data:`FAILURE_TAIL_GRID`) and the penalty
    (:data:`FAILURE_L2_GRID`) are chosen by cross-validated log-loss on the fit rows alone: the mean
    of repeated stratified K-fold and of extrapolation folds (each feature's top 20 % of rows held
    out and predicted by a model fitted on the rest), so the choice weighs how a model behaves beyond
    its fitted range. The scores of every candidate are kept in ``cv_``.

    ``monotone=True`` (the default) constrains every feature coefficient to >= 0: the probability
    never decreases when an uncertainty, a distance ratio or the step count grows, and ``tail="auto"``
    then tries only tails > 0, so rows beyond the calibration range keep their order instead of
    tying. An unconstrained fit can use contrasts between correlated trace features (e.g. initial
    minus mean distance) that rank well inside the calibration range and reverse beyond it: on the
    shift benchmark (issue 11) the unconstrained choice ranked unseen-adsorbate relaxations at AUROC
    0.43, the monotone one at 0.66.

    Args:
        rmsd_threshold: RMSD (Å) above which a relaxation counts as failed (0.5, OC20's ADwT ceiling).
        l2: penalty on the standardised coefficients (not on the intercept), a number >= 0 or ``"auto"``.
        features: row keys used as features.
        transform: one of :data:`FAILURE_TRANSFORMS` or ``"auto"``.
        tail: slope factor >= 0 of ``"clip"``/``"rank"`` beyond the fit range, or ``"auto"``.
        monotone: non-negative feature coefficients (and, with ``tail="auto"``, no saturating tail 0).
        seed: seed of the cross-validation folds.

    Attributes (after :meth:`fit`): ``transform_``, ``tail_``, ``l2_`` (the chosen ones), ``mean_``, ``std_``
    (k,) standardisation, ``low_``/``high_`` (k,) fit-row range (``"clip"``), ``reference_`` (n, k)
    sorted fit-row features (``"rank"``), ``coef_`` (k + 1,), ``n_fit_``, ``n_failed_fit_``, ``cv_``.
    """

    def __init__(self, rmsd_threshold: float = 0.5, l2: float | str = "auto",
                 features: Sequence[str] = FAILURE_FEATURES, transform: str = "auto", tail: float | str = "auto",
                 monotone: bool = True, seed: int = 0) -> None:
        if not (isinstance(rmsd_threshold, (int, float)) and np.isfinite(rmsd_threshold) and rmsd_threshold > 0):
            raise ValueError(f"rmsd_threshold must be a positive RMSD in Å; got {rmsd_threshold!r}")
        if not (l2 == "auto" or (isinstance(l2, (int, float)) and not isinstance(l2, bool) and np.isfinite(l2)
                                 and l2 >= 0)):
            raise ValueError(f"l2 must be a finite number >= 0 or 'auto'; got {l2!r}")
        if not features or isinstance(features, str) or not all(isinstance(f, str) for f in features):
            raise ValueError(f"features must be a non-empty sequence of row keys; got {features!r}")
        if len(set(features)) != len(features):
            raise ValueError(f"features must be distinct (a repeated one would enter the fit twice); got {features!r}")
        if transform not in FAILURE_TRANSFORMS + ("auto",):
            raise ValueError(f"transform must be one of {FAILURE_TRANSFORMS + ('auto',)}; got {transform!r}")
        if not (tail == "auto" or (isinstance(tail, (int, float)) and not isinstance(tail, bool) and np.isfinite(tail)
                                   and tail >= 0)):
            raise ValueError(f"tail must be a finite number >= 0 or 'auto'; got {tail!r}")
        if not isinstance(monotone, (bool, np.bool_)):
            raise ValueError(f"monotone must be True or False; got {monotone!r}")
        self.rmsd_threshold = float(rmsd_threshold)
        self.l2 = l2 if l2 == "auto" else float(l2)
        self.tail = tail if tail == "auto" else float(tail)
        self.features = tuple(features)
        self.transform = transform
        self.monotone = bool(monotone)
        self.seed = int(seed)

    def _matrix(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        if len(rows) == 0:
            raise ValueError("no relaxation rows given")
        x = np.empty((len(rows), len(self.features)), dtype=np.float64)
        for i, row in enumerate(rows):
            for j, key in enumerate(self.features):
                if key not in row:
                    raise ValueError(f"row {i} ({row.get('name', '?')!r}) lacks feature {key!r}; expected {self.features}")
                x[i, j] = float(row[key])
        if not np.all(np.isfinite(x)):
            raise ValueError("the failure-model features must be finite")
        if "nsteps" in self.features:
            j = self.features.index("nsteps")
            if np.any(x[:, j] < 0):
                raise ValueError("nsteps must be >= 0")
            x[:, j] = np.log1p(x[:, j])
        for j, key in enumerate(self.features):
            if key in DISTANCE_FEATURES or _is_elnorm_scale(key):
                if np.any(x[:, j] <= 0):
                    what = "a distance ratio" if key in DISTANCE_FEATURES else "an element-normalised value"
                    raise ValueError(f"{key} must be {what} > 0; got {x[:, j].min():g}")
                x[:, j] = np.log(x[:, j])
            elif key.endswith("_elnorm_frac") and np.any((x[:, j] < 0) | (x[:, j] > 1)):
                raise ValueError(f"{key} must be a fraction of atoms in [0, 1]; got values in "
                                 f"[{x[:, j].min():g}, {x[:, j].max():g}]")
        return x

    def _labels(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """(n,) 1.0 where a row's ``rmsd`` (Å) exceeds the threshold; both classes must be large enough."""
        rmsd = np.array([float(r["rmsd"]) if "rmsd" in r else np.nan for r in rows])
        if not np.all(np.isfinite(rmsd)):
            raise ValueError("every row needs a finite 'rmsd' (Å) to fit the failure model")
        y = (rmsd > self.rmsd_threshold).astype(np.float64)
        n_fail, n_ok = int(y.sum()), int(y.size - y.sum())
        if min(n_fail, n_ok) < MIN_FAILURE_CLASS:
            raise ValueError(f"the failure model needs at least {MIN_FAILURE_CLASS} relaxations with RMSD above and "
                             f"{MIN_FAILURE_CLASS} below {self.rmsd_threshold:g} Å; got {n_fail} above, {n_ok} below")
        return y

    def fit(self, rows: Sequence[Mapping[str, Any]]) -> "FailureModel":
        """Fit on relaxation rows with the features and ``rmsd`` (Å); returns self."""
        x = self._matrix(rows)
        y = self._labels(rows)
        n_fail = int(y.sum())
        self.cv_: dict[str, Any] = {}
        candidates = self._candidates()
        if len(candidates) > 1:
            shuffled, extrapolation = _cv_folds(x, y, self.seed)
            best = None
            for transform, tail, l2 in candidates:
                scores = {}
                for name, folds in (("kfold", shuffled), ("extrapolation", extrapolation)):
                    losses = []
                    for held in folds:
                        keep = np.setdiff1d(np.arange(y.size), held)
                        fmap = _FeatureMap(transform, x[keep], tail)
                        w = _fit_logistic(_design(fmap(x[keep])), y[keep], l2, self.monotone)
                        z = _design(fmap(x[held])) @ w
                        losses.append(_log_loss(0.5 * (1.0 + np.tanh(0.5 * z)), y[held]))
                    scores[name] = float(np.mean(losses)) if losses else float("nan")
                finite = [v for v in scores.values() if np.isfinite(v)]
                scores["score"] = float(np.mean(finite))
                self.cv_[_candidate_name(transform, tail, l2)] = scores
                # strict improvement only: ties keep the earlier candidate
                if best is None or scores["score"] < best[0]:
                    best = (scores["score"], transform, tail, l2)
            assert best is not None
            _, self.transform_, self.tail_, self.l2_ = best
        else:
            self.transform_, self.tail_, self.l2_ = candidates[0]
        fmap = _FeatureMap(self.transform_, x, self.tail_)
        self._set_map(fmap)
        self.coef_ = _fit_logistic(_design(fmap(x)), y, self.l2_, self.monotone)
        self.n_fit_, self.n_failed_fit_ = int(y.size), n_fail
        return self

    def _candidates(self) -> list[tuple[str, float, float]]:
        """(transform, tail, l2) tried by :meth:`fit`: the given ones, or their grids where ``"auto"``.

        ``"log"`` has no range (its tail is 1 by definition); a fixed ``transform="clip"``/``"rank"``
        with ``tail="auto"`` tries :data:`FAILURE_TAIL_GRID`, without tail 0 when ``monotone`` (a
        saturating map ties every row beyond the calibration range, which a monotone model must keep
        in order).
        """
        transforms = FAILURE_TRANSFORMS if self.transform == "auto" else (self.transform,)
        penalties = FAILURE_L2_GRID if self.l2 == "auto" else (float(self.l2),)
        if self.tail == "auto":
            tails = tuple(t for t in FAILURE_TAIL_GRID if t > 0) if self.monotone else FAILURE_TAIL_GRID
        else:
            tails = (float(self.tail),)
        out = []
        for transform in transforms:
            for tail in ((1.0,) if transform == "log" else tails):
                # clip with tail 1 is the log map
                if transform == "clip" and tail == 1.0 and "log" in transforms:
                    continue
                out.extend((transform, tail, l2) for l2 in penalties)
        return out

    def _set_map(self, fmap: _FeatureMap) -> None:
        self.mean_, self.std_ = fmap.mean, fmap.std
        self.low_, self.high_, self.reference_ = fmap.low, fmap.high, fmap.ref

    def _map(self) -> _FeatureMap:
        fmap = _FeatureMap.__new__(_FeatureMap)
        fmap.transform, fmap.tail, fmap.mean, fmap.std = self.transform_, self.tail_, self.mean_, self.std_
        fmap.low, fmap.high, fmap.ref = self.low_, self.high_, self.reference_
        return fmap

    def predict_proba(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """(n,) probability that each relaxation's RMSD exceeds ``rmsd_threshold``."""
        if not hasattr(self, "coef_"):
            raise ValueError("this FailureModel is not fitted; call fit(rows) or FailureModel.from_dict(...)")
        z = _design(self._map()(self._matrix(rows))) @ self.coef_
        return 0.5 * (1.0 + np.tanh(0.5 * z))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state (written by ``ltau report --fit-failure-model``)."""
        if not hasattr(self, "coef_"):
            raise ValueError("this FailureModel is not fitted")
        state = {"kind": "ltau-failure-model", "rmsd_threshold": self.rmsd_threshold, "l2": self.l2_,
                 "transform": self.transform_, "tail": self.tail_, "monotone": self.monotone,
                 "features": list(self.features),
                 "mean": self.mean_.tolist(),
                 "std": self.std_.tolist(), "coef": self.coef_.tolist(), "n_fit": self.n_fit_,
                 "n_failed_fit": self.n_failed_fit_, "cv": self.cv_}
        if self.reference_ is not None:
            state.update(low=self.low_.tolist(), high=self.high_.tolist(), reference=self.reference_.tolist())
        return state

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> "FailureModel":
        """Rebuild from :meth:`to_dict`; raises ValueError for anything malformed."""
        if not isinstance(state, Mapping):
            raise ValueError(f"a failure model is a JSON object; got {type(state).__name__}")
        try:
            if state.get("kind") != "ltau-failure-model":
                raise ValueError("not an ltau failure model (kind != 'ltau-failure-model')")
            # files written before the transform existed are linear in the (log) features
            transform = state.get("transform", "log")
            if transform not in FAILURE_TRANSFORMS:
                raise ValueError(f"unknown transform {transform!r}; expected one of {FAILURE_TRANSFORMS}")
            tail = float(state.get("tail", 1.0 if transform == "log" else 0.0))
            if not (np.isfinite(tail) and tail >= 0):
                raise ValueError(f"tail must be a finite number >= 0; got {tail!r}")
            # files written before the constraint existed are unconstrained fits
            monotone = state.get("monotone", False)
            if not isinstance(monotone, bool):
                raise ValueError(f"monotone must be true or false; got {monotone!r}")
            features = state["features"]
            if not isinstance(features, list):  # a JSON string or object would be read as its characters / keys
                raise ValueError(f"features must be a list of row keys; got {features!r}")
            model = cls(float(state["rmsd_threshold"]), float(state["l2"]), tuple(features), transform,
                        tail=tail, monotone=monotone)
            k = len(model.features)
            mean = np.asarray(state["mean"], dtype=np.float64)
            std = np.asarray(state["std"], dtype=np.float64)
            coef = np.asarray(state["coef"], dtype=np.float64)
            if mean.shape != (k,) or std.shape != (k,) or coef.shape != (k + 1,):
                raise ValueError(f"expected {k} means/stds and {k + 1} coefficients")
            if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(coef)) and np.all(np.isfinite(std))
                    and np.all(std > 0)):
                raise ValueError("non-finite coefficients or scales, or non-positive scales")
            if monotone and np.any(coef[1:] < 0):
                raise ValueError("a monotone failure model has non-negative feature coefficients")
            low = high = reference = None
            if transform != "log" or "low" in state:
                low = np.asarray(state["low"], dtype=np.float64)
                high = np.asarray(state["high"], dtype=np.float64)
                reference = np.asarray(state["reference"], dtype=np.float64)
                if (low.shape != (k,) or high.shape != (k,) or reference.ndim != 2 or reference.shape[1] != k
                        or reference.shape[0] < 1 or not np.all(np.isfinite(reference))
                        or not np.all(np.diff(reference, axis=0) >= 0)
                        or not np.array_equal(low, reference[0]) or not np.array_equal(high, reference[-1])):
                    raise ValueError(f"expected {k} lows/highs equal to the first/last rows of an ascending "
                                     f"(n, {k}) reference")
            model.transform_, model.tail_, model.l2_ = transform, tail, float(state["l2"])
            model.mean_, model.std_, model.coef_ = mean, std, coef
            model.low_, model.high_, model.reference_ = low, high, reference
            model.n_fit_ = check_int(state["n_fit"], "n_fit", minimum=1)
            model.n_failed_fit_ = check_int(state["n_failed_fit"], "n_failed_fit", minimum=0)
            if model.n_failed_fit_ > model.n_fit_:
                raise ValueError(f"n_failed_fit ({model.n_failed_fit_}) exceeds n_fit ({model.n_fit_})")
            model.cv_ = dict(state.get("cv", {}))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed failure model: missing or wrong field ({exc!r})") from None
        return model


def select_failure_features(rows: Sequence[Mapping[str, Any]], feature_sets: Sequence[Sequence[str]],
                            **params: Any) -> tuple[FailureModel, dict[str, dict[str, float]]]:
    """Choose among candidate feature sets by nested cross-validation on the fit rows alone.

    Each :class:`FailureModel` CV uses folds of its own features (one extrapolation fold per feature),
    so its ``cv_`` scores cannot compare feature sets. Here every set is scored on the SAME outer folds:
    those of :func:`_cv_folds` on the union of the sets' features (in order of first appearance), i.e.
    stratified K-fold and, per feature, its top :data:`EXTRAPOLATION_SHARE` held out. On each outer fold
    a ``FailureModel(features=set, **params)`` is fitted on the kept rows (running its own ``"auto"``
    choices there) and scored by log-loss on the held-out rows; a set's score is the mean of its K-fold
    and extrapolation means, as in ``FailureModel.fit``. The set with the lowest score (ties: the
    earlier) is refitted on all rows.

    Args:
        rows: calibration relaxation rows (features and ``rmsd`` in Å).
        feature_sets: candidate feature sets (each a non-empty sequence of row keys).
        **params: further ``FailureModel`` arguments (``rmsd_threshold``, ``monotone``, ``seed``, ...).
    Returns:
        (the fitted model of the chosen set, ``{",".join(set): {"kfold", "extrapolation", "score"}}``).
    """
    if isinstance(feature_sets, str) or len(feature_sets) == 0:
        raise ValueError(f"feature_sets must be a non-empty sequence of feature sets; got {feature_sets!r}")
    sets = [tuple(f) for f in feature_sets]
    if "features" in params:
        raise ValueError("give the features as feature_sets, not as a FailureModel argument")
    union = tuple(dict.fromkeys(f for fs in sets for f in fs))
    probe = FailureModel(features=union, **params)
    x = probe._matrix(rows)
    y = probe._labels(rows)
    shuffled, extrapolation = _cv_folds(x, y, probe.seed)
    scores: dict[str, dict[str, float]] = {}
    best = None
    for fs in sets:
        entry = {}
        for name, folds in (("kfold", shuffled), ("extrapolation", extrapolation)):
            losses = []
            for held in folds:
                keep = np.setdiff1d(np.arange(y.size), held)
                model = FailureModel(features=fs, **params).fit([rows[i] for i in keep])
                losses.append(_log_loss(model.predict_proba([rows[i] for i in held]), y[held]))
            entry[name] = float(np.mean(losses)) if losses else float("nan")
        entry["score"] = float(np.mean([v for v in entry.values() if np.isfinite(v)]))
        scores[",".join(fs)] = entry
        if best is None or entry["score"] < best[0]:
            best = (entry["score"], fs)
    assert best is not None
    return FailureModel(features=best[1], **params).fit(rows), scores
