"""Batch UQ scoring: per-atom uncertainties of many structures on Dask, written to an ase.db, resumable.

:func:`predict_batch` evaluates the LTAU calculator (energy, forces and the per-atom UQ of
:mod:`ltau_ase.simulate.calculator`) once on every structure, on the same machinery as
:func:`ltau_ase.simulate.batch.relax_batch`:

- Dask runs the evaluations (:func:`~ltau_ase.simulate.batch.dask_client`: an in-process
  LocalCluster by default, or ``scheduler="tcp://host:port"``); structures travel in chunks of
  ``chunk_size`` per task, and at most a few chunks per worker are in flight, so the client holds a
  bounded number of results whatever the number of structures;
- each worker thread builds its calculator once (:func:`~ltau_ase.simulate.batch.worker_calculator`);
- the database is :func:`~ltau_ase.simulate.batch.open_store`'s (a unique index on ``name``, a
  claims table): a run claims its pending structures first, so concurrent runs split the work and a
  killed run's claims are taken over (:func:`~ltau_ase.simulate.batch.claim_pending`);
- the client writes each finished chunk to the ase.db in one SQLite transaction
  (:func:`~ltau_ase.simulate.batch.store_rows`), one row per structure identified by its unique
  ``name`` (``info["name"]``, else derived from the content:
  :func:`~ltau_ase.simulate.batch.read_structures`): a run killed at any point leaves whole chunks
  only, and re-running skips every name already in the database, so every structure ends up
  exactly once.

Each row holds the structure with its calculator results (``energy``, ``forces``, ``stress`` when
computed), key-value pairs ``name``, ``status`` (``"done"`` | ``"failed"``), ``reason``,
``wall_time`` (s), ``n_atoms`` and the per-structure UQ ``ltau_max_uncertainty`` /
``ltau_mean_uncertainty``; ``data`` holds the per-atom UQ arrays ``ltau_uncertainties``,
``ltau_confidences``, ``ltau_expected_force_errors`` (eV/Å) and ``ltau_latent_distances`` — the
names :func:`~ltau_ase.simulate.calculator.store_uq_in_atoms` uses. :func:`load_predictions` gives
the structures back with those arrays and info keys restored. A structure whose evaluation fails
(an exception, non-finite energy or forces, forces above ``max_force``) gets a ``"failed"`` row with
the reason; the batch goes on.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from os import PathLike
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import all_properties
from ase.calculators.singlepoint import SinglePointCalculator

from ltau_ase.simulate.batch import (
    RelaxationFailure,
    _check_finite,
    check_batch_args,
    claim_pending,
    dask_client,
    pending_systems,
    read_structures,
    release_claims,
    store_rows,
    stored_rows,
    worker_calculator,
)
from ltau_ase.simulate.calculator import PER_ATOM_UQ, PER_STRUCTURE_UQ, store_uq_in_atoms

PREDICT_STATUSES = ("done", "failed")


def predict_one(name: str, atoms: Atoms, factory: Callable[[], Any], max_force: float = 1.0e3) -> dict[str, Any]:
    """Evaluate one structure on a worker; never raises (a failure comes back as ``status="failed"``).

    Returns ``name``, ``status``, ``reason``, ``wall_time`` (s) and ``atoms``: a copy with a
    SinglePointCalculator of the physical results and the UQ stored by :func:`store_uq_in_atoms`
    (for a failure: the input geometry without results).
    """
    t0 = time.perf_counter()
    work = atoms.copy()
    out: dict[str, Any] = {"name": name, "status": "failed", "reason": ""}
    try:
        work.calc = worker_calculator(factory)
        _check_finite(work, max_force)  # computes energy, forces and the UQ in one call
        results = dict(work.calc.results)
        scored = work.copy()
        scored.calc = SinglePointCalculator(scored, **{k: v for k, v in results.items() if k in all_properties})
        store_uq_in_atoms(scored, results)
        out.update(status="done", atoms=scored)
    except Exception as exc:  # recorded, never raised: the batch goes on
        out["reason"] = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, RelaxationFailure):
            import traceback

            out["traceback"] = traceback.format_exc(limit=5)
        out["atoms"] = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc, tags=atoms.get_tags())
    out["wall_time"] = time.perf_counter() - t0
    return out


def predict_chunk(items: Sequence[tuple[str, Atoms]], factory: Callable[[], Any], max_force: float) -> list[dict]:
    """:func:`predict_one` for each ``(name, atoms)`` of a chunk (one Dask task)."""
    return [predict_one(name, atoms, factory, max_force) for name, atoms in items]


def _row(result: dict) -> tuple[Atoms, dict[str, Any], dict[str, Any]]:
    """``(atoms, key_value_pairs, data)`` of one structure's row."""
    atoms = result["atoms"]
    kvp: dict[str, Any] = {"name": result["name"], "status": result["status"],
                           "reason": result["reason"] or "", "n_atoms": len(atoms)}
    if math.isfinite(result["wall_time"]):
        kvp["wall_time"] = float(result["wall_time"])
    for key in PER_STRUCTURE_UQ:
        value = atoms.info.get("ltau_" + key)
        if value is not None and math.isfinite(value):
            kvp["ltau_" + key] = float(value)
    data = {"ltau_" + k: np.asarray(atoms.arrays["ltau_" + k]) for k in PER_ATOM_UQ if "ltau_" + k in atoms.arrays}
    if "traceback" in result:
        data["traceback"] = result["traceback"]
    return atoms, kvp, data


def predict_batch(
    structures: str | PathLike | Sequence[Atoms],
    db_path: str | PathLike,
    calculator_factory: Callable[[], Any],
    scheduler: str | None = None,
    n_workers: int | None = None,
    chunk_size: int = 16,
    max_force: float = 1.0e3,
    retry_failed: bool = False,
    progress: bool = True,
    dashboard: str | None = None,
    scheduler_timeout: float = 30.0,
) -> dict[str, int]:
    """Score every structure not yet in ``db_path`` with per-atom uncertainties; resumable.

    Args:
        structures: list of Atoms, or an extxyz / ase.db path (names from ``info["name"]`` / the
            row's ``name``, else by position; see :func:`~ltau_ase.simulate.batch.read_structures`).
        db_path: SQLite ase.db (created when absent); names already in it are skipped.
        calculator_factory: picklable, hashable callable returning an ASE calculator that provides
            the per-atom UQ (e.g. ``backend_for(model).ltau_factory(model, estimator)``).
        scheduler: None for an in-process LocalCluster, or the address of a running Dask scheduler.
        n_workers: LocalCluster workers (default 1; each builds its own calculator).
        chunk_size: structures per Dask task and per database transaction.
        max_force: forces above this (eV/Å) mark a structure as failed (a broken model).
        retry_failed: delete rows with status "failed" first and score those structures again.
        progress: tqdm progress bar.
        dashboard: address for the in-process cluster's Dask dashboard; None serves none.
        scheduler_timeout: seconds to wait for ``scheduler`` to answer.
    Returns:
        counts ``{"done", "failed", "skipped", "busy", "total"}``: this run's rows, structures
        already in the database, and structures left to another running process.
    """
    check_batch_args(calculator_factory, n_workers, scheduler_timeout)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}")
    if not (isinstance(max_force, (int, float)) and max_force > 0):
        raise ValueError(f"max_force must be a positive force in eV/Å; got {max_force!r}")
    items = read_structures(structures)
    db, pending, counts = pending_systems(db_path, items, PREDICT_STATUSES, retry_failed)
    if not pending:
        return counts
    owner, pending = claim_pending(db_path, pending, counts)
    try:
        if pending:
            _score_pending(pending, db, calculator_factory, counts, owner, scheduler, n_workers, dashboard,
                           scheduler_timeout, chunk_size, float(max_force), progress)
    finally:
        release_claims(db_path, owner)
    return counts


def _score_pending(pending, db, calculator_factory, counts, owner, scheduler, n_workers, dashboard,
                   scheduler_timeout, chunk_size, max_force, progress) -> None:
    from distributed import as_completed
    from tqdm.auto import tqdm

    chunks = [pending[i : i + chunk_size] for i in range(0, len(pending), chunk_size)]
    with dask_client(scheduler, n_workers, dashboard, scheduler_timeout) as client:
        # bounded in-flight work: a few chunks per worker, refilled as chunks finish
        n_threads = max(1, sum(client.nthreads().values()))
        window = 2 * n_threads
        todo = iter(chunks)
        futures: dict[Any, list] = {}

        def submit_next() -> Any:
            chunk = next(todo, None)
            if chunk is None:
                return None
            fut = client.submit(predict_chunk, chunk, calculator_factory, max_force, pure=False)
            futures[fut] = chunk
            return fut

        queue = as_completed([f for f in (submit_next() for _ in range(window)) if f is not None])
        bar = tqdm(total=len(pending), disable=not progress, desc="structures", unit="structure")
        for fut in queue:
            chunk = futures.pop(fut)
            try:
                results = fut.result()
            except Exception as exc:  # the task could not run (a worker died): every structure is recorded
                results = [{"name": n, "status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                            "wall_time": float("nan"),
                            "atoms": Atoms(a.numbers, a.positions, cell=a.cell, pbc=a.pbc)} for n, a in chunk]
            written = store_rows(db, [_row(r) for r in results], owner)
            for result, row_id in zip(results, written):
                if row_id:
                    counts[result["status"]] += 1
                else:  # another process stored this name meanwhile: its row stands
                    counts["skipped"] += 1
            bar.update(len(results))
            bar.set_postfix({s: counts[s] for s in PREDICT_STATUSES})
            fut.release()
            nxt = submit_next()
            if nxt is not None:
                queue.add(nxt)
        bar.close()


def load_predictions(db_path: str | PathLike, statuses: Sequence[str] | None = ("done",)) -> list[Atoms]:
    """Structures of a :func:`predict_batch` database, in insertion order, with the UQ restored.

    Each Atoms has its results (SinglePointCalculator), ``info["name"]``, ``info["status"]``,
    ``info["ltau_max_uncertainty"]`` / ``info["ltau_mean_uncertainty"]`` and the per-atom arrays
    ``arrays["ltau_uncertainties"]`` ... as :func:`store_uq_in_atoms` writes them.
    ``statuses`` filters rows (None: all).
    """
    out = []
    for row in stored_rows(db_path, statuses, PREDICT_STATUSES):
        atoms = row.toatoms()
        atoms.info.update({"name": row.get("name"), "status": row.get("status"), "reason": row.get("reason", "")})
        for key in PER_STRUCTURE_UQ:
            value = row.get("ltau_" + key)
            if value is not None:
                atoms.info["ltau_" + key] = float(value)
        for key, value in row.data.items():
            if key.startswith("ltau_"):
                atoms.arrays[key] = np.asarray(value, dtype=np.float64)
        out.append(atoms)
    return out
