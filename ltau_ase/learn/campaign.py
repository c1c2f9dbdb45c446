"""Active-learning campaigns: explore, flag, select, label, retrain, refit, recalibrate, report.

One campaign = one working directory::

    campaign.json           settings + fingerprint (a directory of another campaign is refused)
    inputs/                 copies of the initial training, validation, calibration, seed and test files
    iter_000/               the initial model(s): models/member<m>/ (nequip run + error log),
                            estimator.ltau, calibration.json, metrics.json
    iter_001/ ...           explore.db (snapshots), selected.json, labels.db (reference labels),
                            new_frames.extxyz (labelled frames with new frame ids), models/,
                            estimator.ltau, calibration.json, metrics.json
    report.md, report.png   the campaign report, rewritten after every iteration

Every stage writes its output atomically (or row by row into an ase.db) and is skipped when the
output exists, so re-running :meth:`Campaign.run` after a crash or kill continues where it stopped:
exploration tasks and labels already recorded are neither recomputed nor duplicated.

Selection methods (``CampaignSettings.selection``): ``"ltau"`` (uncertainty + latent diversity,
one model), ``"random"`` (the same exploration, frames drawn at random), ``"committee"`` (DP-GEN:
M models, MD on the committee mean, trust window on the max force deviation). Each iteration's
model is trained fresh on the grown set, or warm-started from the previous iteration's checkpoint
(``warm_start=True``); its estimator is refitted on the new run's error log (the latent space
changes with every retraining, so old descriptors never stay valid) and the stop threshold is
recalibrated on the calibration split.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from ltau_ase.core.atom_ids import assign_new_frame_ids, frame_ids_of
from ltau_ase.core.jsonable import to_jsonable
from ltau_ase.learn.explore import ExploreSettings
from ltau_ase.learn.selection import SELECTION_METHODS

FORMAT = "ltau-ase campaign"
VERSION = 1
#: settings that may change between runs of one campaign (not part of the fingerprint)
RUNTIME_FIELDS = ("n_iterations",)
RUNTIME_TRAINING_FIELDS = ("parallel", "timeout_s")


@dataclass(frozen=True)
class TrainingSettings:
    """nequip model and training settings (see :func:`ltau_ase.nequip.training.write_nequip_config`)."""

    epochs: int = 20
    num_layers: int = 2
    num_features: int = 8
    l_max: int = 1
    r_max: float = 4.0
    batch_size: int = 5
    lr: float = 0.01
    timeout_s: float = 1800.0  # per training run (not part of the campaign's fingerprint)
    parallel: int = 2  # models trained side by side (committee members; not part of the fingerprint)


@dataclass(frozen=True)
class CampaignSettings:
    """Everything that defines a campaign (forces eV/Å).

    Args:
        type_names: the model's chemical symbols; seeds with other elements are refused.
        selection: ``"ltau"``, ``"random"`` or ``"committee"``.
        n_iterations: label-and-retrain iterations after the initial model (may grow on resume).
        budget: labels per iteration (>= 1).
        explore: :class:`ExploreSettings`.
        threshold_quantile: the stop threshold is this quantile of the stop statistic over the
            calibration frames (recalibrated every iteration); for the committee it gives the
            lower trust level ``lo``, and ``hi = trust_ratio * lo``.
        pool_factor: LTAU candidate pool size, in multiples of the budget.
        committee_size: M models of the committee (``selection="committee"``).
        fill_budget: when fewer frames than the budget are flagged (LTAU) or in the trust window
            (committee), fill the batch with the most uncertain of the rest (so every method spends
            the same labels per iteration); False labels only flagged frames.
        warm_start: train each iteration from the previous checkpoint instead of from scratch.
        fit_scale: also fit the estimator's scale s on the calibration split.
        k: neighbours of the estimator.
        seed: seeds models, MD and random choices.
        max_reference_force: reference trust cap (eV/Å; None = none): a selected frame whose reference
            max-atom force exceeds it is stored in ``labels.db`` as ``rejected`` (reference values
            kept, counted as a label spent) and never enters the training set.
    """

    type_names: tuple[str, ...]
    selection: str = "ltau"
    n_iterations: int = 3
    budget: int = 8
    explore: ExploreSettings = field(default_factory=ExploreSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    threshold_quantile: float = 0.95
    pool_factor: float = 2.0
    committee_size: int = 4
    trust_ratio: float = 3.0
    fill_budget: bool = True
    warm_start: bool = False
    fit_scale: bool = True
    k: int = 10
    seed: int = 0
    max_reference_force: float | None = None

    def validate(self) -> "CampaignSettings":
        if self.selection not in SELECTION_METHODS:
            raise ValueError(f"selection must be one of {SELECTION_METHODS}, got {self.selection!r}")
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, np.integer)) or self.budget < 1:
            raise ValueError(f"budget must be a positive number of labels per iteration, got {self.budget!r}")
        if isinstance(self.n_iterations, bool) or not isinstance(self.n_iterations, (int, np.integer)) \
                or self.n_iterations < 0:
            raise ValueError(f"n_iterations must be a non-negative integer, got {self.n_iterations!r}")
        if not self.type_names:
            raise ValueError("type_names is empty; give the model's chemical symbols")
        if not 0.0 < self.threshold_quantile < 1.0:
            raise ValueError(f"threshold_quantile must lie in (0, 1), got {self.threshold_quantile}")
        if self.selection == "committee" and self.committee_size < 2:
            raise ValueError(f"a committee needs committee_size >= 2 models, got {self.committee_size}")
        if not self.trust_ratio > 1.0:
            raise ValueError(f"trust_ratio (hi/lo) must be > 1, got {self.trust_ratio}")
        if self.training.epochs < 2:
            raise ValueError(f"training needs at least 2 epochs for an error trajectory, got {self.training.epochs}")
        self.explore.validate()
        from ltau_ase.learn.label import check_max_reference_force

        check_max_reference_force(self.max_reference_force)
        return self

    @property
    def n_models(self) -> int:
        return self.committee_size if self.selection == "committee" else 1

    def to_dict(self) -> dict:
        return to_jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping) -> "CampaignSettings":
        d = dict(d)
        ex = dict(d.pop("explore"))
        for key in ("kinds", "temperatures"):
            ex[key] = tuple(ex[key])
        return cls(type_names=tuple(d.pop("type_names")), explore=ExploreSettings(**ex),
                   training=TrainingSettings(**d.pop("training")), **d)


def _sha256(path: Path) -> str:
    from ltau_ase.core.fileformat import sha256_file

    return sha256_file(path)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(obj), indent=2))
    os.replace(tmp, path)  # atomic: a stage's output exists completely or not at all


def _read_frames(path: str | os.PathLike) -> list[Atoms]:
    from ase.io import read

    return read(os.fspath(path), index=":")


def _write_frames(path: Path, frames: Sequence[Atoms]) -> None:
    from ase.io import write

    tmp = path.with_name(path.name + ".tmp.extxyz")
    write(tmp, list(frames), format="extxyz")
    os.replace(tmp, path)


def reduce_frames(per_atom: Sequence[np.ndarray], atom_reduce: str | float) -> np.ndarray:
    """(F,) stop statistic of each frame: ``atom_reduce`` of its per-atom values (as UncertaintyStop)."""
    from ltau_ase.simulate.observers import reduce_values

    return np.array([reduce_values(np.asarray(u, dtype=np.float64), atom_reduce) for u in per_atom])


def split_force_mae(errors: np.ndarray, above_cap: np.ndarray) -> dict[str, Any]:
    """Force MAE (eV/Å) over the atoms of frames within the reference cap, over those above it, and
    over all; ``n_atoms`` counts the atoms within the cap.

    Args:
        errors: (A,) per-atom force error norms |F_pred − F_ref| (eV/Å).
        above_cap: (A,) bool, the atom's frame has a reference max-atom force above the cap.
    """
    errors, above_cap = np.asarray(errors, dtype=np.float64), np.asarray(above_cap, dtype=bool)
    within = errors[~above_cap]
    return {"force_mae": float(within.mean()) if within.size else None, "n_atoms": int(within.size),
            "force_mae_above_cap": float(errors[above_cap].mean()) if above_cap.any() else None,
            "force_mae_all_frames": float(errors.mean()) if errors.size else None}


def _per_atom_errors(calc, frames: Sequence[Atoms]) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(per-atom |F_pred − F_ref| (eV/Å), frame index per atom, results per frame) of a calculator."""
    errors, index, results = [], [], []
    for i, frame in enumerate(frames):
        ref = frame.get_forces(apply_constraint=False)
        atoms = Atoms(frame.numbers, frame.positions, cell=frame.cell, pbc=frame.pbc, tags=frame.get_tags())
        atoms.calc = calc
        atoms.get_forces()
        res = dict(calc.results)
        errors.append(np.linalg.norm(res["forces"] - ref, axis=1))
        index.append(np.full(len(frame), i))
        results.append(res)
    return np.concatenate(errors), np.concatenate(index), results


class Campaign:
    """An active-learning campaign in ``workdir`` (see the module docstring).

    Args:
        workdir: the campaign's directory (created; reopened to resume).
        settings: :class:`CampaignSettings`.
        train: initial training frames (extxyz; every frame with a unique ``info["frame_id"]``).
        val: validation frames for nequip (extxyz, with frame ids).
        calibration: labelled frames the threshold (and scale) is calibrated on.
        seeds: seed structures of the exploration (extxyz or ase.db; names from ``info["name"]``).
        reference: picklable, hashable factory of the reference ASE calculator.
        test_sets: optional {name: labelled extxyz}, evaluated after every iteration (force MAE).
        scheduler: Dask scheduler address (default: an in-process LocalCluster on 127.0.0.1).
        n_workers: LocalCluster workers.
        initial_run: optional finished nequip run directory (with its ``ltau_errors`` log, trained on
            ``train`` with these type names) used as iteration 0's model instead of training one;
            it is copied into the campaign. A committee campaign may give a sequence of up to
            ``committee_size`` run directories (members 1, 2, ...; members not given are trained);
            only an LTAU or random campaign needs the error log.
    """

    def __init__(self, workdir: str | os.PathLike, settings: CampaignSettings, train: str | os.PathLike,
                 val: str | os.PathLike, calibration: str | os.PathLike, seeds: str | os.PathLike,
                 reference: Callable[[], Any], test_sets: Mapping[str, str | os.PathLike] | None = None,
                 scheduler: str | None = None, n_workers: int | None = None, progress: bool = True,
                 initial_run: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> None:
        self.workdir = Path(workdir)
        self.settings = settings.validate()
        if initial_run is None:
            self.initial_runs: list[Path] = []
        elif isinstance(initial_run, (str, os.PathLike)):
            self.initial_runs = [Path(initial_run)]
        else:
            self.initial_runs = [Path(r) for r in initial_run]
            if not 1 <= len(self.initial_runs) <= self.settings.n_models:
                raise ValueError(f"initial_run gives {len(self.initial_runs)} runs; this campaign has "
                                 f"{self.settings.n_models} model(s) (committee_size for a committee)")
        self.reference = reference
        self.scheduler = scheduler
        self.n_workers = n_workers
        self.progress = progress
        inputs = {"train": train, "val": val, "calibration": calibration, "seeds": seeds}
        for name, path in (test_sets or {}).items():
            if not name.isidentifier():
                raise ValueError(f"test set names must be identifiers, got {name!r}")
            inputs[f"test_{name}"] = path
        for name, path in inputs.items():
            if not Path(path).is_file():
                raise FileNotFoundError(f"{name} file {path} does not exist")
        self.test_names = list(test_sets or {})
        if self.initial_runs:
            from ltau_ase.nequip.fit import default_checkpoint, find_error_log

            if self.settings.selection != "committee":
                find_error_log(self.initial_runs[0])  # a clear error when the run has no LTAU error log
            for m, run in enumerate(self.initial_runs):  # member 1 keeps the key of campaigns with one run
                inputs["initial_model" if m == 0 else f"initial_model_{m + 1}"] = default_checkpoint(run)
        self._check_inputs(inputs)
        self._open(inputs)

    # ------------------------------------------------------------------ set-up
    def _check_inputs(self, inputs: Mapping[str, Any]) -> None:
        from ltau_ase.simulate.batch import read_structures

        known = set(self.settings.type_names)
        for name in ("train", "val", "calibration"):
            frames = _read_frames(inputs[name])
            if name != "calibration":
                frame_ids_of(frames)  # unique integer frame ids, or a clear error
            extra = sorted({s for a in frames for s in a.get_chemical_symbols()} - known)
            if extra:
                raise ValueError(f"the {name} frames contain {extra}, which are not among type_names "
                                 f"{list(self.settings.type_names)}; add them to type_names")
        self.seeds = read_structures(os.fspath(inputs["seeds"]))
        for seed_name, atoms in self.seeds:
            extra = sorted(set(atoms.get_chemical_symbols()) - known)
            if extra:
                raise ValueError(f"seed structure {seed_name!r} contains {extra}, which the model does not know "
                                 f"(type_names {list(self.settings.type_names)}); remove the seed or train a model "
                                 "with these elements")

    def _fingerprint(self, hashes: Mapping[str, str]) -> str:
        settings = {k: v for k, v in self.settings.to_dict().items() if k not in RUNTIME_FIELDS}
        settings["training"] = {k: v for k, v in settings["training"].items() if k not in RUNTIME_TRAINING_FIELDS}
        if settings.get("max_reference_force") is None:  # campaigns started before the cap existed still resume
            settings.pop("max_reference_force", None)
        text = json.dumps({"settings": settings, "inputs": dict(sorted(hashes.items())),
                           "reference": repr(self.reference)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def _open(self, inputs: Mapping[str, Any]) -> None:
        hashes = {name: _sha256(Path(p)) for name, p in inputs.items()}
        fingerprint = self._fingerprint(hashes)
        meta_path = self.workdir / "campaign.json"
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
            except ValueError:
                raise ValueError(f"{meta_path} is not a campaign file (invalid JSON)") from None
            if meta.get("format") != FORMAT:
                raise ValueError(f"{meta_path} is not an ltau-ase campaign file")
            if meta.get("fingerprint") != fingerprint:
                changed = sorted(k for k in set(meta.get("inputs", {})) | set(hashes)
                                 if meta.get("inputs", {}).get(k) != hashes.get(k))
                raise ValueError(
                    f"{self.workdir} belongs to another campaign (different fingerprint: settings or inputs differ"
                    + (f"; changed inputs {changed}" if changed else "; settings differ") +
                    "); use a new working directory or the same settings and inputs to resume")
        elif self.workdir.exists() and any(self.workdir.iterdir()) and not (self.workdir / "iter_000").is_dir():
            raise ValueError(f"{self.workdir} is not empty and holds no campaign; use an empty or new directory")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "inputs").mkdir(exist_ok=True)
        self.inputs = {}
        for name, path in inputs.items():
            dst = self.workdir / "inputs" / f"{name}{''.join(Path(path).suffixes) or '.extxyz'}"
            if not dst.exists() or _sha256(dst) != hashes[name]:
                shutil.copyfile(path, dst)
            self.inputs[name] = dst
        _write_json(meta_path, {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint,
                                "settings": self.settings.to_dict(), "inputs": hashes,
                                "reference": repr(self.reference)})

    def iter_dir(self, i: int) -> Path:
        return self.workdir / f"iter_{i:03d}"

    # ------------------------------------------------------------------ the loop
    def run(self, n_iterations: int | None = None) -> list[dict]:
        """Run (or resume) iterations 0..n_iterations; returns every iteration's metrics."""
        n = self.settings.n_iterations if n_iterations is None else int(n_iterations)
        history = []
        for i in range(n + 1):
            history.append(self.iteration(i))
            self.write_report(history)
        return history

    def iteration(self, i: int) -> dict:
        d = self.iter_dir(i)
        d.mkdir(exist_ok=True)
        if (d / "metrics.json").exists():
            return json.loads((d / "metrics.json").read_text())
        timings: dict[str, float] = {}
        metrics: dict[str, Any] = {"iteration": i, "selection": self.settings.selection}
        if i > 0:
            t0 = time.perf_counter()
            metrics["exploration"] = self.explore(i)
            timings["exploration"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            metrics["selection_stats"] = self.select(i)
            metrics["labelling"] = self.label(i)
            timings["selection_and_labelling"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.train(i)
        timings["training"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if self.settings.selection != "committee":
            self.fit_estimator(i)
        metrics["calibration"] = self.calibrate(i)
        metrics["evaluation"] = self.evaluate(i)
        timings["fit_calibrate_evaluate"] = time.perf_counter() - t0
        metrics["n_train_frames"] = sum(len(_read_frames(f)) for f in self.train_files(i))
        metrics["labels_used"] = sum(self._labels_used(j) for j in range(1, i + 1))
        if i > 0:
            metrics["selected_uq_vs_error"] = self.selected_uq_vs_error(i)
        metrics["timings_s"] = timings
        _write_json(d / "metrics.json", metrics)
        return metrics

    # ------------------------------------------------------------------ pieces
    def train_files(self, i: int) -> list[Path]:
        files = [self.inputs["train"]]
        files += [self.iter_dir(j) / "new_frames.extxyz" for j in range(1, i + 1)
                  if (self.iter_dir(j) / "new_frames.extxyz").exists()]
        return files

    def member_dir(self, i: int, m: int) -> Path:
        return self.iter_dir(i) / "models" / f"member{m + 1}"

    def model_path(self, i: int, m: int = 0) -> Path:
        from ltau_ase.nequip.fit import default_checkpoint

        return default_checkpoint(self.member_dir(i, m) / "run")

    def train(self, i: int) -> None:
        """Train the iteration's model(s) with the LTAU error logger (skips finished members)."""
        from concurrent.futures import ThreadPoolExecutor

        from ltau_ase.nequip.training import ERROR_LOGGER_TARGET, train_nequip, write_nequip_config
        from ltau_ase.nequip.warm_start import configure_warm_start

        s, t = self.settings, self.settings.training
        files = self.train_files(i)

        def prepare(m: int) -> Path | None:
            """The member's nequip config, or None when it needs no training (runs serially: building
            a model to verify a warm-start checkpoint uses nequip's global state)."""
            member = self.member_dir(i, m)
            if (member / "done.json").exists():
                return None
            if member.exists():
                shutil.rmtree(member)  # an interrupted run: its log dir would refuse to be reused
            if i == 0 and m < len(self.initial_runs):
                shutil.copytree(self.initial_runs[m], member / "run")
                _write_json(member / "done.json", {"seconds": 0.0, "copied_from": str(self.initial_runs[m].resolve())})
                return None
            run_dir = (member / "run").resolve()
            config = write_nequip_config(
                member / "config.yaml", files, type_names=list(s.type_names), val_file=self.inputs["val"],
                callbacks=[{"_target_": ERROR_LOGGER_TARGET, "log_dir": str(run_dir / "ltau_errors"), "mode": "free"}],
                seed=s.seed * 1000 + m + 1, data_seed=s.seed, max_epochs=t.epochs, num_layers=t.num_layers,
                num_features=t.num_features, l_max=t.l_max, r_max=t.r_max, batch_size=t.batch_size, lr=t.lr)
            if s.warm_start and i > 0:  # the previous model (section and weights): a self-contained checkpoint
                configure_warm_start(config, self.model_path(i - 1, m))
            return config

        def run(m: int, config: Path) -> None:
            member = self.member_dir(i, m)
            t0 = time.perf_counter()
            train_nequip(config, (member / "run").resolve(), timeout=t.timeout_s, threads=1)
            _write_json(member / "done.json", {"seconds": time.perf_counter() - t0, "train_files": files})

        configs = {m: prepare(m) for m in range(s.n_models)}
        pending = [(m, c) for m, c in configs.items() if c is not None]
        with ThreadPoolExecutor(max_workers=max(1, min(len(pending), t.parallel))) as pool:
            list(pool.map(lambda mc: run(*mc), pending))

    def fit_estimator(self, i: int) -> Path:
        from ltau_ase.nequip.fit import fit_estimator_from_runs

        path = self.iter_dir(i) / "estimator.ltau"
        if not path.exists():
            tmp = path.with_name("estimator.tmp.ltau")
            fit_estimator_from_runs([self.member_dir(i, 0) / "run"], self.train_files(i), tmp, k=self.settings.k,
                                    model=self.model_path(i), progress=False)
            os.replace(tmp, path)
        return path

    def _calculator(self, i: int):
        """The exploration/evaluation calculator of iteration i (LTAU with one model, or the committee)."""
        from ltau_ase.nequip.calculator import LatentNequIPCalculator
        from ltau_ase.simulate.calculator import LTAUCalculator
        from ltau_ase.simulate.committee import CommitteeCalculator

        if self.settings.selection == "committee":
            return CommitteeCalculator([LatentNequIPCalculator.from_model_file(
                self.model_path(i, m), chemical_species_to_atom_type_map=True) for m in range(self.settings.n_models)])
        return LTAUCalculator.from_model(self.model_path(i), self.iter_dir(i) / "estimator.ltau",
                                          unknown_species="flag", chemical_species_to_atom_type_map=True)

    def factory(self, i: int):
        from ltau_ase.nequip.backend import NequIPCommitteeFactory, NequIPLTAUFactory

        if self.settings.selection == "committee":
            return NequIPCommitteeFactory(tuple(str(self.model_path(i, m)) for m in range(self.settings.n_models)))
        return NequIPLTAUFactory(str(self.model_path(i)), str(self.iter_dir(i) / "estimator.ltau"),
                                 unknown_species="flag", chemical_species_to_atom_type_map=True)

    def calibrate(self, i: int) -> dict:
        """Recalibrate on the calibration split: scale s (LTAU), stop threshold / trust levels."""
        path = self.iter_dir(i) / "calibration.json"
        if path.exists():
            return json.loads(path.read_text())
        s = self.settings
        frames = _read_frames(self.inputs["calibration"])
        out: dict[str, Any] = {"quantile": s.threshold_quantile, "atom_reduce": s.explore.atom_reduce}
        if s.selection == "committee":
            calc = self._calculator(i)
            err, idx, results = _per_atom_errors(calc, frames)
            stats = reduce_frames([r["uncertainties"] for r in results], s.explore.atom_reduce)
            lo = float(np.quantile(stats, s.threshold_quantile))
            out.update(lo=lo, hi=lo * s.trust_ratio, threshold=lo * s.trust_ratio,
                       atom_quantile=float(np.quantile(np.concatenate([r["uncertainties"] for r in results]),
                                                       s.threshold_quantile)))
        else:
            from ltau_ase.core.estimator import LTAUEstimator

            est_path = self.iter_dir(i) / "estimator.ltau"
            calc = self._calculator(i)
            err, idx, results = _per_atom_errors(calc, frames)
            if s.fit_scale:
                est = LTAUEstimator.load(est_path)
                desc = np.concatenate([r["descriptors"] for r in results]).astype(np.float32)
                out["scale"] = est.fit_scale(desc, err)
                tmp = est_path.with_name("estimator.tmp.ltau")
                est.save(str(tmp))
                os.replace(tmp, est_path)
                calc = self._calculator(i)
                err, idx, results = _per_atom_errors(calc, frames)
            u = [r["uncertainties"] for r in results]
            stats = reduce_frames(u, s.explore.atom_reduce)
            out["threshold"] = float(np.quantile(stats, s.threshold_quantile))
            out["atom_quantile"] = float(np.quantile(np.concatenate(u), s.threshold_quantile))
        out["calibration_mae"] = float(err.mean())
        _write_json(path, out)
        return out

    def evaluate(self, i: int) -> dict:
        """Force MAE (eV/Å, over atoms) of model 1 (and the committee mean) on each test set.

        With a reference trust cap (``max_reference_force``), test frames whose reference max-atom
        force exceeds it are outside what the campaign trains on (it never trains on such frames):
        ``force_mae`` is over the frames within the cap and the frames above it are reported apart
        (``force_mae_above_cap``, ``n_frames_above_cap``; None / 0 when there are none).
        ``force_mae_all_frames`` is over every frame. Without a cap all three cover every frame.
        """
        from ltau_ase.nequip.calculator import LatentNequIPCalculator

        out: dict[str, Any] = {}
        cap = self.settings.max_reference_force
        single = LatentNequIPCalculator.from_model_file(self.model_path(i), chemical_species_to_atom_type_map=True)
        committee = self._calculator(i) if self.settings.selection == "committee" else None
        for name in self.test_names:
            frames = _read_frames(self.inputs[f"test_{name}"])
            above = np.array([cap is not None and len(f) > 0 and float(
                np.linalg.norm(f.get_forces(apply_constraint=False), axis=1).max()) > cap for f in frames], dtype=bool)
            err, index, _ = _per_atom_errors(single, frames)
            out[name] = split_force_mae(err, above[index])
            if committee is not None:
                err_c, _, _ = _per_atom_errors(committee, frames)
                out[name]["committee_force_mae"] = split_force_mae(err_c, above[index])["force_mae"]
            out[name].update(n_frames=len(frames), n_frames_above_cap=int(above.sum()))
        return out

    def explore(self, i: int) -> dict:
        """Explore from every seed with iteration i-1's model; summary of the trajectories."""
        from ltau_ase.learn.explore import explore, load_snapshots

        s = self.settings
        cal = json.loads((self.iter_dir(i - 1) / "calibration.json").read_text())
        db = self.iter_dir(i) / "explore.db"
        # a seed labelled in an earlier iteration does not stop its trajectory at step 0: it explores on
        explore(self.seeds, db, self.factory(i - 1), s.explore, cal["threshold"], rng_root=(s.seed, i),
                scheduler=self.scheduler, n_workers=self.n_workers, progress=self.progress,
                labelled=self._labelled_keys(i))
        snaps, tasks = load_snapshots(db)
        done = [t for t in tasks if t["status"] == "done"]
        stop_steps = [t["stop_step"] for t in done if t["triggered"]]
        return {"threshold": cal["threshold"], "n_tasks": len(tasks), "n_failed": len(tasks) - len(done),
                "n_triggered": len(stop_steps), "stop_steps": stop_steps,
                "mean_stop_step": float(np.mean(stop_steps)) if stop_steps else None,
                "model_steps": int(sum(t["n_steps"] + 1 for t in done) * s.n_models),
                "steps": int(sum(t["n_steps"] + 1 for t in done)),
                "wall_time_s": float(sum(t["wall_time"] for t in tasks if np.isfinite(t["wall_time"]))),
                "n_snapshots": len(snaps), "n_flagged": int(sum(x["flagged"] for x in snaps)),
                "failures": [t["reason"] for t in tasks if t["status"] != "done"][:10]}

    def select(self, i: int) -> dict:
        from ltau_ase.learn.explore import load_snapshots
        from ltau_ase.learn.selection import select_committee, select_ltau, select_random, structure_feature

        path = self.iter_dir(i) / "selected.json"
        if path.exists():
            return json.loads(path.read_text())["stats"]
        s = self.settings
        cal = json.loads((self.iter_dir(i - 1) / "calibration.json").read_text())
        all_snaps, _ = load_snapshots(self.iter_dir(i) / "explore.db")
        snaps, n_duplicates = self._distinct_candidates(i, all_snaps)
        rng = np.random.default_rng([s.seed, i, 77])
        stat = np.array([x["statistic"] for x in snaps])
        if not snaps:
            picked = np.zeros(0, dtype=np.int64)
        elif s.selection == "ltau":
            flagged = np.array([x["flagged"] for x in snaps])
            feats = np.stack([structure_feature(x["descriptors"], x["uncertainties"], cal["atom_quantile"])
                              for x in snaps])
            picked = select_ltau(stat, flagged, feats, s.budget, s.pool_factor, fill=s.fill_budget)
        elif s.selection == "random":
            picked = select_random(len(snaps), s.budget, rng)
        else:
            picked = select_committee(stat, s.budget, cal["lo"], cal["hi"], rng, fill=s.fill_budget)
        flagged_all = np.array([x["flagged"] for x in snaps], dtype=bool)
        in_window = (stat > cal["lo"]) & (stat <= cal["hi"]) if s.selection == "committee" else flagged_all
        stats = {"n_candidates": len(snaps), "n_duplicates_removed": n_duplicates, "n_selected": int(picked.size),
                 "n_selected_flagged": int(in_window[picked].sum()) if snaps else 0,
                 "selected_statistic": stat[picked].tolist()}
        _write_json(path, {"names": [snaps[j]["name"] for j in picked], "stats": stats})
        return stats

    def _distinct_candidates(self, i: int, snaps: list[dict]) -> tuple[list[dict], int]:
        """The snapshots of iteration i that are new structures, and how many were not.

        Every MD trajectory records its start (the seed structure) at step 0, so the same structure
        comes once per temperature and replica and again in every iteration; labelling it twice
        would spend a reference calculation on nothing. A snapshot identical (numbers, positions,
        cell, pbc: :func:`~ltau_ase.simulate.batch.content_name`) to an earlier snapshot or to a
        frame in an earlier iteration's ``labels.db`` is not a candidate.
        """
        from ltau_ase.simulate.batch import content_name

        seen = self._labelled_keys(i)
        out = []
        for x in snaps:
            key = content_name(x["atoms"])
            if key not in seen:
                seen.add(key)
                out.append(x)
        return out, len(snaps) - len(out)

    def _labelled_keys(self, i: int) -> set[str]:
        """Content keys (:func:`~ltau_ase.simulate.batch.content_name`) of every structure labelled
        (done, failed or rejected) in iterations 1..i-1."""
        from ase.db import connect

        from ltau_ase.simulate.batch import content_name

        seen = set()
        for j in range(1, i):
            db = self.iter_dir(j) / "labels.db"
            if db.exists():
                seen.update(content_name(row.toatoms()) for row in connect(str(db)).select())
        return seen

    def label(self, i: int) -> dict:
        """Label the selected frames into labels.db; write the labelled ones, with new frame ids, to
        new_frames.extxyz (the frames that enter the training set)."""
        from ltau_ase.learn.explore import load_snapshots
        from ltau_ase.learn.label import label_frames, load_labels

        d = self.iter_dir(i)
        names = json.loads((d / "selected.json").read_text())["names"]
        by_name = {x["name"]: x["atoms"] for x in load_snapshots(d / "explore.db")[0]}
        label_frames([(n, by_name[n]) for n in names], d / "labels.db", self.reference,
                     scheduler=self.scheduler, n_workers=self.n_workers, progress=self.progress,
                     max_reference_force=self.settings.max_reference_force)
        done, failed, rejected = load_labels(d / "labels.db")
        if not (d / "new_frames.extxyz").exists() and any(n in done for n in names):
            frames = []
            for n in names:
                if n in done:
                    frame = done[n]
                    frame.info.update(explore_name=n, campaign_iteration=i)
                    frames.append(frame)
            taken = np.concatenate([frame_ids_of(_read_frames(f)) for f in self.train_files(i - 1)]
                                   + [frame_ids_of(_read_frames(self.inputs["val"]))])
            assign_new_frame_ids(frames, taken)
            _write_frames(d / "new_frames.extxyz", frames)
        return {"n_labelled": sum(n in done for n in names), "n_failed": sum(n in failed for n in names),
                "n_rejected": sum(n in rejected for n in names),
                "failures": {n: failed[n] for n in names if n in failed},
                "rejections": {n: rejected[n].info["reason"] for n in names if n in rejected}}

    def _labels_used(self, j: int) -> int:
        """Reference calculations spent in iteration j (failed and rejected ones cost a calculation too)."""
        done, failed, rejected = _load_labels(self.iter_dir(j) / "labels.db")
        return len(done) + len(failed) + len(rejected)

    def selected_uq_vs_error(self, i: int) -> dict:
        """Stop statistic at selection vs the true force error of the model that explored, per labelled frame."""
        from ltau_ase.learn.explore import load_snapshots

        d = self.iter_dir(i)
        labels = _load_labels(d / "labels.db")
        snaps = {x["name"]: x for x in load_snapshots(d / "explore.db")[0]}
        rows = []
        for name, frame in {**labels.done, **labels.rejected}.items():
            x = snaps[name]
            err = np.linalg.norm(x["atoms"].get_forces(apply_constraint=False)
                                 - frame.get_forces(apply_constraint=False), axis=1)
            rows.append({"name": name, "statistic": x["statistic"], "max_error": float(err.max()),
                         "mean_error": float(err.mean()), "rejected": name in labels.rejected,
                         "reference_max_force": float(np.linalg.norm(frame.get_forces(apply_constraint=False),
                                                                     axis=1).max())})
        out: dict[str, Any] = {"frames": rows}
        if len(rows) >= 3:
            from scipy.stats import spearmanr

            out["spearman_statistic_vs_max_error"] = float(spearmanr([r["statistic"] for r in rows],
                                                                     [r["max_error"] for r in rows])[0])
        return out

    # ------------------------------------------------------------------ report
    def write_report(self, history: Sequence[dict]) -> Path:
        from ltau_ase.learn.report import write_campaign_report

        return write_campaign_report(self.workdir, self.settings, history)


def _load_labels(path: Path):
    from ltau_ase.learn.label import load_labels

    return load_labels(path)
