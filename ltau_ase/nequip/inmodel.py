"""LTAU as a nequip model output: a GraphModule appended after the force model.

:class:`LTAUReadout` reads the per-atom latent features (``node_features``, the last convnet's
invariant scalars) that the same forward pass produced and writes four per-atom fields, shape (N, 1),
float64 (nequip's output dtype, what LAMMPS' ``compute nequip/atom`` reads):

``ltau_uncertainty``            1 - p_j
``ltau_confidence``             p_j: mean over the k nearest training atoms of P(|F error| ≤ threshold / scale)
``ltau_expected_force_error``   scale × mean of the neighbours' mean logged errors, eV/Å
``ltau_latent_distance``        mean Euclidean latent distance to the k neighbours (latent units)

A calibrated estimator compiled in its distance-aware form adds ``ltau_distance_ratio`` (the distance over
the calibration's reference distance) and, when compiled with a coverage q,
``ltau_force_error_bound`` (eV/Å): the split-conformal bound q_Z × expected error of
``LTAUEstimator.predict(..., coverage=q)``, with the atom's per-element (Mondrian) quantile.

The reference is a plain tensor computation, so the module compiles with AOTInductor and runs on
the model's device (CPU or CUDA):

* **exact**: all N training latents are buffers. Candidate neighbours come from squared distances
  ``|x|² - 2 x·y + |y|²`` by matrix products over blocks of ``block_size`` training atoms (top
  ``k + margin`` per block, so memory is n × block_size); the final k are re-ranked on distances
  recomputed directly as ``|x - y|`` (no cancellation), which is what makes the distances agree with
  FAISS's flat index to float32 round-off. Per-atom confidences at the estimator's threshold / scale
  and scale × mean errors are precomputed buffers, so the result equals ``LTAUEstimator.predict``.
* **compressed** (for reference sets too large to carry): C k-means centroids, each with its member
  count and the members' mean confidence and mean error. A query takes its nearest centroids until
  their counts reach k (the last one contributing only the missing count) and averages the pooled
  statistics with those counts as weights; the distance is the same count-weighted mean of centroid
  distances. :func:`compressed_accuracy` measures Spearman ρ against exact and neighbour recall.

Provenance (the source checkpoint's and estimator's sha256, k, threshold, scale, species, mode)
enters the compiled file's metadata through ``_get_metadata_contributions`` (keys ``ltau_*``).
"""
from __future__ import annotations

import json
from typing import Any, Dict, Optional

import numpy as np
import torch
from nequip.data import AtomicDataDict
from nequip.nn import GraphModuleMixin

from ltau_ase.nequip.calculator import LatentNequIPCalculator

LATENT_FIELD = AtomicDataDict.NODE_FEATURES_KEY
UNCERTAINTY_FIELD = "ltau_uncertainty"
CONFIDENCE_FIELD = "ltau_confidence"
EXPECTED_ERROR_FIELD = "ltau_expected_force_error"
DISTANCE_FIELD = "ltau_latent_distance"
DISTANCE_RATIO_FIELD = "ltau_distance_ratio"
ERROR_BOUND_FIELD = "ltau_force_error_bound"
#: the per-atom output fields, in output order
LTAU_FIELDS = (UNCERTAINTY_FIELD, CONFIDENCE_FIELD, EXPECTED_ERROR_FIELD, DISTANCE_FIELD)
#: the distance-aware readout's additional field (the latent distance over the calibration's reference)
DISTANCE_AWARE_FIELDS = (*LTAU_FIELDS, DISTANCE_RATIO_FIELD)
#: ... and with conformal error bounds compiled in (``ltau compile --coverage q``)
BOUNDED_FIELDS = (*DISTANCE_AWARE_FIELDS, ERROR_BOUND_FIELD)
#: metadata key holding the JSON provenance of the appended LTAU readout
LTAU_METADATA_KEY = "ltau_readout"
REFERENCE_MODES = ("exact", "compressed")

MAX_DEFAULT_CENTROIDS = 4096
_MARGIN = 8  # extra candidates per block, re-ranked exactly (covers float32 ties/rounding in the expansion)


class LTAUReadout(GraphModuleMixin, torch.nn.Module):
    """Per-atom LTAU uncertainty from ``node_features`` by kNN over a training reference.

    Args:
        irreps_in: irreps of the fields the preceding module outputs (must hold ``node_features``
            of D ``0e`` scalars).
        reference: (R, D) float reference latents (R = N training atoms, or C centroids).
        confidence: (R,) per-reference confidence at the estimator's threshold / scale.
        mean_error: (R,) per-reference mean error × scale (eV/Å).
        k: neighbours averaged (1 ≤ k ≤ N training atoms).
        counts: None (exact) or (C,) member counts of the centroids (compressed).
        weights: ``"uniform"`` or ``"distance"`` (inverse-distance weights, exact mode only).
        block_size: training atoms per distance block.
        provenance: JSON-able dict stored in the compiled file's metadata under ``ltau_readout``.
    """

    def __init__(
        self,
        irreps_in: Dict[str, Any],
        reference: torch.Tensor,
        confidence: torch.Tensor,
        mean_error: torch.Tensor,
        k: int,
        counts: Optional[torch.Tensor] = None,
        weights: str = "uniform",
        block_size: int = 32768,
        provenance: Optional[Dict[str, Any]] = None,
        distance_aware: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        from e3nn import o3

        irreps = irreps_in.get(LATENT_FIELD)
        if irreps is None:
            raise ValueError(f"the model declares no '{LATENT_FIELD}' output to read the latent features from")
        irreps = o3.Irreps(irreps)
        if any(ir.l != 0 or ir.p != 1 for _, ir in irreps):
            raise ValueError(f"'{LATENT_FIELD}' has irreps {irreps}; expected 0e scalars only")
        d = int(irreps.dim)
        reference = torch.as_tensor(reference, dtype=torch.float32)
        r = reference.shape[0]
        if reference.ndim != 2 or reference.shape[1] != d:
            raise ValueError(f"reference latents have shape {tuple(reference.shape)}; expected (R, {d}) for the model's D={d}")
        for name, arr in (("confidence", confidence), ("mean_error", mean_error)):
            if tuple(arr.shape) != (r,):
                raise ValueError(f"{name} has shape {tuple(arr.shape)}; expected ({r},), one per reference row")
        if weights not in ("uniform", "distance"):
            raise ValueError(f"weights must be 'uniform' or 'distance'; got {weights!r}")
        n_train = r if counts is None else int(counts.sum())
        if not 1 <= k <= n_train:
            raise ValueError(f"k must lie in [1, {n_train}]; got {k}")
        if counts is not None and weights != "uniform":
            raise ValueError("the compressed reference supports weights='uniform' only")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1; got {block_size}")
        if distance_aware is not None and counts is not None:
            raise ValueError("the distance-aware readout needs the exact reference (every training atom's error "
                             "distribution), not the compressed one")
        bounded = distance_aware is not None and distance_aware.get("bound_quantiles") is not None
        fields = LTAU_FIELDS if distance_aware is None else (BOUNDED_FIELDS if bounded else DISTANCE_AWARE_FIELDS)
        self._init_irreps(
            irreps_in=irreps_in,
            my_irreps_in={LATENT_FIELD: irreps},
            irreps_out={f: "0e" for f in fields},
        )
        self.k = int(k)
        self.compressed = counts is not None
        self.distance_weights = weights == "distance"
        self.block_size = int(block_size)
        self.register_buffer("reference", reference.contiguous())
        self.register_buffer("reference_sqnorm", (reference.double() ** 2).sum(1).float())
        self.register_buffer("confidence", torch.as_tensor(confidence, dtype=torch.float64).contiguous())
        self.register_buffer("mean_error", torch.as_tensor(mean_error, dtype=torch.float64).contiguous())
        if counts is not None:
            self.register_buffer("counts", torch.as_tensor(counts, dtype=torch.float64).contiguous())
        else:
            self.register_buffer("counts", torch.ones(0, dtype=torch.float64))
        self.fields = fields
        # the file's metadata lists the fields the readout writes (what a calculator may report)
        self.provenance = {**(provenance or {}), "fields": list(fields)}
        self.distance_aware = distance_aware is not None
        self.error_bounds = bounded
        self.distribution_kind = "" if distance_aware is None else str(distance_aware["kind"])
        self.n_runs = 0 if distance_aware is None else int(distance_aware["n_logged"].shape[0])
        if distance_aware is not None:
            self._register_distance_aware(distance_aware, r)

    def _register_distance_aware(self, da: Dict[str, Any], n: int) -> None:
        """Buffers of the distance-aware form (see :func:`distance_aware_reference`), shapes checked."""
        f64 = lambda a: torch.from_numpy(np.array(a, dtype=np.float64))  # noqa: E731  (a copy: the buffers own it)
        if da["kind"] not in ("exact", "compact"):
            raise ValueError(f"distribution kind must be 'exact' or 'compact'; got {da['kind']!r}")
        n_logged = f64(da["n_logged"])
        threshold = f64(np.broadcast_to(np.asarray(da["threshold"], dtype=np.float64), (n,)))
        checks = [("n_logged", tuple(n_logged.shape), (self.n_runs, n)),
                  ("unscaled_mean_error", tuple(np.shape(da["unscaled_mean_error"])), (n,))]
        for name, got, want in checks:
            if got != want:
                raise ValueError(f"distance-aware {name} has shape {got}; expected {want}")
        self.register_buffer("threshold", threshold)
        self.register_buffer("n_logged", n_logged)
        self.register_buffer("unscaled_mean_error", f64(da["unscaled_mean_error"]))
        self.register_buffer("scale_log_ratio", f64(da["scale_log_ratio"]))
        self.register_buffer("scale_values", f64(da["scale_values"]))
        self.register_buffer("type_factors", f64(da["type_factors"]))
        quantiles = da.get("bound_quantiles")
        if quantiles is not None and np.shape(quantiles) != np.shape(da["type_factors"]):
            raise ValueError(f"bound quantiles have shape {np.shape(quantiles)}; expected one per model type "
                             f"{np.shape(da['type_factors'])}")
        # q_Z per model type (the conformal quantile at the compiled coverage; +inf where too few scores)
        self.register_buffer("bound_quantiles", f64(quantiles) if quantiles is not None else torch.ones(0, dtype=torch.float64))
        self.scale_tail_exponent = float(da["scale_tail_exponent"])
        self.reference_distance = float(da["reference_distance"])
        if da["kind"] == "exact":
            # (M, E, N) sorted errors, NaN where an atom (or a shorter run) has fewer logged epochs
            # (NaN <= t is False, so a padded slot never counts)
            runs = [np.asarray(e, dtype=np.float32) for e in da["sorted_errors"]]
            if len(runs) != self.n_runs or any(e.ndim != 2 or e.shape[1] != n for e in runs):
                raise ValueError(f"sorted errors must be {self.n_runs} arrays of shape (E, {n})")
            errs = np.full((self.n_runs, max(e.shape[0] for e in runs), n), np.nan, dtype=np.float32)
            for m, e in enumerate(runs):
                errs[m, : e.shape[0]] = e
            self.register_buffer("sorted_errors", torch.as_tensor(errs).contiguous())
        else:
            counts = np.asarray(da["counts"])
            if counts.ndim != 3 or counts.shape[:2] != (self.n_runs, n):
                raise ValueError(f"histogram counts have shape {counts.shape}; expected ({self.n_runs}, {n}, K+1)")
            # counts below each bin edge (exact integers in float64); a bin's own count is the difference
            cum = np.concatenate([np.zeros(counts.shape[:2] + (1,)), np.cumsum(counts, axis=2, dtype=np.float64)],
                                 axis=2)
            self.register_buffer("bin_below", f64(cum).reshape(self.n_runs, -1))  # (M, N·(K+2))
            self.register_buffer("bin_edges", f64(da["edges"]))
            ext = np.concatenate([[0.0], np.asarray(da["edges"], dtype=np.float64), [np.inf]])
            self.register_buffer("bin_bounds", f64(ext))
            self.register_buffer("max_error", f64(da["max_error"]))
            self.n_bins = int(counts.shape[2])

    @torch.jit.unused
    def _get_metadata_contributions(self) -> Dict[str, str]:
        return {LTAU_METADATA_KEY: json.dumps(self.provenance, sort_keys=True, separators=(",", ":"))}

    def _candidates(self, x: torch.Tensor, m: int) -> torch.Tensor:
        """(n, ≤ blocks·m) indices of the m nearest reference rows of each block (expanded distances)."""
        xsq = (x * x).sum(1, keepdim=True)
        r = self.reference.shape[0]
        picked = []
        for start in range(0, r, self.block_size):  # unrolled at trace time: the block count is static
            stop = min(start + self.block_size, r)
            block = self.reference[start:stop]
            d2 = xsq - 2.0 * (x @ block.t()) + self.reference_sqnorm[start:stop].unsqueeze(0)
            mb = min(m, stop - start)
            picked.append(torch.topk(d2, mb, dim=1, largest=False).indices + start)
        return picked[0] if len(picked) == 1 else torch.cat(picked, dim=1)

    def _exact_distances(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(n, c) Euclidean distances |x_i - ref_ids[i, j]| computed from differences."""
        diff = self.reference[ids] - x.unsqueeze(1)
        return (diff * diff).sum(-1).sqrt()

    def _distance_scale(self, ratio: torch.Tensor) -> torch.Tensor:
        """g(r) of :class:`ltau_ase.core.shift.DistanceScale`: linear interpolation in log r between the
        knots (constant below the first), power-law tail beyond the last."""
        knots, values = self.scale_log_ratio, self.scale_values
        lr = torch.log(torch.clamp(ratio, min=0.0))
        if knots.shape[0] == 1:
            inside = values[0].expand_as(lr)
        else:
            j = torch.clamp(torch.searchsorted(knots, lr.contiguous(), right=True), 1, knots.shape[0] - 1)
            x0, x1, y0, y1 = knots[j - 1], knots[j], values[j - 1], values[j]
            frac = torch.clamp((lr - x0) / (x1 - x0), 0.0, 1.0)
            inside = y0 + frac * (y1 - y0)
        tail = values[-1] * torch.exp(self.scale_tail_exponent * (lr - knots[-1]))
        return torch.where(lr > knots[-1], tail, inside)

    def _pair_confidence(self, ids: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(n, k) µ_M of neighbour ids[j, i]'s P(error ≤ t[j, i]) (``pair_confidence`` of the estimator's
        distributions)."""
        n_logged = self.n_logged[:, ids]  # (M, n, k)
        if self.distribution_kind == "exact":
            below = (self.sorted_errors[:, :, ids].double() <= t).sum(1).to(torch.float64)  # (M, n, k)
            return (below / n_logged).mean(0)
        # histogram: counts below t's bin plus the bin's share, linear within the bin
        j = torch.searchsorted(self.bin_edges, t.contiguous(), right=False)  # t in (e_{j-1}, e_j]
        pos = ids * (self.n_bins + 1) + j
        lower = self.bin_below[:, pos]
        in_bin = self.bin_below[:, pos + 1] - lower
        lo, hi = self.bin_bounds[j], self.bin_bounds[j + 1]
        width = hi - lo
        frac = torch.where(torch.isfinite(hi), torch.clamp((t - lo) / torch.where(width > 0, width, torch.ones_like(width)),
                                                            0.0, 1.0), torch.zeros_like(t))
        frac = torch.where(width > 0, frac, torch.ones_like(frac))  # a degenerate [0, 0] bin holds t >= 0
        est = (lower + frac * in_bin) / n_logged
        est = torch.where(t >= self.max_error[ids], torch.ones_like(est), est)  # above the largest error: 1
        return est.mean(0)

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        # the UQ needs no gradients (forces were taken before this module runs)
        x = data[LATENT_FIELD].detach().to(torch.float32)
        r = self.reference.shape[0]
        if self.compressed:
            # nearest centroids, ranked by exact distance; their counts fill k member slots
            m = min(r, self.k)  # k centroids always hold >= k members (every count >= 1)
            cand = self._candidates(x, min(r, m + _MARGIN))
            dist = self._exact_distances(x, cand)
            dist, order = torch.topk(dist, m, dim=1, largest=False)
            ids = torch.gather(cand, 1, order)
            c = self.counts[ids]
            before = torch.cumsum(c, dim=1) - c
            w = torch.clamp(float(self.k) - before, min=0.0)
            w = torch.minimum(w, c) / float(self.k)
            conf = (w * self.confidence[ids]).sum(1)
            err = (w * self.mean_error[ids]).sum(1)
            mean_dist = (w * dist.double()).sum(1)
        else:
            cand = self._candidates(x, min(r, self.k + _MARGIN))
            dist = self._exact_distances(x, cand)
            dist, order = torch.topk(dist, self.k, dim=1, largest=False)
            ids = torch.gather(cand, 1, order)
            dist64 = dist.double()
            if self.distance_weights:
                w = 1.0 / torch.clamp(dist64, min=1e-12)
                w = w / w.sum(1, keepdim=True)
            else:
                w = torch.full_like(dist64, 1.0 / self.k)
            mean_dist = dist64.mean(1)
            if self.distance_aware:
                # s_j = c_Z · g(d_j / d_ref); each neighbour's CDF evaluated at its threshold / s_j
                ratio = mean_dist / self.reference_distance
                types = data[AtomicDataDict.ATOM_TYPE_KEY].reshape(-1)
                scale = self.type_factors[types] * self._distance_scale(ratio)
                t = self.threshold[ids] / scale.unsqueeze(1)
                conf = torch.clamp((w * self._pair_confidence(ids, t)).sum(1), 0.0, 1.0)
                err = scale * (w * self.unscaled_mean_error[ids]).sum(1)
                data[DISTANCE_RATIO_FIELD] = ratio.unsqueeze(-1)
                if self.error_bounds:
                    data[ERROR_BOUND_FIELD] = (self.bound_quantiles[types] * err).unsqueeze(-1)
            else:
                conf = (w * self.confidence[ids]).sum(1)
                err = (w * self.mean_error[ids]).sum(1)
        data[UNCERTAINTY_FIELD] = (1.0 - conf).unsqueeze(-1)
        data[CONFIDENCE_FIELD] = conf.unsqueeze(-1)
        data[EXPECTED_ERROR_FIELD] = err.unsqueeze(-1)
        data[DISTANCE_FIELD] = mean_dist.unsqueeze(-1)
        return data


class ModelWithLTAU(GraphModuleMixin, torch.nn.Module):
    """The force model (nequip's ``ForceStressOutput``) followed by an :class:`LTAUReadout`."""

    def __init__(self, model: GraphModuleMixin, ltau: LTAUReadout) -> None:
        super().__init__()
        self._init_irreps(irreps_in=model.irreps_in, irreps_out={**model.irreps_out, **ltau.irreps_out})
        self.model = model
        self.ltau = ltau

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        return self.ltau(self.model(data))


def ltau_fields_to_results(out: Dict[str, torch.Tensor], n_atoms: int) -> Dict[str, np.ndarray]:
    """The LTAU fields present in a model output dict as (N,) float64 arrays (ASE results)."""
    return {f: out[f].detach().reshape(n_atoms).cpu().numpy().astype(np.float64)
            for f in BOUNDED_FIELDS if f in out}


class InModelLTAUCalculator(LatentNequIPCalculator):
    """``LatentNequIPCalculator`` over an eager ``GraphModel`` with an appended :class:`LTAUReadout`.

    The eager twin of a file written by ``ltau compile``: results gain the four ``ltau_*`` fields
    ((N,) float64) of the same forward pass, and ``ltau_readout`` holds the readout's provenance, so
    ``LTAUCalculator(calc, None)`` reports them. Arguments: those of ``LatentNequIPCalculator``.
    """

    def __init__(self, model: torch.nn.Module, device: Any = "cpu", **kwargs: Any) -> None:
        if not isinstance(getattr(model, "model", None), ModelWithLTAU):
            raise ValueError("the model carries no LTAU readout; append one with append_ltau(model, readout)")
        super().__init__(model, device, **kwargs)
        self.ltau_readout = dict(model.model.ltau.provenance)
        self.implemented_properties = [*self.implemented_properties, *model.model.ltau.fields]

    def save_extra_outputs(self, out: AtomicDataDict.Type) -> None:
        super().save_extra_outputs(out)
        self.results.update(ltau_fields_to_results(out, len(self.atoms)))


def _training_latents(estimator: Any) -> np.ndarray:
    """(N, D) float32 training latents kept by the estimator's index (flat, HNSW, IVF-PQ with re-ranking)."""
    x = estimator.index_.training_vectors()
    if x is None:
        raise ValueError(
            f"the estimator's {estimator.index_.kind} index stores only compressed codes, not the training latents; "
            "refit it with index='flat' or 'hnsw' (or ivfpq with refine > 0) to compile LTAU into the model"
        )
    return np.ascontiguousarray(x, dtype=np.float32)


def reference_from_estimator(
    estimator: Any, mode: str = "exact", n_centroids: Optional[int] = None, seed: int = 0
) -> Dict[str, Any]:
    """Reference arrays for :class:`LTAUReadout` from a fitted ``LTAUEstimator``.

    Confidences are the training atoms' probabilities at the estimator's fitted threshold / scale
    (``estimator.train_confidence(None)``, exactly what ``predict()`` averages) and mean errors are
    scale × the logged means. ``mode="compressed"`` clusters the N latents into ``n_centroids``
    (default N / 8, at most 4096, at least 4·k) k-means centroids (FAISS, 20 iterations, ``seed``) and pools the
    members' statistics (means and counts).

    Returns:
        dict(reference=(R, D) float32, confidence=(R,), mean_error=(R,), counts=(C,) float64 or None,
        k=int, weights=str).
    """
    if mode not in REFERENCE_MODES:
        raise ValueError(f"mode must be one of {REFERENCE_MODES}; got {mode!r}")
    x = _training_latents(estimator)
    p = np.asarray(estimator.train_confidence(None), dtype=np.float64)
    if p.ndim == 0 or p.shape != (x.shape[0],):
        raise ValueError(f"estimator's training confidences have shape {p.shape}; expected ({x.shape[0]},)")
    # the same s that predict() applies without a calibration (a fitted scale_ wins over the parameter)
    err = float(estimator.effective_scale) * np.asarray(estimator.mean_error_train_, dtype=np.float64)
    out = dict(reference=x, confidence=p, mean_error=err, counts=None, k=int(estimator.k_eff_), weights=estimator.weights)
    if mode == "exact":
        return out
    import faiss

    n = x.shape[0]
    k = out["k"]
    c = int(n_centroids) if n_centroids is not None else min(n, max(4 * k, min(n // 8, MAX_DEFAULT_CENTROIDS)))
    if not 1 <= c <= n:
        raise ValueError(f"n_centroids must lie in [1, {n}]; got {c}")
    if estimator.weights != "uniform":
        raise ValueError("the compressed reference supports estimators with weights='uniform' only")
    # k-means on at most 64 points per centroid (FAISS subsamples): minutes at most for 10^6 atoms
    km = faiss.Kmeans(x.shape[1], c, niter=20, seed=seed, verbose=False, max_points_per_centroid=64)
    km.train(x)
    _, assign = km.index.search(x, 1)
    assign = assign[:, 0]
    counts = np.bincount(assign, minlength=c).astype(np.float64)
    keep = counts > 0  # k-means may leave clusters empty: drop them
    remap = np.cumsum(keep) - 1
    assign = remap[assign]
    cent = np.ascontiguousarray(km.centroids[keep], dtype=np.float32)
    counts = counts[keep]
    out.update(
        reference=cent,
        confidence=np.bincount(assign, weights=p, minlength=cent.shape[0]) / counts,
        mean_error=np.bincount(assign, weights=err, minlength=cent.shape[0]) / counts,
        counts=counts,
        weights="uniform",
    )
    out["assignment"] = assign  # (N,) centroid of each training atom, for recall measurements
    return out


def distance_aware_reference(estimator: Any, type_names: list[str], coverage: Optional[float] = None) -> Dict[str, Any]:
    """What the distance-aware readout needs from a calibrated estimator (``fit_calibration``).

    Per training atom: its error distribution (``exact``: the sorted logged errors per run;
    ``compact``: the histogram counts, bin edges and largest error), logged-epoch counts, threshold
    (fitted atol + rtol·|F_ref|) and unscaled mean error; the distance scale g (knots, values, tail
    exponent) and the reference distance d_ref; per model type, the element factor c_Z (the pooled
    factor for elements without one). ``type_names`` are the model's types in index order; they must
    be chemical symbols when the estimator has per-element factors. With ``coverage`` q also
    ``bound_quantiles``: per model type, the conformal quantile that ``predict(..., coverage=q)`` uses
    for its element (the pooled one for a type that is not a chemical symbol).
    """
    from ase.data import atomic_numbers

    if not getattr(estimator, "is_calibrated", False):
        raise ValueError("the distance-aware readout needs a calibrated estimator (fit_calibration / ltau calibrate)")
    estimator.check_calibration()  # compiled at the k it was calibrated at, as predict does
    dist = estimator.distributions_
    factor_z = np.asarray(estimator.element_factor_z_, dtype=np.int64)
    factors = np.full(len(type_names), float(estimator.pooled_factor_))
    for i, name in enumerate(type_names):
        z = atomic_numbers.get(name)
        if z is None:
            if factor_z.size:
                raise ValueError(f"model type {name!r} is not a chemical symbol, so the estimator's per-element "
                                 f"factors (Z = {factor_z.tolist()}) cannot be assigned to it")
            continue
        hit = np.flatnonzero(factor_z == z)
        if hit.size:
            factors[i] = float(estimator.element_factors_[hit[0]])
    g = estimator.distance_scale_
    out: Dict[str, Any] = {
        "kind": dist.kind,
        "n_logged": np.asarray(dist.n_logged, dtype=np.float64),
        "threshold": np.asarray(dist.fitted_threshold, dtype=np.float64),
        "unscaled_mean_error": np.asarray(estimator.mean_error_train_, dtype=np.float64),
        "scale_log_ratio": g.log_ratio, "scale_values": g.values, "scale_tail_exponent": g.tail_exponent,
        "reference_distance": float(estimator.calibration_info_["reference_distance"]),
        "type_factors": factors,
    }
    if coverage is not None:
        from ltau_ase.core.conformal import check_coverage

        # a type that is no chemical symbol gets label -1, which no Mondrian group has: the pooled quantile
        labels = np.array([atomic_numbers.get(name, -1) for name in type_names], dtype=np.int64)
        out["bound_quantiles"] = estimator.conformal_.quantile_for(labels, check_coverage(coverage))
    if dist.kind == "exact":
        out["sorted_errors"] = dist.sorted_errors
    else:
        out.update(counts=dist.counts, edges=dist.edges, max_error=dist.max_error)
    return out


def check_readout_form(estimator: Any, paper_form: bool, mode: str = "exact", coverage: Optional[float] = None) -> None:
    """A calibrated estimator compiles in its distance-aware form, which needs the exact reference:
    refuse the compressed one unless the paper's form is asked for explicitly. Error bounds
    (``coverage``) exist only in the distance-aware form."""
    if coverage is not None:
        from ltau_ase.core.conformal import check_coverage

        check_coverage(coverage)
        if not getattr(estimator, "is_calibrated", False):
            raise ValueError("error bounds (coverage) need an estimator calibrated with fit_calibration / ltau calibrate; "
                             "this one has no conformal calibration")
        if paper_form:
            raise ValueError("error bounds (coverage) exist only in the distance-aware form; drop paper_form "
                             "(--paper-form) or the coverage (--coverage)")
        if getattr(estimator, "structure_scale_", None) is not None:
            # the readout computes each atom's bound from that atom alone; h(R) needs the whole structure's
            # distance ratios, so compiling the per-atom quantile × σ would give bounds predict does not give
            raise ValueError("this estimator's error bounds are structure-aware (fit_calibration(structure_index=...)): "
                             "the in-model readout computes bounds per atom and cannot apply the structure scale; "
                             "compile without --coverage, or calibrate without structure_index for compiled bounds")
    if getattr(estimator, "is_calibrated", False) and not paper_form and mode != "exact":
        raise ValueError(
            "the estimator is calibrated (fit_calibration / ltau calibrate): its distance-aware form needs every "
            "training atom's error distribution, which the compressed reference does not keep; compile with "
            "--reference exact, or pass paper_form=True (ltau compile --paper-form) for the paper's one-scale form"
        )


def readout_from_estimator(
    model: torch.nn.Module,
    estimator: Any,
    mode: str = "exact",
    n_centroids: Optional[int] = None,
    block_size: int = 32768,
    provenance: Optional[Dict[str, Any]] = None,
    paper_form: bool = False,
    coverage: Optional[float] = None,
) -> LTAUReadout:
    """An :class:`LTAUReadout` for the eager nequip ``GraphModel`` ``model`` and a fitted estimator.

    An uncalibrated estimator compiles in the paper's form (one scale s). A calibrated one
    (``fit_calibration``) compiles in its distance-aware form, as ``predict`` computes it with the
    atoms' atomic numbers (what ``LTAUCalculator`` passes): per-atom scale s_j = c_Z · g(d_j / d_ref),
    each neighbour's error distribution evaluated at its threshold / s_j, and the extra field
    ``ltau_distance_ratio``; ``paper_form=True`` compiles its paper form instead
    (``predict(..., distance_aware=False)``). With ``coverage`` q the distance-aware form also outputs
    ``ltau_force_error_bound``, ``predict(..., coverage=q)``'s conformal bound (eV/Å).
    """
    check_readout_form(estimator, paper_form, mode, coverage)
    aware = bool(getattr(estimator, "is_calibrated", False)) and not paper_form
    inner = model.model
    d = inner.irreps_out.get(LATENT_FIELD)
    if d is not None and int(d.dim) != int(estimator.n_features_in_):
        raise ValueError(
            f"the estimator was fitted on {estimator.n_features_in_}-dimensional descriptors but the model's "
            f"'{LATENT_FIELD}' have {int(d.dim)} features: the estimator belongs to another model"
        )
    ref = reference_from_estimator(estimator, mode, n_centroids)
    species = None if estimator.species_ is None else [int(z) for z in estimator.species_]
    info = {
        "mode": mode,
        "k": ref["k"],
        "weights": ref["weights"],
        "n_reference": int(ref["reference"].shape[0]),
        "n_train_atoms": int(estimator.n_train_atoms_),
        "descriptor_dim": int(estimator.n_features_in_),
        "threshold": float(estimator.atol_) if estimator.rtol == 0 else None,
        "rtol": float(estimator.rtol),
        "scale": float(estimator.effective_scale),
        "form": "distance_aware" if aware else "paper",
        "species": species,
        "coverage": None if coverage is None else float(coverage),
        **(provenance or {}),
    }
    counts = None if ref["counts"] is None else torch.as_tensor(ref["counts"])
    return LTAUReadout(
        inner.irreps_out,
        torch.as_tensor(ref["reference"]),
        torch.as_tensor(ref["confidence"]),
        torch.as_tensor(ref["mean_error"]),
        k=ref["k"],
        counts=counts,
        weights=ref["weights"],
        block_size=block_size,
        provenance=info,
        distance_aware=distance_aware_reference(estimator, list(model.type_names), coverage) if aware else None,
    )


def append_ltau(model: torch.nn.Module, readout: LTAUReadout) -> torch.nn.Module:
    """Append ``readout`` after the eager ``GraphModel`` ``model``'s force module, in place; returns ``model``."""
    if isinstance(model.model, ModelWithLTAU):
        raise ValueError("the model already carries an LTAU readout")
    model.model = ModelWithLTAU(model.model, readout)
    model.irreps_out = dict(model.model.irreps_out)
    return model


def readout_for_estimator(estimator: Any, mode: str = "exact", n_centroids: Optional[int] = None,
                          seed: int = 0, block_size: int = 32768, type_names: Optional[list] = None,
                          coverage: Optional[float] = None) -> LTAUReadout:
    """A stand-alone :class:`LTAUReadout` reading D-dimensional ``node_features`` (for tests and benchmarks).

    ``type_names`` (chemical symbols, in type-index order) selects the distance-aware form of a
    calibrated estimator; None gives the paper's form. ``coverage`` adds the error bounds (distance-aware)."""
    from e3nn import o3

    ref = reference_from_estimator(estimator, mode, n_centroids, seed)
    irreps = {LATENT_FIELD: o3.Irreps(f"{int(estimator.n_features_in_)}x0e")}
    counts = None if ref["counts"] is None else torch.as_tensor(ref["counts"])
    if coverage is not None and type_names is None:
        raise ValueError("error bounds (coverage) need the distance-aware form: pass type_names")
    aware = None if type_names is None else distance_aware_reference(estimator, list(type_names), coverage)
    return LTAUReadout(irreps, torch.as_tensor(ref["reference"]), torch.as_tensor(ref["confidence"]),
                       torch.as_tensor(ref["mean_error"]), k=ref["k"], counts=counts, weights=ref["weights"],
                       block_size=block_size, distance_aware=aware)


def readout_predict(readout: LTAUReadout, latents: Any, atom_types: Any = None) -> Dict[str, np.ndarray]:
    """Run ``readout`` on (n, D) latents (and, distance-aware, the (n,) model type indices of the atoms);
    returns ``LTAUEstimator.predict``-style (n,) float64 arrays."""
    device = readout.reference.device
    data = {LATENT_FIELD: torch.as_tensor(np.ascontiguousarray(latents, dtype=np.float32)).to(device)}
    if readout.distance_aware:
        if atom_types is None:
            raise ValueError("the distance-aware readout needs the atoms' type indices (atom_types)")
        data[AtomicDataDict.ATOM_TYPE_KEY] = torch.as_tensor(np.asarray(atom_types, dtype=np.int64)).to(device)
    with torch.no_grad():  # the readout has no parameters; its outputs need no gradients
        out = readout(data)
    get = lambda f: out[f].squeeze(-1).cpu().numpy().astype(np.float64)  # noqa: E731
    pred = {"uncertainty": get(UNCERTAINTY_FIELD), "confidence": get(CONFIDENCE_FIELD),
            "expected_error": get(EXPECTED_ERROR_FIELD), "distance": get(DISTANCE_FIELD)}
    if readout.distance_aware:
        pred["distance_ratio"] = get(DISTANCE_RATIO_FIELD)
    if readout.error_bounds:
        pred["error_bound"] = get(ERROR_BOUND_FIELD)
    return pred


def compressed_accuracy(estimator: Any, queries: Any, n_centroids: Optional[int] = None, seed: int = 0) -> Dict[str, float]:
    """Accuracy of the compressed reference against ``estimator.predict`` on (n, D) query latents.

    Returns dict(spearman=ρ between the compressed readout's and the exact uncertainties,
    recall=mean fraction of each query's exact k nearest training atoms that belong to a centroid the
    compressed search used, max_abs_uncertainty_diff, n_centroids, n_train_atoms, k).
    """
    import faiss
    from scipy.stats import spearmanr

    q = np.ascontiguousarray(queries, dtype=np.float32)
    # the compressed readout is the paper's form (reference_from_estimator): compare like with like, also for
    # a calibrated estimator (whose default predict is distance-aware)
    exact = estimator.predict(q, distance_aware=False)
    ref = reference_from_estimator(estimator, "compressed", n_centroids, seed)
    counts = torch.as_tensor(ref["counts"])
    readout = LTAUReadout({LATENT_FIELD: f"{q.shape[1]}x0e"}, torch.as_tensor(ref["reference"]),
                          torch.as_tensor(ref["confidence"]), torch.as_tensor(ref["mean_error"]),
                          k=ref["k"], counts=counts)
    comp = readout_predict(readout, q)
    k = ref["k"]
    index = faiss.IndexFlatL2(q.shape[1])
    index.add(ref["reference"])
    _, cids = index.search(q, min(k, ref["reference"].shape[0]))
    c = ref["counts"][cids]
    used = (np.cumsum(c, axis=1) - c) < k  # centroids that filled at least one of the k member slots
    members = ref["assignment"][estimator.index_.search(q, k)[1]]  # (n, k) centroid of each exact neighbour
    recall = np.mean([np.isin(members[i], cids[i][used[i]]).mean() for i in range(q.shape[0])])
    return {
        "spearman": float(spearmanr(comp["uncertainty"], exact["uncertainty"]).statistic),
        "recall": float(recall),
        "max_abs_uncertainty_diff": float(np.max(np.abs(comp["uncertainty"] - exact["uncertainty"]))),
        "n_centroids": int(ref["reference"].shape[0]),
        "n_train_atoms": int(estimator.n_train_atoms_),
        "k": int(k),
    }
