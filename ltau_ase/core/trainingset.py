"""Training sets on disk: frames with stable ``frame_id``\\ s, read and written with ``ase.io``.

Every training frame carries ``atoms.info["frame_id"]`` (an integer unique across all training
files, see :mod:`ltau_ase.core.atom_ids`); the error logs key atoms by it, so any model backend
(and ``ltau fit``, ``ltau reweight``, the demo) reads training data through these functions.
Torch-free: only ``ase.io`` (no calculators are run here).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ltau_ase.core.atom_ids import FRAME_ID_KEY, frame_ids_of, split_atom_ids

PathLike = str | os.PathLike


def assign_frame_ids(frames: Sequence[Any], first_frame_id: int = 0) -> list:
    """Set ``atoms.info["frame_id"] = first_frame_id + i`` on each frame (in place) and return them."""
    for i, atoms in enumerate(frames):
        atoms.info[FRAME_ID_KEY] = int(first_frame_id + i)
    return list(frames)


def write_training_file(path: PathLike, frames: Sequence[Any]) -> Path:
    """Write frames (each with an integer ``info["frame_id"]``, unique) to an extxyz file.

    Energies (eV) and forces (eV/Å) are taken from each frame's calculator. Raises ValueError when
    a frame has no ``frame_id`` or ids repeat.
    """
    import ase.io

    frame_ids_of(frames)  # every frame needs a unique integer frame_id (see assign_frame_ids)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(path, list(frames), format="extxyz")
    return path


def as_paths(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    """One path or several as a list of ``Path``."""
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def read_training_frames(paths: PathLike | Sequence[PathLike]) -> list:
    """Read all frames of one or more training files (any ASE format, e.g. extxyz), in file order.

    Every frame must carry an integer ``atoms.info["frame_id"]``, unique across all files.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: a frame lacks a frame id, or ids repeat.
    """
    from ase.io import read

    frames: list = []
    for path in as_paths(paths):
        if not path.is_file():
            raise FileNotFoundError(f"training file {path} does not exist")
        frames.extend(read(path, index=":"))
    frame_ids_of(frames)  # validates
    return frames


def frames_for_atom_ids(frames: Sequence[Any], atom_ids: np.ndarray,
                        train_files: Sequence[PathLike] = ()) -> list:
    """The frames holding the atoms ``atom_ids`` (e.g. an error log's), in their given order.

    Frames without logged atoms (e.g. split off for validation) are skipped.

    Raises:
        ValueError: some frames of ``atom_ids`` are not among ``frames`` (``train_files`` names the
            files in the message).
    """
    frame_ids = frame_ids_of(frames)
    wanted = np.unique(split_atom_ids(atom_ids)[0])
    missing = np.setdiff1d(wanted, frame_ids)
    if missing.size:
        raise ValueError(
            f"{missing.size} frames of the error logs are not in the training files {[str(f) for f in train_files]} "
            f"(frame ids e.g. {missing[:5].tolist()}); expected the files the runs were trained on"
        )
    keep = np.isin(frame_ids, wanted)
    return [a for a, k in zip(frames, keep) if k]


__all__ = ["as_paths", "assign_frame_ids", "frames_for_atom_ids", "read_training_frames", "write_training_file"]
