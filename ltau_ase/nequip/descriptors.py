"""Latent descriptors of a whole training set, in global atom-id order.

The batches go through nequip's own data pipeline (``from_ase``, the model's type mapper and
neighbour-list transforms, ``batched_from_list``) and the same eager model as
:class:`~ltau_ase.nequip.calculator.LatentNequIPCalculator`, so a training atom's descriptor equals
the one the calculator returns for that structure (up to float32 summation order).

Alignment with the error logs is verified, not assumed: every batch output's per-atom frame index
(``batch``), atom types and positions are compared with the input frames before the descriptors are
kept.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from ase import Atoms
from nequip.data import AtomicDataDict
from nequip.integrations.ase import NequIPCalculator

from ltau_ase.core.atom_ids import frame_ids_of, global_atom_ids
from ltau_ase.core.checks import check_int
from ltau_ase.core.trainingset import read_training_frames  # noqa: F401  (its old home)
from ltau_ase.nequip.calculator import LATENT_FIELD, LatentNequIPCalculator, latent_dim

ModelLike = Union[str, Path, NequIPCalculator]

# positions go through the model's dtype (float32 or float64); Å
_POSITION_ATOL = 1e-4


def _as_calculator(model_or_path: ModelLike, device: Union[str, torch.device]) -> NequIPCalculator:
    if isinstance(model_or_path, NequIPCalculator):
        return model_or_path
    if isinstance(model_or_path, (str, Path)):
        return LatentNequIPCalculator.from_model_file(model_or_path, device=device)
    raise TypeError(
        f"model_or_path is a {type(model_or_path).__name__}; expected a path to a .ckpt / .nequip.zip file "
        "or a (Latent)NequIPCalculator"
    )


def _expected_atom_types(calc: NequIPCalculator, frames: Sequence[Atoms]) -> np.ndarray:
    """Atom types the model should see for the frames' atoms, from their atomic numbers."""
    from ase.data import chemical_symbols
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper

    mappers = [t for t in calc.transforms if isinstance(t, ChemicalSpeciesToAtomTypeMapper)]
    if len(mappers) != 1:
        raise ValueError(
            f"expected exactly one ChemicalSpeciesToAtomTypeMapper in the calculator's transforms, got {len(mappers)}"
        )
    lookup = mappers[0].lookup_table.detach().cpu().numpy()  # atomic number -> type index, -1 = unknown
    numbers = np.concatenate([a.numbers for a in frames]) if frames else np.zeros(0, dtype=np.int64)
    types = np.where(numbers < lookup.size, lookup[np.minimum(numbers, lookup.size - 1)], -1)
    if (types < 0).any():
        unknown = sorted({chemical_symbols[z] for z in numbers[types < 0]})
        known = [chemical_symbols[z] for z in np.flatnonzero(lookup >= 0)]
        raise ValueError(f"training frames contain elements {unknown} that the model does not map; it knows {known}")
    return types.astype(np.int64)


def _geometry_only(atoms: Atoms) -> Atoms:
    # drop labels/calculator results: they are not model inputs and would make batch keys differ
    return Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)


def extract_descriptors(
    model_or_path: ModelLike,
    frames: Sequence[Atoms],
    device: Union[str, torch.device] = "cpu",
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Latent descriptors of every atom of the training frames.

    Args:
        model_or_path: a ``.ckpt`` / ``.nequip.zip`` path, or a ``(Latent)NequIPCalculator``
            whose model and transforms are used.
        frames: training frames, each with ``info["frame_id"]``.
        device: torch device when loading from a path.
        batch_size: frames per forward pass.
        progress: show a tqdm progress bar.
    Returns:
        atom_ids: (N,) int64 global atom ids (``frame_id * 2**20 + local index``), frame order
            then local order.
        descriptors: (N, D) float32 latent features (model latent units), row i for atom_ids[i].
    Raises:
        ValueError: bad frame ids, bad batch size, unknown elements, or model output that does not
            line up with the input frames.
    """
    from tqdm.auto import tqdm

    check_int(batch_size, "batch_size")
    frames = list(frames)
    frame_ids = frame_ids_of(frames)
    n_atoms = np.asarray([len(a) for a in frames], dtype=np.int64)
    atom_ids = global_atom_ids(frame_ids, n_atoms)
    calc = _as_calculator(model_or_path, device)
    model = calc.model
    dim = latent_dim(model)
    expected_types = _expected_atom_types(calc, frames)
    expected_pos = np.concatenate([a.positions for a in frames]) if frames else np.zeros((0, 3))

    descriptors = np.empty((int(n_atoms.sum()), dim), dtype=np.float32)
    starts = np.concatenate([[0], np.cumsum(n_atoms)])
    batches = range(0, len(frames), int(batch_size))
    for first in tqdm(batches, desc="descriptors", unit="batch", disable=not progress):
        last = min(first + int(batch_size), len(frames))
        data = AtomicDataDict.batched_from_list([calc.atoms_to_data(_geometry_only(a)) for a in frames[first:last]])
        # autograd stays on: nequip's force output differentiates the energy w.r.t. positions
        out = model(data)
        lo, hi = starts[first], starts[last]
        _check_alignment(out, n_atoms[first:last], expected_types[lo:hi], expected_pos[lo:hi], first)
        descriptors[lo:hi] = out[LATENT_FIELD].detach().cpu().numpy()
    return atom_ids, descriptors


def _check_alignment(
    out: AtomicDataDict.Type, n_atoms: np.ndarray, types: np.ndarray, positions: np.ndarray, first_frame: int
) -> None:
    """Raise unless the batch output's atoms are exactly the input frames' atoms, in order."""
    batch = out[AtomicDataDict.BATCH_KEY].detach().cpu().numpy()
    expected_batch = np.repeat(np.arange(n_atoms.size), n_atoms)
    where = f"batch starting at frame {first_frame}"
    if batch.shape != expected_batch.shape or not np.array_equal(batch, expected_batch):
        raise ValueError(f"{where}: model output holds {batch.size} atoms in frame order {np.unique(batch).tolist()}; "
                         f"expected {expected_batch.size} atoms of frames 0..{n_atoms.size - 1} in order")
    got_types = out[AtomicDataDict.ATOM_TYPE_KEY].detach().cpu().numpy().reshape(-1)
    if not np.array_equal(got_types, types):
        bad = int(np.flatnonzero(got_types != types)[0])
        raise ValueError(f"{where}: atom {bad} has model type {got_types[bad]} but the frames give type {types[bad]}")
    got_pos = out[AtomicDataDict.POSITIONS_KEY].detach().cpu().numpy()
    if not np.allclose(got_pos, positions, rtol=0.0, atol=_POSITION_ATOL):
        bad = int(np.flatnonzero(np.abs(got_pos - positions).max(axis=1) > _POSITION_ATOL)[0])
        raise ValueError(f"{where}: atom {bad} is at {got_pos[bad]} Å in the model output but at {positions[bad]} Å in the frames")
    features = out.get(LATENT_FIELD)
    if features is None or features.shape[0] != types.size:
        raise ValueError(f"{where}: model output '{LATENT_FIELD}' missing or with {None if features is None else features.shape[0]} rows; expected {types.size}")
