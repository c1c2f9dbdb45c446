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
import time
import warnings
from typing import Any

import numpy as np

from ltau_ase.core.checks import check_int, check_number, is_finite_number, is_integer
from ltau_ase.core.distributions import (
    CompactDistributions,
    ExactDistributions,
    as_runs,
    default_atol,
    distributions_from_arrays,
    estimate_memory,
    make_edges,
)
from ltau_ase.core.errorlog import EpochWindow
from ltau_ase.core.fileformat import EAGER_BYTES, LEGACY_NPZ_VERSION, read_container, write_container
from ltau_ase.core.index import HNSW_QUANTIZER_NLIST, INDEX_CHOICES, NeighbourIndex, as_float32, choose_index, resolve_params
from ltau_ase.core.conformal import MondrianConformal, check_coverage
from ltau_ase.core.shift import (
    MAX_TAIL_EXPONENT,
    REFERENCE_RULES,
    REFERENCE_SAMPLE,
    DistanceScale,
    reference_distances,
    structure_ratios,
)

# fit_calibration splits the calibration atoms in two halves: one fits the distance scale g and the
# per-element factors, the other gives the conformal scores (split conformal needs scores the
# normaliser never saw). 200 atoms = 100 per half: a 95 % bound is finite from 19 scores on, and with
# 100 scores the coverage overshoots the nominal one by at most 1/101 (about 1 %).
MIN_CALIBRATION_ATOMS = 200
# With ``frame_ids`` the halves are split by structure, and atoms of one structure share their errors
# (same geometry, same model error pattern), so a half's effective sample size is nearer its number of
# structures than its number of atoms: 20 structures = 10 per half, below which one structure can move
# the fitted scale and the conformal quantile by itself.
MIN_CALIBRATION_STRUCTURES = 20
# An element gets its own factor and conformal quantile from this many atoms per half; fewer use the
# pooled ones (a 95 % conformal quantile from < 50 scores moves by several % between draws).
MIN_ELEMENT_ATOMS = 50
# ... and, with ``frame_ids``, its own conformal quantile only from this many structures per half (the
# per-half minimum of structures above): a new structure is exchangeable with calibration structures,
# not with their atoms. In the shift benchmark a metal's quantile came from 1-3 slabs (Ni's from one:
# 72 atoms). Element factors keep the atom minimum: each is already checked on the other half's atoms,
# and there the Pd factor from 3 slabs lowered the in-domain test miscalibration (0.042 against 0.070).
MIN_ELEMENT_STRUCTURES = MIN_CALIBRATION_STRUCTURES // 2
# The structure scale h(R) of the conformal bounds (``fit_calibration(structure_index=...)``) is isotonic
# in the structure ratio R inside the calibration range; beyond it a power law R^α continues it, α from
# the binned calibration scores, clipped to [0, this] (0 would keep h flat past the largest calibration R).
# h is a DistanceScale like g: the same cap (its own name so that a study can fit h with a flat tail).
STRUCTURE_MAX_EXPONENT = MAX_TAIL_EXPONENT
# The default epoch window: the last half of the logged epochs (see the ``window`` argument).
LAST_HALF = "last_half"

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
#: parameters whose learned state (the error distributions) needs the training logs to recompute
_REFIT_PARAMS = ("atol", "rtol", "distribution", "bins", "window")
#: largest k accepted (each query allocates k neighbours; the paper uses k ≈ 10)
MAX_K = 4096


#: what happens to atoms of elements never seen at fit (see ``LTAUEstimator(unknown_species=...)``)
UNKNOWN_SPECIES_POLICIES = ("raise", "flag", "ignore")
#: earlier names kept working: the estimator's "warn" (now "flag", still warning)
UNKNOWN_SPECIES_ALIASES = {"warn": "flag"}


def unknown_species_policy(value: Any) -> str:
    """The canonical policy (one of :data:`UNKNOWN_SPECIES_POLICIES`) of ``value`` or its alias."""
    canonical = UNKNOWN_SPECIES_ALIASES.get(value, value) if isinstance(value, str) else value
    if canonical not in UNKNOWN_SPECIES_POLICIES:
        raise ValueError(f"unknown_species must be one of {UNKNOWN_SPECIES_POLICIES} (alias 'warn' = 'flag'); "
                         f"got {value!r}")
    return canonical


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
            (or an ErrorLog's own window); ``"last_half"`` (default) keeps the last ⌈E/2⌉ of the E
            logged epochs (E: the shortest run). Early epochs of a still-improving model inflate the
            training error distributions, so all-epoch confidences are under-confident in domain:
            miscalibration on in-domain test atoms 0.057 (all 12 epochs) vs 0.019 (last 6) on the
            demo's full data, 0.059 vs 0.057 on its quick data (16 epochs), 0.23 vs 0.08 in the
            molecular study of issue 11.
        unknown_species: the policy for atoms of elements never seen at fit (needs
            ``atomic_numbers`` at fit), applied by :meth:`predict` when it gets atomic numbers and
            by :meth:`check_species` (:data:`UNKNOWN_SPECIES_POLICIES`): ``"raise"`` refuses them
            (ValueError naming the elements), because the error distributions say nothing about
            them; ``"flag"`` reports them as maximally uncertain (uncertainty 1, confidence 0,
            expected error NaN; latent distance still computed) and lists them in the result
            ``unknown_species``; ``"ignore"`` leaves them to the latent-distance lookup alone.
            ``"warn"`` (the earlier name) is an alias of ``"flag"`` that also warns.
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
        window: EpochWindow | dict | tuple | str | None = "last_half",
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
        """Set parameters; on a fitted estimator each change takes effect or is refused, never ignored.

        After fit: ``k`` (query time) takes effect at once (k_eff_ = min(k, N); a calibration fitted at another
        k then refuses distance-aware predictions, :meth:`check_calibration`); ``index`` /
        ``index_params`` change the index in place when only search-time settings change (efSearch,
        nprobe, refine), else rebuild it from the stored training vectors (ValueError when the index
        keeps none: ivfpq with refine=0); ``weights``, ``scale``, ``unknown_species``, ``metadata``
        act at query / save time; ``chunk_size`` and ``progress`` only affect fitting. ``atol``,
        ``rtol``, ``distribution``, ``bins`` and ``window`` shape the fitted error distributions,
        which need the training error logs: changing them marks the estimator stale, and predict /
        save raise until ``fit`` is called again (or the old values are set back).
        Invalid values raise ValueError and leave the estimator unchanged.
        """
        for name in params:
            if name not in _PARAM_NAMES:
                raise ValueError(f"unknown parameter {name!r}; expected one of {_PARAM_NAMES}")
        old = {name: getattr(self, name) for name in params}
        for name, value in params.items():
            setattr(self, name, value)
        try:
            self._check_params()
            if hasattr(self, "index_"):
                if "index" in params or "index_params" in params:
                    index = self.index_.with_params(self.index, self.index_params)
                else:
                    index = self.index_
                self.index_ = index
                self.k_eff_ = int(min(self.k, self.n_train_atoms_))
                if self.k > self.n_train_atoms_ and "k" in params:
                    warnings.warn(f"k={self.k} exceeds the {self.n_train_atoms_} training atoms; every prediction averages all of them", stacklevel=2)
        except Exception:
            for name, value in old.items():
                setattr(self, name, value)
            raise
        self._cache = None
        return self

    def _stale_params(self) -> list[str]:
        """Fit-time parameters changed since fit/load (their learned state would be out of date)."""
        fitted = self.__dict__.get("_fitted_settings")
        if fitted is None:
            return []
        now = _settings_snapshot(self)
        return [name for name in _REFIT_PARAMS if now[name] != fitted[name]]

    def _check_params(self) -> None:
        check_int(self.k, "k")
        if self.k > MAX_K:
            raise ValueError(f"k must be at most {MAX_K}; got {self.k}")
        if not isinstance(self.index, str) or self.index not in INDEX_CHOICES:
            raise ValueError(f"index must be one of {INDEX_CHOICES}; got {self.index!r}")
        if self.index_params is not None and not isinstance(self.index_params, dict):
            raise ValueError(f"index_params must be a dict or None; got {self.index_params!r}")
        if self.index == "auto" and self.index_params:
            raise ValueError("index_params need an explicit index kind (flat, hnsw or ivfpq), not 'auto'")
        if self.weights not in ("uniform", "distance"):
            raise ValueError(f"weights must be 'uniform' or 'distance'; got {self.weights!r}")
        if self.distribution not in ("compact", "exact"):
            raise ValueError(f"distribution must be 'compact' or 'exact'; got {self.distribution!r}")
        unknown_species_policy(self.unknown_species)
        check_number(self.atol, "atol", minimum=0, unit="eV/Å", allow_none=True)
        check_number(self.rtol, "rtol", minimum=0)
        _check_scale(self.scale)
        check_int(self.chunk_size, "chunk_size")
        if self.max_memory is not None and (not _finite_number(self.max_memory) or self.max_memory <= 0):
            raise ValueError(f"max_memory must be None or a number of bytes > 0; got {self.max_memory!r}")
        if isinstance(self.window, str) and self.window != LAST_HALF:
            raise ValueError(f"window must be {LAST_HALF!r}, None (all epochs), an EpochWindow, a dict or a "
                             f"(skip, last) tuple; got {self.window!r}")
        try:
            if not (isinstance(self.window, str) and self.window == LAST_HALF):  # resolved at fit
                EpochWindow.coerce(self.window)
            if self.bins is not None:
                make_edges(self.bins, 1e-3, 1.0)  # validates the bins setting only
        except (TypeError, IndexError) as exc:
            raise ValueError(f"invalid window or bins setting: {exc}") from None

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
        kind = choose_index(n)[0] if self.index == "auto" else self.index
        p = resolve_params(kind, self.index_params, n, d)
        # The index is built over the fit's float32 descriptors without a copy: flat and ivfpq with
        # re-ranking keep that very array as their full vectors (counted once, under "descriptors");
        # hnsw copies them into its graph storage.
        if kind == "flat":
            index, build = 0, 0
        elif kind == "hnsw":
            index, build = n * (d * 4 + p["M"] * 2 * 4 + 16), 0  # level-0 links dominate the graph
        else:
            index = n * (p["m"] * p["nbits"] // 8 + 8) + p["nlist"] * d * 4
            if p["nlist"] > HNSW_QUANTIZER_NLIST:
                index += p["nlist"] * 32 * 2 * 4  # the coarse quantizer's HNSW links (M = 32)
            build = p["train_size"] * d * 4
        part = {
            "descriptors": n * d * 4,  # float32, as passed to fit (other dtypes: converted, a second array)
            "distributions": dist["distributions"],
            "streaming": dist["streaming"],
            "learned": 3 * n * 8 + 2 * len(epochs) * n * 8,  # 3 (N,) float64 + (M, N) temporaries
            "index": index,
            "index_build": build,
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
                f"{self.max_memory / 1e9:.2f} GB; shrink the largest parts (compact distributions with fewer "
                "bins, a compressed index: ivfpq) or raise the budget"
            )

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        descriptors: Any,
        errors: Any,
        reference_forces: Any = None,
        atomic_numbers: Any = None,
        atom_ids: Any = None,
        groups: Any = None,
    ) -> "LTAUEstimator":
        """Fit on N training atoms.

        Args:
            descriptors: (N, D) latent descriptors, row i = training atom i. When they are already a
                C-contiguous float32 array (or memory map) the fitted index keeps this very array as its
                full vectors (flat; ivfpq with re-ranking), as scikit-learn's neighbour estimators do:
                no second N·D·4 bytes, so do not modify it after fit (pass a copy if you must).
            errors: force-error norms (eV/Å): (E, N), (M, E, N), a list of M (E_m, N) arrays, an
                :class:`~ltau_ase.core.errorlog.ErrorLog` or a list of them. Error logs order atoms
                by sorted atom id: descriptors must come in that same order.
            reference_forces: (N,) |F_ref,i| (eV/Å), required when rtol > 0.
            atomic_numbers: (N,) atomic numbers; records ``species_`` for :meth:`check_species`.
            atom_ids: (N,) ids of the descriptor rows; checked against the error logs' ids (never
                used to reorder).
            groups: optional (N,) integer structure group of each training atom (e.g. the system, MD
                run or relaxation its frame comes from; at least 2 groups). The reference distance of
                the distance ratio (``fit_calibration``) then comes from neighbours in *other* groups
                (leave one group out, :func:`ltau_ase.core.shift.reference_distances`), so frames
                that are near-duplicates of each other do not shrink it; kept as ``train_groups_``
                and saved. None: every other training atom counts (``reference_rule_ = "atoms"``).
        Returns:
            self
        """
        self._check_params()
        x = as_float32(descriptors, "descriptors")
        n, d = x.shape
        window = self.resolve_window(errors)
        runs = as_runs(errors, window)
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
        train_groups = None
        if groups is not None:
            train_groups = _check_groups(groups, n)
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
        # no copy: the index's full vectors (flat; ivfpq re-ranking) are the fit's float32 descriptors
        self.index_ = NeighbourIndex.build(x, self.index, self.index_params, copy=False)
        seconds["index"] = time.perf_counter() - t1
        # each training atom's leave-one-out neighbour distance: the yardstick of "far" for fit_calibration
        self.train_groups_ = train_groups
        self.reference_rule_ = "atoms" if train_groups is None else "groups"
        self.train_distance_ref_ = reference_distances(self.index_, x, k_eff, groups=train_groups)
        self.n_features_in_ = int(d)
        self.n_train_atoms_ = int(n)
        self.k_eff_ = k_eff
        self.species_ = species
        self.atom_ids_ = ids
        self._fitted_settings = _settings_snapshot(self)
        self.fit_info_ = {
            "n_runs": len(runs),
            "n_epochs": [r.n_epochs for r in runs],
            "window": None if window is None else window.to_dict(),
            "window_policy": self.window if isinstance(self.window, str) else None,
            "seconds": seconds,  # wall time per stage of this fit
        }
        for name in _CALIBRATION_ATTRS + ("scale_",):
            self.__dict__.pop(name, None)  # a refit invalidates earlier calibrations
        self._cache = None
        self._warned_short = False
        return self

    def resolve_window(self, errors: Any) -> EpochWindow | None:
        """The EpochWindow this estimator's ``window`` selects from ``errors`` (None: all epochs).

        ``"last_half"`` becomes the last ⌈E/2⌉ epochs of the shortest of the runs in ``errors`` (any
        form :meth:`fit` accepts, ErrorLogs included).
        """
        if isinstance(self.window, str) and self.window != LAST_HALF:
            raise ValueError(f"window must be {LAST_HALF!r}, None (all epochs), an EpochWindow, a dict or a "
                             f"(skip, last) tuple; got {self.window!r}")
        if self.window != LAST_HALF:
            return None if self.window is None else EpochWindow.coerce(self.window)
        n_epochs = min(run.n_epochs for run in as_runs(errors, None))
        return EpochWindow(last=max(1, math.ceil(n_epochs / 2)))

    # ------------------------------------------------------------------ predict
    def _check_fitted(self) -> None:
        if not hasattr(self, "index_"):
            raise ValueError("this LTAUEstimator is not fitted yet; call fit(descriptors, errors) or LTAUEstimator.load(path)")
        stale = self._stale_params()
        if stale:
            raise ValueError(
                f"parameters {stale} changed after fit; they shape the fitted error distributions, which need the "
                "training error logs: call fit(...) again (or set them back)"
            )

    @property
    def effective_scale(self) -> float:
        """The paper's s used by predict without a calibration: fitted ``scale_`` if present, else ``scale``."""
        return float(self.__dict__["scale_"]) if "scale_" in self.__dict__ else float(self.scale)

    @property
    def is_calibrated(self) -> bool:
        """True after :meth:`fit_calibration` (or loading a file that holds one)."""
        return "distance_scale_" in self.__dict__

    def check_calibration(self) -> None:
        """Raise ValueError when the calibration no longer holds: ``set_params(k=...)`` after :meth:`fit_calibration`.

        The calibration's distance ratios, scales g and h and conformal quantiles were fitted on mean distances
        to ``calibration_info_["k"]`` neighbours; at another k the distances shift (fewer neighbours: nearer)
        and the bounds lose their coverage. Files calibrated before the k was recorded are not checked.
        """
        fitted_k = self.calibration_info_.get("k")
        if fitted_k is not None and fitted_k != self.k_eff_:
            raise ValueError(f"the calibration was fitted with k={fitted_k} neighbours and k is now {self.k_eff_}: its "
                             "distance scale and error bounds do not hold at another k; set k back "
                             f"(set_params(k={fitted_k})), call fit_calibration again, or predict with "
                             "distance_aware=False")

    @property
    def structure_scale_(self) -> DistanceScale | None:
        """h(R) of a structure-aware calibration (``fit_calibration(structure_index=...)``), else None."""
        return self.__dict__.get("_structure_scale")

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
        dist, ids, valid = self.index_.search_checked(x, self.k_eff_)
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
        atomic_numbers: Any = None,
        unknown_species: str | None = None,
        coverage: float | None = None,
        distance_aware: bool = True,
        structure_index: Any = None,
    ) -> dict[str, np.ndarray]:
        """Uncertainties of n atoms.

        Args:
            descriptors: (n, D) latent descriptors from the same model as at fit.
            threshold: absolute error threshold (eV/Å); None = the fitted atol (+ rtol·|F_ref|).
            atomic_numbers: (n,) atomic numbers of the atoms; given, atoms of elements never seen at
                fit are treated by the ``unknown_species`` policy (raise, flag or ignore), and a
                calibrated estimator uses its per-element factors and conformal quantiles (without:
                the pooled ones).
            unknown_species: overrides the estimator's policy for this call (None: keep it).
            coverage: q in (0, 1): add ``error_bound``, the split-conformal per-atom bound (eV/Å) with
                P(|ΔF| ≤ bound) ≥ q on data exchangeable with the calibration set (needs
                :meth:`fit_calibration`).
            distance_aware: with False a calibrated estimator predicts as the paper does (one scale,
                ``effective_scale``), ignoring its calibration.
            structure_index: (n,) integers in [0, n), the structure (frame) each atom belongs to (one
                structure: ``np.zeros(n, int)``; ``LTAUCalculator`` passes that). Needed for
                ``coverage`` when the estimator was calibrated with ``structure_index`` (a structure-aware
                bound: σ_j × h(R_f), R_f the geometric mean distance ratio of atom j's structure f);
                validated and otherwise unused.
        Returns:
            dict of (n,) float64: ``confidence`` (mean over the k nearest training atoms of their
            probability of an error ≤ threshold / s), ``uncertainty`` (1 − confidence),
            ``expected_error`` (s × mean of the neighbours' mean logged errors, eV/Å) and ``distance``
            (mean Euclidean latent distance to the neighbours). s is ``effective_scale`` or, when
            calibrated, the per-atom distance-aware s_j = c_Z · g(r_j); then ``distance_ratio`` (r_j,
            the distance over the training set's median leave-one-out distance) and ``scale`` (s_j)
            are added, and ``error_bound`` when ``coverage`` is given. With ``weights="distance"``
            confidence and expected_error are inverse-distance weighted. With ``atomic_numbers``,
            also ``unknown_species``: (n,) bool, the atoms of unseen elements (all False unless the
            policy is ``"flag"``), whose uncertainty is 1, confidence 0, expected error and error
            bound NaN, and (calibrated) distance ratio and scale +inf: the species-aware reading,
            in which an element absent from training is infinitely far from it. With a structure-aware
            calibration and ``structure_index``: ``structure_ratio`` (R_f of each atom's structure) and
            ``structure_scale`` (h(R_f)), and ``error_bound`` = quantile × h × s_j × mean error. Atoms of
            unseen elements flagged under ``"flag"`` do not enter R_f (their latent distance means nothing;
            the seen atoms keep finite bounds); a structure of only such atoms has R_f = h = +inf.
        Raises:
            ValueError: an unseen element under the ``"raise"`` policy (before any search); a
                ``structure_index`` of the wrong shape, dtype or range; ``coverage`` on a structure-aware
                estimator without ``structure_index``.
        """
        if coverage is not None:
            coverage = check_coverage(coverage)
        unknown = None
        if atomic_numbers is not None:
            unknown = self.unknown_atoms(atomic_numbers, unknown_species)
        dist, ids, valid = self._neighbours(descriptors)
        n = ids.shape[0]
        if unknown is not None and unknown.shape != (n,):
            raise ValueError(f"atomic_numbers has {unknown.size} entries for {n} descriptor rows; "
                             "expected one per atom")
        z = None if atomic_numbers is None else _check_atomic_numbers(atomic_numbers, n, "atomic_numbers")
        structures = None if structure_index is None else check_structure_index(structure_index, n)
        w = self._weights(dist, valid)
        mean_error = self._average(self.mean_error_train_[ids], valid, w)
        distance = np.where(valid, dist, 0.0).sum(axis=1) / valid.sum(axis=1)
        calibrated = self.is_calibrated and distance_aware
        if coverage is not None and not calibrated:
            raise ValueError("coverage needs a calibrated estimator: call fit_calibration(descriptors, errors) first"
                             if not self.is_calibrated else "coverage needs distance_aware=True")
        if calibrated:
            self.check_calibration()
        structure_scale = self.structure_scale_ if calibrated else None
        if coverage is not None and structure_scale is not None and structures is None:
            raise ValueError("this estimator's error bounds are structure-aware (calibrated with structure_index): "
                             f"pass structure_index, ({n},) integers naming each atom's structure "
                             "(one structure: numpy.zeros(n, dtype=int))")
        if not calibrated:
            p_train = self.train_confidence(threshold)
            confidence = self._average(p_train[ids], valid, w)
            out = {
                "confidence": confidence,
                "uncertainty": 1.0 - confidence,
                "expected_error": self.effective_scale * mean_error,
                "distance": distance,
            }
        else:
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
            sigma = scale * mean_error
            if structure_scale is not None and structures is not None:
                # R_f over the structure's atoms of seen elements (structure_ratios: why); +inf, like their
                # distance ratio, for a structure whose every atom is of an unseen element
                big_r = structure_ratios(ratio, structures, float(self.calibration_info_["structure"]["ratio_floor"]),
                                         include=None if unknown is None else ~unknown)
                h_of_r = np.full(n, np.inf)
                defined = np.isfinite(big_r)
                h_of_r[defined] = structure_scale(big_r[defined])
                out["structure_ratio"], out["structure_scale"] = big_r, h_of_r
                sigma = sigma * h_of_r
            if coverage is not None:
                q = (self.conformal_.quantile_for(z, coverage) if z is not None
                     else np.full(n, self.conformal_.quantiles(coverage)[1]))
                out["error_bound"] = q * sigma
        if unknown is not None:
            out["confidence"][unknown] = 0.0
            out["uncertainty"][unknown] = 1.0
            out["expected_error"][unknown] = np.nan
            if "error_bound" in out:
                out["error_bound"][unknown] = np.nan
            if "distance_ratio" in out:
                # no training neighbourhood of this element exists: infinitely far, unbounded scale
                out["distance_ratio"][unknown] = np.inf
                out["scale"][unknown] = np.inf
            out["unknown_species"] = unknown
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
        """Atomic numbers in ``atomic_numbers`` never seen at fit (sorted).

        Raises ValueError naming them under the ``"raise"`` policy (warns under ``"warn"``);
        returns an empty array when ``species_`` was not recorded at fit.
        """
        return self._unseen(atomic_numbers, self.unknown_species)[0]

    def unknown_atoms(self, atomic_numbers: Any, unknown_species: str | None = None) -> np.ndarray:
        """(n,) bool: the atoms to report as unknown under the policy (estimator's, or the override).

        ``"raise"``: ValueError when any element is unseen; ``"flag"``: the atoms of unseen elements;
        ``"ignore"`` (or no ``species_`` recorded): all False.
        """
        policy = self.unknown_species if unknown_species is None else unknown_species
        unseen, z = self._unseen(atomic_numbers, policy)
        if unknown_species_policy(policy) != "flag" or not unseen.size:
            return np.zeros(z.shape, dtype=bool)
        return np.isin(z, unseen)

    def _unseen(self, atomic_numbers: Any, policy: str) -> tuple[np.ndarray, np.ndarray]:
        canonical = unknown_species_policy(policy)
        self._check_fitted()
        z = np.asarray(atomic_numbers)
        if z.ndim != 1 or not np.issubdtype(z.dtype, np.integer):
            raise ValueError(f"atomic_numbers must be a 1-d integer array; got shape {z.shape}, dtype {z.dtype}")
        if self.species_ is None:
            return np.empty(0, dtype=np.int64), z
        unseen = np.setdiff1d(np.unique(z), self.species_)
        if unseen.size and (canonical == "raise" or policy == "warn"):
            try:
                from ase.data import chemical_symbols  # lazy: the core stays free of ASE at import

                names = ", ".join(f"{chemical_symbols[int(v)]} (Z={int(v)})" for v in unseen)
            except (ImportError, IndexError):
                names = ", ".join(f"Z={int(v)}" for v in unseen)
            msg = (
                f"elements {names} never appear in the training set (trained on Z={self.species_.tolist()}); "
                "LTAU uncertainties for them are extrapolations"
            )
            if canonical == "raise":
                raise ValueError(msg + "; use unknown_species='flag' to mark those atoms as maximally uncertain "
                                 "instead, or 'ignore' to judge them by their latent neighbours alone")
            warnings.warn(msg, stacklevel=3)
        return unseen, z

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
        distances (recomputed from the index's stored vectors). A previous
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
        train_x = self.index_.training_vectors()
        if train_x is None:
            raise ValueError("select_k needs an index that keeps the training vectors (flat, hnsw, or ivfpq with "
                             "refine > 0) to recompute the reference distances; refit with the chosen k instead")
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
        self.train_distance_ref_ = reference_distances(self.index_, np.ascontiguousarray(train_x, dtype=np.float32),
                                                       self.k_eff_, groups=getattr(self, "train_groups_", None))
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
        structure_index: Any = None,
    ) -> "LTAUEstimator":
        """Fit the distance-aware scale, per-element factors and conformal bounds on a calibration set.

        Model (:mod:`ltau_ase.core.shift`): atom j's errors are s_j × its neighbours' training errors,
        s_j = c_{Z_j} · g(r_j), r_j = its mean neighbour distance over the median leave-one-out
        neighbour distance of the training atoms (leave one structure group out when fitted with
        ``groups``; ``calibration_info_["reference_rule"]``). The calibration atoms are split at random (``seed``)
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
            frame_ids: optional (n,) integer structure label of each atom (at least
                ``MIN_CALIBRATION_STRUCTURES`` = 20 distinct structures); then whole structures go to
                one half (atoms of one structure have correlated errors, so an atom-level split would
                make the halves look more alike than new structures are), and an element gets its own
                conformal quantile only from at least ``MIN_ELEMENT_STRUCTURES`` structures per half.
                Recommended; the CLI does it.
            structure_index: optional (n,) integers in [0, n), the structure (frame: what one
                calculator call sees) of each atom, at least ``MIN_CALIBRATION_STRUCTURES`` of them.
                Given, the conformal bounds become structure-aware: each atom's σ_j = s_j m_j is
                multiplied by h(R_f), R_f the geometric mean distance ratio of its structure
                (:func:`ltau_ase.core.shift.structure_ratios`) and h the monotone scale
                (:class:`ltau_ase.core.shift.DistanceScale`, tail exponent at most
                ``STRUCTURE_MAX_EXPONENT``) fitted on the first half's scores |ΔF_j| / σ_j, normalised
                to mean 1 over those atoms; the second half's scores |ΔF_j| / (σ_j h(R_f)) give the
                quantiles. ``predict`` then needs ``structure_index`` for ``coverage``. Without
                ``frame_ids`` the halves are split by these structures. Confidences and expected errors
                are unchanged (h enters the bounds only).
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
        structures = None
        if structure_index is not None:
            structures = np.unique(check_structure_index(structure_index, n), return_inverse=True)[1].reshape(n)
            n_structures = int(structures.max()) + 1
            if n_structures < MIN_CALIBRATION_STRUCTURES:
                raise ValueError(
                    f"structure_index names {n_structures} structures; a structure-aware calibration needs at least "
                    f"{MIN_CALIBRATION_STRUCTURES} ({MIN_CALIBRATION_STRUCTURES // 2} per half): its scale h is a "
                    "function of a per-structure statistic, fitted over structures")
            if frame_ids is None:
                frame_ids = structures
        if threshold is None:
            if self.rtol > 0:
                raise ValueError("with rtol > 0, fit_calibration needs an explicit absolute threshold (eV/Å)")
            threshold = self.atol_
        if not _finite_number(threshold) or threshold <= 0:
            raise ValueError(f"threshold must be a finite number > 0 (eV/Å); got {threshold!r}")
        threshold = float(threshold)
        ref = getattr(self, "train_distance_ref_", None)
        if ref is None or ref.size == 0:
            raise ValueError("this estimator has no training-set reference distances (fitted by an older ltau-ase, "
                             "on a single atom, or with groups so large that no atom found another group's atoms "
                             "among its nearest MAX_GROUP_SEARCH); refit it with LTAUEstimator.fit to use "
                             "fit_calibration")
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
            if frames.size < MIN_CALIBRATION_STRUCTURES:
                raise ValueError(
                    f"the calibration set has {frames.size} structures (frame_ids); fit_calibration needs at least "
                    f"{MIN_CALIBRATION_STRUCTURES} ({MIN_CALIBRATION_STRUCTURES // 2} per half): atoms of one structure "
                    "have correlated errors, so fewer structures let one of them set the scale and the bounds")
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
        sigma = self._element_factors(z, n) * base * m
        h = None
        if structures is not None:
            big_r = structure_ratios(ratio, structures, tiny)
            h = DistanceScale.fit(big_r[half_a], err[half_a] / sigma[half_a], max_exponent=STRUCTURE_MAX_EXPONENT)
            # h only scales σ before the conformal quantile; mean 1 over the fitting atoms keeps it readable
            h = DistanceScale(h.log_ratio, h.values / float(np.mean(h(big_r[half_a]))), h.tail_exponent)
            sigma = sigma * h(big_r)
        scores = err[half_b] / sigma[half_b]
        if frame_ids is None:
            self.conformal_ = MondrianConformal(MIN_ELEMENT_ATOMS).fit(scores, None if z is None else z[half_b])
        else:
            self.conformal_ = MondrianConformal(MIN_ELEMENT_ATOMS, MIN_ELEMENT_STRUCTURES).fit(
                scores, None if z is None else z[half_b], clusters=f[half_b])
        self.calibration_info_ = {
            "reference_distance": reference_distance,
            "reference_rule": getattr(self, "reference_rule_", "atoms"),
            "threshold": threshold,
            "n_atoms": int(n),
            "n_scale_atoms": int(half_a.size),
            "n_conformal_atoms": int(half_b.size),
            "ratio_range": [float(ratio.min()), float(ratio.max())],
            "miscalibration_before": float(pooled["before"]),
            "miscalibration_after": float(pooled["after"]),
            "seed": int(seed),
            "split": "atoms" if frame_ids is None else "structures",
            # the distances (and so g, h and the quantiles) are those of this many neighbours: check_calibration
            "k": int(self.k_eff_),
        }
        self.__dict__["_structure_scale"] = h
        if h is not None:
            self.calibration_info_["structure"] = {
                "statistic": "geometric mean distance ratio of the structure",
                "ratio_floor": tiny,
                "n_structures": int(structures.max()) + 1,
                "ratio_range": [float(big_r.min()), float(big_r.max())],
                "max_exponent": float(STRUCTURE_MAX_EXPONENT),
            }
        return self

    # ------------------------------------------------------------------ persistence
    @property
    def distributions_(self) -> CompactDistributions | ExactDistributions:
        """The fitted error distributions (after a load of a large file: built on first use)."""
        dist = self.__dict__.get("_distributions")
        if dist is None:
            pending = self.__dict__.get("_distributions_source")
            if pending is None:
                raise AttributeError("distributions_")
            dist = distributions_from_arrays(*pending)
            self.__dict__["_distributions"] = dist
            self.__dict__["_distributions_source"] = None
        return dist

    @distributions_.setter
    def distributions_(self, value: CompactDistributions | ExactDistributions) -> None:
        self.__dict__["_distributions"] = value
        self.__dict__["_distributions_source"] = None

    def save(self, path: str) -> None:
        """Write the fitted estimator to one ``.ltau`` file (format 2; see :mod:`ltau_ase.core.fileformat`).

        No pickle; arrays are stored raw and uncompressed so that :meth:`load` can memory-map them.
        """
        self._check_fitted()
        header = {"settings": _settings_snapshot(self), "metadata": dict(self.metadata or {}), "learned": self._learned_header()}
        dist_info, dist_arrays = self.distributions_.to_arrays(streamed=True)
        header["distributions"] = dist_info
        # the small calibration arrays first: the N-sized ones follow, the largest last
        arrays: dict[str, np.ndarray] = {}
        if getattr(self, "train_distance_ref_", None) is not None:
            arrays["train_distance_ref_"] = self.train_distance_ref_
        if getattr(self, "train_groups_", None) is not None:
            arrays["train_groups_"] = self.train_groups_
        if self.is_calibrated:
            header["calibration"], cal_arrays = self._calibration_to_arrays()
            arrays.update({f"cal_{k}": v for k, v in cal_arrays.items()})
        arrays.update({name: getattr(self, name) for name in _LEARNED_ARRAYS})
        if self.atom_ids_ is not None:
            arrays["atom_ids_"] = self.atom_ids_
        arrays.update(self.index_.to_arrays(streamed=True))  # the FAISS blob goes to the file, not to RAM
        arrays.update({f"dist_{k}": v for k, v in dist_arrays.items()})
        write_container(path, header, arrays)

    def _learned_header(self) -> dict[str, Any]:
        return {
            "atol_": float(self.atol_),
            "n_features_in_": int(self.n_features_in_),
            "n_train_atoms_": int(self.n_train_atoms_),
            "k_eff_": int(self.k_eff_),
            "species_": None if self.species_ is None else [int(z) for z in self.species_],
            "index_kind_": self.index_.kind,
            "index_params_": {key: int(v) for key, v in self.index_.params.items()},
            "index_choice_": self.index_.reason,
            "fit_info_": self.fit_info_,
            **({"scale_": float(self.scale_)} if "scale_" in self.__dict__ else {}),
            # absent in files written before the group rule: they load as "atoms"
            **({"reference_rule_": self.reference_rule_} if getattr(self, "reference_rule_", "atoms") != "atoms"
               else {}),
        }

    def _calibration_to_arrays(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {f"g_{k}": v for k, v in self.distance_scale_.to_arrays().items()}
        arrays.update({f"conformal_{k}": v for k, v in self.conformal_.to_arrays().items()})
        arrays["element_z"] = self.element_factor_z_
        arrays["element_factors"] = self.element_factors_
        if self.structure_scale_ is not None:
            arrays.update({f"h_{k}": v for k, v in self.structure_scale_.to_arrays().items()})
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
        if "k" in details and not (is_integer(details["k"]) and 1 <= details["k"] <= self.n_train_atoms_):
            raise ValueError(f"the calibration's k must be an integer in [1, {self.n_train_atoms_}]; "
                             f"got {details['k']!r}")
        if g.tail_exponent > MAX_TAIL_EXPONENT:
            raise ValueError(f"the distance scale's tail exponent is {g.tail_exponent:g}; fit_calibration gives "
                             f"at most {MAX_TAIL_EXPONENT:g}")
        h = None
        h_arrays = {k[2:]: v for k, v in arrays.items() if k.startswith("h_")}
        if ("structure" in details) != bool(h_arrays):
            raise ValueError("a structure-aware calibration needs both its structure scale arrays and its details")
        if h_arrays:
            h = DistanceScale.from_arrays(h_arrays)
            floor = details["structure"].get("ratio_floor") if isinstance(details["structure"], dict) else None
            if not (_finite_number(floor) and floor > 0):
                raise ValueError("the structure scale's ratio floor must be a finite number > 0")
            # what fit_calibration guarantees, so that a file cannot make every bound huge or infinite: every
            # R_f >= the floor, so the first knot (a mean of log R_f) is too; h is normalised to mean 1 over
            # the n_scale_atoms fitting atoms, at least one of them at or past the last knot
            n_scale = details.get("n_scale_atoms")
            if h.tail_exponent > STRUCTURE_MAX_EXPONENT:
                raise ValueError(f"the structure scale's tail exponent is {h.tail_exponent:g}; fit_calibration "
                                 f"gives at most {STRUCTURE_MAX_EXPONENT:g}")
            if math.log(floor) > h.log_ratio[0] + 1e-9:
                raise ValueError(f"the structure scale's ratio floor {floor:g} lies above its first knot "
                                 f"{math.exp(h.log_ratio[0]):g}; every structure ratio is at least the floor")
            if not (_finite_number(n_scale) and h.values[-1] <= n_scale * (1 + 1e-9)):
                raise ValueError(f"the structure scale reaches {h.values[-1]:g}; normalised to mean 1 over "
                                 f"{n_scale!r} fitting atoms it is at most their number")
        self.__dict__["_structure_scale"] = h
        self.distance_scale_, self.conformal_ = g, conformal
        self.element_factor_z_, self.element_factors_ = z.astype(np.int64), factors
        self.pooled_factor_, self.calibration_info_ = pooled, details

    @classmethod
    def load(cls, path: str, verify: bool | None = None, eager_bytes: int = EAGER_BYTES) -> "LTAUEstimator":
        """Read an estimator written by :meth:`save`; never executes code from the file.

        Every setting is validated as in ``__init__``/fit, every array's dtype and shape is checked
        against the header's N, D, runs and bins before it is read, the FAISS index is rebuilt under a
        size guard and checked structurally, and the arrays' values are checked (probabilities in
        [0, 1], errors ≥ 0, bin edges finite and increasing, counts consistent with the stored
        confidences, atom ids unique); any failure raises ValueError naming it.

        Args:
            verify: None (default): arrays ≤ ``eager_bytes`` are read, digest- and value-checked;
                larger arrays are memory-mapped read-only and neither digest- nor value-checked, so a
                10⁷-atom estimator opens in a fraction of a second and predicts touching only the rows
                it needs. True: stream every digest and value check (constant memory; takes as long as
                reading the file). False: skip digests (values of in-memory arrays are still checked).
            eager_bytes: size above which an array is memory-mapped instead of read.
        Format-1 (npz) files load through the hardened npz reader (``ltau convert`` rewrites them).
        """
        try:
            header, arrays = read_container(path, schema=_estimator_schema, verify=verify, eager_bytes=eager_bytes)
            settings = dict(header["settings"])
            learned = dict(header["learned"])
            if not set(settings) <= set(_PARAM_NAMES) - {"metadata"}:
                raise ValueError(f"unknown settings {sorted(set(settings) - set(_PARAM_NAMES))}")
            metadata = header.get("metadata") or {}
            if not isinstance(metadata, dict):
                raise ValueError("metadata is not a mapping")
            est = cls(**settings, metadata=dict(metadata))
            if est.window not in (None, LAST_HALF):
                est.window = EpochWindow.coerce(est.window)
            est._check_params()
            n, d = int(learned["n_train_atoms_"]), int(learned["n_features_in_"])
            kind = learned.get("index_kind_", settings["index"])
            stream = verify is True
            usable = {name: stream or not isinstance(a, np.memmap) for name, a in arrays.items()}
            index_arrays = {k: v for k, v in arrays.items() if k in ("faiss_index", "index_vectors")}
            if header["format_version"] == LEGACY_NPZ_VERSION:
                est.index_ = NeighbourIndex.from_bytes(arrays["faiss_index"], kind, learned["index_params_"])
                if est.index_.ntotal != n or est.index_.dim != d:
                    raise ValueError(f"its FAISS index holds {est.index_.ntotal} x {est.index_.dim} vectors; the header says N={n}, D={d}")
            else:
                est.index_ = NeighbourIndex.from_arrays(kind, learned["index_params_"], index_arrays, n, d,
                                                        check_values=usable.get("index_vectors", True))
                reason = learned.get("index_choice_")
                est.index_.reason = reason if isinstance(reason, str) else None
            for name in _LEARNED_ARRAYS:
                est.__dict__[name] = arrays[name]
            est.atol_ = _nonnegative(learned["atol_"], "atol_")
            est.n_features_in_, est.n_train_atoms_ = d, n
            est.k_eff_ = int(learned["k_eff_"])
            if est.k_eff_ != min(int(est.k), n):
                raise ValueError(f"k_eff_={est.k_eff_} disagrees with k={est.k} and N={n}")
            species = learned["species_"]
            if species is not None:
                species = np.asarray(species)
                if (species.ndim != 1 or species.size == 0 or not np.issubdtype(species.dtype, np.integer)
                        or species.min() < 1 or species.max() > 118 or np.any(np.diff(species) <= 0)):
                    raise ValueError("species_ must be increasing atomic numbers in [1, 118]")
                species = species.astype(np.int64)
            est.species_ = species
            est.atom_ids_ = arrays.get("atom_ids_")
            fit_info = learned.get("fit_info_", {})
            est.fit_info_ = fit_info if isinstance(fit_info, dict) else {}
            if "scale_" in learned:  # files before the scale_/scale split kept a fitted s in settings
                est.scale_ = float(learned["scale_"])
                _check_scale(est.scale_)
            ref = arrays.get("train_distance_ref_")
            if ref is not None:
                ref = np.asarray(ref, dtype=np.float64)
                if not np.all(np.isfinite(ref)) or np.any(ref < 0):
                    raise ValueError("its training reference distances are not finite and >= 0")
            est.train_distance_ref_ = ref
            rule = learned.get("reference_rule_", "atoms")
            if rule not in REFERENCE_RULES:
                raise ValueError(f"unknown reference_rule_ {rule!r}; expected one of {REFERENCE_RULES}")
            groups = arrays.get("train_groups_")
            if (rule == "groups") != (groups is not None):
                raise ValueError(f"reference_rule_ {rule!r} needs train_groups_ exactly when it is 'groups'")
            est.reference_rule_ = rule
            est.train_groups_ = None if groups is None else _check_groups(groups, n)
            if "calibration" in header:
                try:
                    est._calibration_from_arrays(
                        header["calibration"], {k[4:]: v for k, v in arrays.items() if k.startswith("cal_")}
                    )
                except ValueError as exc:
                    raise ValueError(f"{path} has a malformed calibration: {exc}") from None
            dist_info = dict(header["distributions"])
            dist_arrays = {k[5:]: v for k, v in arrays.items() if k.startswith("dist_")}
            _check_values(est, dist_info, dist_arrays, {k[5:] if k.startswith("dist_") else k: u for k, u in usable.items()})
            if all(usable.values()):
                est.distributions_ = distributions_from_arrays(dist_info, dist_arrays)
            else:
                est.__dict__["_distributions_source"] = (dist_info, dist_arrays)
            est._fitted_settings = _settings_snapshot(est)
        except (KeyError, TypeError, IndexError, AttributeError, OverflowError) as exc:
            raise ValueError(f"{path} is an ltau-ase estimator file with missing or malformed fields ({exc!r})") from None
        except ValueError as exc:
            if str(path) in str(exc):
                raise
            raise ValueError(f"{path} is corrupt or inconsistent: {exc}") from None
        est._cache = None
        est._warned_short = False
        return est


_CALIBRATION_ATTRS = (
    "_structure_scale",
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


def check_structure_index(values: Any, n: int) -> np.ndarray:
    """(n,) int64 structure of each atom, values in [0, n); raises ValueError naming what is wrong."""
    s = np.asarray(values)
    if s.shape != (n,) or s.dtype == np.bool_ or not np.issubdtype(s.dtype, np.integer):
        raise ValueError(f"structure_index must be ({n},) integers, the structure of each atom (one structure: "
                         f"numpy.zeros(n, dtype=int)); got shape {s.shape}, dtype {s.dtype}")
    if n and (s.min() < 0 or s.max() >= n):
        raise ValueError(f"structure_index values must lie in [0, {n}) (at most one structure per atom); got "
                         f"{int(s.min())}..{int(s.max())}")
    return s.astype(np.int64)


def _settings_snapshot(est: "LTAUEstimator") -> dict[str, Any]:
    """The JSON form of the parameters (minus metadata), as stored in the file's ``settings``."""
    params = est.get_params()
    params.pop("metadata")
    params["window"] = (None if est.window is None else LAST_HALF if est.window == LAST_HALF
                        else EpochWindow.coerce(est.window).to_dict())
    bins = params["bins"]
    if bins is not None and not isinstance(bins, (int, np.integer)):
        params["bins"] = [bins[0], int(bins[1])] if isinstance(bins[0], str) else np.asarray(bins, float).tolist()
    elif bins is not None:
        params["bins"] = int(bins)
    params["k"], params["chunk_size"] = int(est.k), int(est.chunk_size)
    params["max_memory"] = None if est.max_memory is None else int(est.max_memory)
    params["atol"] = None if est.atol is None else float(est.atol)
    params["rtol"], params["scale"] = float(est.rtol), float(est.scale)
    if est.index_params is not None:
        params["index_params"] = {str(k): int(v) for k, v in est.index_params.items()}
    return params


def _nonnegative(x: Any, name: str) -> float:
    if not _finite_number(x) or x < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {x!r}")
    return float(x)


def _int_field(mapping: Any, key: str, lo: int, hi: int) -> int:
    if not isinstance(mapping, dict):
        raise ValueError("malformed header section")
    value = mapping.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"header field {key}={value!r} must be an integer in [{lo}, {hi}]")
    return value


#: blob-size allowances: fixed overhead plus per-item bytes, generous versus what FAISS writes
_BLOB_OVERHEAD = 1 << 20


def _blob_bound(kind: str, params: dict[str, Any], n: int, d: int) -> int:
    """Upper bound on the bytes of a legitimate FAISS blob for these sizes."""
    if kind == "flat":
        return _BLOB_OVERHEAD + 4 * n * d
    if kind == "hnsw":
        m = int(params.get("M", 32))
        # vectors, levels, offsets and on average at most 4·M neighbour slots per node
        return _BLOB_OVERHEAD + n * (4 * d + 4 + 8 + 16 * m)
    nlist, m, nbits = int(params.get("nlist", 1)), int(params.get("m", 1)), int(params.get("nbits", 8))
    # a hostile nbits (validated to [1, 16] later) must not make 2**nbits itself the hang
    nbits = min(max(nbits, 0), 64)
    code = -(-m * nbits // 8)
    return _BLOB_OVERHEAD + n * (code + 8) + nlist * (4 * d + 24 + 8 + 4 + 16 * 32) + 4 * d * (2**nbits)


def _estimator_schema(header: dict[str, Any], declared: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, tuple[Any, tuple[int, ...]]]:
    """The arrays an estimator file must hold, their dtypes and shapes, from the header's sizes.

    Sizes not recorded in the header (bins K, epochs E_m, the FAISS blob length) are taken from the
    declared shapes but bounded (K ≤ 2^16, E_m ≤ 2^24, blob ≤ :func:`_blob_bound`).
    """
    learned, settings, dinfo = header.get("learned"), header.get("settings"), header.get("distributions")
    if not isinstance(learned, dict) or not isinstance(settings, dict) or not isinstance(dinfo, dict):
        raise ValueError("the header lacks its settings / learned / distributions sections")
    n = _int_field(learned, "n_train_atoms_", 1, 1 << 40)
    d = _int_field(learned, "n_features_in_", 1, 1 << 16)
    m = _int_field(dinfo, "n_runs", 1, 4096)
    if _int_field(dinfo, "n_atoms", 1, 1 << 40) != n:
        raise ValueError("the distributions' atom count disagrees with n_train_atoms_")
    schema: dict[str, tuple[Any, tuple[int, ...]]] = {name: ("<f8", (n,)) for name in _LEARNED_ARRAYS}
    if "atom_ids_" in declared:
        schema["atom_ids_"] = ("<i8", (n,))
    kind = learned.get("index_kind_", settings.get("index"))
    params = learned.get("index_params_")
    if kind not in ("flat", "hnsw", "ivfpq") or not isinstance(params, dict):
        raise ValueError(f"unknown stored index kind {kind!r}")
    names = {"faiss_index"} if header.get("format_version") == LEGACY_NPZ_VERSION else NeighbourIndex.stored_arrays(kind, params)
    if "index_vectors" in names:
        schema["index_vectors"] = ("<f4", (n, d))
    if "faiss_index" in names:
        blob = declared.get("faiss_index", ("|u1", (0,)))[1]
        size = blob[0] if len(blob) == 1 else -1
        stored = dict(params)
        if header.get("format_version") == LEGACY_NPZ_VERSION and kind == "ivfpq":
            stored.setdefault("refine", 0)  # format 1 kept no vectors
        # Parameters in range first: the bound grows with 2**nbits, M and nlist.
        bound = _blob_bound(kind, resolve_params(kind, stored, n, d, strict=True), n, d)
        if not 0 < size <= bound:
            raise ValueError(f"the FAISS index blob declares {size} bytes; at most {bound} are plausible for N={n}, D={d}")
        schema["faiss_index"] = ("|u1", (size,))
    schema.update(_shift_schema(header, declared, n))
    thr = declared.get("dist_fitted_threshold", ("<f8", ()))[1]
    schema["dist_fitted_threshold"] = ("<f8", () if thr == () else (n,))
    if dinfo.get("kind") == "compact":
        edges = declared.get("dist_edges", ("<f8", (0,)))[1]
        k = edges[0] if len(edges) == 1 else 0
        if not 1 <= k <= 1 << 16:
            raise ValueError(f"the compact distributions declare {k} bin edges; expected 1 to 65536")
        schema.update({
            "dist_edges": ("<f8", (k,)),
            "dist_counts": (("|u1", "<u2", "<u4", "<u8"), (m, n, k + 1)),
            "dist_max_error": ("<f8", (n,)),
            "dist_mean_error": ("<f8", (n,)),
            "dist_fitted_counts": ("<i8", (m, n)),
        })
    elif dinfo.get("kind") == "exact":
        for r in range(m):
            shape = declared.get(f"dist_sorted_errors_{r}", ("<f4", (0,)))[1]
            e = shape[0] if len(shape) == 2 else 0
            if not 1 <= e <= 1 << 24:
                raise ValueError(f"run {r}'s sorted errors declare {e} epochs; expected 1 to 2^24")
            schema[f"dist_sorted_errors_{r}"] = ("<f4", (e, n))
    else:
        raise ValueError(f"unknown distribution kind {dinfo.get('kind')!r}")
    return schema


def _declared_length(declared: dict, name: str, lo: int, hi: int) -> int:
    shape = declared.get(name, ("", (-1,)))[1]
    size = shape[0] if len(shape) == 1 else -1
    if not lo <= size <= hi:
        raise ValueError(f"array {name!r} declares shape {tuple(shape)}; expected a length in [{lo}, {hi}]")
    return size


def _shift_schema(header: dict[str, Any], declared: dict, n: int) -> dict[str, tuple[Any, tuple[int, ...]]]:
    """Arrays of the distance-aware calibration (fit's reference distances, fit_calibration's state), bounded."""
    schema: dict[str, tuple[Any, tuple[int, ...]]] = {}
    if "train_distance_ref_" in declared:
        schema["train_distance_ref_"] = ("<f8", (_declared_length(declared, "train_distance_ref_", 0,
                                                                   min(n, REFERENCE_SAMPLE)),))
    if "train_groups_" in declared:
        schema["train_groups_"] = ("<i8", (n,))
    if "calibration" not in header:
        return schema
    cal = header["calibration"]
    info = cal.get("info") if isinstance(cal, dict) else None
    if not isinstance(info, dict):
        raise ValueError("the calibration section of the header is malformed")
    n_conformal = _int_field(info, "n_conformal_atoms", 1, 1 << 40)
    knots = _declared_length(declared, "cal_g_log_ratio", 1, _int_field(info, "n_scale_atoms", 1, 1 << 40))
    groups = _declared_length(declared, "cal_conformal_groups", 0, 118)
    elements = _declared_length(declared, "cal_element_z", 0, 118)
    schema.update({
        "cal_g_log_ratio": ("<f8", (knots,)),
        "cal_g_values": ("<f8", (knots,)),
        "cal_g_tail_exponent": ("<f8", ()),
        "cal_conformal_pooled": ("<f8", (n_conformal,)),
        "cal_conformal_groups": ("<i8", (groups,)),
        "cal_conformal_group_counts": ("<i8", (groups,)),
        "cal_conformal_group_scores": ("<f8", (_declared_length(declared, "cal_conformal_group_scores", 0, n_conformal),)),
        "cal_element_z": ("<i8", (elements,)),
        "cal_element_factors": ("<f8", (elements,)),
    })
    if "cal_h_log_ratio" in declared:  # a structure-aware calibration (older files have none)
        h_knots = _declared_length(declared, "cal_h_log_ratio", 1, _int_field(info, "n_scale_atoms", 1, 1 << 40))
        schema.update({"cal_h_log_ratio": ("<f8", (h_knots,)), "cal_h_values": ("<f8", (h_knots,)),
                       "cal_h_tail_exponent": ("<f8", ())})
    return schema


_CHECK_BLOCK = 1 << 16


def _check_values(est: "LTAUEstimator", info: dict[str, Any], dist: dict[str, np.ndarray], usable: dict[str, bool]) -> None:
    """Value checks of the learned arrays, atom block by atom block; arrays not ``usable`` are skipped."""
    n = est.n_train_atoms_

    def bad(what: str) -> ValueError:
        return ValueError(f"{what}; the file is corrupt or was edited")

    thr = dist["fitted_threshold"]
    if usable["fitted_threshold"] and (not np.all(np.isfinite(thr)) or np.any(thr < 0)):
        raise bad("the fitted threshold is not finite and >= 0")
    if info["kind"] == "compact" and usable["edges"]:
        edges = dist["edges"]
        if not np.all(np.isfinite(edges)) or edges[0] < 0 or np.any(np.diff(edges) <= 0):
            raise bad("the bin edges are not finite, >= 0 and strictly increasing")
    m = int(info["n_runs"])
    if est.atom_ids_ is not None and usable["atom_ids_"]:
        ids = np.asarray(est.atom_ids_)
        if np.unique(ids).size != n:
            raise bad("the training atom ids are not unique")
    for start in range(0, n, _CHECK_BLOCK):
        sl = slice(start, min(start + _CHECK_BLOCK, n))
        conf = var = mean = None
        if usable["confidence_train_"]:
            conf = np.asarray(est.confidence_train_[sl])
            if not np.all((conf >= 0) & (conf <= 1)):
                raise bad("training confidences lie outside [0, 1] (or are NaN)")
        if usable["variability_train_"]:
            var = np.asarray(est.variability_train_[sl])
            if not np.all((var >= 0) & (var <= 0.5)):
                raise bad("training confidence spreads lie outside [0, 0.5] (or are NaN)")
        if usable["mean_error_train_"]:
            mean = np.asarray(est.mean_error_train_[sl])
            if not np.all(np.isfinite(mean) & (mean >= 0)):
                raise bad("mean training errors are negative or not finite")
        t = thr if thr.ndim == 0 else thr[sl]
        if info["kind"] == "compact":
            if not (usable["counts"] and usable["fitted_counts"]):
                continue
            n_logged = np.asarray(dist["counts"][:, sl, :]).sum(axis=2, dtype=np.int64)
            fitted = np.asarray(dist["fitted_counts"][:, sl])
            if np.any(n_logged < 1):
                raise bad("some (run, atom) histograms are empty")
            if np.any(fitted < 0) or np.any(fitted > n_logged):
                raise bad("fitted counts are negative or exceed the logged epochs")
            if usable["max_error"] and usable["mean_error"]:
                mx, me = np.asarray(dist["max_error"][sl]), np.asarray(dist["mean_error"][sl])
                if not (np.all(np.isfinite(mx) & (mx >= 0)) and np.all(np.isfinite(me) & (me >= 0))):
                    raise bad("maximum / mean errors are negative or not finite")
                if np.any(me > mx * (1 + 1e-9) + 1e-12):
                    raise bad("mean errors exceed the maximum errors")
                if mean is not None and not np.allclose(mean, me, rtol=1e-12, atol=0):
                    raise bad("the stored mean errors disagree with the distributions")
            frac = fitted / n_logged
        else:
            runs = [dist[f"sorted_errors_{r}"] for r in range(m)]
            if not all(usable[f"sorted_errors_{r}"] for r in range(m)):
                continue
            frac = np.empty((m, sl.stop - sl.start))
            for r, s in enumerate(runs):
                block = np.asarray(s[:, sl])
                nan = np.isnan(block)
                if np.any(nan[:-1] & ~nan[1:]):
                    raise bad("sorted errors have NaN before logged values")
                vals = np.where(nan, np.inf, block)
                if np.any(np.isneginf(vals)) or np.any(np.isposinf(vals) & ~nan) or np.any(vals < 0):
                    raise bad("logged errors are negative or infinite")
                with np.errstate(invalid="ignore"):  # inf - inf between trailing NaN slots
                    unsorted = np.any(np.diff(vals, axis=0) < 0)
                if unsorted:
                    raise bad("per-atom errors are not sorted")
                n_log = (~nan).sum(axis=0)
                if np.any(n_log < 1):
                    raise bad("some (run, atom) pairs have no logged epoch")
                frac[r] = (block <= t).sum(axis=0) / n_log
        if conf is not None and not np.allclose(conf, frac.mean(axis=0), rtol=0, atol=1e-9):
            raise bad("the stored training confidences disagree with the stored distributions")
        if var is not None and not np.allclose(var, frac.std(axis=0), rtol=0, atol=1e-9):
            raise bad("the stored confidence spreads disagree with the stored distributions")


_finite_number = is_finite_number  # its earlier private name


def _check_groups(values: Any, n: int) -> np.ndarray:
    """(n,) int64 structure groups with at least two distinct labels, else ValueError."""
    g = np.asarray(values)
    if g.shape != (n,) or not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"groups must be ({n},) integers, one structure group per training atom; got shape "
                         f"{g.shape}, dtype {g.dtype}")
    if n > 1 and np.all(g == g[0]):
        raise ValueError("groups name a single structure group; leaving one group out needs at least two")
    return np.ascontiguousarray(g, dtype=np.int64)


def _check_scale(scale: Any) -> None:
    check_number(scale, "scale", minimum=0, strict=True)
