"""Per-atom weighted force loss for nequip training (dataset-cartography re-weighting, paper App. E).

The weights are a per-atom data field ``ltau_weight`` (registered by :mod:`ltau_ase.nequip.fields`):
write them as an extxyz column ``ltau_weight`` (e.g. with ``ltau reweight``) and list
``ltau_weight`` in the dataset's ``include_keys``. Then, in an ordinary nequip config::

    training_module:
      loss:
        _target_: ltau_ase.nequip.loss.WeightedEnergyForceLoss
        per_atom_energy: true
        coeffs:
          total_energy: 1.0
          forces: 1.0

or, inside any nequip ``MetricsManager``, an entry with ``field: null`` and
``metric: {_target_: ltau_ase.nequip.loss.WeightedForceMSE}``.

Definition: for a batch of N atoms with weights w_i ≥ 0,

    weighted_forces_mse = (1 / 3N) Σ_i w_i |F_pred,i − F_ref,i|²     ((eV/Å)²)

i.e. nequip's force MSE (mean over all 3N components) with atom i's terms multiplied by w_i. With
all weights 1 it equals nequip's ``forces_mse``; weights normalised to mean 1 (as
``ltau_ase.cartography.loss_weights`` returns them) keep the loss on the same scale as the
unweighted one. Epoch values accumulate like nequip's MSE (running mean over all components).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from nequip.data import AtomicDataDict, PerAtomModifier
from nequip.train import MeanSquaredError, MetricsManager

from ltau_ase.nequip.fields import ATOM_WEIGHT_KEY


class WeightedForceMSE(MeanSquaredError):
    """nequip's force MSE with per-atom weights from the data field ``ltau_weight``.

    Used with ``field: null`` in a ``MetricsManager`` entry, so ``update`` receives the whole
    prediction and target ``AtomicDataDict`` s (forces (N, 3) eV/Å; weights (N,) or (N, 1)).
    """

    def update(self, preds: AtomicDataDict.Type, target: AtomicDataDict.Type) -> None:  # type: ignore[override]
        """"""
        if not isinstance(preds, dict) or not isinstance(target, dict):
            raise TypeError(
                "WeightedForceMSE needs whole data dicts: use it in a MetricsManager entry with `field: null`"
            )
        if ATOM_WEIGHT_KEY not in target:
            raise KeyError(
                f"the batch has no per-atom '{ATOM_WEIGHT_KEY}' field: write the weights as an extxyz column "
                f"'{ATOM_WEIGHT_KEY}' (see `ltau reweight`) and add '{ATOM_WEIGHT_KEY}' to the dataset's include_keys"
            )
        pred_f = preds[AtomicDataDict.FORCE_KEY]
        ref_f = target[AtomicDataDict.FORCE_KEY]
        weights = target[ATOM_WEIGHT_KEY].reshape(-1, 1).to(pred_f.dtype)
        if weights.shape[0] != pred_f.shape[0]:
            raise ValueError(
                f"'{ATOM_WEIGHT_KEY}' holds {weights.shape[0]} values for {pred_f.shape[0]} atoms; expected one per atom"
            )
        if not bool(torch.all(torch.isfinite(weights) & (weights >= 0))):
            raise ValueError(f"'{ATOM_WEIGHT_KEY}' must be finite and >= 0")
        # (√w·F_pred − √w·F_ref)² = w·ΔF²: nequip's MSE accumulation then does the rest
        root = torch.sqrt(weights)
        super().update(root * pred_f, root * ref_f)

    def __str__(self) -> str:
        return "weighted_mse"


def WeightedEnergyForceLoss(
    coeffs: Dict[str, float] = {AtomicDataDict.TOTAL_ENERGY_KEY: 1.0, AtomicDataDict.FORCE_KEY: 1.0},
    per_atom_energy: bool = True,
    type_names: Optional[List[str]] = None,
    extra_metrics: Optional[List[Dict[str, Any]]] = None,
) -> MetricsManager:
    """Like ``nequip.train.EnergyForceLoss`` with the force MSE replaced by :class:`WeightedForceMSE`.

    Loss component names: ``per_atom_energy_mse`` (or ``total_energy_mse``) and
    ``weighted_forces_mse``.
    """
    for key in (AtomicDataDict.TOTAL_ENERGY_KEY, AtomicDataDict.FORCE_KEY):
        if key not in coeffs:
            raise ValueError(f"coeffs needs a '{key}' entry; got {sorted(coeffs)}")
    metrics: List[Dict[str, Any]] = [
        {
            "name": "per_atom_energy_mse" if per_atom_energy else "total_energy_mse",
            "field": (
                PerAtomModifier(AtomicDataDict.TOTAL_ENERGY_KEY) if per_atom_energy else AtomicDataDict.TOTAL_ENERGY_KEY
            ),
            "coeff": coeffs[AtomicDataDict.TOTAL_ENERGY_KEY],
            "metric": MeanSquaredError(),
        },
        {
            "name": "weighted_forces_mse",
            "field": None,
            "coeff": coeffs[AtomicDataDict.FORCE_KEY],
            "metric": WeightedForceMSE(),
        },
    ]
    return MetricsManager(metrics=[*metrics, *(extra_metrics or [])], type_names=type_names)
