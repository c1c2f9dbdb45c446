"""Batch relaxations with per-atom uncertainties on Dask, results in an SQLite ase.db, resumable.

:func:`relax_batch` relaxes many structures with a :class:`RelaxationUQObserver` attached:

- Dask runs the relaxations: by default an in-process ``LocalCluster(processes=False)`` (threads,
  one relaxation per worker at a time); ``scheduler="tcp://host:port"`` uses an existing cluster.
- ``calculator_factory`` is a picklable, hashable callable returning an ASE calculator (e.g.
  ``ModelBackend.ltau_factory(...)`` of a model backend, such as
  :class:`ltau_ase.nequip.backend.NequIPLTAUFactory`). Each worker thread builds its calculator once and reuses it for
  every system it relaxes (a per-process cache keyed by thread and factory).
- The client writes one row per system to the ase.db as soon as the system finishes. Each row is
  one SQLite transaction, and systems are identified by the unique key ``name``: re-running after a
  crash or kill skips every name already in the database and duplicates nothing.
- Each row holds the final structure (energy and forces as calculator results), key-value pairs
  ``name``, ``group``, ``status`` (``"done"`` | ``"unconverged"`` | ``"failed"``), ``reason``,
  ``converged``, ``nsteps``, ``wall_time`` (s), ``fmax_final`` (eV/Å), ``uq_initial`` / ``uq_max`` /
  ``uq_mean`` / ``uq_final`` / ``uq_key``, ``optimizer``; and ``data``: ``trace`` (per-step UQ),
  the final per-atom UQ arrays (``ltau_uncertainties`` ...) and, when references were given, the
  reference structure (``reference_positions``, ``reference_cell``, ``reference_numbers``,
  ``reference_pbc``, ``reference_tags``, ``reference_fixed``).
- A failure (NaN energy or forces, forces above ``max_force``, any exception) is recorded with
  status ``"failed"`` and its reason; the batch goes on.
"""
from __future__ import annotations

import math
import os
import threading
import time
import traceback
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import all_properties
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from ltau_ase.simulate.calculator import PER_ATOM_UQ
from ltau_ase.simulate.observers import RelaxationUQObserver, check_reduce

OPTIMIZERS = ("BFGS", "LBFGS", "FIRE", "oc20")
#: fairchem's ML relaxation settings (OC20 IS2RS): LBFGS, 300 steps
OC20_LBFGS = {"maxstep": 0.04, "memory": 50, "damping": 1.0, "alpha": 70.0}
OC20_STEPS = 300
STATUSES = ("done", "unconverged", "failed")
DEFAULT_GROUP = "all"


# ---------------------------------------------------------------------------- factories
_CALCULATORS: dict[tuple[int, Hashable], Any] = {}
_CALCULATORS_LOCK = threading.Lock()


def worker_calculator(factory: Callable[[], Any]) -> Any:
    """The calculator ``factory()`` built once per (process, thread) and reused afterwards.

    Per thread because ASE calculators keep per-structure state and are not thread-safe.
    """
    try:
        key = (threading.get_ident(), factory)
        hash(key)
    except TypeError:
        raise TypeError(f"calculator_factory must be hashable so workers can reuse what it builds (e.g. a frozen "
                        f"dataclass such as a backend's ltau_factory); got {type(factory).__name__}") from None
    with _CALCULATORS_LOCK:
        calc = _CALCULATORS.get(key)
    if calc is None:
        calc = factory()
        with _CALCULATORS_LOCK:
            _CALCULATORS[key] = calc
    return calc


# ---------------------------------------------------------------------------- one relaxation
@dataclass(frozen=True)
class RelaxSettings:
    """Settings of one relaxation (picklable, sent to the workers)."""

    optimizer: str = "BFGS"
    fmax: float = 0.05  # eV/Å
    steps: int = 300
    key: str = "uncertainties"
    atom_reduce: str | float = "mean"
    select: str | tuple = "free"
    max_force: float = 1.0e3  # eV/Å: larger forces count as an exploded relaxation

    def validate(self) -> "RelaxSettings":
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not (math.isfinite(self.fmax) and self.fmax > 0):
            raise ValueError(f"fmax must be a positive force in eV/Å, got {self.fmax}")
        if not isinstance(self.steps, (int, np.integer)) or self.steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {self.steps!r}")
        if self.key not in PER_ATOM_UQ:  # checked here, not once per system on the workers
            raise ValueError(f"key must be one of the per-atom UQ results {PER_ATOM_UQ}, got {self.key!r}")
        if not (self.max_force > 0):
            raise ValueError(f"max_force must be positive (eV/Å), got {self.max_force}")
        check_reduce(self.atom_reduce)
        return self


def make_optimizer(atoms: Atoms, name: str, logfile: Any = None):
    """An ASE optimizer by name: ``BFGS``, ``LBFGS``, ``FIRE`` or ``oc20`` (fairchem's LBFGS settings)."""
    from ase.optimize import BFGS, FIRE, LBFGS

    if name == "BFGS":
        return BFGS(atoms, logfile=logfile)
    if name == "LBFGS":
        return LBFGS(atoms, logfile=logfile)
    if name == "FIRE":
        return FIRE(atoms, logfile=logfile)
    if name == "oc20":
        return LBFGS(atoms, logfile=logfile, **OC20_LBFGS)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


class RelaxationFailure(RuntimeError):
    """A relaxation produced non-finite or exploding energies/forces."""


def _check_finite(atoms: Atoms, max_force: float) -> None:
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces(apply_constraint=False)  # NaN on a fixed atom is a broken model too
    if not np.isfinite(energy):
        raise RelaxationFailure(f"non-finite energy {energy}")
    if not np.isfinite(forces).all():
        raise RelaxationFailure(f"non-finite forces on {int((~np.isfinite(forces)).any(axis=1).sum())} atom(s)")
    fmax = float(np.linalg.norm(forces, axis=1).max()) if len(atoms) else 0.0
    if fmax > max_force:
        raise RelaxationFailure(f"exploding forces: max |F| = {fmax:.4g} eV/Å > max_force {max_force:g} eV/Å")


def relax_one(name: str, atoms: Atoms, factory: Callable[[], Any], settings: RelaxSettings) -> dict[str, Any]:
    """Relax one structure on a worker; never raises (failures come back as ``status="failed"``).

    Returns a dict with ``name``, ``status``, ``reason``, ``atoms`` (final structure with a
    SinglePointCalculator; for failures the last structure without results), ``converged``,
    ``nsteps``, ``wall_time`` (s), ``fmax_final``, ``summary``, ``trace`` and ``per_atom`` (final UQ).
    """
    t0 = time.perf_counter()
    work = atoms.copy()
    out: dict[str, Any] = {"name": name, "status": "failed", "reason": "", "converged": False, "nsteps": 0,
                           "summary": None, "trace": None, "per_atom": {}, "wall_time": float("nan")}
    obs = None
    opt = None
    try:
        work.calc = worker_calculator(factory)
        _check_finite(work, settings.max_force)
        obs = RelaxationUQObserver(work, atom_reduce=settings.atom_reduce, select=_select(settings.select),
                                   key=settings.key)
        opt = make_optimizer(work, settings.optimizer)
        opt.attach(lambda: _check_finite(work, settings.max_force))  # first: stop before a bad step is used
        opt.attach(obs)
        converged = bool(opt.run(fmax=settings.fmax, steps=settings.steps))
        forces = work.get_forces()
        out["fmax_final"] = float(np.linalg.norm(forces, axis=1).max()) if len(work) else 0.0
        out["converged"] = converged
        out["status"] = "done" if converged else "unconverged"
        if not converged:
            out["reason"] = (f"not converged in {settings.steps} steps: max |F| = {out['fmax_final']:.4g} eV/Å "
                             f"> fmax {settings.fmax:g}")
        results = work.calc.results
        for key in PER_ATOM_UQ:
            if key in results:
                out["per_atom"]["ltau_" + key] = np.array(results[key], dtype=np.float64)
        final = work.copy()
        final.calc = SinglePointCalculator(final, **{k: v for k, v in results.items() if k in all_properties})
        out["atoms"] = final
    except Exception as exc:  # recorded, never raised: the batch goes on
        out["status"] = "failed"
        out["reason"] = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, RelaxationFailure):
            out["traceback"] = traceback.format_exc(limit=5)
        out["atoms"] = Atoms(work.numbers, work.positions, cell=work.cell, pbc=work.pbc, tags=work.get_tags(),
                             constraint=[c.copy() for c in work.constraints])
    if obs is not None:
        out["summary"] = obs.summary()
        out["trace"] = obs.trace
    if opt is not None:
        out["nsteps"] = int(opt.nsteps)
    out["wall_time"] = time.perf_counter() - t0
    return out


def _select(select: Any) -> Any:
    # tuples travel better than lists in frozen settings; observers take tag lists
    return list(select) if isinstance(select, tuple) else select


# ---------------------------------------------------------------------------- inputs
def read_structures(structures: str | PathLike | Sequence[Atoms]) -> list[tuple[str, Atoms]]:
    """``(name, atoms)`` pairs from a list of Atoms, an extxyz file or an ase.db file.

    Names come from ``atoms.info["name"]`` (extxyz, lists) or the row's ``name`` key (ase.db);
    structures without one get ``"structure_{i:06d}"`` by position (stable only while the input
    order is). Duplicate names raise ``ValueError``.
    """
    from ase.io import read

    if isinstance(structures, (str, PathLike)):
        path = os.fspath(structures)
        if not os.path.exists(path):
            raise FileNotFoundError(f"structures file {path} does not exist")
        if path.endswith(".db"):
            from ase.db import connect

            pairs = []
            for i, row in enumerate(connect(path).select()):
                atoms = row.toatoms()
                atoms.info.update(row.key_value_pairs)
                pairs.append((atoms.info.get("name"), atoms))
        else:
            images = read(path, index=":")
            pairs = [(a.info.get("name"), a) for a in images]
    else:
        images = list(structures)
        bad = [i for i, a in enumerate(images) if not isinstance(a, Atoms)]
        if bad:
            raise TypeError(f"structures must be ase.Atoms; items {bad[:5]} are not")
        pairs = [(a.info.get("name"), a) for a in images]
    if not pairs:
        raise ValueError("no structures to relax")
    named = [(str(n) if n is not None else f"structure_{i:06d}", a) for i, (n, a) in enumerate(pairs)]
    seen: dict[str, int] = {}
    for i, (n, _) in enumerate(named):
        if n in seen:
            raise ValueError(f"duplicate structure name {n!r} (items {seen[n]} and {i}); names must be unique "
                             "because they identify systems in the database")
        seen[n] = i
    return named


def _reference_data(ref: Atoms, atoms: Atoms, name: str) -> dict[str, np.ndarray]:
    if len(ref) != len(atoms):
        raise ValueError(f"reference for {name!r} has {len(ref)} atoms, the initial structure {len(atoms)}")
    if not np.array_equal(ref.numbers, atoms.numbers):
        raise ValueError(f"reference for {name!r} has a different species order than the initial structure")
    fixed = np.zeros(len(ref), dtype=bool)
    for c in ref.constraints:
        if isinstance(c, FixAtoms):
            fixed[c.get_indices()] = True
    return {"reference_positions": ref.positions.copy(), "reference_cell": np.array(ref.cell),
            "reference_numbers": ref.numbers.copy(), "reference_pbc": ref.pbc.copy(),
            "reference_tags": ref.get_tags().copy(), "reference_fixed": fixed}


# ---------------------------------------------------------------------------- the batch
def existing_names(db: Any) -> dict[str, str]:
    """name -> status of every system already in the database."""
    return {row.get("name"): row.get("status") for row in db.select(include_data=False)}


def relax_batch(
    structures: str | PathLike | Sequence[Atoms],
    db_path: str | PathLike,
    calculator_factory: Callable[[], Any],
    optimizer: str = "BFGS",
    fmax: float = 0.05,
    steps: int = OC20_STEPS,
    scheduler: str | None = None,
    n_workers: int | None = None,
    references: str | PathLike | Sequence[Atoms] | None = None,
    progress: bool = True,
    key: str = "uncertainties",
    atom_reduce: str | float = "mean",
    select: str | Sequence[int] = "free",
    max_force: float = 1.0e3,
    retry_failed: bool = False,
) -> dict[str, int]:
    """Relax every structure not yet in ``db_path`` and write one row per system as it finishes.

    Args:
        structures: list of Atoms, or an extxyz / ase.db path (see :func:`read_structures`).
        db_path: SQLite ase.db (created when absent). Names already in it are skipped.
        calculator_factory: picklable, hashable callable returning an ASE calculator that provides
            ``key`` (e.g. ``backend_for(model).ltau_factory(model, estimator)``).
        optimizer: ``"BFGS"`` (default), ``"LBFGS"``, ``"FIRE"`` or ``"oc20"`` (LBFGS maxstep 0.04,
            memory 50, damping 1.0, alpha 70).
        fmax: convergence criterion, eV/Å. steps: max optimizer steps (300, as OC20).
        scheduler: None for an in-process LocalCluster, or the address of a running Dask scheduler.
        n_workers: workers of the LocalCluster (default 1; each holds its own calculator).
        references: optional reference relaxed structures (same forms as ``structures``), matched by
            name and stored in each row's data for ``ltau report``.
        progress: tqdm progress bar.
        key, atom_reduce, select: what the :class:`RelaxationUQObserver` records.
        max_force: forces above this (eV/Å) mark a relaxation as exploded (failed).
        retry_failed: delete rows with status "failed" first and relax those systems again.
    Returns:
        counts: ``{"done", "unconverged", "failed", "skipped", "total"}`` (this run's rows + skipped).
    """
    from ase.db import connect
    from tqdm.auto import tqdm

    settings = RelaxSettings(optimizer=optimizer, fmax=float(fmax), steps=steps,
                             key=key, atom_reduce=atom_reduce,
                             select=tuple(select) if isinstance(select, list) else select,
                             max_force=float(max_force)).validate()
    if not callable(calculator_factory):
        raise TypeError(f"calculator_factory must be callable() -> calculator, got {type(calculator_factory)}")
    try:
        hash(calculator_factory)
    except TypeError:
        raise TypeError("calculator_factory must be hashable (e.g. a frozen dataclass such as a backend's ltau_factory) so "
                        "each worker builds its calculator once") from None
    items = read_structures(structures)
    refs: dict[str, dict] = {}
    if references is not None:
        ref_items = dict(read_structures(references))
        for name, atoms in items:
            if name in ref_items:
                refs[name] = _reference_data(ref_items[name], atoms, name)

    db = connect(os.fspath(db_path), type="db")
    done = existing_names(db)
    if retry_failed:
        failed_ids = [row.id for row in db.select(status="failed", include_data=False)]
        if failed_ids:
            db.delete(failed_ids)
            done = existing_names(db)
    pending = [(n, a) for n, a in items if n not in done]
    counts = {s: 0 for s in STATUSES}
    counts["skipped"] = len(items) - len(pending)
    counts["total"] = len(items)
    if not pending:
        return counts

    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler is None:
        cluster = LocalCluster(n_workers=int(n_workers or 1), threads_per_worker=1, processes=False,
                               dashboard_address=None)
        client = Client(cluster)
    else:
        client = Client(scheduler)
    try:
        futures = {client.submit(relax_one, name, atoms, calculator_factory, settings, pure=False): (name, atoms)
                   for name, atoms in pending}
        bar = tqdm(total=len(futures), disable=not progress, desc="relaxations", unit="system")
        for fut in as_completed(futures):
            name, atoms = futures[fut]
            try:
                result = fut.result()
            except Exception as exc:  # a worker died or the task could not run: still recorded
                result = {"name": name, "status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                          "atoms": atoms.copy(), "converged": False, "nsteps": 0, "wall_time": float("nan"),
                          "summary": None, "trace": None, "per_atom": {}}
            _write_row(db, result, atoms, settings, refs.get(name))
            counts[result["status"]] += 1
            bar.update(1)
            bar.set_postfix({s: counts[s] for s in STATUSES})
            fut.release()
        bar.close()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return counts


def _write_row(db: Any, result: dict, initial: Atoms, settings: RelaxSettings, reference: dict | None) -> int:
    name = result["name"]
    if db.count(name=name):  # never duplicate, whatever happens
        return 0
    kvp: dict[str, Any] = {"name": name, "status": result["status"], "reason": result["reason"] or "",
                           "converged": bool(result["converged"]), "nsteps": int(result["nsteps"]),
                           "optimizer": settings.optimizer, "uq_key": settings.key,
                           "group": str(initial.info.get("group", DEFAULT_GROUP))}
    if math.isfinite(result["wall_time"]):
        kvp["wall_time"] = float(result["wall_time"])
    if "fmax_final" in result and math.isfinite(result["fmax_final"]):
        kvp["fmax_final"] = result["fmax_final"]
    data: dict[str, Any] = {}
    if result.get("summary") is not None:
        for stat in ("initial", "max", "mean", "final"):
            value = result["summary"][stat]
            if math.isfinite(value):
                kvp[f"uq_{stat}"] = float(value)
        data["trace"] = np.asarray(result["trace"], dtype=np.float64)
    data.update(result.get("per_atom", {}))
    if "traceback" in result:
        data["traceback"] = result["traceback"]
    if reference is not None:
        data.update(reference)
    return db.write(result["atoms"], key_value_pairs=kvp, data=data)  # one SQLite transaction


# ---------------------------------------------------------------------------- reading back
def load_results(db_path: str | PathLike, statuses: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Records of a relaxation database, in insertion order.

    Each record: ``name``, ``group``, ``status``, ``reason``, ``converged``, ``nsteps``, ``wall_time``,
    ``uq_initial``, ``uq_max``, ``uq_mean``, ``uq_final`` (NaN when absent), ``trace`` (array or None),
    ``atoms`` (final structure), ``reference`` (Atoms or None), ``per_atom`` (dict of final UQ arrays).
    ``statuses`` filters rows (e.g. ``("done", "unconverged")``).
    """
    from ase.db import connect

    path = os.fspath(db_path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"database {path} does not exist")
    wanted = None if statuses is None else set(statuses)
    if wanted is not None and not wanted <= set(STATUSES):
        raise ValueError(f"statuses must be among {STATUSES}, got {sorted(wanted)}")
    records = []
    for row in connect(path).select(sort="id"):
        status = row.get("status")
        if wanted is not None and status not in wanted:
            continue
        data = row.data
        ref = None
        if "reference_positions" in data:
            ref = Atoms(numbers=data["reference_numbers"], positions=data["reference_positions"],
                        cell=data["reference_cell"], pbc=data["reference_pbc"], tags=data["reference_tags"])
            fixed = np.asarray(data["reference_fixed"], dtype=bool)
            if fixed.any():
                ref.set_constraint(FixAtoms(mask=fixed))
        rec = {"name": row.get("name"), "group": row.get("group", DEFAULT_GROUP), "status": status,
               "reason": row.get("reason", ""), "converged": bool(row.get("converged", False)),
               "nsteps": row.get("nsteps"), "wall_time": row.get("wall_time", float("nan")),
               "trace": np.asarray(data["trace"]) if "trace" in data else None,
               "atoms": row.toatoms(), "reference": ref,
               "per_atom": {k: np.asarray(v) for k, v in data.items() if k.startswith("ltau_")}}
        for stat in ("initial", "max", "mean", "final"):
            rec[f"uq_{stat}"] = row.get(f"uq_{stat}", float("nan"))
        records.append(rec)
    return records


# ---------------------------------------------------------------------------- clients
class dask_client:
    """Context manager: a Dask ``Client`` on ``scheduler`` (an address), or on an in-process
    ``LocalCluster(processes=False, n_workers, threads_per_worker=1)`` without a dashboard when
    ``scheduler`` is None (in-process transport; the scheduler's HTTP server listens on 127.0.0.1
    only). Closes what it opened."""

    def __init__(self, scheduler: str | None = None, n_workers: int | None = None) -> None:
        self.scheduler = scheduler
        self.n_workers = int(n_workers or 1)
        self.cluster = None
        self.client = None

    def __enter__(self):
        from distributed import Client, LocalCluster

        if self.scheduler is None:
            # the scheduler always serves HTTP (health routes) even without a dashboard, on every
            # interface unless told otherwise: keep it on 127.0.0.1, on a free port
            self.cluster = LocalCluster(n_workers=self.n_workers, threads_per_worker=1, processes=False,
                                        dashboard_address=None,
                                        scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"})
            self.client = Client(self.cluster)
        else:
            self.client = Client(self.scheduler)
        return self.client

    def __exit__(self, *exc) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()
