"""`LTAUCalculator`: any ASE force-field calculator plus LTAU per-atom uncertainties.

The wrapper delegates every physical property (energy, forces, stress, ...) to the wrapped
calculator and adds, for the same structure and from the same base computation:

per atom, shape (N,)
    ``uncertainties``           1 - p_j, in [0, 1]
    ``confidences``             p_j = P(|F error| <= threshold) from the neighbours' error distributions
    ``expected_force_errors``   expected |F error| of the atom, eV/Å
    ``latent_distances``        mean Euclidean distance to the k nearest training descriptors, in the
                                model's latent units (no physical unit)
    ``force_error_bounds``      only with ``coverage=q`` and a calibrated estimator, or from a model
                                compiled with ``ltau compile --coverage q``
                                (``LTAUEstimator.fit_calibration``): split-conformal bound (eV/Å) with
                                P(|F error| <= bound) >= q on data like the calibration set
    ``latent_distance_ratios``  only with a calibrated estimator: r_j, the latent distance over the
                                training set's median leave-one-out neighbour distance (dimensionless;
                                r ≈ 1 is a typical training neighbourhood; +inf for an atom of an
                                element never seen in training under ``unknown_species="flag"``)
per structure (float)
    ``max_uncertainty``, ``mean_uncertainty``  over all atoms

ASE keeps only its own property names (``ase.calculators.calculator.all_properties``) when it writes
trajectories, extxyz results or ase.db rows: use :func:`store_uq_in_atoms` to copy the UQ results into
``atoms.arrays`` / ``atoms.info`` so they are written too.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from os import PathLike
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from ltau_ase.core.estimator import unknown_species_policy

PER_ATOM_UQ = ("uncertainties", "confidences", "expected_force_errors", "latent_distances", "force_error_bounds",
               "latent_distance_ratios")
PER_STRUCTURE_UQ = ("max_uncertainty", "mean_uncertainty")
UQ_PROPERTIES = PER_ATOM_UQ + PER_STRUCTURE_UQ

# per-atom fields of a model that computes LTAU in its forward pass -> estimator.predict key
MODEL_UQ_FIELDS = {
    "ltau_uncertainty": "uncertainty",
    "ltau_confidence": "confidence",
    "ltau_expected_force_error": "expected_error",
    "ltau_latent_distance": "distance",
}

# estimator.predict key -> calculator result key
_PREDICT_TO_RESULT = {
    "uncertainty": "uncertainties",
    "confidence": "confidences",
    "expected_error": "expected_force_errors",
    "distance": "latent_distances",
}
_BOUND_RESULT = "force_error_bounds"
_RATIO_RESULT = "latent_distance_ratios"
_MODEL_RATIO_FIELD = "ltau_distance_ratio"  # the in-model readout's field (distance-aware form)
_MODEL_BOUND_FIELD = "ltau_force_error_bound"  # ... and its conformal bound (compiled with a coverage)


def check_finite_geometry(atoms: Atoms, check_cell: bool = True) -> None:
    """Refuse a structure no neighbour list can handle, before one is built.

    Non-finite positions make neighbour-list codes loop forever (NaN) or return ordinary-looking
    numbers (one NaN atom, an infinite cell vector); a zero or linearly dependent cell vector along a
    periodic axis has no lattice to repeat. Checked: positions (N, 3) and cell (3, 3) finite (Å); the
    cell vectors of the periodic axes non-zero and linearly independent. ``check_cell=False`` checks the
    positions only (for a cell and pbc already checked).

    Raises:
        ValueError: what is wrong, with the first offending atom indices.
    """
    positions = np.asarray(atoms.positions)
    bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
    if bad.size:
        raise ValueError(f"{bad.size} atom(s) have non-finite positions (NaN or inf), e.g. atoms "
                         f"{bad[:10].tolist()}; expected finite Cartesian positions in Å")
    if not check_cell:
        return
    cell = np.asarray(atoms.cell.array, dtype=float)
    if not np.isfinite(cell).all():
        raise ValueError(f"the cell has non-finite entries {cell.tolist()}; expected finite cell vectors in Å")
    periodic = cell[np.asarray(atoms.pbc, dtype=bool)]
    if len(periodic):
        singular = np.linalg.svd(periodic, compute_uv=False)
        if singular.min() <= 1e-10 * max(singular.max(), 1.0):
            raise ValueError(f"the cell vectors of the periodic axes (pbc={atoms.pbc.tolist()}) are zero or linearly "
                             f"dependent: {periodic.tolist()}; expected a proper lattice along every periodic axis")


class LTAUCalculator(Calculator):
    """Wrap ``calc`` and add LTAU uncertainties to its results.

    Parameters
    ----------
    calc
        Any ASE calculator. Energy, forces, stress etc. are obtained through ``calc.get_property``,
        so the base calculator's own cache works and it computes each structure exactly once.
    estimator
        A fitted :class:`ltau_ase.core.estimator.LTAUEstimator` (or an object with the same
        ``predict(descriptors, threshold=, atomic_numbers=, unknown_species=)`` / ``n_features_in_``
        interface), or ``None`` when the base calculator's model computes LTAU itself (a model
        compiled with ``ltau compile``): then ``calc.results`` must hold the per-atom fields
        ``ltau_uncertainty``, ``ltau_confidence``, ``ltau_expected_force_error``,
        ``ltau_latent_distance`` of the same forward pass, the threshold is the one compiled in
        (``threshold`` must be None) and the training species come from
        ``calc.ltau_readout["species"]``.
    descriptors
        ``None``: take the (N, D) per-atom descriptors from ``calc.results["descriptors"]``, which the
        base calculator must fill in the same call that computes energy and forces (the model
        backends' calculators do). A callable ``descriptors(atoms) -> (N, D)`` computes them instead.
    threshold
        Force-error threshold (eV/Å) for the confidences; ``None`` uses the estimator's ``atol_``.
    coverage
        q in (0, 1): also return ``force_error_bounds`` (eV/Å), the estimator's split-conformal
        per-atom bounds at coverage q (needs an estimator calibrated with ``fit_calibration``). With
        ``estimator=None`` the bounds come from the model (``ltau compile --coverage q``): None reports
        them when it has them, and any other value must equal the compiled coverage.
    unknown_species
        Atoms of an element the estimator never saw in training (see
        :class:`~ltau_ase.core.estimator.LTAUEstimator`, which owns this policy): ``None`` (default)
        keeps the estimator's own policy (``"raise"`` unless it was fitted otherwise); ``"raise"``
        raises ``ValueError`` naming the elements, because the model's force on such an atom is an
        extrapolation the error distributions say nothing about; ``"flag"`` marks those atoms as
        maximally uncertain (uncertainty 1, confidence 0, expected error NaN; latent distance still
        computed), so a simulation can continue and an :class:`UncertaintyStop` can fire on them;
        ``"ignore"`` judges them by their latent neighbours alone. ``results["unknown_species"]``
        (bool (N,)) lists the flagged atoms.
    **kwargs
        Passed to :class:`ase.calculators.calculator.Calculator` (``label``, ``directory``, ...).
    """

    def __init__(
        self,
        calc: Calculator,
        estimator: Any,
        descriptors: Callable[[Atoms], np.ndarray] | None = None,
        threshold: float | None = None,
        unknown_species: str | None = None,
        coverage: float | None = None,
        **kwargs: Any,
    ) -> None:
        if unknown_species is not None:
            unknown_species_policy(unknown_species)  # the estimator's vocabulary; raises ValueError
        readout = getattr(calc, "ltau_readout", None) if estimator is None else None
        if coverage is not None:
            from ltau_ase.core.conformal import check_coverage

            coverage = check_coverage(coverage)
            if estimator is not None and not getattr(estimator, "is_calibrated", False):
                raise ValueError("coverage needs an estimator calibrated with fit_calibration (or `ltau calibrate`); "
                                 "this one has no conformal calibration")
        if estimator is None and readout is not None:
            # a compiled model's bounds have the coverage they were compiled with (None: no bounds)
            compiled = readout.get("coverage")
            if coverage is not None and coverage != compiled:
                raise ValueError(f"the model was compiled {'without error bounds' if compiled is None else f'with coverage {compiled}'}"
                                 f", not coverage {coverage}; recompile with `ltau compile --coverage {coverage}` or "
                                 "pass coverage=None")
            coverage = compiled
        if descriptors is not None and not callable(descriptors):
            raise TypeError(f"descriptors must be None or a callable atoms -> (N, D) array, got {type(descriptors)}")
        if not hasattr(calc, "get_property"):
            raise TypeError(f"calc must be an ASE calculator, got {type(calc)}")
        if estimator is None and getattr(calc, "ltau_readout", None) is None:
            raise ValueError(f"estimator=None needs a base calculator whose model computes LTAU (compiled with "
                             f"`ltau compile`); {type(calc).__name__} has no ltau_readout")
        if estimator is None and (threshold is not None or descriptors is not None):
            raise ValueError("a model that computes LTAU itself has its threshold and descriptors compiled in; "
                             "threshold and descriptors must be None (recompile with another estimator to change them)")
        super().__init__(**kwargs)
        self.calc = calc
        self.estimator = estimator
        self.descriptors = descriptors
        self.threshold = threshold
        self.unknown_species = unknown_species
        self.coverage = coverage
        # per instance: the class attribute of Calculator is shared by every calculator
        base = [p for p in getattr(calc, "implemented_properties", []) if p not in UQ_PROPERTIES]
        # a model compiled from a calibrated estimator computes the distance-aware form, ratios included
        calibrated = (bool(getattr(estimator, "is_calibrated", False)) if estimator is not None
                      else (readout or {}).get("form") == "distance_aware")
        uq = [p for p in UQ_PROPERTIES
              if (p != _BOUND_RESULT or coverage is not None) and (p != _RATIO_RESULT or calibrated)]
        self.implemented_properties = base + uq
        self._distance_ratios = calibrated
        self._base_properties = base
        self._checked_cell: tuple[np.ndarray, np.ndarray] | None = None  # (cell, pbc) that last passed

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(
        cls,
        model_path: str | PathLike,
        estimator: str | PathLike | Any = None,
        device: str = "cpu",
        threshold: float | None = None,
        allow_model_mismatch: bool = False,
        unknown_species: str | None = None,
        backend: str | None = None,
        coverage: float | None = None,
        **kwargs: Any,
    ) -> "LTAUCalculator":
        """Build from a model file and an estimator (file or fitted object).

        The model backend that claims ``model_path`` (:func:`ltau_ase.simulate.backends.backend_for`,
        or the one named by ``backend``) loads it as a calculator whose descriptors come from the
        same forward pass. The estimator records the fingerprint (SHA-256) of the model it was fitted
        for (``metadata["model_sha256"]``); a different model file (or no recorded hash) raises
        ``ValueError`` unless ``allow_model_mismatch=True``, which only warns
        (:func:`ltau_ase.core.fileformat.check_model_fingerprint`). ``kwargs`` go to the backend's
        loader (for nequip: ``LatentNequIPCalculator.from_model_file``, e.g.
        ``chemical_species_to_atom_type_map=True``).

        ``estimator=None``: the model computes LTAU itself (a file written by ``ltau compile``, loaded
        with ``trusted=True``); its results carry the UQ of the same forward pass.
        """
        from ltau_ase.core.fileformat import check_model_fingerprint
        from ltau_ase.simulate.backends import backend_for, get_backend

        plugin = get_backend(backend) if backend is not None else backend_for(model_path)
        if estimator is None:
            # the model computes LTAU in its forward pass (a file written by `ltau compile`)
            base = plugin.calculator(model_path, device=device, **kwargs)
            if getattr(base, "ltau_readout", None) is None:
                raise ValueError(f"{str(model_path)!r} does not compute LTAU itself; pass an estimator, or compile "
                                 "the model with its estimator: ltau compile MODEL ESTIMATOR OUTPUT")
            return cls(base, None, threshold=threshold, unknown_species=unknown_species)
        if isinstance(estimator, (str, PathLike)):
            from ltau_ase.core.estimator import LTAUEstimator

            estimator_label, estimator = str(estimator), LTAUEstimator.load(estimator)
        else:
            estimator_label = "the given estimator"
        fingerprint = plugin.fingerprint(model_path)
        # refuse a mismatched pair before paying for the model load
        check_model_fingerprint(getattr(estimator, "metadata", None), fingerprint,
                                model=model_path, estimator=estimator_label, allow_mismatch=allow_model_mismatch)
        base = plugin.calculator(model_path, device=device, **kwargs)
        # a backend that reads the file once reports the hash of the bytes it built the model from: if
        # the file was replaced between the check and the load, the checked model is not the loaded one
        loaded = getattr(base, "model_sha256", None)
        if loaded is not None and loaded != fingerprint:
            raise ValueError(f"model file {str(model_path)!r} changed while it was being loaded (sha256 {fingerprint} "
                             f"when checked, {loaded} when read); load it again once it is no longer being written")
        return cls(base, estimator, threshold=threshold, unknown_species=unknown_species, coverage=coverage)

    @classmethod
    def from_nequip(cls, model_path: str | PathLike, estimator_path: str | PathLike | Any = None,
                    **kwargs: Any) -> "LTAUCalculator":
        """Alias of :meth:`from_model` for nequip files (``.ckpt``, ``.nequip.zip``, compiled
        ``.nequip.pt2`` / ``.nequip.pth``; same arguments). ``estimator_path=None``: a file written by
        ``ltau compile`` that computes LTAU itself (load it with ``trusted=True``)."""
        return cls.from_model(model_path, estimator_path, **kwargs)

    # ------------------------------------------------------------------ ASE interface
    def calculate(self, atoms: Atoms | None = None, properties: list[str] | None = None,
                  system_changes: list[str] = all_changes) -> None:
        properties = list(properties or ["energy"])
        if system_changes:
            self.results = {}
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms  # the copy Calculator.calculate stored
        # before the base calculator builds a neighbour list; the cell (an SVD) only when it differs from
        # the last one that passed
        cell, pbc = atoms.cell.array, atoms.pbc
        known = self._checked_cell
        check_finite_geometry(atoms, check_cell=known is None or not (np.array_equal(known[0], cell)
                                                                      and np.array_equal(known[1], pbc)))
        self._checked_cell = (cell.copy(), pbc.copy())
        wanted = [p for p in properties if p in self._base_properties]
        if not wanted:
            # UQ only: still one base computation, the one that also yields the descriptors
            wanted = ["forces"] if "forces" in self._base_properties else self._base_properties[:1]
        if system_changes:
            # the structure changed since this calculator's last call, so the base calculator must compute
            # anyway: clearing its cache skips its own comparison of the two structures (0.1-0.2 ms a step)
            self.calc.reset()
        for name in wanted:
            self.calc.get_property(name, atoms)
        base_results = dict(self.calc.results)
        fresh = "uncertainties" not in self.results  # no UQ yet for this structure
        self.results.update(base_results)
        if fresh:
            self.results.update(self._uq(atoms, base_results))

    def _uq(self, atoms: Atoms, base_results: Mapping[str, Any]) -> dict[str, Any]:
        n = len(atoms)
        if self.estimator is None:
            return self._finish_uq(atoms, self._model_uq(atoms, base_results))
        if self.descriptors is not None:
            desc = self.descriptors(atoms)
            source = "descriptors(atoms)"
        elif "descriptors" in base_results:
            desc = base_results["descriptors"]
            source = "calc.results['descriptors']"
        else:
            raise ValueError(
                f"{type(self.calc).__name__} put no 'descriptors' in its results; use a calculator that "
                "provides per-atom descriptors from the same forward pass (e.g. one loaded with LTAUCalculator.from_model) or "
                "pass descriptors=callable(atoms) -> (N, D)")
        desc = np.asarray(desc)
        d = getattr(self.estimator, "n_features_in_", None)
        if desc.ndim != 2 or desc.shape[0] != n or (d is not None and desc.shape[1] != d):
            raise ValueError(f"{source} has shape {desc.shape}, expected ({n}, {d}) for {n} atoms and an "
                             f"estimator fitted on {d}-dimensional descriptors (was it fitted for this model?)")
        # the estimator owns the unknown-element policy (raise / flag / ignore); this only maps results
        extra = {} if self.coverage is None else {"coverage": self.coverage}
        if getattr(self.estimator, "structure_scale_", None) is not None:
            extra["structure_index"] = np.zeros(n, dtype=np.int64)  # one calculator call = one structure
        pred = self.estimator.predict(np.ascontiguousarray(desc, dtype=np.float32), threshold=self.threshold,
                                      atomic_numbers=np.asarray(atoms.numbers),
                                      unknown_species=self.unknown_species, **extra)
        return self._finish_uq(atoms, pred)

    def _model_uq(self, atoms: Atoms, base_results: Mapping[str, Any]) -> dict[str, Any]:
        """The LTAU fields the base model computed in its forward pass as ``estimator.predict`` keys, with
        the unknown-species policy (the estimator's vocabulary; None: ``"raise"``) applied."""
        missing = [f for f in MODEL_UQ_FIELDS if f not in base_results]
        if missing:
            raise ValueError(f"{type(self.calc).__name__} returned no {missing}; expected a model compiled with "
                             "`ltau compile`, which outputs them")
        pred = {key: np.array(base_results[field], dtype=np.float64) for field, key in MODEL_UQ_FIELDS.items()}
        if self._distance_ratios:
            if _MODEL_RATIO_FIELD not in base_results:
                raise ValueError(f"{type(self.calc).__name__} declares the distance-aware form but returned no "
                                 f"{_MODEL_RATIO_FIELD!r}")
            pred["distance_ratio"] = np.array(base_results[_MODEL_RATIO_FIELD], dtype=np.float64)
        if self.coverage is not None:
            if _MODEL_BOUND_FIELD not in base_results:
                raise ValueError(f"{type(self.calc).__name__} declares error bounds (coverage {self.coverage}) but "
                                 f"returned no {_MODEL_BOUND_FIELD!r}")
            pred["error_bound"] = np.array(base_results[_MODEL_BOUND_FIELD], dtype=np.float64)
        policy = unknown_species_policy(self.unknown_species or "raise")
        species = (getattr(self.calc, "ltau_readout", None) or {}).get("species")
        unseen = [] if species is None else sorted(set(atoms.numbers.tolist()) - set(species))
        if unseen and policy == "raise":
            raise ValueError(f"structure contains elements Z={unseen} never seen in the estimator's training set; "
                             "use unknown_species='flag' to mark them as maximally uncertain instead")
        unknown = np.isin(atoms.numbers, unseen) if policy == "flag" else np.zeros(len(atoms), dtype=bool)
        if unknown.any():  # the same marking LTAUEstimator.predict applies
            pred["uncertainty"][unknown], pred["confidence"][unknown] = 1.0, 0.0
            pred["expected_error"][unknown] = np.nan
            if "error_bound" in pred:
                pred["error_bound"][unknown] = np.nan
            if "distance_ratio" in pred:
                pred["distance_ratio"][unknown] = np.inf
        pred["unknown_species"] = unknown
        return pred

    def _finish_uq(self, atoms: Atoms, pred: Mapping[str, Any]) -> dict[str, Any]:
        n = len(atoms)
        out: dict[str, Any] = {}
        mapping = dict(_PREDICT_TO_RESULT, **({"error_bound": _BOUND_RESULT} if self.coverage is not None else {}),
                       **({"distance_ratio": _RATIO_RESULT} if self._distance_ratios else {}))
        for src, dst in mapping.items():
            values = np.array(pred[src], dtype=np.float64)
            if values.shape != (n,):
                raise ValueError(f"estimator.predict returned {src!r} of shape {values.shape}, expected ({n},)")
            out[dst] = values
        out["unknown_species"] = np.array(pred.get("unknown_species", np.zeros(n, dtype=bool)), dtype=bool)
        out["max_uncertainty"] = float(out["uncertainties"].max()) if n else float("nan")
        out["mean_uncertainty"] = float(out["uncertainties"].mean()) if n else float("nan")
        return out

    def todict(self) -> dict[str, Any]:
        return {"calc": type(self.calc).__name__, "threshold": self.threshold,
                "unknown_species": self.unknown_species, "coverage": self.coverage}


def store_uq_in_atoms(atoms: Atoms, results: Mapping[str, Any] | None = None) -> Atoms:
    """Copy UQ results into ``atoms.arrays`` / ``atoms.info`` so that extxyz and ase.db keep them.

    ``results`` defaults to ``atoms.calc.results``. Per-atom arrays go to
    ``atoms.arrays["ltau_uncertainties" | "ltau_confidences" | "ltau_expected_force_errors" |
    "ltau_latent_distances"]`` (those present), structure values to
    ``atoms.info["ltau_max_uncertainty" | "ltau_mean_uncertainty"]``. Returns ``atoms``.
    """
    if results is None:
        if atoms.calc is None:
            raise ValueError("atoms has no calculator; pass results= explicitly")
        results = atoms.calc.results
    found = False
    for key in PER_ATOM_UQ:
        if key in results:
            values = np.asarray(results[key], dtype=np.float64)
            if values.shape != (len(atoms),):
                raise ValueError(f"results[{key!r}] has shape {values.shape}, expected ({len(atoms)},)")
            atoms.arrays["ltau_" + key] = values.copy()
            found = True
    for key in PER_STRUCTURE_UQ:
        if key in results:
            atoms.info["ltau_" + key] = float(results[key])
            found = True
    if not found:
        raise ValueError(f"results hold none of the UQ keys {UQ_PROPERTIES}; got {sorted(results)}")
    return atoms
