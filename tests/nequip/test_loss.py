"""Weighted per-atom force loss against manual computations on a tiny in-memory NequIP model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ltau_ase.nequip.fields import ATOM_WEIGHT_KEY
from ltau_ase.nequip.training import emt_slab_frames

TYPE_NAMES = ["Cu", "Pt", "O", "H"]


@pytest.fixture(scope="module")
def tiny_model_and_batch():
    from nequip.data import AtomicDataDict, from_ase
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform
    from nequip.model import NequIPGNNModel
    from nequip.utils.global_state import set_global_state

    set_global_state()
    model = NequIPGNNModel(
        seed=0,
        model_dtype="float64",
        type_names=TYPE_NAMES,
        r_max=4.0,
        l_max=1,
        parity=True,
        num_layers=1,
        num_features=4,
        radial_mlp_depth=1,
        radial_mlp_width=8,
        avg_num_neighbors=10.0,
        per_type_energy_shifts={t: 0.0 for t in TYPE_NAMES},
        per_type_energy_scales={t: 1.0 for t in TYPE_NAMES},
    )
    transforms = [
        ChemicalSpeciesToAtomTypeMapper(
            model_type_names=TYPE_NAMES, chemical_species_to_atom_type_map={t: t for t in TYPE_NAMES}
        ),
        NeighborListTransform(r_max=4.0),
    ]
    frames = emt_slab_frames(2, seed=11)
    rng = np.random.default_rng(0)
    data = []
    for atoms in frames:
        atoms.arrays[ATOM_WEIGHT_KEY] = rng.uniform(0.5, 2.0, len(atoms))  # as read from an extxyz column
        d = from_ase(atoms, include_keys=[ATOM_WEIGHT_KEY])
        for t in transforms:
            d = t(d)
        data.append(d)
    batch = AtomicDataDict.batched_from_list(data)
    return model, batch


def _loss_and_grad(model, batch, weights, metric_factory):
    """(loss, flat gradient) of a fresh metric on the batch with the given per-atom weights."""
    target = dict(batch)
    target[ATOM_WEIGHT_KEY] = torch.as_tensor(weights, dtype=torch.float64)
    model.zero_grad()
    pred = model(dict(batch))
    loss = metric_factory()(pred, target)
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    flat = torch.cat([g.reshape(-1) for g in grads if g is not None])
    return loss.detach(), flat, pred


def test_weighted_loss_equals_unweighted_with_unit_weights(tiny_model_and_batch):
    from nequip.train import EnergyForceLoss, MeanSquaredError

    from ltau_ase.nequip.loss import WeightedEnergyForceLoss, WeightedForceMSE

    model, batch = tiny_model_and_batch
    n = batch["pos"].shape[0]
    loss, _, pred = _loss_and_grad(model, batch, np.ones(n), WeightedForceMSE)
    ref = MeanSquaredError()(pred["forces"].detach(), batch["forces"])
    manual = ((pred["forces"].detach() - batch["forces"]) ** 2).mean()
    torch.testing.assert_close(loss, ref.to(loss.dtype))
    torch.testing.assert_close(loss, manual)
    # the whole loss manager agrees with nequip's EnergyForceLoss
    target = dict(batch)
    target[ATOM_WEIGHT_KEY] = torch.ones(n, dtype=torch.float64)
    ours = WeightedEnergyForceLoss(type_names=TYPE_NAMES)(pred, target)
    theirs = EnergyForceLoss(type_names=TYPE_NAMES)(pred, target)
    torch.testing.assert_close(ours["weighted_sum"], theirs["weighted_sum"])
    torch.testing.assert_close(ours["weighted_forces_mse"], theirs["forces_mse"])


def test_doubling_one_weight_adds_that_atoms_gradient(tiny_model_and_batch):
    from ltau_ase.nequip.loss import WeightedForceMSE

    model, batch = tiny_model_and_batch
    w = batch[ATOM_WEIGHT_KEY].reshape(-1).double().numpy().copy()
    n, j = w.size, 5
    loss_a, grad_a, pred = _loss_and_grad(model, batch, w, WeightedForceMSE)
    w2 = w.copy()
    w2[j] *= 2.0
    loss_b, grad_b, _ = _loss_and_grad(model, batch, w2, WeightedForceMSE)
    # manual: L = (1/3N) Σ_i w_i |ΔF_i|², so doubling w_j adds w_j |ΔF_j|² / 3N and its gradient
    diff = pred["forces"].detach() - batch["forces"]
    sq = (diff**2).sum(dim=1)
    torch.testing.assert_close(loss_a, (torch.as_tensor(w) * sq).sum() / (3 * n))
    torch.testing.assert_close(loss_b - loss_a, w[j] * sq[j] / (3 * n))
    model.zero_grad()
    pred_j = model(dict(batch))
    term = w[j] * ((pred_j["forces"][j] - batch["forces"][j]) ** 2).sum() / (3 * n)
    grads = torch.autograd.grad(term, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    expected = torch.cat([g.reshape(-1) for g in grads if g is not None])
    torch.testing.assert_close(grad_b - grad_a, expected, rtol=1e-8, atol=1e-12)
    assert expected.abs().max() > 0


def test_weights_must_be_present_and_valid(tiny_model_and_batch):
    from ltau_ase.nequip.loss import WeightedForceMSE

    model, batch = tiny_model_and_batch
    pred = model(dict(batch))
    target = {k: v for k, v in batch.items() if k != ATOM_WEIGHT_KEY}
    with pytest.raises(KeyError, match="include_keys"):
        WeightedForceMSE()(pred, target)
    target[ATOM_WEIGHT_KEY] = -torch.ones(batch["pos"].shape[0], dtype=torch.float64)
    with pytest.raises(ValueError, match=">= 0"):
        WeightedForceMSE()(pred, target)
    target[ATOM_WEIGHT_KEY] = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="one per atom"):
        WeightedForceMSE()(pred, target)
