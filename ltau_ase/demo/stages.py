"""The demo's stages: data, training, estimator, evaluation, calibration, relaxations, MD, costs.

Each stage takes the configuration and the earlier stages' results (the small dataclasses below) and
returns its own.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ltau_ase.demo.config import DOMAINS, DemoConfig, cpu_count


# ---------------------------------------------------------------------------- what the stages pass on
@dataclass
class DataStage:
    """Stage 1: the generated dataset."""

    dir: Path  # data/ holding <split>.extxyz and manifest.json
    manifest: dict  # write_catalysis_dataset's manifest
    splits: dict  # split -> frames (S2EF) or (initial, relaxed) lists (IS2RS)
    type_names: list  # chemical symbols by atomic number (nequip type names)
    settings: Any  # the CatalysisSettings the data was generated with


@dataclass
class TrainStage:
    """Stage 2: the trained ensemble."""

    run_dirs: list  # nequip run directory of each member
    log_dirs: list  # error-log directory of each member
    models: list  # last.ckpt of each member (member 1 is the LTAU model)
    train_times: list  # seconds per member


@dataclass
class FitStage:
    """Stage 3: estimators for every k of the grid."""

    atom_ids: Any  # (N,) int64 training atom ids, the logs' order
    descriptors: Any  # (N, D) float32 member-1 descriptors
    logs: list  # the M ErrorLogs
    estimators: dict  # k -> fitted LTAUEstimator


@dataclass
class CalibrationStage:
    """Stage 4b: the chosen k, the fitted s, and predictions before/after on the test splits."""

    k: int
    miscalibration_by_k: dict  # k -> miscalibration area on the calibration split (s = 1)
    scale: Any  # LTAUEstimator.fit_scale's result
    estimator: Any  # the chosen, scaled LTAUEstimator (saved as estimator.ltau)
    path: Path
    pred_k1: dict  # split -> predict() of the k = 1 estimator
    pred_before: dict  # split -> predict() of the chosen k at s = 1
    pred_after: dict  # split -> predict() after fitting s
    committee_scale: Any = None  # fit_committee_scale's result, set by the per-atom comparison


def _load_model(path):
    """Member model as a LatentNequIPCalculator (the demo's type names are chemical symbols)."""
    from ltau_ase.nequip.calculator import LatentNequIPCalculator

    return LatentNequIPCalculator.from_model_file(path, chemical_species_to_atom_type_map=True)


def _frame_group(frame, settings) -> str:
    """Calibration-curve group of a frame: adsorbate family in domain, held-out metal/adsorbate out."""
    info = frame.info
    if info["domain"] == "in_domain":
        return f"ID {info['adsorbate_family']}-family"
    if info["metal"] in settings.metals_out_of_domain:
        return f"OOD metal {info['metal']}"
    return f"OOD adsorbate {info['adsorbate']}"


# ---------------------------------------------------------------------------- stage 1
def stage_data(cfg: DemoConfig, out: Path) -> DataStage:
    from ltau_ase.datasets import CatalysisSettings, read_split, write_catalysis_dataset

    data_dir = out / "data"
    manifest = write_catalysis_dataset(data_dir, seed=cfg.seed, size="quick" if cfg.quick else "full", progress=True)
    splits = {name: read_split(data_dir, name) for name in list(manifest["s2ef"]) + list(manifest["is2rs"])}
    from ase.data import atomic_numbers

    symbols = sorted({s for name in manifest["s2ef"] for f in splits[name] for s in f.get_chemical_symbols()}
                     | {s for name in manifest["is2rs"] for f in splits[name][0] for s in f.get_chemical_symbols()},
                     key=lambda s: atomic_numbers[s])
    # the demo generates with the default settings
    return DataStage(dir=data_dir, manifest=manifest, splits=splits, type_names=symbols,
                     settings=CatalysisSettings())


# ---------------------------------------------------------------------------- stage 2
def stage_train(cfg: DemoConfig, out: Path, data: DataStage) -> TrainStage:
    """Train the M members with the error logger, as many at a time as there are cores.

    Each nequip-train process gets one thread: on small models intra-op threads mostly add
    synchronisation (an epoch of the tiny model took 7-40 s with 2 threads vs 0.2-0.9 s with 1 on
    the 2-core machine), so running members side by side uses the cores better.
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm.auto import tqdm

    from ltau_ase.nequip.training import ERROR_LOGGER_TARGET, train_nequip, write_nequip_config

    def train_member(m: int) -> tuple[Path, Path, float]:
        member_dir = (out / "models" / f"member{m + 1}").resolve()
        log_dir = member_dir / "ltau_errors"
        config = write_nequip_config(
            member_dir / "config.yaml", [data.dir / "train.extxyz"], type_names=data.type_names,
            val_file=data.dir / "val.extxyz",
            callbacks=[{"_target_": ERROR_LOGGER_TARGET, "log_dir": str(log_dir), "mode": "free"}],
            seed=cfg.seed * 1000 + m + 1, data_seed=cfg.seed, max_epochs=cfg.epochs, num_layers=cfg.num_layers,
            num_features=cfg.num_features, l_max=cfg.l_max, r_max=cfg.r_max, batch_size=cfg.batch_size, lr=cfg.lr,
        )
        t0 = time.perf_counter()
        run_dir = train_nequip(config, member_dir / "run", timeout=cfg.train_timeout, threads=1)
        return run_dir, log_dir, time.perf_counter() - t0

    results: dict[int, tuple[Path, Path, float]] = {}
    workers = cpu_count() if cfg.train_workers is None else cfg.train_workers
    with ThreadPoolExecutor(max_workers=max(1, min(cfg.members, workers))) as pool:
        futures = {pool.submit(train_member, m): m for m in range(cfg.members)}
        for future in tqdm(as_completed(futures), total=cfg.members, desc="training ensemble", unit="model"):
            results[futures[future]] = future.result()
    runs = [results[m][0] for m in range(cfg.members)]
    logs = [results[m][1] for m in range(cfg.members)]
    times = [results[m][2] for m in range(cfg.members)]
    return TrainStage(run_dirs=runs, log_dirs=logs, models=[r / "last.ckpt" for r in runs], train_times=times)


# ---------------------------------------------------------------------------- stage 3 + 4
def stage_fit(cfg: DemoConfig, out: Path, data: DataStage, train: TrainStage) -> FitStage:
    """Fit the estimator for every k of the grid on member 1's descriptors and the M error logs."""
    from ltau_ase.core.errorlog import load_error_logs
    from ltau_ase.core.estimator import LTAUEstimator
    from ltau_ase.core.fileformat import sha256_file
    from ltau_ase.nequip.descriptors import extract_descriptors

    frames = data.splits["train"]
    atom_ids, desc = extract_descriptors(train.models[0], frames, progress=True)
    logs = load_error_logs(train.log_dirs)
    # Error logs order atoms by sorted id; the training file is written in increasing frame id.
    if not np.array_equal(atom_ids, logs[0].atom_ids):
        raise RuntimeError("training descriptors and error logs are not in the same atom order")
    metadata = {"model_sha256": sha256_file(train.models[0]), "model_path": str(train.models[0]),
                "n_members": cfg.members}
    estimators = {k: LTAUEstimator(k=k, metadata=metadata).fit(desc, logs, atom_ids=atom_ids)
                  for k in cfg.k_grid}
    return FitStage(atom_ids=atom_ids, descriptors=desc, logs=logs, estimators=estimators)


def evaluate_frames(frames, committee, single) -> dict[str, np.ndarray]:
    """Run the committee on S2EF frames; per-atom arrays for LTAU (member 1) and the committee.

    Returns (n_atoms_total,) arrays ``err_single``, ``err_committee`` (eV/Å), ``u_committee``
    (eV/Å), ``frame`` (index), ``free`` (tags > 0), and ``descriptors`` (n, D) of member 1.
    """
    from tqdm.auto import tqdm

    out: dict[str, list] = {k: [] for k in ("err_single", "err_committee", "u_committee", "frame", "free",
                                            "descriptors")}
    for i, frame in enumerate(tqdm(frames, desc="evaluating", unit="frame", leave=False)):
        ref = np.asarray(frame.calc.results["forces"])
        atoms = frame.copy()
        atoms.calc = committee
        committee.get_property("forces", atoms)
        res = committee.results
        out["err_single"].append(np.linalg.norm(res["forces_comm"][0] - ref, axis=1))
        out["err_committee"].append(np.linalg.norm(res["forces"] - ref, axis=1))
        out["u_committee"].append(res["uncertainties"])
        out["descriptors"].append(single.results["descriptors"])
        out["frame"].append(np.full(len(atoms), i))
        out["free"].append(atoms.get_tags() > 0)
    return {k: np.concatenate(v) for k, v in out.items()}


def stage_evaluate(cfg: DemoConfig, data: DataStage, train: TrainStage) -> dict[str, Any]:
    from ltau_ase.simulate.committee import CommitteeCalculator

    members = [_load_model(p) for p in train.models]
    committee = CommitteeCalculator(members)
    evals = {}
    for split in ("calibration", "test_id", "test_ood"):
        frames = data.splits[split]
        ev = evaluate_frames(frames, committee, members[0])
        ev["group"] = np.array([_frame_group(frames[f], data.settings) for f in ev["frame"]], dtype=object)
        evals[split] = ev
    return evals


def stage_calibrate(cfg: DemoConfig, out: Path, fit: FitStage, evals: dict) -> CalibrationStage:
    """Choose k (lowest miscalibration on the calibration split at s = 1), then fit s there."""
    from ltau_ase.core.calibration import miscalibration_area

    cal = evals["calibration"]
    by_k = {}
    for k, est in fit.estimators.items():
        pred = est.predict(cal["descriptors"])
        by_k[k] = miscalibration_area(pred["confidence"], cal["err_single"], est.atol_)
    k_best = min(by_k, key=lambda k: (by_k[k], k))
    est = fit.estimators[k_best]
    before = {split: est.predict(evals[split]["descriptors"]) for split in DOMAINS.values()}
    scale = est.fit_scale(cal["descriptors"], cal["err_single"])
    after = {split: est.predict(evals[split]["descriptors"]) for split in DOMAINS.values()}
    k1 = {split: fit.estimators[min(fit.estimators)].predict(evals[split]["descriptors"])
          for split in DOMAINS.values()}
    path = out / "estimator.ltau"
    est.save(str(path))
    return CalibrationStage(k=k_best, miscalibration_by_k=by_k, scale=scale, estimator=est, path=path,
                            pred_k1=k1, pred_before=before, pred_after=after)


# ---------------------------------------------------------------------------- stage 5
def stage_is2rs(cfg: DemoConfig, out: Path, data: DataStage, train: TrainStage, cal: CalibrationStage) -> dict[str, Any]:
    from ltau_ase.nequip.backend import NequIPCommitteeFactory, NequIPLTAUFactory
    from ltau_ase.simulate.batch import load_results, relax_batch

    initial, refs = [], []
    for split, domain in (("is2rs_id", "in_domain"), ("is2rs_ood", "out_of_domain")):
        for a, r in zip(*data.splits[split]):
            a, r = a.copy(), r.copy()
            for s in (a, r):
                s.info["name"] = s.info["system"]
                s.info["group"] = domain
            initial.append(a)
            refs.append(r)
    factories = {
        "ltau": NequIPLTAUFactory(model_path=str(train.models[0]), estimator_path=str(cal.path),
                                  chemical_species_to_atom_type_map=True),
        "committee": NequIPCommitteeFactory(model_paths=tuple(str(p) for p in train.models)),
    }
    (out / "is2rs").mkdir(exist_ok=True)
    results = {}
    for method, factory in factories.items():
        db = out / "is2rs" / f"{method}.db"
        counts = relax_batch(initial, db, factory, optimizer="oc20", fmax=cfg.relax_fmax, steps=cfg.relax_steps,
                             references=refs, progress=True)
        results[method] = {"db": db, "counts": counts, "records": load_results(db)}
    return results


# ---------------------------------------------------------------------------- stage 6
def md_system(seed: int, settings):
    """A 3x3x3 Pt(111) slab with NO (held-out adsorbate; every element seen in training)."""
    from ltau_ase.datasets import SystemSpec, slab_with_adsorbate

    spec = SystemSpec("Pt", "111", "NO", "fcc", (3, 3, 3), "out_of_domain")
    if "NO" not in settings.adsorbates_out_of_domain:
        spec = SystemSpec(settings.metals_out_of_domain[0], "111", settings.adsorbates_in_domain[0], "fcc",
                          (3, 3, 3), "out_of_domain")
    return slab_with_adsorbate(spec, np.random.default_rng([seed, 99]), settings)


def stage_md(cfg: DemoConfig, out: Path, data: DataStage, train: TrainStage, cal: CalibrationStage, evals: dict) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from ltau_ase.datasets import label_with_emt
    from ltau_ase.simulate.calculator import LTAUCalculator
    from ltau_ase.simulate.md import thermalized_langevin
    from ltau_ase.simulate.observers import UncertaintyStop

    # Threshold: a high quantile, over the in-domain calibration frames (relaxation, rattled and
    # 300-900 K MD frames), of the structure's mean per-atom uncertainty: the statistic the stop watches.
    ev = evals["calibration"]
    u_cal = cal.estimator.predict(ev["descriptors"])["uncertainty"]
    per_frame = np.bincount(ev["frame"], weights=u_cal) / np.bincount(ev["frame"])
    threshold = float(np.quantile(per_frame, cfg.md_quantile))
    atoms = md_system(cfg.seed, data.settings)
    atoms.calc = LTAUCalculator.from_model(train.models[0], cal.path, chemical_species_to_atom_type_map=True)
    dyn = thermalized_langevin(atoms, cfg.md_temperature, np.random.default_rng([cfg.seed, 7]))
    (out / "md").mkdir(exist_ok=True)
    save_to = out / "md" / "uncertain_frames.extxyz"
    save_to.unlink(missing_ok=True)
    stop = UncertaintyStop(dyn, threshold=threshold, atom_reduce="mean", patience=3, save_to=save_to)
    dyn.attach(stop)
    bar = tqdm(total=cfg.md_steps, desc="MD with UncertaintyStop", unit="step")
    dyn.attach(lambda: bar.update(1))
    dyn.run(cfg.md_steps)
    bar.close()
    result = {"threshold": threshold, "quantile": cfg.md_quantile, "temperature_K": cfg.md_temperature,
              "max_steps": cfg.md_steps, "triggered": bool(stop.triggered),
              # when the stop never fires, the run ended at max_steps
              "stopped_at_step": int(stop.step) if stop.triggered else int(cfg.md_steps),
              "mean_uncertainty_trace": [float(v) for v in stop.values], "reason": stop.reason,
              "system": f"{atoms.get_chemical_formula()} (3x3x3 fcc(111) + adsorbate)"}
    # true EMT force error of the final (or triggering) frame, against the in-domain test MAE
    ref = label_with_emt(atoms)
    err = np.linalg.norm(atoms.calc.results["forces"] - ref.calc.results["forces"], axis=1)
    result["true_max_force_error_at_end"] = float(err.max())
    result["true_mean_force_error_at_end"] = float(err.mean())
    return result


# ---------------------------------------------------------------------------- stage 7
def stage_costs(cfg: DemoConfig, data: DataStage, train: TrainStage, cal: CalibrationStage) -> dict[str, Any]:
    """Time one MD step's force call of: the single model, LTAU (same model + estimator), the committee.

    The three are evaluated on the same consecutive frames of a Langevin run of the MD system (the MD
    stage's temperature and 1 fs step, driven by a fourth copy of the single model), interleaved in one
    loop with the order rotated between frames; medians over ``timing_repeats`` frames. Graph
    construction (neighbour list + transforms, ``atoms_to_data``) and UQ (``estimator.predict``) are
    timed on the same frames.
    """
    from ltau_ase.simulate.calculator import LTAUCalculator
    from ltau_ase.simulate.committee import CommitteeCalculator
    from ltau_ase.simulate.md import langevin_frames

    single = _load_model(train.models[0])
    ltau = LTAUCalculator(_load_model(train.models[0]), cal.estimator)
    committee = CommitteeCalculator([_load_model(p) for p in train.models])
    graph_calc = _load_model(train.models[0])
    frames = langevin_frames(md_system(cfg.seed, data.settings), _load_model(train.models[0]),
                             cfg.timing_repeats + 1, cfg.md_temperature, seed=[cfg.seed, 11])
    t = {"single": [], "ltau": [], "committee": [], "graph": [], "uq": []}
    calcs = [("single", single), ("ltau", ltau), ("committee", committee)]
    for r, frame in enumerate(frames):
        for name, calc in calcs[r % 3:] + calcs[:r % 3]:  # rotate the order between frames
            step_atoms = frame.copy()
            t0 = time.perf_counter()
            calc.get_property("forces", step_atoms)
            t[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        graph_calc.atoms_to_data(frame)
        t["graph"].append(time.perf_counter() - t0)
        desc = single.results["descriptors"]
        t0 = time.perf_counter()
        cal.estimator.predict(desc)
        t["uq"].append(time.perf_counter() - t0)
    arr = {k: np.array(v[1:]) for k, v in t.items()}  # the first frame warms caches up
    med = {k: float(np.median(v)) for k, v in arr.items()}
    # ratios of the same frame (seconds apart), then the median: robust to load drift
    ratio = {name: float(np.median(arr[name] / arr["single"])) for name in ("ltau", "committee")}
    forward = max(med["single"] - med["graph"], 0.0)
    step = med["ltau"]
    return {
        "n_atoms": len(frames[0]), "repeats": cfg.timing_repeats, "median_s": med,
        "ltau_over_single": ratio["ltau"],
        "committee_over_single": ratio["committee"],
        "committee_over_ltau": float(np.median(arr["committee"] / arr["ltau"])),
        "uq_fraction_of_step": float(np.median(arr["uq"] / arr["ltau"])),
        "shares": {"graph_construction": med["graph"] / step, "forward_and_forces": forward / step,
                   "uq": med["uq"] / step,
                   "other": max(step - med["graph"] - forward - med["uq"], 0.0) / step},
    }
