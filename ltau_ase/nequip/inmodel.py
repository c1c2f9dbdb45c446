"""LTAU as a nequip model output: a GraphModule appended after the force model.

:class:`LTAUReadout` reads the per-atom latent features (``node_features``, the last convnet's
invariant scalars) that the same forward pass produced and writes four per-atom fields, shape (N, 1),
float64 (nequip's output dtype, what LAMMPS' ``compute nequip/atom`` reads):

``ltau_uncertainty``            1 - p_j
``ltau_confidence``             p_j: mean over the k nearest training atoms of P(|F error| ≤ threshold / scale)
``ltau_expected_force_error``   scale × mean of the neighbours' mean logged errors, eV/Å
``ltau_latent_distance``        mean Euclidean latent distance to the k neighbours (latent units)

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
#: the per-atom output fields, in output order
LTAU_FIELDS = (UNCERTAINTY_FIELD, CONFIDENCE_FIELD, EXPECTED_ERROR_FIELD, DISTANCE_FIELD)
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
        self._init_irreps(
            irreps_in=irreps_in,
            my_irreps_in={LATENT_FIELD: irreps},
            irreps_out={f: "0e" for f in LTAU_FIELDS},
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
        self.provenance = dict(provenance or {})

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
            conf = (w * self.confidence[ids]).sum(1)
            err = (w * self.mean_error[ids]).sum(1)
            mean_dist = dist64.mean(1)
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
    return {f: out[f].detach().reshape(n_atoms).cpu().numpy().astype(np.float64) for f in LTAU_FIELDS if f in out}


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
        self.implemented_properties = [*self.implemented_properties, *LTAU_FIELDS]

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


def check_readout_form(estimator: Any, paper_form: bool) -> None:
    """Refuse a calibrated (distance-aware) estimator unless the paper's form is asked for explicitly."""
    if getattr(estimator, "is_calibrated", False) and not paper_form:
        raise ValueError(
            "the estimator is calibrated (fit_calibration / ltau calibrate): in Python it predicts the "
            "distance-aware uncertainty and conformal bounds, but the in-model readout computes the paper's "
            "form with one scale (predict(..., distance_aware=False)); pass paper_form=True (ltau compile "
            "--paper-form) to compile that form, or compile the uncalibrated estimator"
        )


def readout_from_estimator(
    model: torch.nn.Module,
    estimator: Any,
    mode: str = "exact",
    n_centroids: Optional[int] = None,
    block_size: int = 32768,
    provenance: Optional[Dict[str, Any]] = None,
    paper_form: bool = False,
) -> LTAUReadout:
    """An :class:`LTAUReadout` for the eager nequip ``GraphModel`` ``model`` and a fitted estimator.

    The readout computes the paper's form (one scale s, ``predict(..., distance_aware=False)``). An
    estimator calibrated with ``fit_calibration`` predicts the distance-aware form in Python; compiling
    it is refused unless ``paper_form=True`` states that the compiled uncertainties will be the
    paper's form, so that the two routes never silently disagree.
    """
    check_readout_form(estimator, paper_form)
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
        "form": "paper",
        "species": species,
        "fields": list(LTAU_FIELDS),
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
    )


def append_ltau(model: torch.nn.Module, readout: LTAUReadout) -> torch.nn.Module:
    """Append ``readout`` after the eager ``GraphModel`` ``model``'s force module, in place; returns ``model``."""
    if isinstance(model.model, ModelWithLTAU):
        raise ValueError("the model already carries an LTAU readout")
    model.model = ModelWithLTAU(model.model, readout)
    model.irreps_out = dict(model.model.irreps_out)
    return model


def readout_for_estimator(estimator: Any, mode: str = "exact", n_centroids: Optional[int] = None,
                          seed: int = 0, block_size: int = 32768) -> LTAUReadout:
    """A stand-alone :class:`LTAUReadout` reading D-dimensional ``node_features`` (for tests and benchmarks)."""
    from e3nn import o3

    ref = reference_from_estimator(estimator, mode, n_centroids, seed)
    irreps = {LATENT_FIELD: o3.Irreps(f"{int(estimator.n_features_in_)}x0e")}
    counts = None if ref["counts"] is None else torch.as_tensor(ref["counts"])
    return LTAUReadout(irreps, torch.as_tensor(ref["reference"]), torch.as_tensor(ref["confidence"]),
                       torch.as_tensor(ref["mean_error"]), k=ref["k"], counts=counts, weights=ref["weights"],
                       block_size=block_size)


def readout_predict(readout: LTAUReadout, latents: Any) -> Dict[str, np.ndarray]:
    """Run ``readout`` on (n, D) latents; returns ``LTAUEstimator.predict``-style (n,) float64 arrays."""
    x = torch.as_tensor(np.ascontiguousarray(latents, dtype=np.float32)).to(readout.reference.device)
    with torch.no_grad():  # the readout has no parameters; its outputs need no gradients
        out = readout({LATENT_FIELD: x})
    get = lambda f: out[f].squeeze(-1).cpu().numpy().astype(np.float64)  # noqa: E731
    return {"uncertainty": get(UNCERTAINTY_FIELD), "confidence": get(CONFIDENCE_FIELD),
            "expected_error": get(EXPECTED_ERROR_FIELD), "distance": get(DISTANCE_FIELD)}


def compressed_accuracy(estimator: Any, queries: Any, n_centroids: Optional[int] = None, seed: int = 0) -> Dict[str, float]:
    """Accuracy of the compressed reference against ``estimator.predict`` on (n, D) query latents.

    Returns dict(spearman=ρ between the compressed readout's and the exact uncertainties,
    recall=mean fraction of each query's exact k nearest training atoms that belong to a centroid the
    compressed search used, max_abs_uncertainty_diff, n_centroids, n_train_atoms, k).
    """
    import faiss
    from scipy.stats import spearmanr

    q = np.ascontiguousarray(queries, dtype=np.float32)
    exact = estimator.predict(q)
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
