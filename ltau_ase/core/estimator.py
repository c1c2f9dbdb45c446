"""LTAUEstimator: per-atom uncertainty of a test atom from its nearest training atoms (paper Algorithm 2).

Fitting turns the training atoms' logged error trajectories into per-atom error distributions
(Algorithm 1; :mod:`ltau_ase.core.distributions`) and indexes their latent descriptors with FAISS
(:mod:`ltau_ase.core.index`). A test atom's confidence is the mean, over its k nearest training atoms,
of their probability of an error ≤ threshold / scale (paper Sec. 4.1: the scaling factor s assumes
test errors are s × the training errors).

After :meth:`LTAUEstimator.fit_calibration` the scale depends on the atom: s_j = c_Z · g(d_j / d_ref)
grows with the atom's latent distance relative to the training set's own neighbour distances
(:mod:`ltau_ase.core.shift`), and ``predict(..., coverage=q)`` adds split-conformal per-atom error
bounds (:mod:`ltau_ase.core.conformal`). Imports numpy, scipy, faiss and tqdm only.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from ltau_ase.core.distributions import (
    CompactDistributions,
    ExactDistributions,
    as_runs,
    default_atol,
    distributions_from_arrays,
)
from ltau_ase.core.errorlog import EpochWindow
from ltau_ase.core.fileformat import read_container, write_container
from ltau_ase.core.index import INDEX_KINDS, NeighbourIndex, as_float32
from ltau_ase.core.conformal import MondrianConformal, check_coverage
from ltau_ase.core.shift import DistanceScale, reference_distances

# fit_calibration splits the calibration atoms in two halves: one fits the distance scale g and the
# per-element factors, the other gives the conformal scores (split conformal needs scores the
# normaliser never saw). 200 atoms = 100 per half: a 95 % bound is finite from 19 scores on, and with
# 100 scores the coverage overshoots the nominal one by at most 1/101 (about 1 %).
MIN_CALIBRATION_ATOMS = 200
# An element gets its own factor and conformal quantile from this many atoms per half; fewer use the
# pooled ones (a 95 % conformal quantile from < 50 scores moves by several % between draws).
MIN_ELEMENT_ATOMS = 50

_PARAM_NAMES = (
    "k",
    "index",
    "atol",
    "rtol",
    "scale",
    "index_params",
    "weights",
    "distribution",
    "bins",
    "window",
    "unknown_species",
    "metadata",
    "chunk_size",
    "progress",
)
_LEARNED_ARRAYS = ("confidence_train_", "variability_train_", "mean_error_train_")


class LTAUEstimator:
    """Loss Trajectory Analysis for Uncertainty: kNN over training atoms' error distributions.

    Args:
        k: number of nearest training atoms averaged (k > N uses all N atoms, with one warning at fit).
        index: ``"flat"`` (exact), ``"hnsw"`` or ``"ivfpq"``; see :mod:`ltau_ase.core.index`.
        atol: absolute error tolerance (eV/Å); None = MAE of the final model (mean of each run's last
            logged epoch, averaged over runs).
        rtol: relative tolerance; a training atom's threshold is atol + rtol·|F_ref,i| (needs
            ``reference_forces`` at fit).
        scale: scaling factor s (paper Sec. 4.1); confidences use the training CDFs at threshold / s,
            expected errors are s × the neighbours' mean errors. The user's prior: :meth:`fit_scale`
            leaves it untouched and stores the fitted factor in ``scale_``, which predict uses when
            present. :meth:`fit_calibration` replaces both by a per-atom, distance-aware scale.
        index_params: FAISS parameters (hnsw: M, efConstruction, efSearch; ivfpq: nlist, m, nbits,
            nprobe, train_size, seed).
        weights: ``"uniform"`` (paper) or ``"distance"`` (inverse-distance weighted means).
        distribution: ``"compact"`` (histograms) or ``"exact"`` (all logged errors kept).
        bins: compact-distribution bins, see :func:`ltau_ase.core.distributions.make_edges`.
        window: epoch window (:class:`EpochWindow`, dict or (skip, last)); None keeps every epoch
            (or an ErrorLog's own window).
        unknown_species: what :meth:`check_species` does with elements unseen at fit:
            ``"raise"``, ``"warn"`` or ``"ignore"``.
        metadata: free-form JSON-able provenance saved with the estimator (e.g. ``model_sha256``).
        chunk_size: atoms per chunk when streaming error logs.
        progress: show tqdm progress bars while fitting.
    """

    def __init__(
        self,
        k: int = 10,
        index: str = "flat",
        atol: float | None = None,
        rtol: float = 0.0,
        scale: float = 1.0,
        index_params: dict[str, int] | None = None,
        weights: str = "uniform",
        distribution: str = "compact",
        bins: Any = None,
        window: EpochWindow | dict | tuple | None = None,
        unknown_species: str = "raise",
        metadata: dict[str, Any] | None = None,
        chunk_size: int = 1 << 16,
        progress: bool = False,
    ) -> None:
        self.k = k
        self.index = index
        self.atol = atol
        self.rtol = rtol
        self.scale = scale
        self.index_params = index_params
        self.weights = weights
        self.distribution = distribution
        self.bins = bins
        self.window = window
        self.unknown_species = unknown_species
        self.metadata = metadata
        self.chunk_size = chunk_size
        self.progress = progress

    def __repr__(self) -> str:
        defaults = LTAUEstimator.__init__.__defaults__
        changed = [
            f"{name}={getattr(self, name)!r}"
            for name, default in zip(_PARAM_NAMES, defaults)
            if not (getattr(self, name) is default or (np.isscalar(default) and getattr(self, name) == default))
        ]
        return f"LTAUEstimator({', '.join(changed)})"

    # ------------------------------------------------------------------ parameters
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _PARAM_NAMES}

    def set_params(self, **params: Any) -> "LTAUEstimator":
        for name, value in params.items():
            if name not in _PARAM_NAMES:
                raise ValueError(f"unknown parameter {name!r}; expected one of {_PARAM_NAMES}")
            setattr(self, name, value)
        self._cache = None
        return self

    def _check_params(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k <= 0:
            raise ValueError(f"k must be a positive integer; got {self.k!r}")
        if self.index not in INDEX_KINDS:
            raise ValueError(f"index must be one of {INDEX_KINDS}; got {self.index!r}")
        if self.weights not in ("uniform", "distance"):
            raise ValueError(f"weights must be 'uniform' or 'distance'; got {self.weights!r}")
        if self.distribution not in ("compact", "exact"):
            raise ValueError(f"distribution must be 'compact' or 'exact'; got {self.distribution!r}")
        if self.unknown_species not in ("raise", "warn", "ignore"):
            raise ValueError(f"unknown_species must be 'raise', 'warn' or 'ignore'; got {self.unknown_species!r}")
        if self.atol is not None and (not _finite_number(self.atol) or self.atol < 0):
            raise ValueError(f"atol must be None or a finite number >= 0 (eV/Å); got {self.atol!r}")
        if not _finite_number(self.rtol) or self.rtol < 0:
            raise ValueError(f"rtol must be a finite number >= 0; got {self.rtol!r}")
        _check_scale(self.scale)
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, (int, np.integer)) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer; got {self.chunk_size!r}")

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        descriptors: Any,
        errors: Any,
        reference_forces: Any = None,
        atomic_numbers: Any = None,
        atom_ids: Any = None,
    ) -> "LTAUEstimator":
        """Fit on N training atoms.

        Args:
            descriptors: (N, D) latent descriptors, row i = training atom i.
            errors: force-error norms (eV/Å): (E, N), (M, E, N), a list of M (E_m, N) arrays, an
                :class:`~ltau_ase.core.errorlog.ErrorLog` or a list of them. Error logs order atoms
                by sorted atom id: descriptors must come in that same order.
            reference_forces: (N,) |F_ref,i| (eV/Å), required when rtol > 0.
            atomic_numbers: (N,) atomic numbers; records ``species_`` for :meth:`check_species`.
            atom_ids: (N,) ids of the descriptor rows; checked against the error logs' ids (never
                used to reorder).
        Returns:
            self
        """
        self._check_params()
        x = as_float32(descriptors, "descriptors")
        n, d = x.shape
        runs = as_runs(errors, None if self.window is None else EpochWindow.coerce(self.window))
        if runs[0].n_atoms != n:
            raise ValueError(
                f"errors log {runs[0].n_atoms} atoms but descriptors have {n} rows; expected one descriptor per logged atom"
            )
        log_ids = runs[0].atom_ids
        ids = None
        if atom_ids is not None:
            ids = np.asarray(atom_ids)
            if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"atom_ids must be ({n},) integers, one per descriptor row; got shape {ids.shape}, dtype {ids.dtype}")
            ids = ids.astype(np.int64)
            if log_ids is not None and not np.array_equal(ids, log_ids):
                i = int(np.argmax(ids != log_ids))
                raise ValueError(
                    f"descriptor atom ids differ from the error logs' atom ids (first at row {i}: {ids[i]} vs "
                    f"{log_ids[i]}); expected descriptors in the logs' order (sorted atom ids); nothing is reordered"
                )
        elif log_ids is not None:
            ids = log_ids
        forces = None
        if reference_forces is not None:
            forces = np.asarray(reference_forces, dtype=np.float64)
            if forces.shape != (n,):
                raise ValueError(f"reference_forces has shape {forces.shape}; expected ({n},) force norms |F_ref| (eV/Å)")
            if not np.all(np.isfinite(forces)) or np.any(forces < 0):
                raise ValueError("reference_forces must be finite norms >= 0 (eV/Å)")
        if self.rtol > 0 and forces is None:
            raise ValueError("rtol > 0 needs reference_forces (N,) |F_ref| at fit")
        species = None
        if atomic_numbers is not None:
            z = np.asarray(atomic_numbers)
            if z.shape != (n,) or not np.issubdtype(z.dtype, np.integer) or np.any(z < 1) or np.any(z > 118):
                raise ValueError(f"atomic_numbers must be ({n},) integers in [1, 118]; got shape {z.shape}, dtype {z.dtype}")
            species = np.unique(z).astype(np.int64)

        atol = float(self.atol) if self.atol is not None else default_atol(runs)
        threshold: float | np.ndarray = atol if self.rtol == 0 else atol + float(self.rtol) * forces
        if self.distribution == "compact":
            dist = CompactDistributions.from_runs(
                runs, threshold, bins=self.bins, chunk_size=int(self.chunk_size), progress=bool(self.progress)
            )
        else:
            dist = ExactDistributions.from_runs(runs, threshold, chunk_size=int(self.chunk_size))
        k_eff = int(min(self.k, n))
        if self.k > n:
            warnings.warn(f"k={self.k} exceeds the {n} training atoms; every prediction averages all {n}", stacklevel=2)

        self.atol_ = atol
        self.distributions_ = dist
        self.confidence_train_ = dist.confidence(threshold)
        self.variability_train_ = dist.std(threshold)
        self.mean_error_train_ = dist.mean_error()
        self.index_ = NeighbourIndex.build(x, self.index, self.index_params)
        # each training atom's leave-one-out neighbour distance: the yardstick of "far" for fit_calibration
        self.train_distance_ref_ = reference_distances(self.index_, x, k_eff)
        self.n_features_in_ = int(d)
        self.n_train_atoms_ = int(n)
        self.k_eff_ = k_eff
        self.species_ = species
        self.atom_ids_ = ids
        self.fit_info_ = {
            "n_runs": len(runs),
            "n_epochs": [r.n_epochs for r in runs],
            "window": None if self.window is None else EpochWindow.coerce(self.window).to_dict(),
        }
        for name in _CALIBRATION_ATTRS + ("scale_",):
            self.__dict__.pop(name, None)  # a refit invalidates earlier calibrations
        self._cache = None
        self._warned_short = False
        return self

    # ------------------------------------------------------------------ predict
    def _check_fitted(self) -> None:
        if not hasattr(self, "index_"):
            raise ValueError("this LTAUEstimator is not fitted yet; call fit(descriptors, errors) or LTAUEstimator.load(path)")

    @property
    def effective_scale(self) -> float:
        """The paper's s used by predict without a calibration: fitted ``scale_`` if present, else ``scale``."""
        return float(self.__dict__["scale_"]) if "scale_" in self.__dict__ else float(self.scale)

    @property
    def is_calibrated(self) -> bool:
        """True after :meth:`fit_calibration` (or loading a file that holds one)."""
        return "distance_scale_" in self.__dict__

    def _threshold_key(self, threshold: Any) -> tuple[str, float]:
        if threshold is None:
            return ("fitted", self.effective_scale)
        if not _finite_number(threshold) or threshold < 0:
            raise ValueError(f"threshold must be None or a finite number >= 0 (eV/Å); got {threshold!r}")
        return (repr(float(threshold)), self.effective_scale)

    def train_confidence(self, threshold: float | None = None) -> np.ndarray:
        """(N,) each training atom's µ_M probability of an error ≤ threshold / s (s: ``effective_scale``; cached).

        threshold=None means the fitted per-atom threshold (atol + rtol·|F_ref,i|).
        """
        self._check_fitted()
        _check_scale(self.scale)
        scale = self.effective_scale
        key = self._threshold_key(threshold)
        if getattr(self, "_cache", None) is not None and self._cache[0] == key:
            return self._cache[1]
        if threshold is None and scale == 1:
            p = self.confidence_train_
        else:
            base = self.distributions_.fitted_threshold if threshold is None else float(threshold)
            p = self.distributions_.confidence(np.asarray(base, dtype=np.float64) / scale)
        self._cache = (key, p)
        return p

    def _neighbours(self, descriptors: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self._check_fitted()
        x = as_float32(descriptors, "descriptors", self.n_features_in_)
        dist, ids, valid = self.index_.search(x, self.k_eff_)
        n_valid = valid.sum(axis=1)
        if np.any(n_valid == 0):
            raise RuntimeError(
                f"the {self.index} index found no neighbour for {int(np.sum(n_valid == 0))} atoms; "
                "raise efSearch / nprobe in index_params"
            )
        if np.any(n_valid < self.k_eff_) and not getattr(self, "_warned_short", False):
            self._warned_short = True
            warnings.warn(
                f"the {self.index} index returned fewer than k={self.k_eff_} neighbours for some atoms; "
                "those atoms average over the neighbours found (raise efSearch / nprobe)",
                stacklevel=3,
            )
        return dist, ids, valid

    def _weights(self, dist: np.ndarray, valid: np.ndarray) -> np.ndarray | None:
        """None for uniform weights over valid neighbours, else (n, k) normalised inverse-distance weights."""
        if self.weights == "uniform":
            return None
        # Inverse distance; an exact match (distance 0) dominates through the 1e-12 floor.
        w = np.where(valid, 1.0 / np.maximum(dist, 1e-12), 0.0)
        return w / w.sum(axis=1, keepdims=True)

    @staticmethod
    def _average(values: np.ndarray, valid: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        if w is None:
            return np.where(valid, values, 0.0).sum(axis=1) / valid.sum(axis=1)
        return (w * values).sum(axis=1)

    def predict(
        self,
        descriptors: Any,
        threshold: float | None = None,
        coverage: float | None = None,
        atomic_numbers: Any = None,
        distance_aware: bool = True,
    ) -> dict[str, np.ndarray]:
        """Uncertainties of n atoms.

        Args:
            descriptors: (n, D) latent descriptors from the same model as at fit.
            threshold: absolute error threshold (eV/Å); None = the fitted atol (+ rtol·|F_ref|).
            coverage: q in (0, 1): add ``error_bound``, the split-conformal per-atom bound (eV/Å) with
                P(|ΔF| ≤ bound) ≥ q on data exchangeable with the calibration set (needs
                :meth:`fit_calibration`).
            atomic_numbers: (n,) atomic numbers, for the per-element factors and conformal quantiles
                of a calibrated estimator; None uses the pooled ones.
            distance_aware: with False a calibrated estimator predicts as the paper does (one scale,
                ``effective_scale``), ignoring its calibration.
        Returns:
            dict of (n,) float64: ``confidence`` (mean over the k nearest training atoms of their
            probability of an error ≤ threshold / s), ``uncertainty`` (1 − confidence),
            ``expected_error`` (s × mean of the neighbours' mean logged errors, eV/Å) and ``distance``
            (mean Euclidean latent distance to the neighbours). s is ``effective_scale`` or, when
            calibrated, the per-atom distance-aware s_j = c_Z · g(r_j); then ``distance_ratio`` (r_j,
            the distance over the training set's median leave-one-out distance) and ``scale`` (s_j)
            are added, and ``error_bound`` when ``coverage`` is given. With ``weights="distance"``
            confidence and expected_error are inverse-distance weighted.
        """
        if coverage is not None:
            coverage = check_coverage(coverage)
        dist, ids, valid = self._neighbours(descriptors)
        n = ids.shape[0]
        z = None if atomic_numbers is None else _check_atomic_numbers(atomic_numbers, n, "atomic_numbers")
        w = self._weights(dist, valid)
        mean_error = self._average(self.mean_error_train_[ids], valid, w)
        distance = np.where(valid, dist, 0.0).sum(axis=1) / valid.sum(axis=1)
        calibrated = self.is_calibrated and distance_aware
        if coverage is not None and not calibrated:
            raise ValueError("coverage needs a calibrated estimator: call fit_calibration(descriptors, errors) first"
                             if not self.is_calibrated else "coverage needs distance_aware=True")
        if not calibrated:
            p_train = self.train_confidence(threshold)
            confidence = self._average(p_train[ids], valid, w)
            return {
                "confidence": confidence,
                "uncertainty": 1.0 - confidence,
                "expected_error": self.effective_scale * mean_error,
                "distance": distance,
            }
        ratio = self._distance_ratio(distance)
        scale = self._element_factors(z, n) * self.distance_scale_(ratio)
        confidence = self._scaled_confidence(ids, valid, w, scale, threshold)
        out = {
            "confidence": confidence,
            "uncertainty": 1.0 - confidence,
            "expected_error": scale * mean_error,
            "distance": distance,
            "distance_ratio": ratio,
            "scale": scale,
        }
        if coverage is not None:
            q = self.conformal_.quantile_for(z, coverage) if z is not None else np.full(n, self.conformal_.quantiles(coverage)[1])
            out["error_bound"] = q * scale * mean_error
        return out

    # ------------------------------------------------------------------ distance-aware helpers
    def _distance_ratio(self, distance: np.ndarray) -> np.ndarray:
        return distance / float(self.calibration_info_["reference_distance"])

    def _element_factors(self, z: np.ndarray | None, n: int) -> np.ndarray:
        out = np.full(n, float(self.pooled_factor_))
        if z is not None and self.element_factor_z_.size:
            pos = np.clip(np.searchsorted(self.element_factor_z_, z), 0, self.element_factor_z_.size - 1)
            hit = self.element_factor_z_[pos] == z
            out[hit] = self.element_factors_[pos[hit]]
        return out

    def _scaled_confidence(self, ids: np.ndarray, valid: np.ndarray, w: np.ndarray | None, scale: np.ndarray,
                           threshold: float | None) -> np.ndarray:
        """(n,) mean over neighbours i of CDF_i(T / s_j): each query atom j has its own scale s_j."""
        if threshold is None:
            base = self.distributions_.fitted_threshold
            t = (np.asarray(base)[ids] if np.ndim(base) else np.full(ids.shape, float(base)))
        else:
            if not _finite_number(threshold) or threshold < 0:
                raise ValueError(f"threshold must be None or a finite number >= 0 (eV/Å); got {threshold!r}")
            t = np.full(ids.shape, float(threshold))
        t = t / scale[:, None]
        p = np.zeros(ids.shape, dtype=np.float64)
        p[valid] = self.distributions_.pair_confidence(ids[valid], t[valid])
        return np.clip(self._average(p, valid, w), 0.0, 1.0)

    # ------------------------------------------------------------------ species
    def check_species(self, atomic_numbers: Any) -> np.ndarray:
        """Atomic numbers in ``atomic_numbers`` never seen at fit (sorted); raises/warns per ``unknown_species``.

        Returns an empty array when ``species_`` was not recorded at fit.
        """
        self._check_fitted()
        z = np.asarray(atomic_numbers)
        if z.ndim != 1 or not np.issubdtype(z.dtype, np.integer):
            raise ValueError(f"atomic_numbers must be a 1-d integer array; got shape {z.shape}, dtype {z.dtype}")
        if self.species_ is None:
            return np.empty(0, dtype=np.int64)
        unseen = np.setdiff1d(np.unique(z), self.species_)
        if unseen.size:
            try:
                from ase.data import chemical_symbols  # lazy: the core stays free of ASE at import

                names = ", ".join(f"{chemical_symbols[int(v)]} (Z={int(v)})" for v in unseen)
            except (ImportError, IndexError):
                names = ", ".join(f"Z={int(v)}" for v in unseen)
            msg = (
                f"elements {names} never appear in the training set (trained on Z={self.species_.tolist()}); "
                "LTAU uncertainties for them are extrapolations"
            )
            if self.unknown_species == "raise":
                raise ValueError(msg)
            if self.unknown_species == "warn":
                warnings.warn(msg, stacklevel=2)
        return unseen

    # ------------------------------------------------------------------ scale
    def fit_scale(
        self,
        descriptors: Any,
        true_errors: Any,
        threshold: float | None = None,
        n_bins: int = 10,
        bounds: tuple[float, float] = (0.05, 100.0),
        convention: str = "threshold",
    ) -> dict[str, float]:
        """Choose the scaling factor s minimising the miscalibration area on a calibration set.

        Model (paper Sec. 4.1, App. D): test errors are s × training errors, so the probability of a
        test error ≤ T is the neighbours' training CDF at T / s. The k nearest neighbours are searched
        once; the miscalibration area (:func:`ltau_ase.core.calibration.miscalibration_area`) is
        evaluated on a 60-point log grid of s over ``bounds`` and refined with a bounded scalar
        minimisation around the best grid point (:func:`ltau_ase.core.calibration.search_scale`, shared
        with the committee's scale). Sets the learned ``scale_`` (``scale``, the user's prior, is left
        untouched; predict uses ``scale_`` when present).

        ``convention`` says at which T the model is calibrated:

        * ``"threshold"`` (default): T = threshold. Predicted: CDF at threshold / s; observed:
          true_error ≤ threshold. This calibrates exactly what ``predict(threshold=...)`` (or
          ``predict()`` with threshold = atol) returns afterwards.
        * ``"paper"``: T = threshold × s, as in the paper's Fig. 1c. Predicted: CDF at threshold
          (unchanged by s); observed: true_error ≤ threshold × s. After fitting,
          ``predict(threshold=threshold * s)`` gives those confidences.

        Args:
            descriptors: (n, D) calibration atoms' descriptors.
            true_errors: (n,) their true force-error norms (eV/Å).
            threshold: absolute threshold (eV/Å); None = ``atol_`` (with rtol > 0 pass it explicitly).
            n_bins: confidence bins of the miscalibration area.
            bounds: search interval of s.
            convention: ``"threshold"`` or ``"paper"`` (see above).
        Returns:
            dict(scale=s, before=miscalibration at the previous ``effective_scale``, after=at s).
        """
        from ltau_ase.core.calibration import miscalibration_area, search_scale

        self._check_fitted()
        dist, ids, valid = self._neighbours(descriptors)
        err = np.asarray(true_errors, dtype=np.float64)
        if err.shape != (ids.shape[0],):
            raise ValueError(f"true_errors has shape {err.shape}; expected ({ids.shape[0]},), one per descriptor row")
        if not np.all(np.isfinite(err)) or np.any(err < 0):
            raise ValueError("true_errors must be finite error norms >= 0 (eV/Å)")
        if threshold is None:
            if self.rtol > 0:
                raise ValueError("with rtol > 0, fit_scale needs an explicit absolute threshold (eV/Å)")
            threshold = self.atol_
        if not _finite_number(threshold) or threshold < 0:
            raise ValueError(f"threshold must be a finite number >= 0 (eV/Å); got {threshold!r}")
        if convention not in ("threshold", "paper"):
            raise ValueError(f"convention must be 'threshold' or 'paper'; got {convention!r}")
        lo, hi = (float(b) for b in bounds)
        if not (0 < lo < hi and math.isfinite(hi)):
            raise ValueError(f"bounds must satisfy 0 < low < high; got {bounds}")
        atoms, inverse = np.unique(ids, return_inverse=True)
        inverse = inverse.reshape(ids.shape)
        w = self._weights(dist, valid)

        if convention == "paper":
            fixed = self._average(self.distributions_.confidence(threshold, atoms=atoms)[inverse], valid, w)

        def miscal(s: float) -> float:
            if convention == "paper":
                return miscalibration_area(fixed, err, threshold * s, n_bins=n_bins)
            p = self.distributions_.confidence(threshold / s, atoms=atoms)
            return miscalibration_area(self._average(p[inverse], valid, w), err, threshold, n_bins=n_bins)

        res = search_scale(miscal, bounds=(lo, hi), n_grid=60, refine=True, current=self.effective_scale)
        self.scale_ = float(res["scale"])
        self._cache = None
        return {"scale": self.scale_, "before": float(res["before"]), "after": float(res["after"])}

    # ------------------------------------------------------------------ k on a calibration set
    def select_k(
        self,
        descriptors: Any,
        errors: Any,
        k_grid: Any = (1, 2, 5, 10, 20, 50),
        threshold: float | None = None,
    ) -> dict[int, float]:
        """Set k to the value of ``k_grid`` whose plain (paper-form) confidences have the lowest
        miscalibration area on a calibration set (ties: the smaller k), as the demo chooses k.

        One neighbour search with the largest k serves every candidate (the k nearest are a prefix of
        the K nearest). k-dependent learned state follows: ``k_eff_`` and the training reference
        distances (recomputed from the index's stored vectors; flat and hnsw indexes only). A previous
        :meth:`fit_calibration` depended on k and is dropped: calibrate after choosing k.

        Args:
            descriptors: (n, D) calibration descriptors; errors: (n,) their true force-error norms (eV/Å).
            k_grid: candidate k values (positive integers).
            threshold: absolute threshold (eV/Å); None = ``atol_``.
        Returns:
            {k: miscalibration area} for every candidate.
        """
        from ltau_ase.core.calibration import miscalibration_area

        self._check_fitted()
        x = as_float32(descriptors, "descriptors", self.n_features_in_)
        err = np.asarray(errors, dtype=np.float64)
        if err.shape != (x.shape[0],) or not np.all(np.isfinite(err)) or np.any(err < 0):
            raise ValueError(f"errors must be ({x.shape[0]},) finite force-error norms >= 0 (eV/Å); got shape {err.shape}")
        ks = sorted({int(k) for k in k_grid}) if len(k_grid) else []
        if not ks or ks[0] < 1:
            raise ValueError(f"k_grid must hold positive integers; got {k_grid!r}")
        if self.index == "ivfpq":
            raise ValueError("select_k needs a flat or hnsw index (the training vectors are recovered from it); "
                             "refit with the chosen k instead")
        t = self.atol_ if threshold is None else threshold
        if not _finite_number(t) or t < 0:
            raise ValueError(f"threshold must be a finite number >= 0 (eV/Å); got {threshold!r}")
        n_train = self.n_train_atoms_
        dist, ids, valid = self.index_.search(x, min(ks[-1], n_train))
        p_train = self.train_confidence(threshold)
        by_k: dict[int, float] = {}
        for k in ks:
            ke = min(k, n_train)
            v = valid[:, :ke]
            if np.any(v.sum(axis=1) == 0):
                raise RuntimeError(f"the {self.index} index found no neighbour for some atoms; raise efSearch")
            conf = self._average(p_train[ids[:, :ke]], v, self._weights(dist[:, :ke], v))
            by_k[k] = float(miscalibration_area(conf, err, float(t)))
        best = min(by_k, key=lambda k: (by_k[k], k))
        self.k = best
        self.k_eff_ = int(min(best, n_train))
        train_x = self.index_.index.reconstruct_n(0, n_train)
        self.train_distance_ref_ = reference_distances(self.index_, np.ascontiguousarray(train_x, dtype=np.float32),
                                                       self.k_eff_)
        for name in _CALIBRATION_ATTRS:
            self.__dict__.pop(name, None)
        self._cache = None
        return by_k

    # ------------------------------------------------------------------ distance-aware calibration
    def fit_calibration(
        self,
        descriptors: Any,
        errors: Any,
        atomic_numbers: Any = None,
        threshold: float | None = None,
        seed: int = 0,
        frame_ids: Any = None,
    ) -> "LTAUEstimator":
        """Fit the distance-aware scale, per-element factors and conformal bounds on a calibration set.

        Model (:mod:`ltau_ase.core.shift`): atom j's errors are s_j × its neighbours' training errors,
        s_j = c_{Z_j} · g(r_j), r_j = its mean neighbour distance over the median leave-one-out
        neighbour distance of the training atoms. The calibration atoms are split at random (``seed``)
        into two halves. On the first, g is the isotonic (non-decreasing) regression of |ΔF_j| / m_j
        on log r_j (m_j: the neighbours' mean logged error) with a power-law tail beyond the largest r,
        and c_Z the factor minimising the miscalibration area of the confidences at ``threshold``
        (shared search :func:`ltau_ase.core.calibration.search_scale`), per element with at least
        ``MIN_ELEMENT_ATOMS`` atoms in each half whose own factor also lowers the miscalibration of the
        element's atoms in the second half (a guard against factors fitted to a few correlated
        structures), else pooled. On the second half the nonconformity
        scores |ΔF_j| / (s_j m_j) give the split-conformal quantiles (Mondrian by element, same
        minimum count; :class:`ltau_ase.core.conformal.MondrianConformal`).

        In-domain data alone (e.g. the training runs' validation split) is enough: r then spans the
        training set's own neighbourhoods and the tail extrapolates. Passing the in-domain set
        concatenated with one milder shifted set refines g over a wider range of r.

        Args:
            descriptors: (n, D) calibration atoms' descriptors (same model as at fit), n >=
                ``MIN_CALIBRATION_ATOMS`` (200: 100 per half; see the module constant's comment).
            errors: (n,) their true force-error norms |F_model − F_ref| (eV/Å).
            atomic_numbers: (n,) atomic numbers, for the per-element factors and quantiles (None: pooled).
            threshold: absolute threshold T (eV/Å) at which confidences are calibrated; None = ``atol_``
                (with rtol > 0 pass it explicitly).
            seed: seed of the random halving.
            frame_ids: optional (n,) integer structure label of each atom; then whole structures go to
                one half (atoms of one structure have correlated errors, so an atom-level split would
                make the halves look more alike than new structures are). Recommended; the CLI does it.
        Returns:
            self, with ``distance_scale_``, ``pooled_factor_``, ``element_factor_z_``,
            ``element_factors_``, ``conformal_`` and ``calibration_info_`` set.
        """
        from ltau_ase.core.calibration import miscalibration_area, search_scale

        self._check_fitted()
        x = as_float32(descriptors, "descriptors", self.n_features_in_)
        n = x.shape[0]
        err = np.asarray(errors, dtype=np.float64)
        if err.shape != (n,):
            raise ValueError(f"errors has shape {err.shape}; expected ({n},), one force-error norm per descriptor row")
        if not np.all(np.isfinite(err)) or np.any(err < 0):
            raise ValueError("errors must be finite force-error norms >= 0 (eV/Å)")
        if n < MIN_CALIBRATION_ATOMS:
            raise ValueError(
                f"the calibration set has {n} atoms; fit_calibration needs at least {MIN_CALIBRATION_ATOMS}: half of "
                "them fit the distance scale and per-element factors, the other half the conformal quantiles, and "
                "with 100 conformal scores a 95 % bound is finite and at most ~1 % over-covering"
            )
        z = None if atomic_numbers is None else _check_atomic_numbers(atomic_numbers, n, "atomic_numbers")
        if threshold is None:
            if self.rtol > 0:
                raise ValueError("with rtol > 0, fit_calibration needs an explicit absolute threshold (eV/Å)")
            threshold = self.atol_
        if not _finite_number(threshold) or threshold <= 0:
            raise ValueError(f"threshold must be a finite number > 0 (eV/Å); got {threshold!r}")
        threshold = float(threshold)
        ref = getattr(self, "train_distance_ref_", None)
        if ref is None or ref.size == 0:
            raise ValueError("this estimator has no training-set reference distances (fitted by an older ltau-ase or "
                             "on a single atom); refit it with LTAUEstimator.fit to use fit_calibration")
        positive = ref[ref > 0]
        if positive.size == 0:
            raise ValueError("every training atom coincides with its neighbours in latent space (all leave-one-out "
                             "distances are 0), so no distance scale can be defined")
        reference_distance = float(np.median(positive))

        dist, ids, valid = self._neighbours(x)
        w = self._weights(dist, valid)
        mean_error = self._average(self.mean_error_train_[ids], valid, w)
        distance = np.where(valid, dist, 0.0).sum(axis=1) / valid.sum(axis=1)
        ratio = distance / reference_distance
        # an exact training match (r = 0) sits at the smallest positive ratio seen
        tiny = float(ratio[ratio > 0].min()) if np.any(ratio > 0) else 1e-6
        m_floor = max(float(mean_error.mean()) * 1e-6, 1e-12)
        m = np.maximum(mean_error, m_floor)
        rng = np.random.default_rng(seed)
        if frame_ids is None:
            order = rng.permutation(n)
            half_a, half_b = np.sort(order[: n // 2]), np.sort(order[n // 2 :])
        else:
            f = np.asarray(frame_ids)
            if f.shape != (n,) or not np.issubdtype(f.dtype, np.integer):
                raise ValueError(f"frame_ids must be ({n},) integers, one per descriptor row; got shape {f.shape}")
            frames = rng.permutation(np.unique(f))
            if frames.size < 2:
                raise ValueError("frame_ids name a single structure; the calibration needs at least two to split")
            in_a = np.isin(f, frames[: frames.size // 2])
            half_a, half_b = np.flatnonzero(in_a), np.flatnonzero(~in_a)
            if min(half_a.size, half_b.size) < MIN_CALIBRATION_ATOMS // 2:
                raise ValueError(f"splitting the {frames.size} structures in two gives {half_a.size} and {half_b.size} "
                                 f"atoms; each half needs at least {MIN_CALIBRATION_ATOMS // 2} (add structures)")

        g = DistanceScale.fit(np.maximum(ratio[half_a], tiny), err[half_a] / m[half_a])
        base = g(ratio)

        def miscal_of(rows: np.ndarray):
            sub_w = None if w is None else w[rows]

            def f(c: float) -> float:
                conf = self._scaled_confidence(ids[rows], valid[rows], sub_w, c * base[rows], threshold)
                return miscalibration_area(conf, err[rows], threshold)

            return f

        pooled = search_scale(miscal_of(half_a), bounds=(0.05, 20.0), n_grid=40, refine=True, current=1.0)
        elements, factors = [], []
        if z is not None:
            labels_a, counts_a = np.unique(z[half_a], return_counts=True)
            labels_b, counts_b = np.unique(z[half_b], return_counts=True)
            enough_b = set(labels_b[counts_b >= MIN_ELEMENT_ATOMS].tolist())
            for label in labels_a[counts_a >= MIN_ELEMENT_ATOMS]:
                if int(label) not in enough_b:
                    continue
                rows = half_a[z[half_a] == label]
                res = search_scale(miscal_of(rows), bounds=(0.05, 20.0), n_grid=40, refine=True,
                                   current=pooled["scale"])
                # Atoms of one structure are correlated, so an element seen in few structures can get a
                # factor that only fits them: keep it only if it also beats the pooled factor on the
                # element's atoms of the other half.
                check = miscal_of(half_b[z[half_b] == label])
                if check(res["scale"]) < check(pooled["scale"]):
                    elements.append(int(label))
                    factors.append(res["scale"])
        self.distance_scale_ = g
        self.pooled_factor_ = float(pooled["scale"])
        self.element_factor_z_ = np.asarray(elements, dtype=np.int64)
        self.element_factors_ = np.asarray(factors, dtype=np.float64)
        sigma_b = self._element_factors(None if z is None else z[half_b], half_b.size) * base[half_b] * m[half_b]
        scores = err[half_b] / sigma_b
        self.conformal_ = MondrianConformal(MIN_ELEMENT_ATOMS).fit(scores, None if z is None else z[half_b])
        self.calibration_info_ = {
            "reference_distance": reference_distance,
            "threshold": threshold,
            "n_atoms": int(n),
            "n_scale_atoms": int(half_a.size),
            "n_conformal_atoms": int(half_b.size),
            "ratio_range": [float(ratio.min()), float(ratio.max())],
            "miscalibration_before": float(pooled["before"]),
            "miscalibration_after": float(pooled["after"]),
            "seed": int(seed),
            "split": "atoms" if frame_ids is None else "structures",
        }
        return self

    # ------------------------------------------------------------------ persistence
    def save(self, path: str, compress: bool = False) -> None:
        """Write the fitted estimator to one ``.ltau`` file (npz; no pickle). See :mod:`ltau_ase.core.fileformat`."""
        self._check_fitted()
        params = self.get_params()
        params["window"] = None if self.window is None else EpochWindow.coerce(self.window).to_dict()
        bins = params["bins"]
        if bins is not None and not isinstance(bins, (int, np.integer)):
            params["bins"] = [bins[0], int(bins[1])] if isinstance(bins[0], str) else np.asarray(bins, float).tolist()
        elif bins is not None:
            params["bins"] = int(bins)
        params["k"], params["chunk_size"] = int(self.k), int(self.chunk_size)
        params["atol"] = None if self.atol is None else float(self.atol)
        params["rtol"], params["scale"] = float(self.rtol), float(self.scale)
        if self.index_params is not None:
            params["index_params"] = {str(k): int(v) for k, v in self.index_params.items()}
        metadata = dict(self.metadata or {})
        params.pop("metadata")
        dist_info, dist_arrays = self.distributions_.to_arrays()
        header = {
            "settings": params,
            "metadata": metadata,
            "learned": {
                "atol_": self.atol_,
                "n_features_in_": self.n_features_in_,
                "n_train_atoms_": self.n_train_atoms_,
                "k_eff_": self.k_eff_,
                "species_": None if self.species_ is None else self.species_.tolist(),
                "index_params_": self.index_.params,
                "fit_info_": self.fit_info_,
            },
            "distributions": dist_info,
        }
        if "scale_" in self.__dict__:
            header["learned"]["scale_"] = float(self.scale_)
        arrays = {name: getattr(self, name) for name in _LEARNED_ARRAYS}
        arrays["faiss_index"] = self.index_.to_bytes()
        if self.atom_ids_ is not None:
            arrays["atom_ids_"] = self.atom_ids_
        arrays.update({f"dist_{k}": v for k, v in dist_arrays.items()})
        if getattr(self, "train_distance_ref_", None) is not None:
            arrays["train_distance_ref_"] = self.train_distance_ref_
        if self.is_calibrated:
            header["calibration"], cal_arrays = self._calibration_to_arrays()
            arrays.update({f"cal_{k}": v for k, v in cal_arrays.items()})
        write_container(path, header, arrays, compress=compress)

    def _calibration_to_arrays(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {f"g_{k}": v for k, v in self.distance_scale_.to_arrays().items()}
        arrays.update({f"conformal_{k}": v for k, v in self.conformal_.to_arrays().items()})
        arrays["element_z"] = self.element_factor_z_
        arrays["element_factors"] = self.element_factors_
        info = {"pooled_factor_": self.pooled_factor_, "min_element_atoms": self.conformal_.min_count,
                "info": self.calibration_info_}
        return info, arrays

    def _calibration_from_arrays(self, info: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Restore fit_calibration's state; raises ValueError when anything is inconsistent."""
        g = DistanceScale.from_arrays({k[2:]: v for k, v in arrays.items() if k.startswith("g_")})
        conformal = MondrianConformal.from_arrays(
            int(info["min_element_atoms"]), {k[10:]: v for k, v in arrays.items() if k.startswith("conformal_")}
        )
        z = np.asarray(arrays["element_z"])
        factors = np.asarray(arrays["element_factors"], dtype=np.float64)
        pooled = float(info["pooled_factor_"])
        details = dict(info["info"])
        ref = float(details["reference_distance"])
        ok = (
            z.ndim == 1 and np.issubdtype(z.dtype, np.integer) and np.all(np.diff(z) > 0)
            and factors.shape == z.shape and np.all(np.isfinite(factors)) and np.all(factors > 0)
            and math.isfinite(pooled) and pooled > 0 and math.isfinite(ref) and ref > 0
        )
        if not ok:
            raise ValueError("the calibration's per-element factors or reference distance are malformed")
        self.distance_scale_, self.conformal_ = g, conformal
        self.element_factor_z_, self.element_factors_ = z.astype(np.int64), factors
        self.pooled_factor_, self.calibration_info_ = pooled, details

    @classmethod
    def load(cls, path: str) -> "LTAUEstimator":
        """Read an estimator written by :meth:`save`; never executes code from the file."""
        header, arrays = read_container(path)
        try:
            settings = dict(header["settings"])
            learned = header["learned"]
            est = cls(**settings, metadata=dict(header.get("metadata") or {}))
            est._check_params()
            n, d = int(learned["n_train_atoms_"]), int(learned["n_features_in_"])
            dist_arrays = {k[5:]: v for k, v in arrays.items() if k.startswith("dist_")}
            est.distributions_ = distributions_from_arrays(header["distributions"], dist_arrays)
            est.index_ = NeighbourIndex.from_bytes(arrays["faiss_index"], settings["index"], learned["index_params_"])
            for name in _LEARNED_ARRAYS:
                est.__dict__[name] = np.asarray(arrays[name], dtype=np.float64)
            est.atol_ = float(learned["atol_"])
            est.n_features_in_, est.n_train_atoms_ = d, n
            est.k_eff_ = int(learned["k_eff_"])
            est.species_ = None if learned["species_"] is None else np.asarray(learned["species_"], dtype=np.int64)
            est.atom_ids_ = arrays.get("atom_ids_")
            est.fit_info_ = learned.get("fit_info_", {})
            if "scale_" in learned:  # files before the scale_/scale split kept the fitted s in settings
                est.scale_ = float(learned["scale_"])
                _check_scale(est.scale_)
            ref = arrays.get("train_distance_ref_")
            if ref is not None:
                ref = np.asarray(ref, dtype=np.float64)
                if ref.ndim != 1 or ref.size > n or not np.all(np.isfinite(ref)) or np.any(ref < 0):
                    raise ValueError(f"{path} has malformed training reference distances")
            est.train_distance_ref_ = ref
            if "calibration" in header:
                try:
                    est._calibration_from_arrays(
                        header["calibration"], {k[4:]: v for k, v in arrays.items() if k.startswith("cal_")}
                    )
                except ValueError as exc:
                    raise ValueError(f"{path} has a malformed calibration: {exc}") from None
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"{path} is an ltau-ase estimator file with missing or malformed fields ({exc!r})") from None
        shapes_ok = (
            all(getattr(est, name).shape == (n,) for name in _LEARNED_ARRAYS)
            and est.index_.ntotal == n
            and est.index_.dim == d
            and est.distributions_.n_atoms == n
            and 1 <= est.k_eff_ <= n
        )
        if not shapes_ok:
            raise ValueError(f"{path} is inconsistent: its arrays, index and distributions disagree on N={n} or D={d}")
        est._cache = None
        est._warned_short = False
        return est


_CALIBRATION_ATTRS = (
    "distance_scale_",
    "pooled_factor_",
    "element_factor_z_",
    "element_factors_",
    "conformal_",
    "calibration_info_",
)


def _check_atomic_numbers(values: Any, n: int, name: str) -> np.ndarray:
    z = np.asarray(values)
    if z.shape != (n,) or not np.issubdtype(z.dtype, np.integer) or np.any(z < 1) or np.any(z > 118):
        raise ValueError(f"{name} must be ({n},) integers in [1, 118], one per descriptor row; got shape {z.shape}, "
                         f"dtype {z.dtype}")
    return z.astype(np.int64)


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(float(x))


def _check_scale(scale: Any) -> None:
    if not _finite_number(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0; got {scale!r}")
