"""Observers for ASE optimizers and MD drivers that read per-atom uncertainties.

Both work with any calculator that lists the chosen per-atom key (``uncertainties``,
``expected_force_errors``, ``latent_distances``, ...) in its ``implemented_properties`` and returns an
(N,) array for it, so they read the values computed with the step's energy and forces (no extra
computation: optimizers and MD drivers have already evaluated the structure when observers run).

- :class:`RelaxationUQObserver` records a per-step structure value (the reduced per-atom UQ) during a
  relaxation, including the initial structure, and summarises it (paper Fig. 4: initial, max, mean,
  final).
- :class:`UncertaintyStop` stops MD or an optimizer cleanly when the value stays above a threshold;
  :func:`stop_threshold` / :meth:`UncertaintyStop.from_false_alarm_rate` choose that threshold from
  in-domain runs for a stated false-alarm rate; :func:`element_scales` (``element_scales=`` of the
  stop, :meth:`UncertaintyStop.from_reference_runs`) puts every element's atoms on its own in-domain scale
  first, so a light adsorbate atom is not judged by the metal atoms' range.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import all_properties, compare_atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from ltau_ase.core.checks import check_int, check_number, is_finite_number
from ltau_ase.core.paths import check_writable_file
from ltau_ase.simulate.calculator import PER_ATOM_UQ, PER_STRUCTURE_UQ, store_uq_in_atoms

Select = str | Sequence[int] | np.ndarray
Reduce = str | float

#: Per-atom calculator results an :class:`UncertaintyStop` can watch (its ``key``), with their units.
#: Reduced over the selected atoms (default: the maximum atom), each gives one value per step.
STOP_STATISTICS = {
    "uncertainties": "1 − P(|ΔF| ≤ T), a probability in [0, 1] (no unit). It saturates: once the worst atom's "
                     "neighbours all have errors above T it is 1 however far the atom is, so a max-atom stop on it "
                     "cannot tell a little out of domain from a breakdown.",
    "expected_force_errors": "expected |ΔF| of the atom, eV/Å: s × the neighbours' mean logged error; with a "
                             "calibrated estimator s is the distance-aware s_j = c_Z · g(r_j), so it grows without "
                             "bound with the distance. The recommended stop statistic.",
    "latent_distance_ratios": "r_j, the latent distance over the training set's median leave-one-out neighbour "
                              "distance (dimensionless; 1 = a typical training neighbourhood; +inf for a flagged "
                              "unseen element). Needs a calibrated estimator.",
    "latent_distances": "mean latent distance to the k nearest training atoms, in the model's latent units "
                        "(no physical unit; comparable only within one model).",
}


# ---------------------------------------------------------------------------- helpers
def resolve_selection(atoms: Atoms, select: Select) -> np.ndarray:
    """Boolean (N,) mask of the atoms a structure value is reduced over.

    ``select``: ``"free"`` (atoms not fixed by ``FixAtoms``), ``"all"``, a list/tuple of tags
    (OC20: 0 bulk, 1 surface, 2 adsorbate), or a numpy array of atom indices (or a boolean mask).
    """
    n = len(atoms)
    if isinstance(select, str):
        if select == "all":
            mask = np.ones(n, dtype=bool)
        elif select == "free":
            mask = np.ones(n, dtype=bool)
            for c in atoms.constraints:
                if isinstance(c, FixAtoms):
                    mask[c.get_indices()] = False
        else:
            raise ValueError(f"select must be 'free', 'all', a list of tags or an index array, got {select!r}")
    elif isinstance(select, np.ndarray):
        if select.dtype == bool:
            if select.shape != (n,):
                raise ValueError(f"boolean select mask has shape {select.shape}, expected ({n},)")
            mask = select.copy()
        elif np.issubdtype(select.dtype, np.integer) and select.ndim == 1:
            if select.size and (select.min() < -n or select.max() >= n):
                raise ValueError(f"select indices must lie in [-{n}, {n}) for {n} atoms, "
                                 f"got range [{select.min()}, {select.max()}]")
            mask = np.zeros(n, dtype=bool)
            mask[select] = True
        else:
            raise ValueError(f"select array must be 1-D integer indices or a boolean mask, got dtype "
                             f"{select.dtype} and shape {select.shape}")
    elif isinstance(select, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in select):
        mask = np.isin(atoms.get_tags(), np.asarray(select, dtype=int))
    else:
        raise ValueError(f"select must be 'free', 'all', a list of tags or an index array, got {select!r}")
    if not mask.any():
        raise ValueError(f"select={select!r} selects no atom of this {n}-atom structure "
                         f"(tags present: {sorted(set(atoms.get_tags().tolist()))})")
    return mask


def check_reduce(atom_reduce: Reduce) -> Reduce:
    if isinstance(atom_reduce, str):
        if atom_reduce not in ("mean", "max"):
            raise ValueError(f"atom_reduce must be 'mean', 'max' or a quantile in [0, 1], got {atom_reduce!r}")
    elif isinstance(atom_reduce, (float, int)) and not isinstance(atom_reduce, bool):
        if not 0.0 <= float(atom_reduce) <= 1.0:
            raise ValueError(f"atom_reduce quantile must lie in [0, 1], got {atom_reduce}")
    else:
        raise ValueError(f"atom_reduce must be 'mean', 'max' or a quantile in [0, 1], got {atom_reduce!r}")
    return atom_reduce


def reduce_values(values: np.ndarray, atom_reduce: Reduce) -> float:
    """Reduce selected per-atom values to one structure value (NaN propagates; nothing is dropped)."""
    if atom_reduce == "mean":
        return float(np.mean(values))
    if atom_reduce == "max":
        return float(np.max(values))
    return float(np.quantile(values, float(atom_reduce)))


def _real_atoms(atoms_or_filter: Any) -> Atoms:
    # optimizers may run on a Filter (e.g. FrechetCellFilter), which wraps the Atoms as .atoms
    return atoms_or_filter if isinstance(atoms_or_filter, Atoms) else atoms_or_filter.atoms


def check_key(atoms: Atoms, key: str) -> None:
    if atoms.calc is None:
        raise ValueError("atoms has no calculator: attach one (e.g. an LTAUCalculator) before the observer")
    implemented = list(getattr(atoms.calc, "implemented_properties", []))
    if key not in implemented:
        per_atom = [p for p in implemented if p not in all_properties and p not in PER_STRUCTURE_UQ]
        raise ValueError(f"the calculator ({type(atoms.calc).__name__}) does not provide {key!r}; per-atom "
                         f"UQ keys it provides: {per_atom} (LTAUCalculator gives {list(PER_ATOM_UQ)})")


def per_atom_values(atoms: Atoms, key: str) -> np.ndarray:
    values = np.asarray(atoms.calc.get_property(key, atoms), dtype=np.float64)
    if values.shape != (len(atoms),):
        raise ValueError(f"calculator result {key!r} has shape {values.shape}, expected per-atom ({len(atoms)},)")
    return values


# ---------------------------------------------------------------------------- observer
class RelaxationUQObserver:
    """Record the reduced per-atom UQ of every relaxation step, including the initial structure.

    Usage::

        obs = RelaxationUQObserver(atoms, atom_reduce="mean", select="free")
        opt = BFGS(atoms, trajectory="relax.traj"); opt.attach(obs); opt.run(fmax=0.05)
        obs.summary()  # {"initial", "max", "mean", "final", "nsteps"}

    The initial value is captured when the observer is created (``atoms`` must carry its calculator
    then; the optimizer's first evaluation of the same structure is then a cache hit). ASE calls
    observers at step 0 only when no trajectory file is written; that call finds the structure
    unchanged and is not counted twice.

    ``trace`` (nsteps + 1,) holds the per-step values, ``per_atom_last`` the last (N,) values.
    After each step the summary is written to ``atoms.info["ltau_uq_initial" | "_max" | "_mean" |
    "_final" | "_nsteps"]`` (and ``"ltau_uq_key"``), the last per-atom values to
    ``atoms.arrays["ltau_<key>"]``. A second observer of another key (e.g. the distance trace,
    ``key="latent_distance_ratios"``) needs its own ``info_prefix`` (e.g. ``"ltau_distance_ratio_"``)
    so the two summaries do not overwrite each other.
    """

    def __init__(self, atoms: Atoms, atom_reduce: Reduce = "mean", select: Select = "free",
                 key: str = "uncertainties", info_prefix: str = "ltau_uq_") -> None:
        self.atoms = atoms
        self.atom_reduce = check_reduce(atom_reduce)
        self.select = select
        self.key = key
        if not isinstance(info_prefix, str) or not info_prefix:
            raise ValueError(f"info_prefix must be a non-empty string, got {info_prefix!r}")
        self.info_prefix = info_prefix
        check_key(atoms, key)
        self.mask_ = resolve_selection(atoms, select)
        self._values: list[float] = []
        self._initial = atoms.copy()
        self._first_call = True
        self.per_atom_last: np.ndarray | None = None
        self._record()

    def __call__(self) -> None:
        if self._first_call:
            self._first_call = False
            if not compare_atoms(self._initial, self.atoms, tol=0.0):
                return  # ASE's step-0 call: the initial structure is already recorded
        self._record()

    def _record(self) -> None:
        if len(self.atoms) != self.mask_.size:
            raise ValueError(f"the structure now has {len(self.atoms)} atoms, the observer was created for "
                             f"{self.mask_.size}")
        values = per_atom_values(self.atoms, self.key)
        self.per_atom_last = values
        self._values.append(reduce_values(values[self.mask_], self.atom_reduce))
        self.atoms.arrays["ltau_" + self.key] = values.copy()
        self.atoms.info.update({f"{self.info_prefix}{k}": v for k, v in self.summary().items()})
        self.atoms.info[f"{self.info_prefix}key"] = self.key

    @property
    def trace(self) -> np.ndarray:
        """(nsteps + 1,) structure values, initial structure first."""
        return np.array(self._values, dtype=np.float64)

    def summary(self) -> dict[str, float | int]:
        """``initial``, ``max``, ``mean``, ``final`` of the trace, and ``nsteps`` = len(trace) - 1."""
        t = self.trace
        return {"initial": float(t[0]), "max": float(t.max()), "mean": float(t.mean()),
                "final": float(t[-1]), "nsteps": int(t.size - 1)}


# ---------------------------------------------------------------------------- stop
def patience_peak(values: Sequence[float] | np.ndarray, patience: int = 1) -> float:
    """The largest threshold a run's trace would exceed for ``patience`` consecutive steps.

    A stop with threshold t and patience p fires on a trace iff some p consecutive values are all
    > t, i.e. iff t < max over windows of the window minimum; that max-min is returned (-inf for a
    trace shorter than p; NaN values count as +inf, since a NaN UQ always counts as exceeding).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"a trace must be 1-d (steps,); got shape {v.shape}")
    if isinstance(patience, bool) or not isinstance(patience, (int, np.integer)) or patience < 1:
        raise ValueError(f"patience must be an integer >= 1, got {patience!r}")
    v = np.where(np.isnan(v), np.inf, v)
    if v.size < patience:
        return -math.inf
    windows = np.lib.stride_tricks.sliding_window_view(v, int(patience))
    return float(windows.min(axis=1).max())


#: how :func:`stop_threshold` turns reference peaks into a threshold
THRESHOLD_METHODS = ("conformal", "gumbel")


def stop_threshold(traces: Sequence[Sequence[float] | np.ndarray], false_alarm_rate: float,
                   patience: int = 1, method: str = "conformal") -> float:
    """Stop threshold with a stated per-run false-alarm rate, from in-domain reference runs.

    ``traces`` are the per-step structure values (the statistic the stop will watch: same key,
    ``atom_reduce`` and selection) of R in-domain runs as long as the runs to be monitored. Each run's
    :func:`patience_peak` is the lowest threshold that would not stop it. Longer runs than the
    references have more chances to fire. Two methods:

    * ``"conformal"`` (default, distribution-free): the ⌈(R+1)(1−α)⌉-th smallest peak (a conformal
      quantile, :mod:`ltau_ase.core.conformal`), so a new in-domain run exchangeable with the
      references fires with probability ≤ α. Needs α ≥ 1/(R+1): 20 runs cannot state less than 1/21.
    * ``"gumbel"`` (extreme value): the peaks are block maxima; a Gumbel law fitted to them by
      maximum likelihood (:func:`ltau_ase.core.extremes.fit_gumbel`, ≥ 10 runs) gives the threshold
      exceeded with probability α, t = μ − β ln(−ln(1 − α)), for any α, also below 1/(R+1). The rate
      is a model-based estimate, not a guarantee; fitted from 20 runs it overshoots on average (a
      stated 0.01 achieves about 0.017 on Gumbel-like peaks, :mod:`ltau_ase.core.extremes`). The
      Gumbel tail is unbounded: for a statistic bounded above (``"uncertainties"`` ≤ 1) the threshold
      can exceed the bound and the stop never fires; use an unbounded statistic
      (``"expected_force_errors"``, distances).

    Args:
        traces: R per-step traces (each (steps,)).
        false_alarm_rate: α in (0, 1), the tolerated share of in-domain runs that stop.
        patience: the stop's ``patience``.
        method: one of :data:`THRESHOLD_METHODS`.
    Raises:
        ValueError: conformal: fewer than ⌈(1−α)/α⌉ runs (no finite threshold has the guarantee);
            gumbel: fewer than 10 runs, a non-finite peak or all peaks equal; or bad input.
    """
    from ltau_ase.core.conformal import check_coverage, conformal_quantile

    if method not in THRESHOLD_METHODS:
        raise ValueError(f"method must be one of {THRESHOLD_METHODS}, got {method!r}")
    alpha = check_coverage(false_alarm_rate)
    peaks = np.sort([patience_peak(t, patience) for t in traces])
    if peaks.size == 0:
        raise ValueError("stop_threshold needs at least one in-domain reference trace")
    if method == "gumbel":
        from ltau_ase.core.extremes import fit_gumbel, gumbel_quantile

        return gumbel_quantile(*fit_gumbel(peaks), 1.0 - alpha)
    value = conformal_quantile(peaks, 1.0 - alpha)
    if not math.isfinite(value):
        need = int(math.ceil((1.0 - alpha) / alpha - 1e-9))  # rank ⌈(R+1)(1−α)⌉ <= R
        raise ValueError(f"a false-alarm rate of {alpha:g} needs at least {need} in-domain reference runs "
                         f"(got {peaks.size}) with method='conformal'; give more runs, a larger rate, or "
                         "method='gumbel' (extreme-value fit, >= 10 runs)")
    return value


#: default quantile of an element's in-domain per-atom values used as its scale (:func:`element_scales`)
ELEMENT_SCALE_QUANTILE = 0.99


def element_scales(per_atom_traces: Sequence[np.ndarray], numbers: Sequence[np.ndarray],
                   quantile: float = ELEMENT_SCALE_QUANTILE) -> dict[int, float]:
    """Per-element scale of a per-atom statistic: the ``quantile`` of all in-domain values of that element's atoms.

    Why: in-domain, the per-atom statistic (expected error, distance ratio) has a different range per
    element (adsorbate atoms sit far above the metal atoms that dominate training), so a max-atom stop
    on raw values is set by the element with the widest in-domain range and is blind to a shift of the
    others. Divided by its element's scale, every atom is ~1 at its element's typical in-domain tail.

    Args:
        per_atom_traces: R in-domain runs, each (steps, N_r) per-atom values (the stop's ``key``, in its unit).
        numbers: R atomic-number arrays, each (N_r,).
        quantile: in (0, 1]; 0.99 by default (:data:`ELEMENT_SCALE_QUANTILE`).
    Returns:
        ``{Z: scale}`` in the statistic's unit (eV/Å for ``expected_force_errors``), every scale finite > 0;
        runs with 0 steps are skipped, so an element present only in such runs has no scale.
    Raises:
        ValueError: mismatched lengths or shapes, a non-finite reference value, a quantile outside (0, 1],
            or an element whose scale is 0 (the statistic is 0 for all its atoms: nothing to divide by).
    """
    q = float(quantile)
    if not 0.0 < q <= 1.0:
        raise ValueError(f"quantile must lie in (0, 1], got {quantile!r}")
    if len(per_atom_traces) != len(numbers) or not per_atom_traces:
        raise ValueError(f"element_scales needs one atomic-number array per reference run and at least one run; got "
                         f"{len(per_atom_traces)} runs and {len(numbers)} number arrays")
    by_element: dict[int, list[np.ndarray]] = {}
    for r, (values, z) in enumerate(zip(per_atom_traces, numbers)):
        v = np.asarray(values, dtype=np.float64)
        z = np.asarray(z)
        if v.ndim != 2 or z.shape != (v.shape[1],):
            raise ValueError(f"reference run {r}: per-atom values must be (steps, N) with numbers (N,); got "
                             f"{v.shape} and {z.shape}")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"reference run {r} has non-finite per-atom values (an unseen element or a failed "
                             "prediction): an in-domain reference must be finite")
        if v.shape[0] == 0:
            continue  # a run cut before its first step (e.g. at a breakdown at step 0) holds no values
        for element in np.unique(z):
            by_element.setdefault(int(element), []).append(v[:, z == element].ravel())
    if not by_element:
        raise ValueError("the reference runs hold no per-atom values (every run has 0 steps)")
    scales = {}
    for element, chunks in sorted(by_element.items()):
        scale = float(np.quantile(np.concatenate(chunks), q))
        if not scale > 0.0:
            raise ValueError(f"element Z={element}: its in-domain {q:g} quantile is {scale:g}; a scale must be > 0")
        scales[element] = scale
    return scales


def element_normalised(values: np.ndarray, numbers: np.ndarray, scales: Mapping[int, float],
                       default: float | None = None) -> np.ndarray:
    """``values`` (..., N) divided atom by atom by the scale of the atom's element (``numbers`` (N,)).

    ``default``: the scale of an element without one (e.g. the pooled quantile of all reference atoms);
    None (default): such an element is an error.

    Raises:
        ValueError: an element of ``numbers`` has no scale (it was absent from the reference runs) and no
            ``default`` is given; ``numbers`` not integers; a scale or ``default`` that is not a finite
            number > 0 (dividing by it would give infinite, negative or NaN normalised values).
    """
    z = np.asarray(numbers)
    if z.dtype == np.bool_ or not np.issubdtype(z.dtype, np.integer):
        raise ValueError(f"numbers must be integer atomic numbers; got dtype {z.dtype}")
    bad = {k: v for k, v in scales.items() if not (is_finite_number(v) and v > 0)}
    if bad:
        raise ValueError(f"element scales (element_scales) must be finite numbers > 0; got {bad}")
    check_number(default, "default (the scale of an element without one)", minimum=0.0, strict=True, allow_none=True)
    missing = sorted(set(np.unique(z).tolist()) - set(int(k) for k in scales))
    if missing and default is not None:
        scales = dict(scales) | {e: float(default) for e in missing}
    elif missing:
        raise ValueError(f"no in-domain scale for element(s) Z={missing} (scales exist for {sorted(scales)}): the "
                         "reference runs must contain every element of the monitored structure")
    per_atom = np.array([scales[int(e)] for e in z], dtype=np.float64)
    return np.asarray(values, dtype=np.float64) / per_atom


def element_normalised_trace(per_atom_trace: np.ndarray, numbers: np.ndarray, scales: Mapping[int, float],
                             mask: np.ndarray | None = None, default: float | None = None) -> dict[str, float]:
    """Relaxation-trace features of a per-atom statistic divided by its element's in-domain scale.

    Every atom's value at every recorded step is divided by its element's scale (:func:`element_normalised`;
    ~1 at the element's typical in-domain tail), the selected atoms are reduced per step by their max, and
    that per-step trace is summarised. Why: a structure mean mixes the adsorbate atoms, which sit far above
    the metal atoms in domain, with the slab; normalising by element lets a shifted atom of any element
    stand out (the IS2RS failure model's ``*_elnorm_*`` features, :mod:`ltau_ase.is2rs`).

    Args:
        per_atom_trace: (steps, N) per-atom values at the recorded steps, initial structure first (the
            statistic's unit, e.g. eV/Å for expected force errors); steps >= 1.
        numbers: (N,) atomic numbers.
        scales: ``{Z: scale}`` (:func:`element_scales` of in-domain data), same unit as the values.
        mask: (N,) bool, the atoms to reduce over (e.g. the free atoms); None = all.
        default: scale of an element without one (e.g. the pooled in-domain quantile); None: an error.
    Returns:
        ``{"initial", "max", "final"}``: the first, largest and last per-step max of the normalised values
        (dimensionless), and ``"frac"``: the largest per-step fraction of selected atoms above 1 (in [0, 1]).
    Raises:
        ValueError: shapes that do not match, no step, no selected atom, non-finite values, or an element
            without a scale and no ``default``.
    """
    v = np.asarray(per_atom_trace, dtype=np.float64)
    z = np.asarray(numbers)
    if v.ndim != 2 or v.shape[0] == 0 or z.shape != (v.shape[1],):
        raise ValueError(f"per_atom_trace must be (steps >= 1, N) with numbers (N,); got {v.shape} and {z.shape}")
    sel = np.ones(z.shape, dtype=bool) if mask is None else np.asarray(mask)
    if sel.dtype != bool or sel.shape != z.shape:
        raise ValueError(f"mask must be a bool array of shape {z.shape}; got {sel.dtype} {sel.shape}")
    if not sel.any():
        raise ValueError("mask selects no atom: nothing to reduce")
    if not np.all(np.isfinite(v[:, sel])):
        raise ValueError("per-atom values of the selected atoms must be finite (an unseen element flagged by the "
                         "estimator has no finite value to normalise)")
    normalised = element_normalised(v[:, sel], z[sel], scales, default=default)
    per_step = normalised.max(axis=1)
    return {"initial": float(per_step[0]), "max": float(per_step.max()), "final": float(per_step[-1]),
            "frac": float((normalised > 1.0).mean(axis=1).max())}


def reference_stop_threshold(per_atom_traces: Sequence[np.ndarray], numbers: Sequence[np.ndarray],
                             false_alarm_rate: float, patience: int = 1, method: str = "conformal",
                             atom_reduce: Reduce = "max", element_quantile: float | None = None
                             ) -> tuple[float, dict[int, float] | None]:
    """Threshold of a stop fitted to R in-domain runs' per-atom values, and its per-element scales.

    ``per_atom_traces``: R arrays (steps, N_r) of the per-atom statistic (its unit); ``numbers``: their
    (N_r,) atomic numbers. With ``element_quantile`` the scales are :func:`element_scales` of these runs
    and each run's trace is the ``atom_reduce`` of its element-normalised values (dimensionless); with
    None the raw values are reduced and the scales are None. The threshold is :func:`stop_threshold`
    of those traces.
    """
    atom_reduce = check_reduce(atom_reduce)
    if len(per_atom_traces) != len(numbers):
        raise ValueError(f"got {len(per_atom_traces)} reference runs but {len(numbers)} atomic-number arrays")
    scales = None if element_quantile is None else element_scales(per_atom_traces, numbers, element_quantile)
    traces = []
    for values, z in zip(per_atom_traces, numbers):
        v = np.asarray(values, dtype=np.float64)
        if scales is not None:
            v = element_normalised(v, z, scales)
        traces.append([reduce_values(row, atom_reduce) for row in v])
    return stop_threshold(traces, false_alarm_rate, patience, method), scales


class UncertaintyStop:
    """Stop an ASE optimizer or MD run when the uncertainty stays too high.

    Usage::

        dyn = Langevin(atoms, ..., trajectory="md.traj")
        stop = UncertaintyStop(dyn, threshold=0.5, patience=3, save_to="uncertain.extxyz")
        dyn.attach(stop)
        dyn.run(10_000)          # returns normally, early if the stop fired
        stop.triggered, stop.step, stop.value, stop.reason

    At every step the per-atom ``key`` values of the selected atoms (default all) are reduced with
    ``atom_reduce`` (default ``"max"``). ``key`` is one of :data:`STOP_STATISTICS` (units there):
    ``"uncertainties"`` (default, a probability that saturates at 1), ``"expected_force_errors"``
    (eV/Å, distance-aware and unbounded with a calibrated estimator: the statistic to stop on under
    distribution shift), ``"latent_distance_ratios"`` (dimensionless, calibrated estimator) or
    ``"latent_distances"`` (latent units); any other per-atom result the calculator lists also works. The stop fires when the value is strictly above the threshold
    for ``patience`` consecutive steps: it sets ``dyn.max_steps = 0``, which ends ASE's run loop (MD and
    optimizers) after all observers of that step have run, so a trajectory written by the dynamics
    holds every step up to and including the triggering one whatever the attach order. It then
    writes the triggering frame, with energies/forces and per-atom UQ columns, to ``save_to``
    (extxyz, appended, so repeated active-learning runs collect frames) and calls
    ``on_trigger(atoms, info)``.

    Adaptive mode (``adaptive=True``): after ``warmup`` non-exceeding steps the bound is the running
    mean + ``n_sigma`` × running standard deviation (ddof=1) of the earlier non-exceeding values (the
    values of an excursion do not raise their own bar). ``threshold``, if not None, then acts as an
    absolute ceiling that applies from the first step.

    A threshold with a stated false-alarm rate comes from in-domain runs:
    :meth:`from_false_alarm_rate` (see :func:`stop_threshold`). ``threshold=math.inf`` only records
    ``values`` (the traces those reference runs need). With a calibrated estimator
    (``LTAUEstimator.fit_calibration``) ``uncertainties`` and ``expected_force_errors`` are the
    distance-aware ones; to watch the distance too, attach a second stop with
    ``key="latent_distance_ratios"`` and split the false-alarm budget between the two (union bound).

    Per-element scales (``element_scales={Z: scale}``, in the statistic's unit, e.g. from
    :func:`element_scales` over in-domain runs): each atom's value is divided by its element's scale
    before the reduction, so the stop watches the largest value *relative to that element's in-domain
    tail* (dimensionless; the threshold then is too). :meth:`from_reference_runs` fits the scales and the
    threshold from the same in-domain runs. Measured on the EMT shift benchmark (20 + 20 cached MD runs of
    2,000 steps, Gumbel α = 0.01): with per-element scales (quantile 0.99) the max-atom expected error
    stopped 13 of 20 1200 K runs at most 10 steps after (or before) their true max-atom error first
    exceeded 1 eV/Å (3 of 20 without), with no false alarm in 20 in-domain runs either way; on 20 + 20 new
    runs with the same thresholds, 11 of 20 (1 of 20 without) and 1 false alarm (0 without).

    Note: an optimizer writing to a non-empty trajectory skips step-0 observers, so the initial
    structure is then first checked after step 1.
    """

    def __init__(self, dyn: Any, threshold: float | None = None, key: str = "uncertainties",
                 atom_reduce: Reduce = "max", patience: int = 1,
                 on_trigger: Callable[[Atoms, dict], Any] | None = None,
                 save_to: str | PathLike | None = None, adaptive: bool = False, warmup: int = 20,
                 n_sigma: float = 3.0, select: Select = "all",
                 element_scales: Mapping[int, float] | None = None) -> None:
        if threshold is None and not adaptive:
            raise ValueError("threshold is required unless adaptive=True")
        if not (isinstance(threshold, (int, float, np.floating)) and threshold == math.inf):  # +inf: record only
            check_number(threshold, "threshold", allow_none=True)
        check_int(patience, "patience")
        if adaptive:
            check_int(warmup, "warmup (adaptive mode)", minimum=2)
            check_number(n_sigma, "n_sigma", minimum=0)
        if on_trigger is not None and not callable(on_trigger):
            raise TypeError(f"on_trigger must be callable(atoms, info), got {type(on_trigger)}")
        self.dyn = dyn
        self.threshold = None if threshold is None else float(threshold)
        self.key = key
        self.atom_reduce = check_reduce(atom_reduce)
        self.patience = int(patience)
        self.on_trigger = on_trigger
        if save_to is not None:  # now, not when the stop fires and its frame would be lost
            check_writable_file(save_to, "save_to")
            if not os.path.isdir(os.path.dirname(os.path.abspath(save_to))):
                raise ValueError(f"save_to {save_to}: its directory does not exist; create it first")
        self.save_to = save_to
        self.adaptive = adaptive
        self.warmup = warmup
        self.n_sigma = float(n_sigma)
        self.select = select
        atoms = _real_atoms(dyn.atoms)
        check_key(atoms, key)
        self._mask = resolve_selection(atoms, select)
        self.element_scales = None if element_scales is None else dict(element_scales)
        self._atom_scales = None
        if self.element_scales is not None:
            # element_normalised checks the scales (finite > 0) and that every element has one
            self._atom_scales = element_normalised(np.ones(len(atoms)), atoms.numbers, self.element_scales) ** -1
        # state
        self.triggered = False
        self.step: int | None = None
        self.value: float | None = None
        self.reason: str | None = None
        self.events: list[dict] = []
        self.steps: list[int] = []
        self.values: list[float] = []
        self.bounds: list[float] = []
        self._count = 0
        self._n = 0  # Welford running stats of non-exceeding values (adaptive mode)
        self._mean = 0.0
        self._m2 = 0.0

    @classmethod
    def from_false_alarm_rate(cls, dyn: Any, reference_traces: Sequence[Sequence[float] | np.ndarray],
                              false_alarm_rate: float, patience: int = 1, method: str = "conformal",
                              **kwargs: Any) -> "UncertaintyStop":
        """A stop whose threshold is :func:`stop_threshold` ``(reference_traces, false_alarm_rate, patience, method)``.

        ``reference_traces`` must be the same statistic (``key``, ``atom_reduce``, ``select`` in
        ``kwargs``) recorded on in-domain runs, e.g. ``stop.values`` of stops built with
        ``threshold=math.inf``; the threshold is in the statistic's unit (:data:`STOP_STATISTICS`:
        eV/Å for ``key="expected_force_errors"``). ``method``: ``"conformal"`` (distribution-free,
        α ≥ 1/(R+1)) or ``"gumbel"`` (extreme-value fit, any α; see :func:`stop_threshold`). Sets
        ``false_alarm_rate``, ``threshold_method`` and ``n_reference_runs`` on the stop.
        """
        threshold = stop_threshold(reference_traces, false_alarm_rate, patience, method)
        stop = cls(dyn, threshold=threshold, patience=patience, **kwargs)
        stop.false_alarm_rate = float(false_alarm_rate)
        stop.threshold_method = method
        stop.n_reference_runs = len(reference_traces)
        return stop

    @classmethod
    def from_reference_runs(cls, dyn: Any, per_atom_traces: Sequence[np.ndarray], numbers: Sequence[np.ndarray],
                            false_alarm_rate: float, patience: int = 1, method: str = "conformal",
                            element_quantile: float | None = ELEMENT_SCALE_QUANTILE,
                            **kwargs: Any) -> "UncertaintyStop":
        """A stop fitted to R in-domain runs' per-atom values: per-element scales, then the threshold.

        ``per_atom_traces``: R arrays (steps, N_r) of the per-atom ``key`` values (kwargs; its unit, e.g.
        eV/Å for ``"expected_force_errors"``) recorded on in-domain runs (``stop.events``/an extxyz of
        ``ltau md --interval 1``); ``numbers``: their (N_r,) atomic numbers. With ``element_quantile``
        (default 0.99) the scales are :func:`element_scales` of these runs and each run's trace is the
        ``atom_reduce`` of its element-normalised values (dimensionless); with None the raw values are
        reduced (the stop of :meth:`from_false_alarm_rate`). The threshold is :func:`stop_threshold` of
        those traces. The reference runs are reduced over all their atoms, so ``select`` must be "all".
        Sets ``false_alarm_rate``, ``threshold_method``, ``n_reference_runs`` (and ``element_scales``).
        """
        if kwargs.get("select", "all") != "all":
            raise ValueError("from_reference_runs reduces the reference runs over all their atoms; select must be "
                             f"'all', got {kwargs['select']!r}")
        threshold, scales = reference_stop_threshold(per_atom_traces, numbers, false_alarm_rate, patience, method,
                                                     kwargs.get("atom_reduce", "max"), element_quantile)
        stop = cls(dyn, threshold=threshold, patience=patience, element_scales=scales, **kwargs)
        stop.false_alarm_rate = float(false_alarm_rate)
        stop.threshold_method = method
        stop.n_reference_runs = len(per_atom_traces)
        return stop

    def current_bound(self) -> float:
        """The threshold the next value is compared with (inf while an adaptive warm-up lasts)."""
        bound = math.inf if self.threshold is None else self.threshold
        if self.adaptive and self._n >= self.warmup:
            std = math.sqrt(self._m2 / (self._n - 1))
            bound = min(bound, self._mean + self.n_sigma * std)
        return bound

    def __call__(self) -> None:
        atoms = _real_atoms(self.dyn.atoms)
        values = per_atom_values(atoms, self.key)
        watched = values if self._atom_scales is None else values / self._atom_scales
        value = reduce_values(watched[self._mask], self.atom_reduce)
        bound = self.current_bound()
        step = int(self.dyn.nsteps)
        self.steps.append(step)
        self.values.append(value)
        self.bounds.append(bound)
        if value > bound or math.isnan(value):  # NaN UQ is never "fine"
            self._count += 1
        else:
            self._count = 0
            if self.adaptive:
                self._n += 1
                delta = value - self._mean
                self._mean += delta / self._n
                self._m2 += delta * (value - self._mean)
        if self._count >= self.patience:
            self._fire(atoms, values, value, bound, step)

    def _fire(self, atoms: Atoms, values: np.ndarray, value: float, bound: float, step: int) -> None:
        self.dyn.max_steps = 0  # ends ASE's run loop after this step's observers, no exception
        first = self.steps[-self.patience]
        reduce_name = self.atom_reduce if isinstance(self.atom_reduce, str) else f"q{self.atom_reduce:g}"
        name = self.key if self._atom_scales is None else f"element-normalised {self.key}"
        self.reason = (f"{reduce_name} {name} over {int(self._mask.sum())} selected atoms = {value:.6g} > "
                       f"threshold {bound:.6g} for {self.patience} consecutive step(s) (steps {first}..{step})")
        self.triggered, self.step, self.value = True, step, value
        info = {"step": step, "value": value, "threshold": bound, "key": self.key, "reason": self.reason,
                "per_atom": values.copy()}
        self.events.append(info)
        _flush_open_trajectory(self.dyn)
        if self.save_to is not None:
            from ase.io import write

            write(self.save_to, self.frame(atoms, values, info), format="extxyz", append=True)
        if self.on_trigger is not None:
            self.on_trigger(atoms, info)

    def frame(self, atoms: Atoms, values: np.ndarray, info: dict) -> Atoms:
        """A copy of ``atoms`` with its standard results and per-atom UQ columns, for writing."""
        frame = atoms.copy()
        results = atoms.calc.results
        frame.calc = SinglePointCalculator(frame, **{k: v for k, v in results.items() if k in all_properties})
        if any(k in results for k in PER_ATOM_UQ + PER_STRUCTURE_UQ):
            store_uq_in_atoms(frame, results)
        frame.arrays["ltau_" + self.key] = values.copy()
        frame.info.update(ltau_stop_step=info["step"], ltau_stop_value=info["value"],
                          ltau_stop_threshold=info["threshold"], ltau_stop_key=self.key)
        return frame


def _flush_open_trajectory(dyn: Any) -> None:
    # A trajectory given to ASE as a path is opened and closed at every write (already on disk);
    # an open Trajectory object is the caller's, but flush its buffer so nothing is lost.
    traj = getattr(dyn, "trajectory", None)
    if traj is None or not hasattr(traj, "write"):
        return
    for obj in (traj, getattr(traj, "backend", None), getattr(getattr(traj, "backend", None), "fd", None)):
        flush = getattr(obj, "flush", None)
        if callable(flush):
            flush()
