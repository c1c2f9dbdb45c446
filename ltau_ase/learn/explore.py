"""Exploration: MD (Langevin, NVT) and relaxations from seed structures under an UncertaintyStop,
as Dask tasks, every snapshot kept in an SQLite ase.db (resumable).

One task = one trajectory: (seed structure, kind ``md`` at a temperature or ``relax``, replica).
The calculator comes from a picklable, hashable factory (built once per worker thread, see
:func:`ltau_ase.simulate.batch.worker_calculator`) and must provide per-atom ``uncertainties``
(an :class:`~ltau_ase.simulate.calculator.LTAUCalculator`, or a committee). Every ``stride`` steps
and at the step where the stop fires, a snapshot is taken: the structure, the model's energy and
forces, the per-atom uncertainties, the latent descriptors when the calculator gives them, the
stop statistic and the bound it was compared with.

Rows of the database (one per snapshot, all rows of a task written in one transaction, so a task
is either fully recorded or absent): key-value pairs ``name`` (``<task>@<step>``), ``task``,
``seed``, ``kind``, ``temperature`` (K, MD only), ``step``, ``statistic``, ``bound``, ``flagged``
(statistic above the bound), ``stop`` (this is the triggering frame), ``status`` of the task
(``done`` | ``failed``), ``triggered``, ``stop_step``, ``n_steps`` (steps run), ``wall_time`` (s),
``labelled`` (the structure was labelled before: see below); data ``uncertainties`` (N,) and
``descriptors`` (N, D) float32.

Already labelled structures (``labelled``: :func:`~ltau_ase.simulate.batch.content_name` keys) do not
count towards the stop: a trajectory whose start frame was labelled in an earlier iteration (every MD
trajectory starts at its seed) goes on exploring instead of stopping at step 0 on a structure that
cannot be labelled again, as on-the-fly codes continue after labelling. Their snapshot is still
recorded, with the statistic and ``labelled=True``. A failed task writes one row
(its seed structure, ``status="failed"``, ``reason``) and the campaign goes on.
"""
from __future__ import annotations

import math
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import all_properties
from ase.calculators.singlepoint import SinglePointCalculator

from ltau_ase.simulate.batch import content_name, dask_client, make_optimizer, worker_calculator
from ltau_ase.simulate.observers import UncertaintyStop, check_reduce, per_atom_values, reduce_values

KINDS = ("md", "relax")


@dataclass(frozen=True)
class ExploreSettings:
    """How each seed is explored (temperatures K, time fs, forces eV/Å).

    ``kinds``: ``("md",)``, ``("relax",)`` or both. MD: Langevin NVT at each of ``temperatures``,
    ``md_steps`` steps of ``timestep_fs``, friction ``friction_per_fs``; relaxations: ``optimizer``
    to ``fmax`` in at most ``relax_steps``. ``replicas`` independent trajectories per (seed, kind,
    temperature). Snapshots every ``stride`` steps. The stop watches ``atom_reduce`` of the per-atom
    ``uncertainties`` over all atoms and fires after ``patience`` steps above the bound: the fixed
    ``threshold``, or (``adaptive=True``) the running mean + ``n_sigma`` std after ``warmup`` steps,
    with ``threshold`` as a ceiling. ``stop=False`` runs every trajectory to its end (the bound is
    still recorded, frames above it still flagged).
    """

    kinds: tuple[str, ...] = ("md",)
    temperatures: tuple[float, ...] = (300.0, 900.0)
    md_steps: int = 200
    timestep_fs: float = 1.0
    friction_per_fs: float = 0.02
    relax_steps: int = 100
    fmax: float = 0.05
    optimizer: str = "BFGS"
    replicas: int = 1
    stride: int = 10
    atom_reduce: str | float = "max"
    patience: int = 1
    adaptive: bool = False
    warmup: int = 20
    n_sigma: float = 3.0
    stop: bool = True
    max_force: float = 50.0  # eV/Å: a model force above this ends the trajectory (failed)

    def validate(self) -> "ExploreSettings":
        if not self.kinds or any(k not in KINDS for k in self.kinds):
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {self.kinds!r}")
        if "md" in self.kinds and (not self.temperatures or any(not (t > 0) for t in self.temperatures)):
            raise ValueError(f"MD exploration needs positive temperatures in K, got {self.temperatures!r}")
        for name in ("md_steps", "relax_steps", "replicas", "stride", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (self.timestep_fs > 0 and self.friction_per_fs >= 0 and self.fmax > 0 and self.max_force > 0):
            raise ValueError("timestep_fs, fmax and max_force must be positive and friction_per_fs >= 0")
        check_reduce(self.atom_reduce)
        return self


@dataclass(frozen=True)
class ExploreTask:
    """One trajectory to run."""

    name: str
    seed: str
    kind: str
    temperature: float | None
    replica: int
    rng_seed: tuple[int, ...]


def make_tasks(seed_names: Sequence[str], settings: ExploreSettings, rng_root: Sequence[int]) -> list[ExploreTask]:
    """All (seed, kind, temperature, replica) trajectories, with one RNG seed each."""
    tasks = []
    for i, seed in enumerate(seed_names):
        for kind in settings.kinds:
            temps = settings.temperatures if kind == "md" else (None,)
            for j, temp in enumerate(temps):
                for r in range(settings.replicas):
                    label = f"md{temp:g}K" if kind == "md" else "relax"
                    tasks.append(ExploreTask(f"{seed}|{label}|r{r}", seed, kind, temp, r,
                                             tuple(int(x) for x in rng_root) + (i, KINDS.index(kind), j, r)))
    return tasks


def _snapshot(atoms: Atoms, statistic: float, bound: float, step: int, stop: bool, labelled: bool = False) -> Atoms:
    frame = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc, tags=atoms.get_tags(),
                  constraint=[c.copy() for c in atoms.constraints])
    frame.info.update({k: v for k, v in atoms.info.items() if isinstance(v, (str, int, float, bool, np.integer,
                                                                              np.floating))})
    results = atoms.calc.results
    frame.calc = SinglePointCalculator(frame, **{k: np.copy(v) for k, v in results.items()
                                                 if k in all_properties and k in ("energy", "forces")})
    frame.info.update(statistic=float(statistic), bound=float(bound), step=int(step), stop=bool(stop),
                      flagged=bool(statistic > bound or math.isnan(statistic)), labelled=bool(labelled))
    frame.arrays["uncertainties_snapshot"] = np.asarray(results["uncertainties"], dtype=np.float64).copy()
    descriptors = results.get("descriptors")
    if descriptors is None and callable(getattr(atoms.calc, "descriptors", None)):
        descriptors = atoms.calc.descriptors(atoms)  # an LTAUCalculator given a descriptor callable
    if descriptors is not None:
        frame.info["_descriptors"] = np.asarray(descriptors, dtype=np.float32).copy()
    return frame


def explore_one(task: ExploreTask, atoms: Atoms, factory: Callable[[], Any], settings: ExploreSettings,
                threshold: float | None, labelled: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Run one trajectory on a worker; never raises (failures come back with ``status="failed"``).

    ``labelled``: content keys (:func:`~ltau_ase.simulate.batch.content_name`) of structures labelled
    before; a step on one of them is recorded but never evaluated by the stop (module docstring).

    Returns ``name``, ``status``, ``reason``, ``snapshots`` (list of Atoms, see :func:`_snapshot`),
    ``triggered``, ``stop_step``, ``n_steps``, ``wall_time`` (s), ``force_calls``.
    """
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import thermalize_momenta

    t0 = time.perf_counter()
    out: dict[str, Any] = {"name": task.name, "status": "failed", "reason": "", "snapshots": [],
                           "triggered": False, "stop_step": -1, "n_steps": 0, "wall_time": float("nan")}
    work = atoms.copy()
    dyn = None
    try:
        work.calc = worker_calculator(factory)
        if task.kind == "md":
            rng = np.random.default_rng(list(task.rng_seed))
            thermalize_momenta(work, temperature_K=task.temperature, rng=rng)
            dyn = Langevin(work, timestep=settings.timestep_fs * units.fs, temperature_K=task.temperature,
                           friction=settings.friction_per_fs / units.fs, fixcm=False, rng=rng)
            n_max = settings.md_steps
        else:
            dyn = make_optimizer(work, settings.optimizer)
            n_max = settings.relax_steps
        # without a stop, the bound is still recorded (flags), but the stop never ends the run
        stop = UncertaintyStop(dyn, threshold=threshold, atom_reduce=settings.atom_reduce,
                               patience=settings.patience if settings.stop else 10**9,
                               adaptive=settings.adaptive, warmup=settings.warmup, n_sigma=settings.n_sigma)
        snapshots: list[Atoms] = []

        def observe() -> None:
            forces = work.get_forces(apply_constraint=False)
            if not np.isfinite(forces).all() or np.linalg.norm(forces, axis=1).max() > settings.max_force:
                raise RuntimeError(f"model forces exploded (max |F| > {settings.max_force:g} eV/Å or non-finite) "
                                   f"at step {dyn.nsteps}")
            known = bool(labelled) and content_name(work) in labelled
            if known:  # recorded with its statistic, but a labelled structure never stops the run
                step = int(dyn.nsteps)
                value = reduce_values(per_atom_values(work, "uncertainties"), settings.atom_reduce)
                bound = stop.current_bound()
            else:
                stop()
                step, value, bound = stop.steps[-1], stop.values[-1], stop.bounds[-1]
            if stop.triggered or step % settings.stride == 0 or known:
                snap = _snapshot(work, value, bound, step, stop.triggered, labelled=known)
                if snapshots and snapshots[-1].info["step"] == step:
                    snapshots[-1] = snap  # ASE may call observers twice for one step (step 0 of a stopped run)
                else:
                    snapshots.append(snap)

        dyn.attach(observe, interval=1)
        if task.kind == "md":  # ASE calls observers at step 0 too: the seed is recorded
            dyn.run(n_max)
        else:
            dyn.run(fmax=settings.fmax, steps=n_max)
        out.update(status="done", triggered=bool(stop.triggered), stop_step=int(stop.step) if stop.triggered else -1)
        out["snapshots"] = snapshots
    except Exception as exc:  # recorded, never raised: the campaign goes on
        out["reason"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc(limit=5)
    if dyn is not None:
        out["n_steps"] = int(dyn.nsteps)
    out["wall_time"] = time.perf_counter() - t0
    return out


def _write_task(db: Any, task: ExploreTask, seed_atoms: Atoms, result: dict) -> None:
    base = {"task": task.name, "seed": task.seed, "kind": task.kind, "status": result["status"],
            "triggered": bool(result["triggered"]), "stop_step": int(result["stop_step"]),
            "n_steps": int(result["n_steps"]), "wall_time": float(result["wall_time"])}
    if task.temperature is not None:
        base["temperature"] = float(task.temperature)
    if db.count(task=task.name):  # never duplicate
        return
    with db:  # one transaction: a task is fully recorded or absent
        if result["status"] != "done" or not result["snapshots"]:
            atoms = Atoms(seed_atoms.numbers, seed_atoms.positions, cell=seed_atoms.cell, pbc=seed_atoms.pbc)
            db.write(atoms, key_value_pairs=dict(base, name=f"{task.name}@failed", step=-1, flagged=False,
                                                 stop=False, reason=result["reason"][:500] or "no snapshot"),
                     data={"traceback": result.get("traceback", "")})
            return
        for frame in result["snapshots"]:
            info = frame.info
            data = {"uncertainties": frame.arrays["uncertainties_snapshot"]}
            if "_descriptors" in info:
                data["descriptors"] = info["_descriptors"]
            kvp = dict(base, name=f"{task.name}@{info['step']}", step=int(info["step"]),
                       statistic=float(info["statistic"]) if math.isfinite(info["statistic"]) else 1e300,
                       flagged=bool(info["flagged"]), stop=bool(info["stop"]), labelled=bool(info["labelled"]))
            if math.isfinite(info["bound"]):
                kvp["bound"] = float(info["bound"])
            clean = frame.copy()
            clean.calc = frame.calc
            for key in ("_descriptors",):
                clean.info.pop(key, None)
            clean.arrays.pop("uncertainties_snapshot", None)
            db.write(clean, key_value_pairs=kvp, data=data)


def explore(
    seeds: Sequence[tuple[str, Atoms]],
    db_path: str | os.PathLike,
    factory: Callable[[], Any],
    settings: ExploreSettings,
    threshold: float | None,
    rng_root: Sequence[int] = (0,),
    scheduler: str | None = None,
    n_workers: int | None = None,
    progress: bool = True,
    labelled: Sequence[str] = (),
) -> dict[str, int]:
    """Run every exploration task not yet in ``db_path`` on Dask, writing each as it finishes.

    ``labelled``: content keys (:func:`~ltau_ase.simulate.batch.content_name`) of structures already
    labelled; they never stop a trajectory (module docstring).

    Returns counts ``{"tasks", "skipped", "done", "failed"}``.
    """
    from ase.db import connect
    from tqdm.auto import tqdm

    settings.validate()
    if threshold is None and not settings.adaptive:
        raise ValueError("a fixed-threshold exploration needs a threshold (calibrate first)")
    atoms_of = dict(seeds)
    tasks = make_tasks([n for n, _ in seeds], settings, rng_root)
    db = connect(os.fspath(db_path), type="db")
    done = {row.get("task") for row in db.select(include_data=False)}
    pending = [t for t in tasks if t.name not in done]
    counts = {"tasks": len(tasks), "skipped": len(tasks) - len(pending), "done": 0, "failed": 0}
    if not pending:
        return counts
    from distributed import as_completed

    labelled = frozenset(labelled)
    # only a step-0 frame (the seed itself) can coincide exactly with a labelled structure: send each task
    # the key of its own seed, not the whole set
    own = {name: frozenset({content_name(a)}) & labelled for name, a in seeds}
    with dask_client(scheduler, n_workers) as client:
        futures = {client.submit(explore_one, t, atoms_of[t.seed], factory, settings, threshold, own[t.seed],
                                 pure=False): t for t in pending}
        bar = tqdm(total=len(futures), disable=not progress, desc="exploration", unit="trajectory")
        for fut in as_completed(futures):
            task = futures[fut]
            try:
                result = fut.result()
            except Exception as exc:  # the task could not run at all: still recorded
                result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "snapshots": [],
                          "triggered": False, "stop_step": -1, "n_steps": 0, "wall_time": float("nan")}
            _write_task(db, task, atoms_of[task.seed], result)
            counts[result["status"]] += 1
            bar.update(1)
            fut.release()
        bar.close()
    return counts


def load_snapshots(db_path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(snapshots, tasks) of an exploration database.

    Each snapshot: ``name``, ``task``, ``step``, ``statistic``, ``bound``, ``flagged``, ``stop``,
    ``atoms`` (with the model's energy/forces), ``uncertainties`` (N,), ``descriptors`` (N, D) or None.
    Each task: ``task``, ``seed``, ``kind``, ``status``, ``reason``, ``triggered``, ``stop_step``,
    ``n_steps``, ``wall_time``.
    """
    from ase.db import connect

    snaps, tasks, index = [], {}, {}
    for row in connect(os.fspath(db_path)).select(sort="id"):
        t = row.get("task")
        if t not in tasks:
            tasks[t] = {"task": t, "seed": row.get("seed"), "kind": row.get("kind"), "status": row.get("status"),
                        "reason": row.get("reason", ""), "triggered": bool(row.get("triggered")),
                        "stop_step": int(row.get("stop_step")), "n_steps": int(row.get("n_steps")),
                        "wall_time": float(row.get("wall_time")), "temperature": row.get("temperature")}
        if row.get("status") != "done":
            continue
        data = row.data
        if row.get("name") in index:  # databases written before snapshots were unique per step: keep the later
            snaps[index[row.get("name")]] = None
        index[row.get("name")] = len(snaps)
        snaps.append({"name": row.get("name"), "task": t, "step": int(row.get("step")),
                      "statistic": float(row.get("statistic")), "bound": float(row.get("bound", math.inf)),
                      "flagged": bool(row.get("flagged")), "stop": bool(row.get("stop")),
                      "labelled": bool(row.get("labelled", False)), "atoms": row.toatoms(),
                      "uncertainties": np.asarray(data["uncertainties"], dtype=np.float64),
                      "descriptors": np.asarray(data["descriptors"]) if "descriptors" in data else None})
    return [x for x in snaps if x is not None], list(tasks.values())
