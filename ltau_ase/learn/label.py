"""Labelling selected frames with a reference ASE calculator as Dask tasks, into an SQLite ase.db.

Each frame is written to the database as soon as its calculation finishes (one row, one SQLite
transaction, unique key ``name``). A killed campaign resumes by labelling only the names not yet in
the database: nothing labelled is computed again or written twice. A reference that raises, or
returns a non-finite energy or forces, gives a row with ``status="failed"`` and the ``reason``; the
campaign goes on without that frame.

Reference trust cap (``max_reference_force``, eV/Å): a frame whose reference max-atom force exceeds
it is physically implausible for the domain (two atoms driven into each other by a young model's MD:
EMT answers with 60-130 eV/Å there) and would dominate a retraining. Such a frame is kept in the
database with its energy and forces and ``status="rejected"`` plus the ``reason``: recorded, never
trained on, never silently dropped, and not computed again on resume (the analogue of DP-GEN's upper
trust level, on the reference side).

The reference is a picklable, hashable factory returning an ASE calculator (EMT here, the user's
DFT calculator in production), e.g. :class:`CalculatorFactory` ``("ase.calculators.emt:EMT")``.
Labelled frames hold the reference ``energy`` (eV) and *unconstrained* ``forces`` (eV/Å), as the
training files need.
"""
from __future__ import annotations

import importlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from ltau_ase.simulate.batch import dask_client, worker_calculator

LABEL_STATUSES = ("done", "failed", "rejected")


@dataclass(frozen=True)
class CalculatorFactory:
    """Picklable recipe ``module:name(**kwargs)`` for a reference ASE calculator.

    ``kwargs`` is a tuple of (key, value) pairs so the recipe stays hashable.
    """

    target: str = "ase.calculators.emt:EMT"
    kwargs: tuple[tuple[str, Any], ...] = ()

    def __call__(self):
        module, _, name = self.target.partition(":")
        if not module or not name:
            raise ValueError(f"reference calculator must look like module:name, got {self.target!r}")
        return getattr(importlib.import_module(module), name)(**dict(self.kwargs))


def check_max_reference_force(value: float | None) -> float | None:
    """``max_reference_force`` (eV/Å) must be None (no cap) or a positive finite number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"max_reference_force must be a positive force in eV/Å (or None for no cap), got {value!r}")
    return float(value)


def label_one(name: str, atoms: Atoms, factory: Callable[[], Any],
              max_reference_force: float | None = None) -> dict[str, Any]:
    """Reference energy and forces of one frame on a worker; never raises.

    ``status`` is ``"done"``, ``"failed"`` (with ``reason``) or, when the reference max-atom force
    exceeds ``max_reference_force`` (eV/Å), ``"rejected"`` (with ``reason``, energy and forces kept).
    """
    t0 = time.perf_counter()
    out: dict[str, Any] = {"name": name, "status": "failed", "reason": ""}
    try:
        work = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc, tags=atoms.get_tags(),
                     constraint=[c.copy() for c in atoms.constraints])
        work.calc = worker_calculator(factory)
        energy = float(work.get_potential_energy())
        forces = np.array(work.get_forces(apply_constraint=False), dtype=np.float64)
        if not math.isfinite(energy):
            raise ValueError(f"reference energy is not finite ({energy})")
        if forces.shape != (len(work), 3) or not np.isfinite(forces).all():
            raise ValueError(f"reference forces of shape {forces.shape} are not finite on "
                             f"{int((~np.isfinite(forces)).any(axis=-1).sum())} atom(s)")
        out.update(status="done", energy=energy, forces=forces)
        f_max = float(np.linalg.norm(forces, axis=1).max()) if len(forces) else 0.0
        if max_reference_force is not None and f_max > max_reference_force:
            out.update(status="rejected", reason=f"unphysical: reference max |F| = {f_max:.4g} eV/Å exceeds "
                                                 f"max_reference_force = {max_reference_force:g} eV/Å")
    except Exception as exc:  # recorded as failed: the campaign goes on
        out["reason"] = f"{type(exc).__name__}: {exc}"[:500]
    out["wall_time"] = time.perf_counter() - t0
    return out


def label_frames(
    frames: Sequence[tuple[str, Atoms]],
    db_path: str | os.PathLike,
    reference: Callable[[], Any],
    scheduler: str | None = None,
    n_workers: int | None = None,
    progress: bool = True,
    max_reference_force: float | None = None,
) -> dict[str, int]:
    """Label every frame whose name is not in ``db_path`` yet; returns
    ``{"total", "skipped", "done", "failed", "rejected"}`` (this run's rows, and the names already there).

    ``max_reference_force`` (eV/Å, None = no cap): frames above it are stored as ``rejected``.
    """
    from ase.db import connect
    from tqdm.auto import tqdm

    if not callable(reference):
        raise TypeError(f"reference must be a callable returning an ASE calculator, got {type(reference)}")
    try:
        hash(reference)
    except TypeError:
        raise TypeError("reference must be hashable (e.g. CalculatorFactory) so each worker builds it once") from None
    max_reference_force = check_max_reference_force(max_reference_force)
    names = [n for n, _ in frames]
    if len(set(names)) != len(names):
        raise ValueError("frame names must be unique: they identify labels in the database")
    db = connect(os.fspath(db_path), type="db")
    have = {row.get("name") for row in db.select(include_data=False)}
    pending = [(n, a) for n, a in frames if n not in have]
    counts = {"total": len(frames), "skipped": len(frames) - len(pending), "done": 0, "failed": 0, "rejected": 0}
    if not pending:
        return counts
    from distributed import as_completed

    with dask_client(scheduler, n_workers) as client:
        futures = {client.submit(label_one, n, a, reference, max_reference_force, pure=False): (n, a) for n, a in pending}
        bar = tqdm(total=len(futures), disable=not progress, desc="labelling", unit="frame")
        for fut in as_completed(futures):
            name, atoms = futures[fut]
            try:
                result = fut.result()
            except Exception as exc:  # the task could not run: still recorded
                result = {"name": name, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:500],
                          "wall_time": float("nan")}
            _write_label(db, name, atoms, result)
            counts[result["status"]] += 1
            bar.update(1)
            fut.release()
        bar.close()
    return counts


def _write_label(db: Any, name: str, atoms: Atoms, result: dict) -> None:
    if db.count(name=name):  # never duplicate, whatever happens
        return
    frame = atoms.copy()
    frame.calc = None
    kvp = {"name": name, "status": result["status"]}
    if math.isfinite(result.get("wall_time", float("nan"))):
        kvp["wall_time"] = float(result["wall_time"])
    if result["status"] in ("done", "rejected"):  # a rejected frame keeps the reference values it cost
        frame.calc = SinglePointCalculator(frame, energy=result["energy"], forces=result["forces"])
    if result["status"] != "done":
        kvp["reason"] = result["reason"] or "unknown failure"
    db.write(frame, key_value_pairs=kvp)


class Labels(NamedTuple):
    """The rows of a label database by status."""

    done: dict[str, Atoms]  # frames with reference energy/forces, to train on
    failed: dict[str, str]  # failure reason by name
    rejected: dict[str, Atoms]  # over the reference trust cap: reference values kept, never trained on


def load_labels(db_path: str | os.PathLike) -> Labels:
    """:class:`Labels` (done frames, failure reasons, rejected frames; by name) of a label database.

    A rejected frame carries ``info["reason"]``.
    """
    from ase.db import connect

    out = Labels({}, {}, {})
    if not os.path.exists(os.fspath(db_path)):
        return out
    for row in connect(os.fspath(db_path)).select(sort="id"):
        status = row.get("status")
        if status == "done":
            out.done[row.get("name")] = row.toatoms()
        elif status == "rejected":
            atoms = row.toatoms()
            atoms.info["reason"] = row.get("reason", "")
            out.rejected[row.get("name")] = atoms
        else:
            out.failed[row.get("name")] = row.get("reason", "")
    return out
