"""LTAUEstimator: per-atom uncertainty of a test atom from its nearest training atoms (paper Algorithm 2).

Fitting turns the training atoms' logged error trajectories into per-atom error distributions
(Algorithm 1; :mod:`ltau_ase.core.distributions`) and indexes their latent descriptors with FAISS
(:mod:`ltau_ase.core.index`). A test atom's confidence is the mean, over its k nearest training atoms,
of their probability of an error ≤ threshold / scale (paper Sec. 4.1: the scaling factor s assumes
test errors are s × the training errors). Imports numpy, scipy, faiss and tqdm only.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Any

import numpy as np

from ltau_ase.core.distributions import (
    CompactDistributions,
    ExactDistributions,
    as_runs,
    default_atol,
    distributions_from_arrays,
    estimate_memory,
)
from ltau_ase.core.errorlog import EpochWindow
from ltau_ase.core.fileformat import read_container, write_container
from ltau_ase.core.index import INDEX_KINDS, NeighbourIndex, as_float32, resolve_params

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
    "max_memory",
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
            expected errors are s × the neighbours' mean errors. :meth:`fit_scale` sets it.
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
        max_memory: memory budget of :meth:`fit` in bytes (None: no check). A fit whose estimated
            peak (:meth:`estimate_fit_memory`) exceeds it raises ValueError before reading any
            error, with the estimate.
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
        max_memory: int | None = None,
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
        self.max_memory = max_memory

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
        if self.max_memory is not None and (not _finite_number(self.max_memory) or self.max_memory <= 0):
            raise ValueError(f"max_memory must be None or a number of bytes > 0; got {self.max_memory!r}")

    def estimate_fit_memory(self, n_atoms: int, n_features: int, n_epochs: Any) -> dict[str, int]:
        """Estimated peak resident bytes of :meth:`fit` with these parameters.

        Args:
            n_atoms: N training atoms; n_features: D; n_epochs: selected epochs of each of the M runs.
        Returns:
            bytes per part (``descriptors`` (N, D) float32 as passed to fit, ``distributions``
            kept, ``streaming`` temporaries while building them, ``learned`` per-atom arrays,
            ``index``, ``index_build`` temporaries) and ``peak``, the largest sum over the fit's
            phases (streaming the logs, then building the index). Error logs are streamed, never
            counted whole.
        """
        self._check_params()
        n, d = int(n_atoms), int(n_features)
        epochs = [int(e) for e in np.atleast_1d(n_epochs)]
        dist = estimate_memory(self.distribution, n, epochs, self.bins, int(self.chunk_size))
        p = resolve_params(self.index, self.index_params, n, d)
        if self.index == "flat":
            index, build = n * d * 4, 0
        elif self.index == "hnsw":
            index, build = n * (d * 4 + p["M"] * 2 * 4 + 16), 0  # level-0 links dominate the graph
        else:
            index = n * (p["m"] * p["nbits"] // 8 + 8) + p["nlist"] * d * 4
            build = p["train_size"] * d * 4
        part = {
            "descriptors": n * d * 4,
            "distributions": dist["distributions"],
            "streaming": dist["streaming"],
            "learned": 3 * n * 8 + 2 * len(epochs) * n * 8,  # 3 (N,) float64 + (M, N) temporaries
            "index": index,
            "index_build": build + n * d,  # + the finiteness mask of as_float32
        }
        part["peak"] = part["descriptors"] + part["distributions"] + max(
            part["streaming"], part["learned"], part["learned"] + part["index"] + part["index_build"]
        )
        return part

    def check_fit_memory(self, n_atoms: int, n_features: int, n_epochs: Any) -> None:
        """Raise ValueError, with the estimate, when a fit of this size would exceed ``max_memory``."""
        if self.max_memory is None:
            return
        n, runs = int(n_atoms), list(np.atleast_1d(n_epochs))
        est = self.estimate_fit_memory(n, n_features, runs)
        if est["peak"] > self.max_memory:
            parts = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in est.items() if k != "peak")
            raise ValueError(
                f"this fit needs about {est['peak'] / 1e9:.2f} GB ({parts} GB) for {n} atoms x {len(runs)} runs "
                f"with distribution={self.distribution!r}, index={self.index!r}, but max_memory is "
                f"{self.max_memory / 1e9:.2f} GB; use distribution='compact', index='ivfpq', fewer bins, "
                "or a larger budget"
            )

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
        self.check_fit_memory(n, d, [r.n_epochs for r in runs])
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

        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        atol = float(self.atol) if self.atol is not None else default_atol(runs)
        threshold: float | np.ndarray = atol if self.rtol == 0 else atol + float(self.rtol) * forces
        if self.distribution == "compact":
            dist = CompactDistributions.from_runs(
                runs, threshold, bins=self.bins, chunk_size=int(self.chunk_size), progress=bool(self.progress)
            )
        else:
            dist = ExactDistributions.from_runs(runs, threshold, chunk_size=int(self.chunk_size))
        seconds["distributions"] = time.perf_counter() - t0
        k_eff = int(min(self.k, n))
        if self.k > n:
            warnings.warn(f"k={self.k} exceeds the {n} training atoms; every prediction averages all {n}", stacklevel=2)

        self.atol_ = atol
        self.distributions_ = dist
        self.confidence_train_ = dist.confidence(threshold)
        self.variability_train_ = dist.std(threshold)
        self.mean_error_train_ = dist.mean_error()
        seconds["train_confidence"] = time.perf_counter() - t0 - seconds["distributions"]
        t1 = time.perf_counter()
        self.index_ = NeighbourIndex.build(x, self.index, self.index_params)
        seconds["index"] = time.perf_counter() - t1
        self.n_features_in_ = int(d)
        self.n_train_atoms_ = int(n)
        self.k_eff_ = k_eff
        self.species_ = species
        self.atom_ids_ = ids
        self.fit_info_ = {
            "n_runs": len(runs),
            "n_epochs": [r.n_epochs for r in runs],
            "window": None if self.window is None else EpochWindow.coerce(self.window).to_dict(),
            "seconds": seconds,  # wall time per stage of this fit
        }
        self._cache = None
        self._warned_short = False
        return self

    # ------------------------------------------------------------------ predict
    def _check_fitted(self) -> None:
        if not hasattr(self, "index_"):
            raise ValueError("this LTAUEstimator is not fitted yet; call fit(descriptors, errors) or LTAUEstimator.load(path)")

    def _threshold_key(self, threshold: Any) -> tuple[str, float]:
        if threshold is None:
            return ("fitted", float(self.scale))
        if not _finite_number(threshold) or threshold < 0:
            raise ValueError(f"threshold must be None or a finite number >= 0 (eV/Å); got {threshold!r}")
        return (repr(float(threshold)), float(self.scale))

    def train_confidence(self, threshold: float | None = None) -> np.ndarray:
        """(N,) each training atom's µ_M probability of an error ≤ threshold / scale (cached).

        threshold=None means the fitted per-atom threshold (atol + rtol·|F_ref,i|).
        """
        self._check_fitted()
        _check_scale(self.scale)
        key = self._threshold_key(threshold)
        if getattr(self, "_cache", None) is not None and self._cache[0] == key:
            return self._cache[1]
        if threshold is None and self.scale == 1:
            p = self.confidence_train_
        else:
            base = self.distributions_.fitted_threshold if threshold is None else float(threshold)
            p = self.distributions_.confidence(np.asarray(base, dtype=np.float64) / float(self.scale))
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

    def predict(self, descriptors: Any, threshold: float | None = None) -> dict[str, np.ndarray]:
        """Uncertainties of n atoms.

        Args:
            descriptors: (n, D) latent descriptors from the same model as at fit.
            threshold: absolute error threshold (eV/Å); None = the fitted atol (+ rtol·|F_ref|).
        Returns:
            dict of (n,) float64: ``confidence`` (mean over the k nearest training atoms of their
            probability of an error ≤ threshold / scale), ``uncertainty`` (1 − confidence),
            ``expected_error`` (scale × mean of the neighbours' mean logged errors, eV/Å; scale = 1
            gives the plain mean) and ``distance`` (mean Euclidean latent distance to the neighbours).
            With ``weights="distance"`` confidence and expected_error are inverse-distance weighted.
        """
        dist, ids, valid = self._neighbours(descriptors)
        p_train = self.train_confidence(threshold)
        w = self._weights(dist, valid)
        confidence = self._average(p_train[ids], valid, w)
        expected = float(self.scale) * self._average(self.mean_error_train_[ids], valid, w)
        distance = np.where(valid, dist, 0.0).sum(axis=1) / valid.sum(axis=1)
        return {
            "confidence": confidence,
            "uncertainty": 1.0 - confidence,
            "expected_error": expected,
            "distance": distance,
        }

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
        minimisation around the best grid point. Sets ``self.scale``.

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
            dict(scale=s, before=miscalibration at the previous scale, after=at s).
        """
        from scipy.optimize import minimize_scalar

        from ltau_ase.core.calibration import miscalibration_area

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

        before = miscal(float(self.scale))
        grid = np.geomspace(lo, hi, 60)
        values = np.array([miscal(float(s)) for s in grid])
        i = int(np.argmin(values))
        best_s, best_v = float(grid[i]), float(values[i])
        res = minimize_scalar(
            lambda ls: miscal(float(np.exp(ls))),
            bounds=(math.log(grid[max(i - 1, 0)]), math.log(grid[min(i + 1, grid.size - 1)])),
            method="bounded",
            options={"xatol": 1e-3},
        )
        if res.success and float(res.fun) < best_v:
            best_s, best_v = float(np.exp(res.x)), float(res.fun)
        if before <= best_v:  # the current scale is already at least as good: keep it
            best_s, best_v = float(self.scale), before
        self.scale = best_s
        self._cache = None
        return {"scale": best_s, "before": float(before), "after": float(best_v)}

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
        params["max_memory"] = None if self.max_memory is None else int(self.max_memory)
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
        arrays = {name: getattr(self, name) for name in _LEARNED_ARRAYS}
        arrays["faiss_index"] = self.index_.to_bytes()
        if self.atom_ids_ is not None:
            arrays["atom_ids_"] = self.atom_ids_
        arrays.update({f"dist_{k}": v for k, v in dist_arrays.items()})
        write_container(path, header, arrays, compress=compress)

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


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(float(x))


def _check_scale(scale: Any) -> None:
    if not _finite_number(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0; got {scale!r}")
