"""Stable global atom ids.

Every training frame carries an integer ``frame_id`` (``atoms.info["frame_id"]``), unique across
all training files. The global id of atom ``a`` of that frame is ``frame_id * 2**20 + a``: it does
not depend on file order, shuffling or train/validation splits, and it can be inverted without a
lookup table. Frames are limited to 2**20 (~1 M) atoms and frame ids to 2**42.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

FRAME_ID_KEY = "frame_id"
ATOMS_PER_FRAME_BITS = 20
MAX_ATOMS_PER_FRAME = 1 << ATOMS_PER_FRAME_BITS
MAX_FRAME_ID = 1 << 42


def global_atom_ids(frame_ids: np.ndarray, n_atoms: np.ndarray) -> np.ndarray:
    """Global ids of all atoms of the given frames, frame after frame.

    Args:
        frame_ids: (F,) non-negative integer frame ids.
        n_atoms: (F,) number of atoms of each frame.
    Returns:
        (sum(n_atoms),) int64 ids, atoms in frame order then local order.
    """
    frame_ids = np.asarray(frame_ids, dtype=np.int64).reshape(-1)
    n_atoms = np.asarray(n_atoms, dtype=np.int64).reshape(-1)
    if frame_ids.shape != n_atoms.shape:
        raise ValueError(
            f"frame_ids has {frame_ids.size} entries but n_atoms has {n_atoms.size}; expected one per frame"
        )
    if frame_ids.size and (frame_ids.min() < 0 or frame_ids.max() >= MAX_FRAME_ID):
        raise ValueError(f"frame ids must lie in [0, 2**42); got range [{frame_ids.min()}, {frame_ids.max()}]")
    if n_atoms.size and (n_atoms.min() < 0 or n_atoms.max() > MAX_ATOMS_PER_FRAME):
        raise ValueError(f"frames must hold between 0 and {MAX_ATOMS_PER_FRAME} atoms; got up to {n_atoms.max()}")
    starts = np.repeat(frame_ids << ATOMS_PER_FRAME_BITS, n_atoms)
    offsets = np.arange(int(n_atoms.sum()), dtype=np.int64) - np.repeat(np.cumsum(n_atoms) - n_atoms, n_atoms)
    return starts + offsets


def split_atom_ids(atom_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`global_atom_ids`: (frame_ids, local atom indices), both (N,) int64."""
    atom_ids = np.asarray(atom_ids, dtype=np.int64)
    return atom_ids >> ATOMS_PER_FRAME_BITS, atom_ids & (MAX_ATOMS_PER_FRAME - 1)


def frame_ids_of(frames: Sequence[Any]) -> np.ndarray:
    """(F,) int64 ``info["frame_id"]`` of the frames (``ase.Atoms`` or anything with ``.info``).

    Raises:
        ValueError: a frame has no integer ``frame_id``, or ids repeat.
    """
    ids = []
    for i, atoms in enumerate(frames):
        if FRAME_ID_KEY not in atoms.info:
            raise ValueError(f"frame {i} has no info['{FRAME_ID_KEY}']; training frames need unique integer frame "
                             "ids (set atoms.info['frame_id'], see ltau_ase.core.trainingset.assign_frame_ids)")
        value = atoms.info[FRAME_ID_KEY]
        if value is None or isinstance(value, bool) or not float(value).is_integer():
            raise ValueError(
                f"frame {i} has info['{FRAME_ID_KEY}'] = {value!r}; expected an integer id unique across "
                "the training files (see ltau_ase.core.atom_ids)"
            )
        ids.append(int(value))
    ids = np.asarray(ids, dtype=np.int64)
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"frame ids repeat across the training frames: {unique[counts > 1][:10].tolist()}")
    return ids


SOURCE_FRAME_ID_KEY = "source_frame_id"


def assign_new_frame_ids(frames: Sequence[Any], taken: Sequence[int] | np.ndarray) -> np.ndarray:
    """Give frames that enter a training set fresh frame ids, unique against ``taken``.

    Frames written by ``ltau md``, :class:`~ltau_ase.simulate.observers.UncertaintyStop` (``save_to``)
    or an exploration keep the ``frame_id`` of the structure they started from, so adding them to a
    training set as they are would collide with that structure (and with each other). This is the
    one place where such frames get new ids: ``max(taken) + 1, + 2, ...`` in frame order (0, 1, ...
    when nothing is taken). The previous id, when there was one, is kept in
    ``info["source_frame_id"]``. Frames are changed in place.

    Args:
        frames: the frames (``ase.Atoms`` or anything with ``.info``) entering the training set.
        taken: frame ids already in the training set, (T,) integers.
    Returns:
        (F,) int64 new ids.
    """
    taken = np.asarray(taken, dtype=np.int64).reshape(-1)
    first = int(taken.max()) + 1 if taken.size else 0
    if first + len(frames) > MAX_FRAME_ID:
        raise ValueError(f"no frame ids left: {len(frames)} new frames after id {first - 1} exceed 2**42")
    new = np.arange(first, first + len(frames), dtype=np.int64)
    for atoms, frame_id in zip(frames, new):
        old = atoms.info.get(FRAME_ID_KEY)
        if old is not None and not isinstance(old, bool) and float(old).is_integer():
            atoms.info[SOURCE_FRAME_ID_KEY] = int(old)
        atoms.info[FRAME_ID_KEY] = int(frame_id)
    return new
