"""Uncertainty under distribution shift: the engine behind ``benchmarks/shift.py`` (issue 11, item 7).

Train M NequIP members at one temperature on the EMT catalysis domain (:mod:`ltau_ase.datasets.shift`),
then score, side by side and in one run, four per-atom uncertainties on every shift domain:

* ``ltau_paper``: :class:`~ltau_ase.core.estimator.LTAUEstimator` as in the paper (member 1 + kNN over
  the training atoms' error distributions); uncalibrated (s = 1) and with s fitted on the calibration set;
* ``ltau_distance``: the distance-aware LTAU (``fit_calibration`` on the calibration set), when the
  installed estimator has it;
* ``distance``: the mean latent distance to the k neighbours alone (``predict()["distance"]``);
* ``committee``: the force spread of the same M members (their mean is the committee's prediction).

Stages write raw results to ``--output`` (``data/``, ``models/``, ``raw/*.npz``) and are reused when
present (``reuse=True``), so a long run can be re-scored after the estimator changes. Everything
measured goes to ``results.json``; ``summary.md`` holds the tables, PNGs the figures.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ltau_ase.core.jsonable import to_jsonable
from ltau_ase.datasets.shift import IS2RS_DOMAINS, ShiftSettings
from ltau_ase.shift_metrics import (bootstrap_ci, coverage, normalised_conformal_bound, species_aware,
                                    stop_outcomes, summarise_ci)

METHODS = ("ltau_paper", "ltau_distance", "distance", "committee")
METHOD_LABELS = {"ltau_paper": "LTAU (paper)", "ltau_distance": "distance-aware LTAU",
                 "ltau_distance_expected_error": "distance-aware expected error (eV/Å)",
                 "ltau_distance_ratio": "distance ratio r (calibrated)",
                 "distance": "latent distance", "committee": "committee"}


@dataclass(frozen=True)
class ShiftBenchConfig:
    """Every setting of one benchmark run (all saved in results.json)."""

    quick: bool = False
    seed: int = 0
    members: int = 4
    epochs: int = 12
    num_layers: int = 2
    num_features: int = 16
    l_max: int = 1
    r_max: float = 4.5
    batch_size: int = 16
    lr: float = 0.01
    train_timeout: float = 1800.0
    k: int = 20
    coverages: tuple[float, ...] = (0.8, 0.9, 0.95)
    relax_steps: int = 40
    committee_stride: int = 10
    is2rs_limit: int | None = None
    relax_fmax: float = 0.05
    failure_rmsd: float = 0.5
    # 0: no separate reference runs; each in-domain run is judged with the threshold from the other
    # in-domain runs (leave-one-out conformal: exchangeable with them, so P(false alarm) <= alpha still),
    # and the hot runs with the threshold from all in-domain runs. Halves the in-domain MD cost.
    md_runs_reference: int = 0
    md_runs_in_domain: int = 20
    md_steps_in_domain: int = 2000
    md_runs_hot: int = 20
    md_steps_hot: int = 2000
    md_hot_temperatures: tuple[float, ...] = (1200.0,)
    md_emt_stride_in_domain: int = 5
    md_emt_stride_hot: int = 1
    md_error_bound: float = 1.0
    md_after_breakdown: int = 30
    md_false_alarm_rate: float = 0.05
    # Extra threshold rules beside the conformal one at md_false_alarm_rate: a Gumbel fit to the reference
    # runs' peaks (stop_threshold(method="gumbel")) at each of these rates; 0.01 is below the 1/(R+1) that
    # 20 runs allow the conformal rule, and makes 0 false alarms in 20 runs the expected outcome
    # (P = 0.99^20 = 0.82 if the rate held exactly).
    md_extreme_value_rates: tuple[float, ...] = (0.05, 0.01)
    md_patience: int = 1
    md_on_time_steps: int = 10
    # Per-element statistics scored beside the raw ones ("<method>_per_element"): each atom's value over
    # its element's md_element_quantile quantile in the reference runs (observers.element_scales), then
    # the max over atoms; the scales come from the same runs as the threshold (leave one out in domain).
    md_per_element_methods: tuple[str, ...] = ("ltau_distance_expected_error", "ltau_distance_ratio")
    md_element_quantile: float = 0.99
    md_slab: tuple[int, int, int] = (2, 2, 3)
    # The MD runs use their own model (member 1's configuration trained for md_model_epochs, with its own
    # error log, LTAU estimator and calibration): at 12 epochs 15 of 20 in-domain 300 K runs of member 1
    # broke down within 100 steps by themselves, at 60 epochs 13 of 20 within 2,000 steps (true max-atom
    # error > 1 eV/Å), which leaves few in-domain runs to test false alarms on. None: MD with member 1.
    md_model_epochs: int | None = 200
    # Extra training frames of the MD model only (0 systems: none). The shared training set has 6 MD frames
    # per system within its first 80 fs of 300 K MD, while a monitored in-domain run lasts 2,000 steps: with
    # them alone the 200-epoch MD model broke down by itself in 6 of 20 in-domain runs and reached true
    # max-atom errors of 0.9-0.98 eV/Å in unbroken ones, so the 1 eV/Å breakdown bound lay inside its own
    # in-domain error range. These are md_model_extra_systems new in-domain systems (own random stream, the
    # domain's slab sizes), each EMT-relaxed and run md_model_extra_steps steps of Langevin MD at the
    # training temperature, one EMT-labelled frame every md_model_extra_steps / md_model_extra_frames steps.
    md_model_extra_systems: int = 60
    md_model_extra_frames: int = 10
    md_model_extra_steps: int = 2000
    bootstrap: int = 1000
    timing_repeats: int = 30
    workers: int = 2
    # the sizes: >= 100 IS2RS systems per domain (and as many calibration relaxations for the
    # failure model)
    settings: ShiftSettings = field(default_factory=lambda: ShiftSettings(n_is2rs=100, n_is2rs_calibration=100))

    @classmethod
    def preset(cls, quick: bool, seed: int = 0, **overrides: Any) -> "ShiftBenchConfig":
        if quick:
            cfg = cls(quick=True, seed=seed, members=4, epochs=3, md_model_epochs=4, md_runs_in_domain=3,
                      md_model_extra_systems=2, md_model_extra_frames=2, md_model_extra_steps=20,
                      md_runs_reference=9,
                      md_false_alarm_rate=0.1,
                      md_steps_in_domain=60, md_runs_hot=2, md_steps_hot=40, relax_steps=30, bootstrap=50,
                      timing_repeats=5, workers=1,
                      settings=ShiftSettings(n_train=6, n_val=2, n_calibration=7, n_calibration_mild=3, n_test=2,
                                             n_is2rs=4, n_is2rs_calibration=4, md_frames=2, relax_frames=2,
                                             slab_sizes=((2, 2, 3),)))
        else:
            cfg = cls(seed=seed)
        cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
        if cfg.members < 2:
            raise ValueError(f"the committee needs at least 2 members, got {cfg.members}")
        if min(cfg.md_model_extra_systems, cfg.md_model_extra_frames, cfg.md_model_extra_steps) < 0 or (
                cfg.md_model_extra_systems and (cfg.md_model_extra_frames < 1
                                                or cfg.md_model_extra_steps < cfg.md_model_extra_frames)):
            raise ValueError("md_model_extra_systems, _frames and _steps must be >= 0, and with extra systems "
                             f"1 <= frames <= steps; got {cfg.md_model_extra_systems}, {cfg.md_model_extra_frames}, "
                             f"{cfg.md_model_extra_steps}")
        if cfg.epochs < 2 or (cfg.md_model_epochs is not None and cfg.md_model_epochs < 2):
            raise ValueError(f"at least 2 epochs are needed for an error trajectory, got {cfg.epochs} "
                             f"(MD model: {cfg.md_model_epochs})")
        return cfg


# ---------------------------------------------------------------------------- stages 1-3
def stage_data(cfg: ShiftBenchConfig, out: Path, reuse: bool) -> dict[str, Any]:
    from ase.data import atomic_numbers

    from ltau_ase.datasets import read_split
    from ltau_ase.datasets.shift import species_of, write_shift_dataset

    data_dir = out / "data"
    manifest_path = data_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    if not (reuse and manifest and manifest["settings"] == json.loads(json.dumps(asdict(cfg.settings)))
            and manifest["seed"] == cfg.seed):
        manifest = write_shift_dataset(data_dir, cfg.settings, seed=cfg.seed, progress=True, reuse_files=reuse,
                                       workers=cfg.workers)
    splits = {name: read_split(data_dir, name) for name in list(manifest["s2ef"]) + list(manifest["is2rs"])}
    s = cfg.settings
    type_names = species_of(s, ["in_domain", "adsorbate", "element"])
    seen = species_of(s, ["in_domain"])
    return {"dir": data_dir, "manifest": manifest, "splits": splits, "type_names": type_names,
            "seen_numbers": np.array(sorted(atomic_numbers[x] for x in seen))}


def _demo_stages():
    """The demo's stage module (imported on use: the demo imports this module)."""
    import ltau_ase.demo.stages

    return ltau_ase.demo.stages


class _Stage(dict):
    """A stage result readable both as a dict and by attribute (the demo's stages use either, by version)."""

    __getattr__ = dict.__getitem__


def _as_stage(obj: Any) -> _Stage:
    return _Stage(obj if isinstance(obj, dict) else vars(obj))


def _demo_config(cfg: ShiftBenchConfig):
    from ltau_ase.demo import DemoConfig

    return DemoConfig(seed=cfg.seed, members=cfg.members, epochs=cfg.epochs, num_layers=cfg.num_layers,
                      num_features=cfg.num_features, l_max=cfg.l_max, r_max=cfg.r_max, batch_size=cfg.batch_size,
                      lr=cfg.lr, k_grid=(cfg.k,), train_timeout=cfg.train_timeout, train_workers=cfg.workers)


def stage_train(cfg: ShiftBenchConfig, out: Path, data: dict, reuse: bool) -> dict[str, Any]:
    """The demo's ensemble training (members side by side, LTAUErrorLogger), reused when complete."""
    runs = [(out / "models" / f"member{m + 1}").resolve() for m in range(cfg.members)]
    if reuse and all((r / "run" / "last.ckpt").is_file() for r in runs):
        return _Stage(run_dirs=[r / "run" for r in runs], log_dirs=[r / "ltau_errors" for r in runs],
                      models=[r / "run" / "last.ckpt" for r in runs], train_times=[math.nan] * cfg.members)
    return _as_stage(_demo_stages().stage_train(_demo_config(cfg), out, _Stage(data)))


def stage_fit(cfg: ShiftBenchConfig, out: Path, data: dict, train: dict) -> dict[str, Any]:
    return _as_stage(_demo_stages().stage_fit(_demo_config(cfg), out, _Stage(data), _Stage(train)))


def md_model_extra_frames(cfg: ShiftBenchConfig, taken_ids: np.ndarray) -> list:
    """The MD model's extra training frames (see ``md_model_extra_systems``), with fresh frame ids.

    New in-domain systems (stream 150, disjoint from the MD runs' streams 101-103+), EMT-relaxed, then
    ``md_model_extra_steps`` steps of EMT Langevin MD at the training temperature with a frame every
    ``md_model_extra_steps // md_model_extra_frames`` steps. ``taken_ids``: frame ids already in the
    model's training files; the new frames get ids after them.
    """
    from ltau_ase.core.atom_ids import assign_new_frame_ids
    from ltau_ase.datasets.catalysis import relax_with_emt, slab_with_adsorbate
    from ltau_ase.datasets.shift import _catalysis_settings, _tag, domain_systems, thermal_trajectory

    s = cfg.settings
    cat = _catalysis_settings(s)
    stride = cfg.md_model_extra_steps // cfg.md_model_extra_frames
    frames = []
    for i, spec in enumerate(domain_systems(s, "in_domain", cfg.md_model_extra_systems, cfg.seed, 150)):
        rng = np.random.default_rng([cfg.seed, 150, i])
        name = spec.name("md_model_train", i)
        relaxed, _, _ = relax_with_emt(slab_with_adsorbate(spec, rng, cat), cat.trajectory_fmax, cat.trajectory_steps)
        md = thermal_trajectory(relaxed, s.train_temperature, cfg.md_model_extra_frames, stride, 0, rng,
                                s.friction_per_fs)
        frames.extend(_tag(f, spec, name, "md_model_train", "in_domain", "md", s.train_temperature) for f in md)
    assign_new_frame_ids(frames, taken_ids)
    return frames


def stage_md_model(cfg: ShiftBenchConfig, out: Path, data: dict, train: dict, reuse: bool) -> dict[str, Any]:
    """The MD model: member 1's configuration (same seed, data, sizes) trained for ``md_model_epochs`` on
    the training split plus its extra long-MD frames (:func:`md_model_extra_frames`, when configured).

    Returns a train-like stage (``models``, ``log_dirs`` of the one run, ``train_files``) or ``train``
    itself when ``md_model_epochs`` is None. Reused when its ``last.ckpt`` exists.
    """
    if cfg.md_model_epochs is None:
        return train
    from ltau_ase.nequip.training import ERROR_LOGGER_TARGET, train_nequip, write_nequip_config

    extra = cfg.md_model_extra_systems
    extra_name = f"x{extra}x{cfg.md_model_extra_frames}s{cfg.md_model_extra_steps}"
    model_dir = (out / "models" / (f"md_model_e{cfg.md_model_epochs}" + (f"_{extra_name}" if extra else ""))).resolve()
    log_dir = model_dir / "ltau_errors"
    train_files = [data["dir"] / "train.extxyz"]
    if extra:  # shared by MD models of any epoch count (reused like the data stage's files)
        train_files.append((out / "models" / f"md_model_train_extra_{extra_name}_seed{cfg.seed}.extxyz").resolve())
    seconds = math.nan
    if not (reuse and (model_dir / "run" / "last.ckpt").is_file()):
        if extra and not (reuse and train_files[1].is_file()):
            from ase.io import write

            from ltau_ase.core.atom_ids import frame_ids_of

            taken = np.concatenate([frame_ids_of(data["splits"][s]) for s in ("train", "val")])
            tmp = train_files[1].with_suffix(".tmp")
            write(tmp, md_model_extra_frames(cfg, taken), format="extxyz")
            tmp.replace(train_files[1])  # complete or absent, never half written
        config = write_nequip_config(
            model_dir / "config.yaml", train_files, type_names=data["type_names"],
            val_file=data["dir"] / "val.extxyz",
            callbacks=[{"_target_": ERROR_LOGGER_TARGET, "log_dir": str(log_dir), "mode": "free"}],
            seed=cfg.seed * 1000 + 1, data_seed=cfg.seed, max_epochs=cfg.md_model_epochs, num_layers=cfg.num_layers,
            num_features=cfg.num_features, l_max=cfg.l_max, r_max=cfg.r_max, batch_size=cfg.batch_size, lr=cfg.lr)
        t0 = time.perf_counter()
        train_nequip(config, model_dir / "run", timeout=cfg.train_timeout, threads=1)
        seconds = time.perf_counter() - t0
    return _Stage(models=[model_dir / "run" / "last.ckpt"], log_dirs=[log_dir], train_times=[seconds],
                  epochs=cfg.md_model_epochs, train_files=train_files)


def calibration_groups(system: np.ndarray, frame: np.ndarray) -> tuple[np.ndarray, str]:
    """Structure label per calibration atom: its system (MD frames of one system are correlated) when
    there are at least ``MIN_CALIBRATION_STRUCTURES`` systems, else its frame (small demo sizes).

    Returns (labels (n,) int, ``"systems"`` or ``"frames"``).
    """
    from ltau_ase.core.estimator import MIN_CALIBRATION_STRUCTURES

    by_system = np.unique(np.asarray(system).astype(str), return_inverse=True)[1]
    if by_system.max() + 1 >= MIN_CALIBRATION_STRUCTURES:
        return by_system, "systems"
    return np.unique(np.asarray(frame).astype(str), return_inverse=True)[1], "frames"


def md_estimators(cfg: ShiftBenchConfig, data: dict, md_train: dict) -> dict[str, Any]:
    """LTAU (paper) and distance-aware LTAU of the MD model: its training descriptors and its own error log,
    calibrated (``fit_calibration``) on its errors on the in-domain and 600 K calibration splits."""
    import copy

    from ltau_ase.core.errorlog import load_error_logs
    from ltau_ase.core.estimator import LTAUEstimator
    from ltau_ase.nequip.descriptors import extract_descriptors

    from ase.io import read

    frames = list(data["splits"]["train"])
    for path in md_train.get("train_files", [])[1:]:  # the MD model's extra frames (ids after the split's)
        frames += read(path, index=":", format="extxyz")
    atom_ids, desc = extract_descriptors(md_train["models"][0], frames, progress=True)
    logs = load_error_logs(md_train["log_dirs"])
    if not np.array_equal(atom_ids, logs[0].atom_ids):
        raise RuntimeError("MD-model training descriptors and error log are not in the same atom order")
    # the reference distance of the distance ratio leaves each training system out (its relaxation and MD
    # frames are near-duplicates of each other); descriptor rows come frame after frame
    systems = np.unique([f.info["system"] for f in frames], return_inverse=True)[1]
    groups = np.repeat(systems, [len(f) for f in frames])
    est = LTAUEstimator(k=cfg.k).fit(desc, logs, atom_ids=atom_ids, groups=groups)
    from ltau_ase.core.shift import reference_distances

    plain_ref = reference_distances(est.index_, np.ascontiguousarray(desc, dtype=np.float32), est.k_eff_)
    model = _demo_stages()._load_model(md_train["models"][0])
    x, err, z, system = [], [], [], []
    for split in ("calibration", "calibration_mild"):
        for frame in data["splits"][split]:
            atoms = frame.copy()
            atoms.calc = model
            f = atoms.get_forces(apply_constraint=False)
            err.append(np.linalg.norm(f - np.asarray(frame.calc.results["forces"]), axis=1))
            x.append(np.asarray(model.results["descriptors"], dtype=np.float32))
            z.append(atoms.numbers)
            system.append(np.full(len(atoms), frame.info["system"], dtype=object))
    x, err, z = np.concatenate(x), np.concatenate(err), np.concatenate(z)
    frame_of_atom = np.concatenate([np.full(n, i) for i, n in enumerate(len(a) for a in system)])
    structure, _ = calibration_groups(np.concatenate(system).astype(str), frame_of_atom)
    aware = copy.deepcopy(est).fit_calibration(x, err, atomic_numbers=z, seed=cfg.seed, frame_ids=structure)
    return {"paper": est, "aware": aware, "calibration_mean_error": float(err.mean()), "atol": est.atol_,
            "reference_distance": {"groups": aware.calibration_info_["reference_distance"],
                                   "atoms": float(np.median(plain_ref[plain_ref > 0])),
                                   "n_groups": int(systems.max() + 1)}}


# ---------------------------------------------------------------------------- stage 4: S2EF evaluation
def _cache_key(train: dict, *parts: Any) -> str:
    """What a cached raw result depends on: member checkpoints (sha256) and the given parts."""
    from ltau_ase.core.fileformat import sha256_file

    return json.dumps([[sha256_file(p) for p in train["models"]], *parts], default=str)


def _cached(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    if path.suffix == ".npz":
        with np.load(path) as z:
            return "cache_key" in z.files and str(z["cache_key"]) == key
    key_file = path.with_suffix(".key")
    return key_file.is_file() and key_file.read_text() == key


def stage_evaluate(cfg: ShiftBenchConfig, out: Path, data: dict, train: dict, reuse: bool) -> dict[str, dict]:
    """Per-atom errors, committee spreads and member-1 descriptors of every S2EF split (cached in raw/).

    Frames are evaluated with :func:`ltau_ase.demo.evaluate_frames` in ``workers`` processes (chunks of
    frames, concatenated back in frame order).
    """
    raw = out / "raw"
    raw.mkdir(exist_ok=True)
    names = [s for s in data["manifest"]["s2ef"] if s not in ("train", "val")]
    keys = {s: _cache_key(train, data["manifest"]["s2ef"][s]["sha256"]) for s in names}
    todo = [s for s in names if not (reuse and _cached(raw / f"s2ef_{s}.npz", keys[s]))]
    chunk = 10
    tasks = [(split, i, data["splits"][split][i:i + chunk]) for split in todo
             for i in range(0, len(data["splits"][split]), chunk)]
    if tasks:
        parts = _pool_map(cfg, train, _evaluate_task, tasks, "evaluating S2EF frames")
        for split in todo:
            mine = sorted((p for p in parts if p["split"] == split), key=lambda p: p["start"])
            frames = data["splits"][split]
            ev = {k: np.concatenate([p["ev"][k] for p in mine]) for k in mine[0]["ev"]}
            ev["frame"] = np.concatenate([p["ev"]["frame"] + p["start"] for p in mine])
            ev["numbers"] = np.concatenate([f.numbers for f in frames])
            ev["system"] = np.array([frames[i].info["system"] for i in ev["frame"]])
            np.savez(raw / f"s2ef_{split}.npz", cache_key=np.array(keys[split]), **ev)
    evals: dict[str, dict] = {}
    for split in names:
        with np.load(raw / f"s2ef_{split}.npz") as z:
            evals[split] = {k: z[k] for k in z.files if k != "cache_key"}
    return evals


# ---------------------------------------------------------------------------- workers (IS2RS, MD)
_WORKER: dict[str, Any] = {}


def _worker_init(model_paths: Sequence[str]) -> None:
    import faiss
    import torch

    _load_model = _demo_stages()._load_model
    from ltau_ase.simulate.committee import CommitteeCalculator

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    members = [_load_model(p) for p in model_paths]
    _WORKER.update(members=members, committee=CommitteeCalculator(members[:]) if len(members) > 1 else None,
                   single=_load_model(model_paths[0]))


def _evaluate_task(args: tuple) -> dict[str, Any]:
    split, start, frames = args
    return {"split": split, "start": start,
            "ev": _demo_stages().evaluate_frames(frames, _WORKER["committee"], _WORKER["members"][0])}


def _relax_task(args: tuple) -> dict[str, Any]:
    """ML relaxation (member 1) of one IS2RS system.

    Records member 1's descriptors at every step and, every ``stride`` steps and at the last step, the
    committee's per-atom force spread at the same structure (members 2..M evaluated there), so every
    method predicts the failure of the same relaxation from the same frames.
    """
    from ltau_ase.is2rs import system_distances
    from ltau_ase.simulate.batch import make_optimizer

    index, initial, reference, steps, fmax, stride = args
    single, others = _WORKER["single"], _WORKER["members"][1:]
    atoms = initial.copy()
    atoms.calc = single
    opt = make_optimizer(atoms, "oc20")
    desc: list[np.ndarray] = []
    spread: dict[int, np.ndarray] = {}
    status = "done"

    def committee_spread() -> np.ndarray:
        f = np.stack([np.asarray(single.results["forces"])]
                     + [np.asarray(m.get_property("forces", atoms)) for m in others])
        return np.sqrt(f.var(axis=0).sum(axis=1)).astype(np.float32)

    try:
        for step, _ in enumerate(opt.irun(fmax=fmax, steps=steps)):
            f = np.asarray(single.results["forces"])
            if not np.all(np.isfinite(f)) or np.linalg.norm(f, axis=1).max() > 1e3:
                status = "exploded"
                break
            desc.append(np.array(single.results["descriptors"], dtype=np.float32))
            if step % stride == 0:
                spread[step] = committee_spread()
        if desc and (len(desc) - 1) not in spread and status == "done":
            spread[len(desc) - 1] = committee_spread()
    except Exception as exc:  # recorded: the system counts as failed (RMSD = inf)
        status = f"error: {type(exc).__name__}: {exc}"
    rmsd = system_distances(atoms, reference)["rmsd"] if status == "done" else math.inf
    steps_kept = sorted(spread)
    return {"index": index, "rmsd": rmsd, "status": status, "nsteps": int(opt.nsteps),
            "free": initial.get_tags() > 0, "steps": np.array(steps_kept, dtype=int),
            "descriptors": np.stack([desc[i] for i in steps_kept]) if steps_kept else None,
            "committee": np.stack([spread[i] for i in steps_kept]) if steps_kept else None}


def _md_task(args: tuple) -> dict[str, Any]:
    """Langevin MD with member 1; per step: its descriptors and the true max-atom EMT force error (eV/Å).

    The EMT error is evaluated every ``emt_stride`` steps (NaN in between). Ends ``after`` steps past
    the first evaluated step whose error exceeds ``error_bound`` (or is not finite).
    """
    from ase.calculators.emt import EMT

    from ltau_ase.simulate.md import thermalized_langevin

    key, atoms, temperature, steps, seed, error_bound, after, emt_stride = args
    single = _WORKER["single"]
    emt = EMT()
    atoms = atoms.copy()
    atoms.calc = single
    dyn = thermalized_langevin(atoms, temperature, np.random.default_rng(seed))
    desc, err = [], []
    broken_at = None
    ref = atoms.copy()
    ref.calc = emt
    try:
        for step, _ in enumerate(dyn.irun(steps)):
            f1 = np.asarray(single.results["forces"])
            desc.append(np.array(single.results["descriptors"], dtype=np.float32))
            if step % emt_stride:
                err.append(math.nan)  # not evaluated at this step
                continue
            ref.positions = atoms.positions
            e = np.linalg.norm(f1 - ref.get_forces(apply_constraint=False), axis=1).max()
            e = e if np.isfinite(e) else math.inf
            err.append(e)
            if e > error_bound and broken_at is None:
                broken_at = step
            if broken_at is not None and (step - broken_at >= after or not np.isfinite(e)):
                break
    except Exception:  # the model or EMT blew up on a broken structure: the run ends broken
        err = err[:len(desc)]
        if len(err) < len(desc):
            err.append(math.inf)
    return {"key": key, "descriptors": np.stack(desc), "true_max_error": np.array(err),
            "numbers": atoms.numbers.astype(np.int64)}


def _pool_map(cfg: ShiftBenchConfig, train: dict, fn, tasks: list, desc: str) -> list:
    from tqdm.auto import tqdm

    paths = [str(p) for p in train["models"]]
    if cfg.workers <= 1:
        _worker_init(paths)
        return [fn(t) for t in tqdm(tasks, desc=desc, unit="task")]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(paths,)) as pool:
        return list(tqdm(pool.map(fn, tasks), total=len(tasks), desc=desc, unit="task"))


def stage_is2rs(cfg: ShiftBenchConfig, out: Path, data: dict, train: dict, reuse: bool) -> dict[str, list]:
    import pickle

    results = {}
    for split in ["is2rs_calibration"] + [f"is2rs_{d}" for d in IS2RS_DOMAINS]:
        path = out / "raw" / f"{split}.pkl"
        key = _cache_key(train, data["manifest"]["is2rs"][split]["initial"]["sha256"], cfg.is2rs_limit,
                         cfg.relax_steps, cfg.relax_fmax, cfg.committee_stride)
        if not (reuse and _cached(path, key)):
            initial, relaxed = data["splits"][split]
            n = len(initial) if cfg.is2rs_limit is None else min(cfg.is2rs_limit, len(initial))
            tasks = [(i, initial[i], relaxed[i], cfg.relax_steps, cfg.relax_fmax, cfg.committee_stride)
                     for i in range(n)]
            res = _pool_map(cfg, train, _relax_task, tasks, f"relaxing {split}")
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(pickle.dumps(res))  # our own file, written just now
            tmp.replace(path)
            path.with_suffix(".key").write_text(key)
        results[split] = pickle.loads(path.read_bytes())
    return results


def md_start_structures(cfg: ShiftBenchConfig, n: int, stream: int) -> list:
    """Relaxed in-domain systems (facet_in, slab ``md_slab``) where MD runs start."""
    from ltau_ase.datasets.catalysis import CatalysisSettings, SystemSpec, relax_with_emt, slab_with_adsorbate
    from ltau_ase.datasets.shift import domain_systems

    s = cfg.settings
    specs = domain_systems(s, "in_domain", n, cfg.seed, stream)
    cat = CatalysisSettings(slab_sizes=(cfg.md_slab,))
    out = []
    for i, spec in enumerate(specs):
        spec = SystemSpec(spec.metal, spec.facet, spec.adsorbate, spec.site, cfg.md_slab, spec.domain)
        atoms = slab_with_adsorbate(spec, np.random.default_rng([cfg.seed, stream, i]), cat)
        relaxed, _, _ = relax_with_emt(atoms, cat.trajectory_fmax, cat.trajectory_steps)
        relaxed.info["system"] = f"md-{stream}-{i}-{spec.metal}{spec.facet}-{spec.adsorbate}-{spec.site}"
        out.append(relaxed)
    return out


def md_plan(cfg: ShiftBenchConfig) -> dict[str, tuple[float, int, int, int]]:
    """Run groups: name -> (temperature K, runs, steps, stream)."""
    t0 = cfg.settings.train_temperature
    plan = {f"T{t0:g}": (t0, cfg.md_runs_in_domain, cfg.md_steps_in_domain, 102)}
    if cfg.md_runs_reference:  # 0: the in-domain runs are their own references (leave one out)
        plan = {"reference": (t0, cfg.md_runs_reference, cfg.md_steps_in_domain, 101)} | plan
    for j, t in enumerate(cfg.md_hot_temperatures):
        plan[f"T{t:g}"] = (t, cfg.md_runs_hot, cfg.md_steps_hot, 103 + j)
    return plan


def stage_md(cfg: ShiftBenchConfig, out: Path, train: dict, reuse: bool) -> dict[str, list]:
    import pickle

    results = {}
    for group, (temp, runs, steps, stream) in md_plan(cfg).items():
        path = out / "raw" / f"md_{group}.pkl"
        key = _cache_key(train, temp, runs, steps, stream, cfg.seed, cfg.md_slab, cfg.md_error_bound,
                         cfg.md_after_breakdown, cfg.md_emt_stride_hot, cfg.md_emt_stride_in_domain)
        if not (reuse and _cached(path, key)):
            starts = md_start_structures(cfg, runs, stream)
            stride = cfg.md_emt_stride_hot if temp > cfg.settings.train_temperature else cfg.md_emt_stride_in_domain
            tasks = [(i, a, temp, steps, [cfg.seed, stream, i, 7], cfg.md_error_bound, cfg.md_after_breakdown,
                      stride) for i, a in enumerate(starts)]
            res = _pool_map(cfg, train, _md_task, tasks, f"MD {group}")
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(pickle.dumps(res))
            tmp.replace(path)
            path.with_suffix(".key").write_text(key)
        results[group] = pickle.loads(path.read_bytes())
        if any("numbers" not in r for r in results[group]):  # cached before runs kept their atomic numbers
            for r, a in zip(results[group], md_start_structures(cfg, runs, stream)):
                r["numbers"] = a.numbers.astype(np.int64)
    return results


# ---------------------------------------------------------------------------- stage: costs
def stage_costs(cfg: ShiftBenchConfig, data: dict, train: dict, estimators: dict) -> dict[str, Any]:
    """Median seconds per force call, interleaved in one loop on the same structures; ratios per round."""
    from ltau_ase.simulate.calculator import LTAUCalculator
    from ltau_ase.simulate.committee import CommitteeCalculator
    from ltau_ase.simulate.md import langevin_frames

    _load_model = _demo_stages()._load_model
    calcs = {"single": _load_model(train["models"][0])}
    for name, est in estimators.items():
        calcs[name] = LTAUCalculator(_load_model(train["models"][0]), est)
    calcs["committee"] = CommitteeCalculator([_load_model(p) for p in train["models"]])
    base = md_start_structures(cfg, 1, 199)[0]
    # consecutive frames of an in-domain MD run: the structures a calculator meets, in order, in MD
    frames = langevin_frames(base, _load_model(train["models"][0]), cfg.timing_repeats + 1,
                                            cfg.settings.train_temperature, seed=[cfg.seed, 11])
    names = list(calcs)
    t = {n: [] for n in names}
    for r, atoms in enumerate(frames):
        for n in names[r % len(names):] + names[:r % len(names)]:
            step_atoms = atoms.copy()
            t0 = time.perf_counter()
            calcs[n].get_property("forces", step_atoms)
            t[n].append(time.perf_counter() - t0)
    arr = {n: np.array(v[1:]) for n, v in t.items()}
    return {"n_atoms": len(base), "repeats": cfg.timing_repeats,
            "median_s": {n: float(np.median(v)) for n, v in arr.items()},
            "over_single": {n: float(np.median(arr[n] / arr["single"])) for n in names if n != "single"}}


# ---------------------------------------------------------------------------- scoring
class Scorer:
    """Per-atom UQ of every method from member-1 descriptors (and the committee's spreads)."""

    def __init__(self, cfg: ShiftBenchConfig, paper, paper_scaled, aware, seen_numbers: np.ndarray):
        self.cfg, self.paper, self.paper_scaled, self.aware = cfg, paper, paper_scaled, aware
        self.seen = seen_numbers

    def predict(self, desc: np.ndarray, numbers: np.ndarray | None = None,
                bounds: bool = False) -> dict[str, dict[str, np.ndarray]]:
        """Per method: ``uncertainty`` (n,); with ``bounds`` also confidences, σ and conformal bounds."""
        out = {}
        p = self.paper.predict(desc)
        out["ltau_paper"] = {"uncertainty": p["uncertainty"], "confidence": p["confidence"],
                             "expected_error": p["expected_error"]}
        if bounds:
            ps = self.paper_scaled.predict(desc)
            out["ltau_paper"].update(confidence_cal=ps["confidence"], sigma=ps["expected_error"])
        out["distance"] = {"uncertainty": p["distance"]}
        if self.aware is not None:
            a = self.aware.predict(desc, atomic_numbers=numbers)
            out["ltau_distance"] = {"uncertainty": a["uncertainty"], "confidence_cal": a["confidence"],
                                    "sigma": a["expected_error"]}
            out["ltau_distance_expected_error"] = {"uncertainty": a["expected_error"]}
            out["ltau_distance_ratio"] = {"uncertainty": a["distance_ratio"]}
            if bounds:
                for q in self.cfg.coverages:
                    out["ltau_distance"][f"bound_{q:g}"] = self.aware.predict(
                        desc, coverage=q, atomic_numbers=numbers)["error_bound"]
        return out


def _calibrated_methods(cfg, fit, evals, seen):
    """Paper LTAU (s = 1 and s fitted), distance-aware LTAU (if available) on calibration ∪ milder shift."""
    import copy

    from ltau_ase.simulate.committee import fit_committee_scale

    est = fit["estimators"][cfg.k]
    cal = {k: np.concatenate([evals["calibration"][k], evals["calibration_mild"][k]])
           for k in ("descriptors", "err_single", "err_committee", "u_committee", "numbers", "system")}
    # frame "a" of split "calibration" and frame "a" of "calibration_mild" are different structures
    frames = np.concatenate([np.char.add(f"{s}:", evals[s]["frame"].astype(str))
                             for s in ("calibration", "calibration_mild")])
    structure, split_by = calibration_groups(cal["system"], frames)
    scaled = copy.deepcopy(est)
    scale = scaled.fit_scale(cal["descriptors"], cal["err_single"])
    aware = None
    aware_note = "LTAUEstimator has no fit_calibration (shift-method API not merged): distance-aware LTAU not scored"
    if hasattr(est, "fit_calibration"):
        aware = copy.deepcopy(est).fit_calibration(cal["descriptors"], cal["err_single"],
                                                   atomic_numbers=cal["numbers"], seed=cfg.seed, frame_ids=structure)
        aware_note = (f"fit_calibration (atomic numbers, whole {split_by} per half) on the in-domain calibration "
                      "split plus the milder-shift (600 K) split")
    comm_scale = fit_committee_scale(cal["u_committee"], cal["err_committee"], est.atol_)["scale"]
    return est, scaled, aware, cal, {"paper_scale": scale, "committee_scale": comm_scale, "aware": aware_note}


def score_s2ef(cfg: ShiftBenchConfig, scorer: Scorer, evals: dict, cal: dict, atol: float, comm_scale: float,
               seen: np.ndarray) -> dict[str, Any]:
    from ltau_ase.core.calibration import auroc, miscalibration_area, spearman
    from ltau_ase.simulate.committee import committee_confidence

    mae = {"single": float(evals["test_in_domain"]["err_single"].mean()),
           "committee": float(evals["test_in_domain"]["err_committee"].mean())}
    cal_pred = scorer.predict(cal["descriptors"], cal["numbers"], bounds=True)
    domains = [s[len("test_"):] for s in evals if s.startswith("test_")]
    rows: dict[str, Any] = {}
    for domain in domains + ["element_species_aware"]:
        ev = evals["test_" + domain.replace("_species_aware", "")]
        pred = scorer.predict(ev["descriptors"], ev["numbers"], bounds=True)
        unseen = ~np.isin(ev["numbers"], seen)
        groups = ev["system"]
        res: dict[str, Any] = {"n_atoms": int(ev["err_single"].size), "n_systems": int(np.unique(groups).size),
                               "mean_error": {"single": float(ev["err_single"].mean()),
                                              "committee": float(ev["err_committee"].mean())}}
        if domain != "element_species_aware":
            res["follow"] = follow_means(ev, pred)
        for method in METHODS:
            if method == "committee":
                u, err, thr = ev["u_committee"], ev["err_committee"], mae["committee"]
            elif method in pred:
                u, err, thr = pred[method]["uncertainty"], ev["err_single"], mae["single"]
            else:
                continue
            if domain == "element_species_aware" and method != "committee":
                u = species_aware(u, unseen)
            m: dict[str, Any] = {"mean_uncertainty": float(np.mean(u))}
            boot = lambda fn: bootstrap_ci(groups, fn, cfg.bootstrap, seed=cfg.seed)  # noqa: E731
            m["spearman"] = boot(lambda i: spearman(u[i], err[i]))
            m["auroc"] = boot(lambda i: auroc(u[i], err[i] > thr))
            if method == "committee":
                conf, conf_cal = committee_confidence(u, atol), committee_confidence(u, atol, scale=comm_scale)
                sig_cal, sig = cal["u_committee"], u
                err_cal = cal["err_committee"]
            elif method in ("ltau_paper", "ltau_distance"):
                conf = pred[method].get("confidence")
                conf_cal = pred[method]["confidence_cal"]
                if domain == "element_species_aware":
                    conf_cal = np.where(unseen, 0.0, conf_cal)
                    conf = None if conf is None else np.where(unseen, 0.0, conf)
                sig_cal, sig, err_cal = cal_pred[method]["sigma"], pred[method]["sigma"], cal["err_single"]
            else:
                conf = conf_cal = None
            if conf is not None:
                m["miscalibration_uncalibrated"] = boot(lambda i: miscalibration_area(conf[i], err[i], atol))
            if conf_cal is not None:
                m["miscalibration_calibrated"] = boot(lambda i: miscalibration_area(conf_cal[i], err[i], atol))
            if conf_cal is not None:
                cov = {}
                for q in cfg.coverages:
                    if method == "ltau_distance":
                        b = pred[method][f"bound_{q:g}"]
                        how = "predict(coverage=q)['error_bound']"
                    else:
                        b = normalised_conformal_bound(sig_cal, err_cal, sig, q)
                        how = "normalised split conformal on the calibration set (benchmark baseline)"
                    cov[f"{q:g}"] = boot(lambda i, b=b: coverage(b[i], err[i]))
                    cov[f"{q:g}"]["mean_bound"] = float(np.mean(b[np.isfinite(b)])) if np.isfinite(b).any() else math.inf
                m["coverage"] = cov
                m["coverage_method"] = how
            res[method] = m
        rows[domain] = res
    return {"auroc_threshold": mae, "domains": rows}


#: What :func:`follow_means` averages per domain: (key, label, unit).
FOLLOW_QUANTITIES = (
    ("true_error", "true error, member 1", "eV/Å"),
    ("ltau_paper_expected_error", "LTAU (paper) expected error", "eV/Å"),
    ("ltau_distance_expected_error", "distance-aware expected error", "eV/Å"),
    ("latent_distance", "latent distance", "latent units"),
    ("true_error_committee", "true error, committee mean", "eV/Å"),
    ("committee_spread", "committee spread", "eV/Å"),
)


def follow_means(ev: dict, pred: dict) -> dict[str, Any]:
    """Mean per-atom value of each :data:`FOLLOW_QUANTITIES` entry over one domain's atoms.

    Whether a method's prediction follows a shift is read from these means across domains: the issue's
    motivating measurement was a mean error growing ×4.3 with the mean uncertainty growing ×1.18. NaN
    values (the distance-aware expected error of an atom of an unseen element under
    ``unknown_species="flag"``) are left out of the mean and counted in ``n_nan``.
    """
    values = {"true_error": ev["err_single"], "true_error_committee": ev["err_committee"],
              "committee_spread": ev["u_committee"], "latent_distance": pred["distance"]["uncertainty"],
              "ltau_paper_expected_error": pred["ltau_paper"]["expected_error"]}
    if "ltau_distance_expected_error" in pred:
        values["ltau_distance_expected_error"] = pred["ltau_distance_expected_error"]["uncertainty"]
    out: dict[str, Any] = {}
    for key, v in values.items():
        v = np.asarray(v, dtype=np.float64)
        finite = np.isfinite(v)
        out[key] = {"mean": float(v[finite].mean()) if finite.any() else math.nan, "n_nan": int((~finite).sum())}
    return out


def follow_table(results: dict) -> str:
    """Markdown: per domain, the mean true error and each method's mean prediction, × its in-domain mean."""
    rows = {d: r["follow"] for d, r in results["s2ef"]["domains"].items() if "follow" in r}
    if "in_domain" not in rows:
        return "(no in-domain S2EF row: nothing to compare with)"
    keys = [(k, label, unit) for k, label, unit in FOLLOW_QUANTITIES if k in rows["in_domain"]]
    lines = ["| domain | " + " | ".join(f"{label} ({unit})" for _, label, unit in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for domain, row in rows.items():
        cells = []
        for k, _, _ in keys:
            mean, ratio = (row[k]["mean"] if k in row else None), follow_ratio(row, rows["in_domain"], k)
            cells.append(f"{mean:.3f} (×{ratio:.2f})" if math.isfinite(ratio) else f"{_num(mean)} (× n/a)")
        lines.append(f"| {domain} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def follow_ratio(row: dict, base: dict, key: str) -> float:
    """A domain's :func:`follow_means` mean of ``key`` over the in-domain one; NaN where either is missing or
    not finite, or the in-domain mean is not > 0 (no ratio to read)."""
    mean, ref = (row.get(key) or {}).get("mean"), (base.get(key) or {}).get("mean")
    if mean is None or ref is None or not (math.isfinite(mean) and math.isfinite(ref) and ref > 0):
        return math.nan
    return mean / ref


def _trace_stats(per_step: np.ndarray) -> dict[str, float]:
    return {"initial": float(per_step[0]), "max": float(per_step.max()), "mean": float(per_step.mean()),
            "final": float(per_step[-1])}


#: per-atom quantities whose element-normalised traces feed the failure model: row-key prefix -> Scorer method
#: ("committee": the recorded committee spread)
ELEMENT_NORMALISED_SOURCES = {"expected_error": "ltau_distance_expected_error", "distance_ratio": "ltau_distance_ratio",
                              "uq": "committee"}


def element_reference_scales(scorer: Scorer, reference: dict) -> dict[str, dict[str, Any]]:
    """Per-element in-domain scales of the element-normalised trace quantities.

    ``reference``: an in-domain S2EF evaluation (``descriptors`` (n, D), ``numbers`` (n,), ``u_committee``
    (n,) eV/Å), e.g. the calibration split. Per quantity of :data:`ELEMENT_NORMALISED_SOURCES` (the
    distance-aware ones only with a calibrated estimator): ``{"scales": {Z: quantile}, "pooled": quantile}``,
    the :data:`~ltau_ase.simulate.observers.ELEMENT_SCALE_QUANTILE` of the element's atoms and of all atoms
    (the pooled one stands in for an element absent from the reference, e.g. an unseen metal).
    """
    from ltau_ase.simulate.observers import ELEMENT_SCALE_QUANTILE, element_scales

    pred = scorer.predict(reference["descriptors"], reference["numbers"])
    out = {}
    for prefix, method in ELEMENT_NORMALISED_SOURCES.items():
        if method == "committee":
            values = np.asarray(reference["u_committee"], dtype=np.float64)
        elif method in pred:
            values = np.asarray(pred[method]["uncertainty"], dtype=np.float64)
        else:
            continue
        out[prefix] = {"scales": element_scales([values[None, :]], [reference["numbers"]]),
                       "pooled": float(np.quantile(values, ELEMENT_SCALE_QUANTILE))}
    return out


def score_is2rs(cfg: ShiftBenchConfig, scorer: Scorer, is2rs: dict, data: dict,
                element_reference: dict | None = None) -> dict[str, Any]:
    """Failure AUROC (final RMSD > failure_rmsd) of each method's mean free-atom UQ over the recorded steps.

    Every method is scored on the same relaxation (member 1) at the same steps (every
    ``committee_stride`` steps and the last); a relaxation that exploded counts as failed. With
    ``element_reference`` (an in-domain S2EF evaluation, see :func:`element_reference_scales`) every row
    also gets ``element_normalised``: the element-normalised trace features
    (``ltau_ase.simulate.observers.element_normalised_trace`` over the free atoms) of the expected error,
    the distance ratio and the committee spread, keyed ``<quantity>_elnorm_<statistic>``.
    """
    from ltau_ase.core.calibration import auroc
    from ltau_ase.simulate.observers import element_normalised_trace

    out: dict[str, Any] = {"failure_rmsd": cfg.failure_rmsd, "relaxed_with": "member 1 (the LTAU model)",
                           "domains": {}, "table": {}}
    scales = element_reference_scales(scorer, element_reference) if element_reference is not None else {}
    if scales:
        out["element_scales"] = scales
    for split, records in is2rs.items():
        initial = data["splits"][split][0]
        rows = []
        for rec in records:
            atoms = initial[rec["index"]]
            row: dict[str, Any] = {"system": atoms.info["system"], "rmsd": rec["rmsd"], "status": rec["status"],
                                   "nsteps": rec["nsteps"]}
            if rec["descriptors"] is not None:
                free = rec["free"]
                d = rec["descriptors"]  # (steps, atoms, D): one predict call over every step's atoms
                pred = scorer.predict(d.reshape(-1, d.shape[-1]), np.tile(atoms.numbers, d.shape[0]))
                per_step = {method: p["uncertainty"].reshape(d.shape[:2])[:, free].mean(axis=1)
                            for method, p in pred.items()}
                per_step["committee"] = rec["committee"][:, free].mean(axis=1)
                for method, vals in per_step.items():
                    row[method] = _trace_stats(np.array(vals))
                normalised = {}
                for prefix, sc in scales.items():
                    method = ELEMENT_NORMALISED_SOURCES[prefix]
                    per_atom = (rec["committee"] if method == "committee"
                                else pred[method]["uncertainty"].reshape(d.shape[:2]))
                    feats = element_normalised_trace(per_atom, atoms.numbers, sc["scales"], mask=free,
                                                     default=sc["pooled"])
                    normalised.update({f"{prefix}_elnorm_{k}": v for k, v in feats.items()})
                if normalised:
                    row["element_normalised"] = normalised
            rows.append(row)
        out["table"][split] = rows
        fail_all = np.array([r["rmsd"] > cfg.failure_rmsd for r in rows])
        res: dict[str, Any] = {"n_systems": len(rows), "n_failed": int(fail_all.sum()),
                               "n_exploded": int(sum(r["status"] != "done" for r in rows)),
                               "failure_rate": float(fail_all.mean()) if rows else math.nan,
                               "median_rmsd": float(np.median([r["rmsd"] for r in rows])) if rows else math.nan}
        for method in METHOD_LABELS:
            have = [r for r in rows if method in r]
            if not have:
                continue
            fail = np.array([r["rmsd"] > cfg.failure_rmsd for r in have])
            ids = np.arange(len(have))
            m: dict[str, Any] = {"n_scored": len(have)}
            for stat in ("max", "initial"):
                score = np.array([r[method][stat] for r in have])
                m[f"auroc_{stat}"] = bootstrap_ci(ids, lambda i, score=score: auroc(score[i], fail[i]), cfg.bootstrap,
                                                  seed=cfg.seed)
            res[method] = m
        out["domains"][split[len("is2rs_"):]] = res
    _failure_models(cfg, out)
    return out


#: Reduced failure-model feature sets (fewer, sturdier features): the max UQ, and with the distance trace
#: also the max distance ratio.
FAILURE_REDUCED = ("uq_max",)
FAILURE_REDUCED_WITH_DISTANCE = ("uq_max", "distance_ratio_max")


def _failure_models(cfg: ShiftBenchConfig, out: dict) -> None:
    """Per method: :class:`ltau_ase.is2rs.FailureModel` fitted on the calibration relaxations, its AUROC per domain."""
    from ltau_ase.core.calibration import auroc

    try:
        from ltau_ase.is2rs import FailureModel
    except ImportError:
        out["failure_model"] = "ltau_ase.is2rs.FailureModel not available"
        return

    from ltau_ase.is2rs import (
        ELEMENT_NORMALISED_STATISTICS,
        FAILURE_FEATURES,
        FAILURE_FEATURES_WITH_DISTANCE,
        FAILURE_FEATURES_WITH_ELEMENT_NORMALISED,
        select_failure_features,
    )

    distance_key = "ltau_distance_ratio"  # the calibrated estimator's r_j, mean over free atoms per step
    committee_elnorm = tuple(f"uq_elnorm_{s}" for s in ELEMENT_NORMALISED_STATISTICS)

    def row_of(r: dict, method: str) -> dict:
        row = {**{f"uq_{k}": v for k, v in r[method].items()}, "nsteps": r["nsteps"], "rmsd": r["rmsd"]}
        if distance_key in r:
            row.update({f"distance_ratio_{k}": v for k, v in r[distance_key].items()})
        # element-normalised traces: the committee's own spread; every other method the distance-aware
        # estimator's expected error and distance ratio (as the distance trace)
        own = ("uq_",) if method == "committee" else ("expected_error_", "distance_ratio_")
        row.update({k: v for k, v in r.get("element_normalised", {}).items() if k.startswith(own)})
        return row

    # FailureModel's default (monotone; map, tail and penalty chosen by cross-validation on the
    # calibration relaxations) on the UQ trace, with the distance trace, and on the reduced set (max UQ,
    # max distance ratio); side by side the earlier forms with the distance trace: unconstrained "auto"
    # (may weight features negatively) and linear (log features, l2 = 1, unconstrained). "_selected" is
    # the default rule: the feature set chosen by nested CV on the calibration relaxations alone
    # (select_failure_features) -- for the committee among its own UQ trace sets (it has no latent
    # distance), for every other method among the sets with the distance trace. Where the rows carry the
    # element-normalised traces, each pool gains the full set plus them (the committee: its own spread's),
    # as the rule fixed on 2026-11-27 (README, IS2RS failure) before any test domain was scored with them.
    calibration_rows = out["table"]["is2rs_calibration"]
    has_elnorm = bool(calibration_rows) and all("element_normalised" in r for r in calibration_rows)
    variants = {"": (FAILURE_FEATURES, {}), "_with_distance": (FAILURE_FEATURES_WITH_DISTANCE, {}),
                "_with_distance_reduced": (FAILURE_REDUCED_WITH_DISTANCE, {}),
                "_with_distance_unconstrained": (FAILURE_FEATURES_WITH_DISTANCE, {"monotone": False}),
                "_with_distance_linear": (FAILURE_FEATURES_WITH_DISTANCE,
                                          {"transform": "log", "l2": 1.0, "monotone": False}),
                "_selected": (None, {})}
    pools = {"uq": (FAILURE_FEATURES, FAILURE_REDUCED), "uq+distance": (FAILURE_FEATURES_WITH_DISTANCE,
                                                                        FAILURE_REDUCED_WITH_DISTANCE)}
    has_distance = bool(calibration_rows) and distance_key in calibration_rows[0]
    if has_elnorm:
        pools["uq"] += (FAILURE_FEATURES + committee_elnorm,)
        pools["uq+distance"] += (FAILURE_FEATURES_WITH_ELEMENT_NORMALISED,)
        variants["_with_element_normalised"] = (FAILURE_FEATURES_WITH_ELEMENT_NORMALISED, {})
    info: dict[str, Any] = {}
    for method in METHOD_LABELS:
        # exploded relaxations (RMSD inf) are failures the model must flag too: scored, not fitted on
        fit_rows = [row_of(r, method) for r in calibration_rows if method in r and math.isfinite(r["rmsd"])]
        pool = "uq" if method == "committee" or not has_distance else "uq+distance"
        for suffix, (features, options) in variants.items():
            if not fit_rows or ("distance" in suffix and not has_distance):
                continue
            if suffix == "_with_element_normalised" and method == "committee":
                features = FAILURE_FEATURES + committee_elnorm
            try:
                if features is None:
                    model, scores = select_failure_features(fit_rows, pools[pool], rmsd_threshold=cfg.failure_rmsd)
                else:
                    model = FailureModel(rmsd_threshold=cfg.failure_rmsd, features=features, **options).fit(fit_rows)
            except ValueError as exc:
                info[method + suffix] = f"not fitted: {exc}"
                continue
            info[method + suffix] = model.to_dict()
            if features is None:
                info[method + suffix].update(feature_pool=pool, feature_set_scores=scores)
            for split in out["table"]:
                if split == "is2rs_calibration":
                    continue
                rows = [row_of(r, method) for r in out["table"][split] if method in r]
                if not rows:
                    continue
                p = model.predict_proba(rows)
                fail = np.array([r["rmsd"] > cfg.failure_rmsd for r in rows])
                d = out["domains"][split[len("is2rs_"):]][method]
                d["auroc_failure_probability" + suffix] = bootstrap_ci(
                    np.arange(len(rows)), lambda i: auroc(p[i], fail[i]), cfg.bootstrap, seed=cfg.seed)
                d["brier_failure_probability" + suffix] = bootstrap_ci(
                    np.arange(len(rows)), lambda i: float(np.mean((p[i] - fail[i]) ** 2)), cfg.bootstrap,
                    seed=cfg.seed)
                d["mean_failure_probability" + suffix] = float(p.mean())
                d["observed_failure_rate"] = float(fail.mean())
    out["failure_model"] = info


def md_threshold_rules(cfg: ShiftBenchConfig) -> dict[str, tuple[str, float]]:
    """Threshold rules scored side by side: name -> (stop_threshold method, false-alarm rate)."""
    rules = {f"conformal α={cfg.md_false_alarm_rate:g}": ("conformal", cfg.md_false_alarm_rate)}
    rules.update({f"gumbel α={a:g}": ("gumbel", a) for a in cfg.md_extreme_value_rates})
    return rules


def score_md(cfg: ShiftBenchConfig, scorer: Scorer, md: dict, ratio_reference: dict | None = None) -> dict[str, Any]:
    """Stop outcomes per temperature from per-step max-atom statistics.

    Each method's threshold is :func:`ltau_ase.simulate.observers.stop_threshold` over in-domain runs:
    the separate ``reference`` runs when there are any; otherwise each in-domain run gets the threshold
    from the other in-domain runs (leave one out) and the hot runs the one from all in-domain runs.
    Threshold rules (:func:`md_threshold_rules`), side by side: the conformal quantile of the per-run
    peaks at ``md_false_alarm_rate`` and a Gumbel fit to the peaks at each of
    ``md_extreme_value_rates``. Reference rules, side by side: ``"whole_runs"`` (every step of the
    reference runs) and ``"before_breakdown"`` (each reference run up to its first step whose true
    max-atom error exceeds ``md_error_bound``: a false alarm is a stop before breakdown, so these are
    the peaks the guarantee is about; an in-domain run that breaks down by itself no longer raises the
    threshold). A rule that cannot give a threshold (e.g. a Gumbel fit from fewer than 10 runs) is
    recorded with its reason under ``"error"``.

    Per-element statistics (``<method>_per_element`` for each of ``md_per_element_methods`` the scorer
    gives, when the runs carry atomic numbers): each atom's value divided by its element's
    ``md_element_quantile`` quantile over the reference runs' atoms (under the reference rule:
    :func:`ltau_ase.simulate.observers.element_scales`), then the max over atoms; leaving one in-domain
    run out refits the scales on the others, and the run's trace and its threshold's references use them
    (an element that only the left-out run has gets the pooled quantile of all the others' atoms). The
    scales are recorded under ``"element_scales"``.

    ``ratio_reference``: the distance ratio's reference distances, ``{"groups": ..., "atoms": ...}``
    (leave one training system out, as fitted, and the plain leave-one-atom-out one); the ratio under
    the plain reference is scored too (``ratio_reference_check``): a constant rescaling, so its stops
    must be the same.
    """
    from ltau_ase.simulate.observers import element_normalised, element_scales, stop_threshold

    per_atom: dict[str, list[dict[str, np.ndarray]]] = {g: [] for g in md}  # per-element bases, (steps, atoms)

    def stats(run, group) -> dict[str, np.ndarray]:
        d = run["descriptors"]  # (steps, atoms, D): one predict call over every step's atoms
        # with the atomic numbers, as LTAUCalculator predicts in a simulation (per-element factors)
        numbers = np.tile(run["numbers"], d.shape[0]) if run.get("numbers") is not None else None
        pred = scorer.predict(d.reshape(-1, d.shape[-1]), numbers)
        values = {m: p["uncertainty"].reshape(d.shape[:2]) for m, p in pred.items()}
        per_atom[group].append({m: values[m] for m in cfg.md_per_element_methods
                                if m in values and numbers is not None})
        return {m: v.max(axis=1) for m, v in values.items()}

    def before_breakdown(trace: np.ndarray, run: dict) -> np.ndarray:
        over = np.flatnonzero(np.asarray(run["true_max_error"]) > cfg.md_error_bound)
        return trace[: over[0]] if over.size else trace

    traces = {g: [stats(r, g) for r in runs] for g, runs in md.items()}
    rescale = None
    if ratio_reference and "ltau_distance_ratio" in traces[next(iter(traces))][0]:
        rescale = ratio_reference["groups"] / ratio_reference["atoms"]
        for group in traces.values():
            for t in group:
                t["ltau_distance_ratio_atoms_reference"] = t["ltau_distance_ratio"] * rescale
    in_domain = f"T{cfg.settings.train_temperature:g}"
    leave_one_out = "reference" not in md
    ref_group = in_domain if leave_one_out else "reference"
    methods = list(traces[ref_group][0])
    element_bases = [m for m in cfg.md_per_element_methods if all(m in pa for g in per_atom.values() for pa in g)]
    element_methods = [f"{m}_per_element" for m in element_bases]
    methods += element_methods
    patience = cfg.md_patience
    rules = md_threshold_rules(cfg)
    res: dict[str, Any] = {"error_bound": cfg.md_error_bound, "false_alarm_rate_target": cfg.md_false_alarm_rate,
                           "threshold_rules": {k: {"method": m, "false_alarm_rate": a} for k, (m, a) in rules.items()},
                           "patience": patience, "n_reference_runs": len(md[ref_group]),
                           "threshold_rule": "ltau_ase.simulate.observers.stop_threshold over "
                                             + ("the other in-domain runs (leave one out) for each in-domain run, "
                                                "over all in-domain runs for the hot runs" if leave_one_out
                                                else "the reference runs"),
                           "reference_rules": {}}

    def threshold(refs: list, method: str, alpha: float) -> float | str:
        try:
            return stop_threshold(refs, alpha, patience, method)
        except ValueError as exc:
            return str(exc)

    for rule in ("whole_runs", "before_breakdown"):
        refs = {m: [t[m] if rule == "whole_runs" else before_breakdown(t[m], r)
                    for t, r in zip(traces[ref_group], md[ref_group])] for m in methods if m not in element_methods}
        # per-element statistics: scales from the reference runs (all of them for the hot runs; in domain,
        # leave one out: run i's trace and its threshold's references are normalised by the others' scales)
        loo: dict[str, tuple[list, list]] = {}
        for base in element_bases:
            m = f"{base}_per_element"
            ref_pa = [pa[base] if rule == "whole_runs" else before_breakdown(pa[base], r)
                      for pa, r in zip(per_atom[ref_group], md[ref_group])]
            nums = [np.asarray(r["numbers"]) for r in md[ref_group]]

            def normalised_max(values, numbers, scales_pooled):
                return element_normalised(values, numbers, *scales_pooled).max(axis=1)

            def scales_of(vals, numbers):  # + the pooled quantile for an element the references lack
                values = np.concatenate([v.ravel() for v in vals])  # runs cut at step 0 add nothing
                if values.size == 0:
                    raise ValueError("the reference runs hold no per-atom values (every run has 0 steps)")
                pooled = float(np.quantile(values, cfg.md_element_quantile))
                return element_scales(vals, numbers, cfg.md_element_quantile), pooled

            scales = scales_of(ref_pa, nums)
            for group, runs in md.items():
                for t, pa, r in zip(traces[group], per_atom[group], runs):
                    t[m] = normalised_max(pa[base], r["numbers"], scales)
            refs[m] = [normalised_max(v, z, scales) for v, z in zip(ref_pa, nums)]
            res.setdefault("element_scales", {}).setdefault(rule, {})[m] = (
                {str(z): v for z, v in scales[0].items()} | {"pooled": scales[1]})
            if leave_one_out:
                own, others = [], []
                for i, pa in enumerate(per_atom[in_domain]):
                    sc = scales_of(ref_pa[:i] + ref_pa[i + 1:], nums[:i] + nums[i + 1:])
                    own.append(normalised_max(pa[base], nums[i], sc))
                    others.append([normalised_max(v, z, sc) for j, (v, z) in enumerate(zip(ref_pa, nums)) if j != i])
                loo[m] = (own, others)
        by_threshold: dict[str, Any] = {}
        for tname, (how, alpha) in rules.items():
            out: dict[str, Any] = {"thresholds": {}, "errors": {}, "groups": {}}
            for m in methods:
                thr = threshold(refs[m], how, alpha)
                if isinstance(thr, str):
                    out["errors"][m] = thr
                else:
                    out["thresholds"][m] = thr
            for group, runs in md.items():
                if group == "reference":
                    continue
                g: dict[str, Any] = {"n_runs": len(runs), "steps": [int(len(r["true_max_error"])) for r in runs],
                                     "max_true_error": [float(np.nanmax(r["true_max_error"])) for r in runs]}
                for m in out["thresholds"]:
                    thr: Any = out["thresholds"][m]
                    stat_traces = [t[m] for t in traces[group]]
                    if leave_one_out and group == in_domain:
                        if m in loo:  # the run's own trace and its references under the others' scales
                            stat_traces = loo[m][0]
                            thr = [threshold(loo[m][1][i], how, alpha) for i in range(len(runs))]
                        else:
                            thr = [threshold(refs[m][:i] + refs[m][i + 1:], how, alpha) for i in range(len(runs))]
                        if any(isinstance(x, str) for x in thr):
                            g.setdefault("errors", {})[m] = next(x for x in thr if isinstance(x, str))
                            continue
                    o = stop_outcomes(stat_traces, [r["true_max_error"] for r in runs],
                                      thr, cfg.md_error_bound, patience, cfg.md_on_time_steps)
                    if isinstance(thr, list):
                        o["thresholds"] = thr
                    # bootstrap CIs over runs of the false-alarm rate and, over broken runs, the on-time rate
                    false_alarm = np.array([s is not None and (b is None or s < b)
                                            for s, b in zip(o["stop"], o["breakdown"])], dtype=float)
                    o["false_alarm_rate_ci"] = bootstrap_ci(np.arange(len(runs)), lambda i: false_alarm[i].mean(),
                                                            cfg.bootstrap, seed=cfg.seed)
                    broken = [i for i, b in enumerate(o["breakdown"]) if b is not None]
                    if broken:
                        on_time = np.array([o["delay"][i] is not None and o["delay"][i] <= cfg.md_on_time_steps
                                            for i in broken], dtype=float)
                        o["on_time_rate_ci"] = bootstrap_ci(np.arange(len(broken)), lambda i: on_time[i].mean(),
                                                            cfg.bootstrap, seed=cfg.seed)
                    g[m] = o
                out["groups"][group] = g
            by_threshold[tname] = out
        first = by_threshold[next(iter(rules))]
        # the conformal rule under the earlier keys, every rule under "threshold_rules"
        res["reference_rules"][rule] = {"thresholds": first["thresholds"], "groups": first["groups"],
                                        "threshold_rules": by_threshold}
    res["thresholds"] = res["reference_rules"]["whole_runs"]["thresholds"]
    res["groups"] = res["reference_rules"]["whole_runs"]["groups"]
    res["reference_max_true_error"] = [float(np.nanmax(r["true_max_error"])) for r in md[ref_group]]
    if rescale is not None:
        same = True
        for rule in res["reference_rules"].values():
            for out in rule["threshold_rules"].values():
                for g in out["groups"].values():
                    a, b = g.get("ltau_distance_ratio"), g.get("ltau_distance_ratio_atoms_reference")
                    same &= a is not None and b is not None and a["stop"] == b["stop"]
        res["ratio_reference_check"] = {**ratio_reference, "same_stops": bool(same),
                                        "in_domain_peak_ratio": {
                                            "groups": [float(t["ltau_distance_ratio"].max()) for t in traces[ref_group]],
                                            "atoms": [float(t["ltau_distance_ratio_atoms_reference"].max())
                                                      for t in traces[ref_group]]}}
    return res


# ---------------------------------------------------------------------------- report
def _num(x: Any, digits: int = 3) -> str:
    """A number for a table; None (NaN in JSON) and non-finite values as n/a."""
    return "n/a" if x is None or not math.isfinite(float(x)) else f"{float(x):.{digits}g}"


def _cell(m: dict | None, key: str) -> str:
    if m is None or key not in m:
        return "–"
    return summarise_ci(m[key])


def summary_table(results: dict) -> str:
    """Markdown: per domain, each method's Spearman / AUROC / miscalibration / 90 % coverage (95 % CIs)."""
    s = results["s2ef"]["domains"]
    lines = ["| domain | method | Spearman ρ | AUROC | miscal. (no cal.) | miscal. (cal.) | coverage 80/90/95 % |",
             "|---|---|---|---|---|---|---|"]
    for domain, row in s.items():
        for method in METHODS:
            m = row.get(method)
            if m is None:
                continue
            cov = " / ".join(f"{m['coverage'][f'{q:g}']['value']:.3f}" for q in results["config"]["coverages"]) \
                if "coverage" in m else "–"
            lines.append(f"| {domain} | {METHOD_LABELS[method]} | {_cell(m, 'spearman')} | {_cell(m, 'auroc')} | "
                         f"{_cell(m, 'miscalibration_uncalibrated')} | {_cell(m, 'miscalibration_calibrated')} | {cov} |")
    return "\n".join(lines)


#: Failure-model variants of the IS2RS table: (result key suffix, column heading).
FAILURE_VARIANT_COLUMNS = (
    ("_selected", "AUROC p (default rule: monotone, feature set by nested CV)"),
    ("", "AUROC p (monotone, UQ trace)"),
    ("_with_distance", "AUROC p (monotone, + distance trace)"),
    ("_with_distance_reduced", "AUROC p (monotone, max UQ + max distance)"),
    ("_with_distance_unconstrained", "AUROC p (unconstrained auto, + distance)"),
    ("_with_distance_linear", "AUROC p (linear, + distance)"),
    ("_with_element_normalised", "AUROC p (monotone, + element-normalised traces)"),
)


def _feature_set_label(features: list[str]) -> str:
    from ltau_ase.is2rs import (
        ELEMENT_NORMALISED_STATISTICS,
        FAILURE_FEATURES,
        FAILURE_FEATURES_WITH_DISTANCE,
        FAILURE_FEATURES_WITH_ELEMENT_NORMALISED,
    )

    names = {FAILURE_FEATURES: "UQ trace", FAILURE_FEATURES_WITH_DISTANCE: "UQ + distance trace",
             FAILURE_FEATURES_WITH_ELEMENT_NORMALISED: "UQ + distance + element-normalised traces",
             FAILURE_FEATURES + tuple(f"uq_elnorm_{s}" for s in ELEMENT_NORMALISED_STATISTICS):
                 "UQ + element-normalised UQ trace"}
    return names.get(tuple(features), ", ".join(features))


def is2rs_table(results: dict) -> str:
    """Markdown: per IS2RS domain and method, AUROC of the raw trace statistics and of each failure model."""
    heads = [h for _, h in FAILURE_VARIANT_COLUMNS]
    lines = ["| IS2RS domain | systems | failed (RMSD > %.1f Å) | method | AUROC (max UQ) | AUROC (initial UQ) | "
             % results["is2rs"]["failure_rmsd"] + " | ".join(heads)
             + " | default rule: features | mean p / observed (default rule) | Brier (default rule) |",
             "|---" * (9 + len(heads)) + "|"]
    models = results["is2rs"].get("failure_model", {})
    for domain, row in results["is2rs"]["domains"].items():
        for method in METHOD_LABELS:
            m = row.get(method)
            if not m:
                continue
            chosen = models.get(method + "_selected") if isinstance(models, dict) else None
            chosen = _feature_set_label(chosen["features"]) if isinstance(chosen, dict) else "–"
            cells = " | ".join(_cell(m, "auroc_failure_probability" + suffix) for suffix, _ in FAILURE_VARIANT_COLUMNS)
            lines.append(f"| {domain} | {row['n_systems']} | {row['n_failed']} | {METHOD_LABELS[method]} | "
                         f"{_cell(m, 'auroc_max')} | {_cell(m, 'auroc_initial')} | {cells} | {chosen} | "
                         f"{_num(m.get('mean_failure_probability_selected'))} / "
                         f"{_num(m.get('observed_failure_rate'))} | "
                         f"{_cell(m, 'brier_failure_probability_selected')} |")
    return "\n".join(lines)


#: the MD stop's statistics: every per-atom method plus the distance ratio under the plain reference distance
MD_METHOD_LABELS = METHOD_LABELS | {"ltau_distance_ratio_atoms_reference": "distance ratio r (leave-one-atom-out "
                                                                          "reference)",
                                    "ltau_distance_expected_error_per_element": "expected error / its element's "
                                                                                "in-domain quantile",
                                    "ltau_distance_ratio_per_element": "distance ratio r / its element's in-domain "
                                                                       "quantile"}


def md_table(results: dict) -> str:
    """Markdown: stop outcomes per reference rule, threshold rule, MD group and statistic."""
    md = results["md"]
    lines = ["| reference rule | threshold rule | MD group | runs | broken (max err > %g eV/Å) | method | threshold | "
             "false alarms | stopped ≤ %d steps after breakdown (or before) | median delay | missed |"
             % (md["error_bound"], results["config"]["md_on_time_steps"]),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    rules = md.get("reference_rules", {"whole_runs": {"thresholds": md["thresholds"], "groups": md["groups"]}})
    for rule, r in rules.items():
        by_threshold = r.get("threshold_rules", {"conformal": r})
        for tname, t in by_threshold.items():
            for group, g in t["groups"].items():
                for method in MD_METHOD_LABELS:
                    o = g.get(method)
                    if o:
                        fa = f"{o['n_false_alarms']}/{o['n_runs']}"
                        if "false_alarm_rate_ci" in o:
                            fa += f" ({summarise_ci(o['false_alarm_rate_ci'])})"
                        ot = f"{o['n_on_time']}/{o['n_broken']}"
                        if "on_time_rate_ci" in o:
                            ot += f" ({summarise_ci(o['on_time_rate_ci'])})"
                        lines.append(f"| {rule} | {tname} | {group} | {o['n_runs']} | {o['n_broken']} | "
                                     f"{MD_METHOD_LABELS[method]} | {_num(t['thresholds'][method])} | {fa} | {ot} | "
                                     f"{_num(o['median_delay'])} | {o['n_missed']} |")
            for method, why in t.get("errors", {}).items():
                lines.append(f"| {rule} | {tname} | – | – | – | {MD_METHOD_LABELS.get(method, method)} | n/a: {why} "
                             "| – | – | – | – |")
    check = md.get("ratio_reference_check")
    if check:
        lines += ["", "Distance ratio reference distance: %.4g leaving each training system out (%d systems) "
                  "against %.4g leaving one atom out; in-domain peak r (median over runs) %.3g against %.3g; "
                  "same stops under both: %s." % (check["groups"], check["n_groups"], check["atoms"],
                                                  np.median(check["in_domain_peak_ratio"]["groups"]),
                                                  np.median(check["in_domain_peak_ratio"]["atoms"]),
                                                  "yes" if check["same_stops"] else "NO")]
    return "\n".join(lines)


def figures(out: Path, results: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    s = results["s2ef"]["domains"]
    domains = list(s)
    for key, label in (("spearman", "Spearman ρ (UQ vs |ΔF|)"), ("auroc", "AUROC (|ΔF| > in-domain MAE)")):
        fig, ax = plt.subplots(figsize=(8, 3.5))
        width = 0.8 / len(METHODS)
        for j, method in enumerate(METHODS):
            vals = [s[d][method][key] if method in s[d] else None for d in domains]
            x = np.arange(len(domains)) + j * width
            # an undefined value or CI (NaN, stored as None in JSON) is drawn as no bar / no error bar
            num = lambda x: np.nan if x is None else float(x)  # noqa: E731
            v = np.array([np.nan if c is None else num(c["value"]) for c in vals])
            lo = np.array([np.nan if c is None else num(c["value"]) - num(c["low"]) for c in vals])
            hi = np.array([np.nan if c is None else num(c["high"]) - num(c["value"]) for c in vals])
            ax.bar(x, v, width, yerr=[np.nan_to_num(lo), np.nan_to_num(hi)], label=METHOD_LABELS[method], capsize=2)
        ax.set_xticks(np.arange(len(domains)) + 0.4 - width / 2)
        ax.set_xticklabels(domains, rotation=20, fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"shift_{key}.png"
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        figs[key] = name
    return figs


def write_summary(out: Path, results: dict) -> Path:
    c = results["cost"]
    lines = [
        "# Uncertainty under distribution shift (benchmarks/shift.py)", "",
        f"Run {results['run']['date']} on {results['run']['machine']}; mode "
        f"{'quick' if results['config']['quick'] else 'full'}, seed {results['config']['seed']}, "
        f"total {results['run']['total_s']:.0f} s. 95 % bootstrap CIs resample systems "
        f"({results['config']['bootstrap']} resamples).", "",
        f"Distance-aware LTAU: {results['calibration']['aware']}.", "",
        "## Per-atom ranking and calibration", "", summary_table(results), "",
        f"![Spearman]({results['figures']['spearman']}) ![AUROC]({results['figures']['auroc']})", "",
        "## Do the predictions follow the shift? (means over each domain's atoms, × the in-domain mean)", "",
        follow_table(results), "",
        "## IS2RS failure prediction", "", is2rs_table(results), "",
        "## MD stop", "", md_table(results), "",
        "## Cost per force call (× one model)", "",
        " ".join(f"{METHOD_LABELS.get(k, k)}: {_num(v)}×;" for k, v in c["over_single"].items())
        + f" ({c['n_atoms']} atoms, consecutive frames of an in-domain MD run, median of {c['repeats']} "
        f"interleaved steps; single model {c['median_s']['single'] * 1e3:.1f} ms).", "",
    ]
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    return path


# ---------------------------------------------------------------------------- main
def ensemble_from_demo(demo_output: str | Path) -> dict[str, Any]:
    """The trained ensemble of a ``make demo`` output directory (its training file, checkpoints, error logs)."""
    root = Path(demo_output)
    members = sorted((root / "models").glob("member*"), key=lambda p: int(p.name[len("member"):]))
    models = [m / "run" / "last.ckpt" for m in members]
    logs = [m / "ltau_errors" for m in members]
    missing = [str(p) for p in models + logs + [root / "data" / "train.extxyz"] if not p.exists()]
    if len(members) < 2 or missing:
        raise FileNotFoundError(f"{root} is not a complete demo output (needs data/train.extxyz and >= 2 "
                                f"models/member*/run/last.ckpt with ltau_errors); missing: {missing or 'members'}")
    return {"train_file": root / "data" / "train.extxyz", "models": models, "log_dirs": logs,
            "source": str(root)}


def run_shift_benchmark(output: str | Path, cfg: ShiftBenchConfig, reuse: bool = True,
                        ensemble: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) every stage; write results.json, summary.md and PNGs to ``output``.

    ``ensemble`` (e.g. :func:`ensemble_from_demo`) scores an already trained ensemble instead of
    training one at ``settings.train_temperature``: its ``train_file`` (the frames the error logs
    cover), ``models`` (member checkpoints, member 1 first) and ``log_dirs``.
    """
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "raw").mkdir(exist_ok=True)
    t_start = time.perf_counter()
    stages: dict[str, float] = {}

    def timed(name, fn, *args):
        t0 = time.perf_counter()
        r = fn(*args)
        stages[name] = time.perf_counter() - t0
        return r

    data = timed("data", stage_data, cfg, out, reuse)
    if ensemble is None:
        train = timed("training", stage_train, cfg, out, data, reuse)
        fit = timed("estimator", stage_fit, cfg, out, data, train)
    else:
        from ase.io import read

        if len(ensemble["models"]) != cfg.members:
            cfg = replace(cfg, members=len(ensemble["models"]))
        train = _Stage(models=list(ensemble["models"]), log_dirs=list(ensemble["log_dirs"]),
                       train_times=[math.nan] * cfg.members, source=ensemble.get("source"))
        frames = read(ensemble["train_file"], index=":", format="extxyz")
        fit = timed("estimator", stage_fit, cfg, out, {"splits": {"train": frames}}, train)
    evals = timed("s2ef evaluation", stage_evaluate, cfg, out, data, train, reuse)
    is2rs = timed("is2rs relaxations", stage_is2rs, cfg, out, data, train, reuse)
    md_train = train if ensemble is not None else timed("md model training", stage_md_model, cfg, out, data, train,
                                                         reuse)
    md = timed("md runs", stage_md, cfg, out, md_train, reuse)
    est, scaled, aware, cal, calib = _calibrated_methods(cfg, fit, evals, data["seen_numbers"])
    scorer = Scorer(cfg, est, scaled, aware, data["seen_numbers"])
    s2ef = timed("scoring s2ef", score_s2ef, cfg, scorer, evals, cal, est.atol_, calib["committee_scale"],
                 data["seen_numbers"])
    is2rs_res = timed("scoring is2rs", score_is2rs, cfg, scorer, is2rs, data, evals["calibration"])
    if md_train is train:
        md_scorer, md_info = scorer, {"model": "member 1 of the ensemble"}
    else:
        md_est = timed("md model estimators", md_estimators, cfg, data, md_train)
        md_scorer = Scorer(cfg, md_est["paper"], md_est["paper"], md_est["aware"], data["seen_numbers"])
        md_info = {"model": f"member 1's configuration trained for {md_train['epochs']} epochs (own error log, "
                            "estimator and calibration)", "atol": md_est["atol"],
                   "calibration_mean_error": md_est["calibration_mean_error"],
                   "training_seconds": md_train["train_times"][0],
                   "training_files": [str(p) for p in md_train.get("train_files", [])],
                   "reference_distance": md_est["reference_distance"]}
    md_res = timed("scoring md", score_md, cfg, md_scorer, md,
                   None if md_train is train else md_est["reference_distance"])
    md_res["md_model"] = md_info
    estimators = {"ltau_paper": est} | ({"ltau_distance": aware} if aware is not None else {})
    cost = timed("costs", stage_costs, cfg, data, train, estimators)
    results: dict[str, Any] = {
        "config": asdict(cfg), "atol": est.atol_, "calibration": calib,
        "data": {s: {"n_frames": v["n_frames"], "n_atoms": v["n_atoms"]} for s, v in data["manifest"]["s2ef"].items()}
        | {s: {"n_systems": v["initial"]["n_frames"], "rejected_placements": v["rejected_placements"]}
           for s, v in data["manifest"]["is2rs"].items()},
        "type_names": data["type_names"], "training_seconds": train["train_times"],
        "ensemble_source": train.get("source", "trained here"),
        "s2ef": s2ef, "is2rs": is2rs_res, "md": md_res, "cost": cost,
    }
    results = to_jsonable(results)
    results["figures"] = figures(out, results)
    results["run"] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, Python "
                                 f"{platform.python_version()}",
                      "stages_s": stages, "total_s": time.perf_counter() - t_start}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_summary(out, results)
    return results





# ---------------------------------------------------------------------------- demo hook
def demo_config(quick: bool, seed: int = 0) -> ShiftBenchConfig:
    """Reduced sizes for ``make demo`` (scores the demo's own ensemble; see :func:`demo_shift_headline`)."""
    if quick:
        settings = ShiftSettings(n_train=1, n_val=1, n_calibration=8, n_calibration_mild=2, n_test=2, n_is2rs=3,
                                 n_is2rs_calibration=3, md_frames=2, relax_frames=1, md_equilibration=0,
                                 md_stride=3, slab_sizes=((2, 2, 3),))
        return ShiftBenchConfig(quick=True, seed=seed, k=5, relax_steps=10, committee_stride=5, md_runs_reference=1,
                                md_runs_in_domain=1, md_steps_in_domain=20, md_runs_hot=1, md_steps_hot=20,
                                md_false_alarm_rate=0.5, bootstrap=50, timing_repeats=5, workers=1, settings=settings)
    settings = ShiftSettings(n_train=1, n_val=1, n_calibration=10, n_calibration_mild=5, n_test=6, n_is2rs=12,
                             n_is2rs_calibration=12, md_frames=4)
    return ShiftBenchConfig(seed=seed, k=20, relax_steps=40, md_runs_reference=9, md_runs_in_domain=5,
                            md_steps_in_domain=200, md_runs_hot=5, md_steps_hot=150, md_false_alarm_rate=0.1,
                            bootstrap=200, timing_repeats=15, workers=1, settings=settings)


def headline(results: dict) -> dict[str, Any]:
    """The numbers the issue's goals name, flattened (point values; CIs stay in results.json)."""
    s = results["s2ef"]["domains"]
    h: dict[str, Any] = {}
    for domain, row in s.items():
        for method in METHODS:
            m = row.get(method)
            if not m:
                continue
            for key in ("spearman", "auroc", "miscalibration_uncalibrated", "miscalibration_calibrated"):
                if key in m:
                    h[f"{domain}.{method}.{key}"] = m[key]["value"]
            for q, c in m.get("coverage", {}).items():
                h[f"{domain}.{method}.coverage_{q}"] = c["value"]
    base = s.get("in_domain", {}).get("follow")
    for domain, row in s.items():
        if base and "follow" in row and domain != "in_domain":
            for key in row["follow"]:  # how far each mean moved from the in-domain one (NaN: no ratio)
                h[f"{domain}.follow.{key}_ratio"] = follow_ratio(row["follow"], base, key)
    for domain, row in results["is2rs"]["domains"].items():
        for method in METHOD_LABELS:
            if method in row:
                h[f"is2rs.{domain}.{method}.auroc_max"] = row[method]["auroc_max"]["value"]
                for suffix, _ in FAILURE_VARIANT_COLUMNS:
                    key = "auroc_failure_probability" + suffix
                    if key in row[method]:
                        h[f"is2rs.{domain}.{method}.{key}"] = row[method][key]["value"]
    for group, g in results["md"]["groups"].items():
        for method in METHOD_LABELS:
            if method in g:
                h[f"md.{group}.{method}.false_alarms"] = g[method]["n_false_alarms"]
                h[f"md.{group}.{method}.on_time_rate"] = g[method]["on_time_rate"]
    for tname, t in results["md"].get("reference_rules", {}).get("whole_runs", {}).get("threshold_rules", {}).items():
        for group, g in t["groups"].items():
            for method in METHOD_LABELS:
                if method in g:
                    h[f"md.{tname}.{group}.{method}.false_alarms"] = g[method]["n_false_alarms"]
                    h[f"md.{tname}.{group}.{method}.on_time_rate"] = g[method]["on_time_rate"]
    for method, ratio in results["cost"]["over_single"].items():
        h[f"cost.{method}_over_single"] = ratio
    return h


def demo_shift_headline(demo_output: str | Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Score the demo's trained ensemble under shift; for ``ltau_ase.demo`` (one call after training).

    Writes the benchmark's output to ``<demo_output>/shift/`` and returns ``{"headline": {...},
    "summary": path of summary.md, "markdown": the per-atom table and the follow table}``. The demo's members were trained
    on relaxation, rattled and 300–900 K MD frames, so its 1200 K domain is the only temperature shift
    beyond its training range; ``benchmarks/shift.py`` trains at one temperature instead.
    """
    out = Path(demo_output) / "shift"
    results = run_shift_benchmark(out, demo_config(quick, seed), ensemble=ensemble_from_demo(demo_output))
    return {"headline": headline(results), "summary": str(out / "summary.md"),
            "markdown": summary_table(results) + "\n\nMean over each domain's atoms (× the in-domain mean):\n\n"
            + follow_table(results)}


__all__ = ["METHODS", "ShiftBenchConfig", "demo_config", "demo_shift_headline", "ensemble_from_demo", "headline",
           "is2rs_table", "md_table", "run_shift_benchmark", "summary_table"]
