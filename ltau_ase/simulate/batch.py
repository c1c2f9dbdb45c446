"""Batch relaxations with per-atom uncertainties on Dask, results in an SQLite ase.db, resumable.

:func:`relax_batch` relaxes many structures with a :class:`RelaxationUQObserver` attached:

- Dask runs the relaxations: by default an in-process ``LocalCluster(processes=False)`` (threads,
  one relaxation per worker at a time); ``scheduler="tcp://host:port"`` uses an existing cluster.
- ``calculator_factory`` is a picklable, hashable callable returning an ASE calculator (e.g.
  ``ModelBackend.ltau_factory(...)`` of a model backend, such as
  :class:`ltau_ase.nequip.backend.NequIPLTAUFactory`). Each worker thread builds its calculator once and reuses it for
  every system it relaxes (a per-process cache keyed by thread and factory).
- The client writes one row per system to the ase.db as soon as the system finishes. Each row is
  one SQLite transaction, and systems are identified by the key ``name``, unique in the database (a
  unique index that SQLite enforces): re-running after a crash or kill skips every name already in
  the database and duplicates nothing.
- Concurrent runs on one database: before submitting, a run claims its pending systems in the table
  ``ltau_claims`` of the same SQLite file (one transaction, ``BEGIN IMMEDIATE``). A system claimed by
  another live process is left to it (counted as ``busy``); claims of a process that no longer runs
  (killed) are taken over, so resuming still works. A claim ends when its row is written.
- Names: ``atoms.info["name"]`` (extxyz, lists) or the row's ``name`` key (ase.db). A structure
  without one is named from its content, :func:`content_name` (a hash of numbers, positions, cell
  and pbc): the same structure gets the same name in every run and in any order, and a different
  structure a different name. References are matched by name and must be named.
- The in-process cluster listens on 127.0.0.1 only; it serves a dashboard only when ``dashboard``
  gives an address.
- Each row holds the final structure (energy and forces as calculator results), key-value pairs
  ``name``, ``group``, ``status`` (``"done"`` | ``"unconverged"`` | ``"failed"``), ``reason``,
  ``converged``, ``nsteps``, ``wall_time`` (s), ``fmax_final`` (eV/Å), ``uq_initial`` / ``uq_max`` /
  ``uq_mean`` / ``uq_final`` / ``uq_key``, ``optimizer``, with a calibrated estimator (one that gives
  ``latent_distance_ratios``) also ``distance_ratio_initial`` / ``_max`` / ``_mean`` / ``_final``
  (the distance trace, reduced like the UQ); and ``data``: ``trace`` (per-step UQ), ``distance_trace``,
  the final per-atom UQ arrays (``ltau_uncertainties`` ...) and, when references were given, the
  reference structure (``reference_positions``, ``reference_cell``, ``reference_numbers``,
  ``reference_pbc``, ``reference_tags``, ``reference_fixed``).
- A failure (NaN energy or forces, forces above ``max_force``, any exception) is recorded with
  status ``"failed"`` and its reason; the batch goes on.
"""
from __future__ import annotations

import hashlib
import math
import os
import socket
import sqlite3
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import all_properties
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from ltau_ase.core.checks import check_int
from ltau_ase.simulate.calculator import PER_ATOM_UQ

#: the per-atom result whose trace relax_batch records next to the UQ when the calculator gives it
DISTANCE_KEY = "latent_distance_ratios"
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


def forget_calculators_of_finished_threads() -> int:
    """Drop the cached calculators of worker threads that have ended; returns how many.

    Called when an in-process cluster closes: its calculators (and their models) are freed, and a
    later thread that happens to get a recycled thread id does not inherit a calculator built from
    files that may have changed since.
    """
    alive = {t.ident for t in threading.enumerate()}
    with _CALCULATORS_LOCK:
        stale = [key for key in _CALCULATORS if key[0] not in alive]
        for key in stale:
            del _CALCULATORS[key]
    return len(stale)


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
    obs = dist_obs = None
    opt = None
    try:
        work.calc = worker_calculator(factory)
        _check_finite(work, settings.max_force)
        obs = RelaxationUQObserver(work, atom_reduce=settings.atom_reduce, select=_select(settings.select),
                                   key=settings.key)
        if DISTANCE_KEY in work.calc.implemented_properties and settings.key != DISTANCE_KEY:
            # a calibrated estimator also gives the distance ratio: its trace feeds the failure model
            dist_obs = RelaxationUQObserver(work, atom_reduce=settings.atom_reduce, select=_select(settings.select),
                                            key=DISTANCE_KEY, info_prefix="ltau_distance_ratio_")
        opt = make_optimizer(work, settings.optimizer)
        opt.attach(lambda: _check_finite(work, settings.max_force))  # first: stop before a bad step is used
        opt.attach(obs)
        if dist_obs is not None:
            opt.attach(dist_obs)
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
    if dist_obs is not None:
        out["distance_summary"] = dist_obs.summary()
        out["distance_trace"] = dist_obs.trace
    if opt is not None:
        out["nsteps"] = int(opt.nsteps)
    out["wall_time"] = time.perf_counter() - t0
    return out


def _select(select: Any) -> Any:
    # tuples travel better than lists in frozen settings; observers take tag lists
    return list(select) if isinstance(select, tuple) else select


# ---------------------------------------------------------------------------- inputs
def content_name(atoms: Atoms) -> str:
    """Name of an unnamed structure, derived from its content: ``"unnamed-"`` + 16 hex digits.

    SHA-256 over the atomic numbers (int64), positions (float64, Å), cell (float64, Å) and pbc, in
    that order (little-endian; -0.0 counted as 0.0). Identical inputs always give the same name, in
    any order and any run; structures differing in any atom, coordinate bit, cell or pbc get
    different names. Tags, constraints and info do not enter. The hash is of the exact values: the
    same file gives the same names in every run, but a structure written to extxyz (8 decimals) and
    read back has rounded positions and so another name; name structures (``info["name"]``) to
    match them across such copies.
    """
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(atoms.numbers, dtype="<i8").tobytes())
    for array in (atoms.positions, atoms.cell.array):
        h.update(np.ascontiguousarray(np.asarray(array, dtype="<f8") + 0.0).tobytes())
    h.update(np.ascontiguousarray(atoms.pbc, dtype=bool).tobytes())
    return "unnamed-" + h.hexdigest()[:16]


def read_structures(structures: str | PathLike | Sequence[Atoms],
                    require_names: bool = False) -> list[tuple[str, Atoms]]:
    """``(name, atoms)`` pairs from a list of Atoms, an extxyz file or an ase.db file.

    Names come from ``atoms.info["name"]`` (extxyz, lists) or the row's ``name`` key (ase.db);
    structures without one are named by :func:`content_name` (unless ``require_names``, then
    they raise). Duplicate names (including identical unnamed structures) raise ``ValueError``.
    """
    from ase.io import read

    if isinstance(structures, (str, PathLike)):
        path = os.fspath(structures)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"structures file {path} does not exist or is not a file")
        try:
            if path.endswith(".db"):
                from ase.db import connect

                pairs = []
                for row in connect(path, type="db").select():
                    atoms = row.toatoms()
                    atoms.info.update(row.key_value_pairs)
                    pairs.append((atoms.info.get("name"), atoms))
            else:
                images = read(path, index=":")
                pairs = [(a.info.get("name"), a) for a in images]
        except Exception as exc:  # ASE and sqlite raise many types for empty, garbled or foreign files
            raise ValueError(f"cannot read structures from {path}: {type(exc).__name__}: "
                             f"{' '.join(str(exc).split())}") from None
    else:
        images = list(structures)
        bad = [i for i, a in enumerate(images) if not isinstance(a, Atoms)]
        if bad:
            raise TypeError(f"structures must be ase.Atoms; items {bad[:5]} are not")
        pairs = [(a.info.get("name"), a) for a in images]
    if not pairs:
        raise ValueError("no structures to relax")
    if require_names:
        unnamed = [i for i, (n, _) in enumerate(pairs) if n is None or str(n) == ""]
        if unnamed:
            raise ValueError(f"structures {unnamed[:10]} have no name (info['name']); these structures are matched "
                             "by name, so every one needs one")
    named = [(str(n) if n is not None and str(n) != "" else content_name(a), a) for n, a in pairs]
    for i, (n, a) in enumerate(named):
        _check_storable(n, "name", i)
        if "group" in a.info:
            _check_storable(str(a.info["group"]), "group", i)
    seen: dict[str, int] = {}
    for i, (n, _) in enumerate(named):
        if n in seen:
            raise ValueError(f"duplicate structure name {n!r} (items {seen[n]} and {i}); names must be unique "
                             "because they identify systems in the database (unnamed structures are named by "
                             "content, so these two are identical)")
        seen[n] = i
    return named


def _check_storable(text: str, what: str, index: int) -> None:
    """Names and groups are ase.db text values: refused up front if ase.db would refuse them at write
    time (a text that reads as a number or boolean, such as ``"5"`` or ``"nan"``)."""
    from ase.db.core import check

    try:
        check({what: text})
    except ValueError:
        raise ValueError(f"structure {index} has {what} {text!r}, which an ase.db cannot store as text (it reads as "
                         f"a number or boolean); use a {what} with letters, e.g. 'sys_{text}'") from None


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


# ---------------------------------------------------------------------------- the store
#: claims table in the results database: name (primary key) -> owning process
CLAIMS_TABLE = "ltau_claims"
#: unique index that makes SQLite refuse a second row with the same name
NAME_INDEX = "ltau_unique_name"


def existing_names(db: Any) -> dict[str, str]:
    """name -> status of every system already in the database."""
    return {row.get("name"): row.get("status") for row in db.select(include_data=False)}


@contextmanager
def _immediate_transaction(path: str) -> Iterator[sqlite3.Connection]:
    """One SQLite transaction that takes the write lock at once (``BEGIN IMMEDIATE``), so that what it
    reads cannot change before it writes."""
    con = sqlite3.connect(path, timeout=60, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
    finally:
        con.close()


def open_store(db_path: str | PathLike) -> Any:
    """The results ase.db at ``db_path`` (created when absent), with the unique index on ``name`` and
    the claims table.

    Raises:
        ValueError: the file is not a usable SQLite database (corrupt, foreign, unwritable), or it
            already holds two rows with one name (written before the index existed).
    """
    from ase.db import connect

    path = os.fspath(db_path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    try:
        # SQLite's own locking only: ASE's lock file would be left behind by a killed run and then
        # block every later write forever
        db = connect(path, type="db", use_lock_file=False)
        with db:  # one connection; its transaction holds the write lock while the schema is made
            con = db.connection
            con.execute("BEGIN IMMEDIATE")
            db.count()  # ASE creates its tables in a new file: here, under the lock (two runs raced before)
            if not con.in_transaction:  # ASE commits its schema
                con.execute("BEGIN IMMEDIATE")
            con.execute(f"CREATE TABLE IF NOT EXISTS {CLAIMS_TABLE} (name TEXT PRIMARY KEY, owner TEXT NOT NULL, "
                        "host TEXT NOT NULL, pid INTEGER NOT NULL, started REAL, claimed REAL NOT NULL)")
            duplicates = con.execute("SELECT value, COUNT(*) FROM text_key_values WHERE key = 'name' "
                                     "GROUP BY value HAVING COUNT(*) > 1 LIMIT 5").fetchall()
            if duplicates:
                raise ValueError(f"{path} already holds several rows for the names "
                                 f"{[name for name, _ in duplicates]}; remove the extra rows first")
            con.execute(f"CREATE UNIQUE INDEX IF NOT EXISTS {NAME_INDEX} ON text_key_values(value) "
                        "WHERE key = 'name'")
    except sqlite3.DatabaseError as exc:
        raise ValueError(f"cannot use {path} as the results database (SQLite ase.db): "
                         f"{type(exc).__name__}: {exc}") from None
    return db


@dataclass(frozen=True)
class ClaimOwner:
    """The process claiming systems: a unique token, its host, pid and start time (s since the epoch)."""

    token: str
    host: str
    pid: int
    started: float | None

    @classmethod
    def this_process(cls) -> "ClaimOwner":
        pid = os.getpid()
        return cls(token=f"{socket.gethostname()}:{pid}:{os.urandom(6).hex()}", host=socket.gethostname(),
                   pid=pid, started=_process_start(pid))


def _process_start(pid: int) -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    try:
        return float(psutil.Process(pid).create_time())
    except Exception:  # psutil.NoSuchProcess / AccessDenied
        return None


def _owner_alive(host: str, pid: int, started: float | None) -> bool:
    """Whether the claiming process still runs. On another host it cannot be told: assumed alive."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now_started = _process_start(pid)  # a recycled pid is another process
    return started is None or now_started is None or abs(now_started - started) < 1e-3


def claim_systems(db_path: str | PathLike, names: Sequence[str],
                  owner: ClaimOwner) -> tuple[list[str], list[str], dict[str, str]]:
    """Claim ``names`` for ``owner`` in one transaction.

    Returns:
        ``(claimed, already_written, busy)``: the names now claimed by ``owner``; those with a row
        already; and name -> "pid P on HOST" for names claimed by another live process.
    """
    path = os.fspath(db_path)
    claimed: list[str] = []
    already: list[str] = []
    busy: dict[str, str] = {}
    with _immediate_transaction(path) as con:
        written = {value for (value,) in con.execute("SELECT value FROM text_key_values WHERE key = 'name'")}
        con.execute(f"DELETE FROM {CLAIMS_TABLE} WHERE name IN "
                    "(SELECT value FROM text_key_values WHERE key = 'name')")  # claims whose row exists
        claims = {row[0]: row[1:] for row in con.execute(f"SELECT name, owner, host, pid, started FROM {CLAIMS_TABLE}")}
        alive: dict[tuple, bool] = {}
        rows = []
        now = time.time()
        for name in names:
            if name in written:
                already.append(name)
                continue
            held = claims.get(name)
            if held is not None and held[0] != owner.token:
                process = tuple(held[1:])
                if process not in alive:
                    alive[process] = _owner_alive(*process)
                if alive[process]:
                    busy[name] = f"pid {held[2]} on {held[1]}"
                    continue
            rows.append((name, owner.token, owner.host, owner.pid, owner.started, now))
            claimed.append(name)
        con.executemany(f"INSERT OR REPLACE INTO {CLAIMS_TABLE} VALUES (?, ?, ?, ?, ?, ?)", rows)
    return claimed, already, busy


def release_claims(db_path: str | PathLike, owner: ClaimOwner) -> None:
    """Drop every claim of ``owner`` (its run is over)."""
    with _immediate_transaction(os.fspath(db_path)) as con:
        con.execute(f"DELETE FROM {CLAIMS_TABLE} WHERE owner = ?", (owner.token,))


def claim_pending(db_path: str | PathLike, pending: list[tuple[str, Atoms]],
                  counts: dict[str, int]) -> tuple[ClaimOwner, list[tuple[str, Atoms]]]:
    """Claim ``pending`` for this process; returns ``(owner, the pairs now claimed)``.

    Adds names with a row already to ``counts["skipped"]`` and sets ``counts["busy"]`` to the names
    left to another live process (with a warning; ``counts["busy_owner"]`` names those processes).
    Release with :func:`release_claims` when done.
    """
    owner = ClaimOwner.this_process()
    claimed, already, busy = claim_systems(db_path, [n for n, _ in pending], owner)
    counts["skipped"] += len(already)
    counts["busy"] = len(busy)
    if busy:
        holders = sorted(set(busy.values()))
        counts["busy_owner"] = ", ".join(holders)  # printed by the CLI
        warnings.warn(f"{len(busy)} system(s) are claimed by another running process ({', '.join(holders)}) and "
                      "are left to it", stacklevel=3)
    mine = set(claimed)
    return owner, [(n, a) for n, a in pending if n in mine]


def store_rows(db: Any, rows: Sequence[tuple[Atoms, dict[str, Any], dict[str, Any]]],
               owner: ClaimOwner | None = None) -> list[int]:
    """Write ``(atoms, key_value_pairs, data)`` rows and end their claims, in one SQLite transaction.

    A name that already has a row (another process wrote it meanwhile; the unique name index refuses
    it) is skipped: the rows are then written one transaction each. Returns each row's id, 0 for a
    skipped one.
    """
    def write(batch):
        with db:  # one SQLite transaction: the rows, and the end of their claims
            ids = [db.write(atoms, key_value_pairs=kvp, data=data) for atoms, kvp, data in batch]
            if owner is not None:
                db.connection.executemany(f"DELETE FROM {CLAIMS_TABLE} WHERE name = ? AND owner = ?",
                                          [(kvp["name"], owner.token) for _, kvp, _ in batch])
        return ids

    try:
        return write(rows)
    except sqlite3.IntegrityError:  # the unique name index: never a second row for a name
        if len(rows) == 1:
            return [0]
        return [store_rows(db, [row], owner)[0] for row in rows]


def check_batch_args(calculator_factory: Any, n_workers: Any = None, scheduler_timeout: Any = 30.0) -> None:
    """Check the arguments every batch run shares; raises TypeError / ValueError naming the problem."""
    if n_workers is not None and (isinstance(n_workers, bool) or not isinstance(n_workers, (int, np.integer))
                                  or n_workers < 1):
        raise ValueError(f"n_workers must be a positive integer, got {n_workers!r}")
    if not (isinstance(scheduler_timeout, (int, float)) and math.isfinite(scheduler_timeout) and scheduler_timeout > 0):
        raise ValueError(f"scheduler_timeout must be a positive number of seconds, got {scheduler_timeout!r}")
    if not callable(calculator_factory):
        raise TypeError(f"calculator_factory must be callable() -> calculator, got {type(calculator_factory)}")
    try:
        hash(calculator_factory)
    except TypeError:
        raise TypeError("calculator_factory must be hashable (e.g. a frozen dataclass such as a backend's ltau_factory) so "
                        "each worker builds its calculator once") from None


def local_cluster(n_workers: int = 1, dashboard: str | None = None) -> Any:
    """The in-process Dask cluster of :func:`relax_batch`: ``n_workers`` threads of this process.

    Every server it opens (scheduler and worker HTTP endpoints) listens on 127.0.0.1 only; the
    scheduler serves its dashboard pages only when ``dashboard`` gives an address (e.g.
    ``"127.0.0.1:8787"``), otherwise just ``/health`` and metrics on a random local port.
    """
    from distributed import LocalCluster

    # a LocalCluster asked for no or negative workers waits forever for them: refuse instead
    n_workers = check_int(n_workers, "n_workers", minimum=1)
    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=False,
                        dashboard_address=dashboard or "127.0.0.1:0", worker_dashboard_address="127.0.0.1:0",
                        scheduler_kwargs={"dashboard": dashboard is not None})


@contextmanager
def dask_client(scheduler: str | None = None, n_workers: int | None = None, dashboard: str | None = None,
                scheduler_timeout: float = 30.0) -> Iterator[Any]:
    """A Dask ``Client`` for a batch run, closed on exit.

    ``scheduler`` None: an in-process ``LocalCluster`` of ``n_workers`` (default 1) single-thread
    workers, closed on exit; every server it opens listens on 127.0.0.1 only, with a dashboard only
    at ``dashboard``. Else the running scheduler at that address (ConnectionError when it does not
    answer within ``scheduler_timeout`` s), left running.
    """
    from distributed import Client

    cluster = None
    if scheduler is None:
        cluster = local_cluster(1 if n_workers is None else n_workers, dashboard)
        client = Client(cluster)
    else:
        try:
            client = Client(scheduler, timeout=scheduler_timeout)
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(f"cannot reach the Dask scheduler at {scheduler} within {scheduler_timeout:g} s: "
                                  f"{' '.join(str(exc).split())}") from None
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
            forget_calculators_of_finished_threads()


def pending_systems(db_path: str | PathLike, items: Sequence[tuple[str, Atoms]], statuses: Iterable[str],
                    retry_failed: bool = False) -> tuple[Any, list[tuple[str, Atoms]], dict[str, int]]:
    """Open the store and find the systems of ``items`` that still need work (shared by relax and predict).

    ``retry_failed`` first deletes the rows of status "failed". Returns the open database, the
    ``(name, atoms)`` pairs without a row, and counts ``{status: 0 for statuses, "skipped": rows already
    there, "busy": 0, "total": len(items)}`` for the caller to fill.
    """
    db = open_store(db_path)
    if retry_failed:
        failed_ids = [row.id for row in db.select(status="failed", include_data=False)]
        if failed_ids:
            db.delete(failed_ids)
    done = existing_names(db)
    pending = [(n, a) for n, a in items if n not in done]
    counts = {s: 0 for s in statuses}
    counts["skipped"] = len(items) - len(pending)
    counts["busy"] = 0
    counts["total"] = len(items)
    return db, pending, counts


# ---------------------------------------------------------------------------- the batch
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
    dashboard: str | None = None,
    scheduler_timeout: float = 30.0,
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
        scheduler: None for an in-process cluster (threads, listening on 127.0.0.1 only), or the
            address of a running Dask scheduler.
        n_workers: workers of the in-process cluster (default 1; each holds its own calculator).
        references: optional reference relaxed structures (same forms as ``structures``, named),
            matched by name and stored in each row's data for ``ltau report``.
        progress: tqdm progress bar.
        key, atom_reduce, select: what the :class:`RelaxationUQObserver` records.
        max_force: forces above this (eV/Å) mark a relaxation as exploded (failed).
        retry_failed: delete rows with status "failed" first and relax those systems again.
        dashboard: address for the in-process cluster's Dask dashboard (e.g. ``"127.0.0.1:8787"``);
            None serves none.
        scheduler_timeout: seconds to wait for ``scheduler`` to answer.
    Returns:
        counts: ``{"done", "unconverged", "failed", "skipped", "busy", "total"}``: this run's rows,
        systems already in the database, and systems left to another running process.
    """
    from tqdm.auto import tqdm

    settings = RelaxSettings(optimizer=optimizer, fmax=float(fmax), steps=steps,
                             key=key, atom_reduce=atom_reduce,
                             select=tuple(select) if isinstance(select, list) else select,
                             max_force=float(max_force)).validate()
    check_batch_args(calculator_factory, n_workers, scheduler_timeout)
    items = read_structures(structures)
    refs: dict[str, dict] = {}
    if references is not None:
        ref_items = dict(read_structures(references, require_names=True))
        for name, atoms in items:
            if name in ref_items:
                refs[name] = _reference_data(ref_items[name], atoms, name)

    db, pending, counts = pending_systems(db_path, items, STATUSES, retry_failed)
    if not pending:
        return counts

    owner, pending = claim_pending(db_path, pending, counts)
    try:
        if pending:
            _run_pending(pending, db, calculator_factory, settings, refs, counts, owner, scheduler, n_workers,
                         dashboard, scheduler_timeout, progress, tqdm)
    finally:
        release_claims(db_path, owner)
    return counts


def _run_pending(pending, db, calculator_factory, settings, refs, counts, owner, scheduler, n_workers,
                 dashboard, scheduler_timeout, progress, tqdm) -> None:
    from distributed import as_completed

    with dask_client(scheduler, n_workers, dashboard, scheduler_timeout) as client:
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
            if _write_row(db, result, atoms, settings, refs.get(name), owner):
                counts[result["status"]] += 1
            else:  # another process stored this name meanwhile: its row stands
                counts["skipped"] += 1
            bar.update(1)
            bar.set_postfix({s: counts[s] for s in STATUSES})
            fut.release()
        bar.close()


def _write_row(db: Any, result: dict, initial: Atoms, settings: RelaxSettings, reference: dict | None,
               owner: ClaimOwner | None = None) -> int:
    """Write one system's row and end its claim, in one transaction; 0 when the name has a row already."""
    name = result["name"]
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
    if result.get("distance_summary") is not None:
        for stat in ("initial", "max", "mean", "final"):
            value = result["distance_summary"][stat]
            if math.isfinite(value):  # +inf (a flagged unseen element) stays in the trace only
                kvp[f"distance_ratio_{stat}"] = float(value)
        data["distance_trace"] = np.asarray(result["distance_trace"], dtype=np.float64)
    data.update(result.get("per_atom", {}))
    if "traceback" in result:
        data["traceback"] = result["traceback"]
    if reference is not None:
        data.update(reference)
    return store_rows(db, [(result["atoms"], kvp, data)], owner)[0]


# ---------------------------------------------------------------------------- reading back
@dataclass
class RelaxationRecord:
    """One relaxation as stored in the database by :func:`relax_batch` (what :func:`load_results` returns).

    Attributes:
        name, group: the system's unique name and its group (e.g. in/out of domain).
        status: ``"done"`` | ``"unconverged"`` | ``"failed"``; ``reason`` says why it failed.
        converged, nsteps, wall_time: optimizer outcome, steps taken, seconds.
        uq_initial, uq_max, uq_mean, uq_final: the RelaxationUQObserver statistics (NaN when absent).
        trace: (nsteps + 1,) per-step UQ or None.
        distance_ratio_initial, distance_ratio_max, distance_ratio_mean, distance_ratio_final: the same
            statistics of the distance ratio trace (``latent_distance_ratios``, recorded when the
            calculator provides it: an estimator from ``fit_calibration``); NaN when absent.
        distance_trace: (nsteps + 1,) per-step distance ratio or None.
        atoms: final structure (energy and forces as calculator results).
        reference: reference relaxed structure stored with ``references=`` (or None).
        per_atom: final per-atom UQ arrays (``ltau_uncertainties`` ...), each (N,).

    ``record["name"]`` etc. also work (the dict records of earlier versions).
    """

    name: str
    group: str = DEFAULT_GROUP
    status: str = "done"
    reason: str = ""
    converged: bool = False
    nsteps: int | None = None
    wall_time: float = float("nan")
    uq_initial: float = float("nan")
    uq_max: float = float("nan")
    uq_mean: float = float("nan")
    uq_final: float = float("nan")
    trace: np.ndarray | None = None
    distance_ratio_initial: float = float("nan")
    distance_ratio_max: float = float("nan")
    distance_ratio_mean: float = float("nan")
    distance_ratio_final: float = float("nan")
    distance_trace: np.ndarray | None = None
    atoms: Atoms | None = None
    reference: Atoms | None = None
    per_atom: dict = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    @property
    def uq(self) -> dict[str, float]:
        """``{"initial", "max", "mean", "final"}`` UQ statistics of the relaxation."""
        return {"initial": self.uq_initial, "max": self.uq_max, "mean": self.uq_mean, "final": self.uq_final}


def stored_rows(db_path: str | PathLike, statuses: Iterable[str] | None, known: Sequence[str]) -> Iterator[Any]:
    """The rows of an existing store in insertion order, only those whose status is in ``statuses`` (None: all).

    Checks first (FileNotFoundError for a missing database, ValueError for a status outside ``known``),
    then returns an iterator over the rows; shared by the relaxation and prediction readers.
    """
    from ase.db import connect

    path = os.fspath(db_path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"database {path} does not exist")
    wanted = None if statuses is None else set(statuses)
    if wanted is not None and not wanted <= set(known):
        raise ValueError(f"statuses must be among {tuple(known)}; got {sorted(wanted)}")
    return (row for row in connect(path).select(sort="id") if wanted is None or row.get("status") in wanted)


def load_results(db_path: str | PathLike, statuses: Iterable[str] | None = None) -> list[RelaxationRecord]:
    """The :class:`RelaxationRecord` of every row of a relaxation database, in insertion order.

    ``statuses`` filters rows (e.g. ``("done", "unconverged")``). For the IS2RS table of these records
    use :func:`ltau_ase.is2rs.records_table`.
    """
    records = []
    for row in stored_rows(db_path, statuses, STATUSES):
        status = row.get("status")
        data = row.data
        ref = None
        if "reference_positions" in data:
            ref = Atoms(numbers=data["reference_numbers"], positions=data["reference_positions"],
                        cell=data["reference_cell"], pbc=data["reference_pbc"], tags=data["reference_tags"])
            fixed = np.asarray(data["reference_fixed"], dtype=bool)
            if fixed.any():
                ref.set_constraint(FixAtoms(mask=fixed))
        records.append(RelaxationRecord(
            name=row.get("name"), group=row.get("group", DEFAULT_GROUP), status=status,
            reason=row.get("reason", ""), converged=bool(row.get("converged", False)), nsteps=row.get("nsteps"),
            wall_time=row.get("wall_time", float("nan")),
            trace=np.asarray(data["trace"]) if "trace" in data else None, atoms=row.toatoms(), reference=ref,
            distance_trace=np.asarray(data["distance_trace"]) if "distance_trace" in data else None,
            per_atom={k: np.asarray(v) for k, v in data.items() if k.startswith("ltau_")},
            **{f"uq_{stat}": row.get(f"uq_{stat}", float("nan")) for stat in ("initial", "max", "mean", "final")},
            **{f"distance_ratio_{stat}": row.get(f"distance_ratio_{stat}", float("nan"))
               for stat in ("initial", "max", "mean", "final")}))
    return records
