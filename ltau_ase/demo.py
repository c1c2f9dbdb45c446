"""`make demo`: the end-to-end LTAU job on an OC20-like catalysis benchmark with an EMT reference.

    python -m ltau_ase.demo --output demo_output [--quick] [--seed 0] [--members M] [--epochs E]

Stages (each with a progress bar):

1. generate the data (:mod:`ltau_ase.datasets`): S2EF frames (train / val / calibration / in-domain
   test / out-of-domain test) and IS2RS pairs with EMT-relaxed references;
2. train an ensemble of M small NequIP models (seeds 1..M, same data) with the
   :class:`~ltau_ase.nequip.callback.LTAUErrorLogger` callback;
3. fit the LTAU estimator (member 1's latent descriptors, the M runs' error trajectories);
4. choose k on the calibration split (lowest miscalibration) and fit the scale s there;
5. relax the in-domain and out-of-domain IS2RS sets in batch (Dask, in process) with the relaxation
   observer, with LTAU and with the committee, and analyse them as OC20 IS2RS (ADwT, UQ vs RMSD);
6. run Langevin MD with :class:`~ltau_ase.simulate.observers.UncertaintyStop` on a hot
   out-of-domain system;
7. compare LTAU (one model + estimator) with the deep ensemble of the same M models
   (:class:`~ltau_ase.simulate.committee.CommitteeCalculator`): ranking, AUROC, calibration, IS2RS
   and the cost of one MD step, timed side by side in this process;
8. the paper's analyses: calibration curves (Figs. 1-2), RMSD binned by UQ (Fig. 4), step-time
   shares (Table A2), convergence with M (Fig. C3), latent map (Fig. D5).

Output in ``--output``: ``report.md`` (read it top to bottom), the PNGs it shows, ``metrics.json``,
and the intermediate files (``data/``, ``models/``, ``estimator.ltau``, ``is2rs/*.db``, ``md/``).

Per-atom force errors are |F_pred − F_EMT|₂ (eV/Å) over all atoms of a frame (EMT forces without
constraints, as in training). The LTAU model is member 1; the committee predicts with the mean of
all M members. Each method's uncertainty is scored against its own prediction's error.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ltau_ase.core.jsonable import to_jsonable

REQUIRED_METRICS = (
    "calibration.in_domain.miscalibration_area.before",
    "calibration.in_domain.miscalibration_area.after",
    "calibration.out_of_domain.miscalibration_area.before",
    "calibration.out_of_domain.miscalibration_area.after",
    "spearman.in_domain",
    "spearman.out_of_domain",
    *(f"is2rs.{d}.{k}" for d in ("in_domain", "out_of_domain")
      for k in ("adwt", "spearman_initial", "spearman_max", "spearman_mean", "spearman_final",
                "auroc_initial", "auroc_max")),
    "overhead.uq_fraction_of_step",
    "ensemble.n_members",
    "ensemble.in_domain.ltau.spearman",
    "ensemble.in_domain.committee.spearman",
    "ensemble.out_of_domain.ltau.spearman",
    "ensemble.out_of_domain.committee.spearman",
    "ensemble.in_domain.ltau.auroc",
    "ensemble.in_domain.committee.auroc",
    "ensemble.out_of_domain.ltau.auroc",
    "ensemble.out_of_domain.committee.auroc",
    "ensemble.in_domain.ltau.miscalibration_area",
    "ensemble.in_domain.committee.miscalibration_area",
    "ensemble.out_of_domain.ltau.miscalibration_area",
    "ensemble.out_of_domain.committee.miscalibration_area",
    "ensemble.cost.ltau_over_single",
    "ensemble.cost.committee_over_single",
    "md.stopped_at_step",
)
DOMAINS = {"in_domain": "test_id", "out_of_domain": "test_ood"}


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one demo run (see :meth:`preset`)."""

    quick: bool = False
    seed: int = 0
    members: int = 4
    epochs: int = 30
    num_layers: int = 2
    num_features: int = 16
    l_max: int = 1
    r_max: float = 4.5
    batch_size: int = 16
    lr: float = 0.01
    k_grid: tuple[int, ...] = (1, 2, 5, 10, 20, 50)
    relax_steps: int = 100
    relax_fmax: float = 0.05
    md_steps: int = 1000
    md_temperature: float = 1500.0
    md_quantile: float = 0.99
    timing_repeats: int = 30
    train_timeout: float = 900.0

    @classmethod
    def preset(cls, quick: bool, seed: int = 0, members: int | None = None, epochs: int | None = None) -> "DemoConfig":
        cfg = cls(quick=True, seed=seed, members=3, epochs=8, relax_steps=60, md_steps=300,
                  timing_repeats=15, k_grid=(1, 2, 5, 10, 20)) if quick else cls(seed=seed)
        if members is not None:
            cfg = replace(cfg, members=members)
        if epochs is not None:
            cfg = replace(cfg, epochs=epochs)
        if cfg.members < 2:
            raise ValueError(f"the ensemble needs at least 2 members (3 or more recommended), got {cfg.members}")
        if cfg.epochs < 2:
            raise ValueError(f"at least 2 epochs are needed for an error trajectory, got {cfg.epochs}")
        return cfg


# ---------------------------------------------------------------------------- helpers
class _Timer:
    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.stages[name] = time.perf_counter() - t0
        return out


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def missing_or_nonfinite(metrics: dict, keys: Sequence[str] = REQUIRED_METRICS) -> list[str]:
    """Required metric keys that are absent or not finite numbers."""
    bad = []
    for key in keys:
        try:
            value = _get(metrics, key)
        except (KeyError, TypeError):
            bad.append(f"{key} (missing)")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            bad.append(f"{key} = {value!r}")
    return bad


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
def stage_data(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    from ltau_ase.datasets import CatalysisSettings, read_split, write_catalysis_dataset

    data_dir = out / "data"
    manifest = write_catalysis_dataset(data_dir, seed=cfg.seed, size="quick" if cfg.quick else "full", progress=True)
    splits = {name: read_split(data_dir, name) for name in list(manifest["s2ef"]) + list(manifest["is2rs"])}
    from ase.data import atomic_numbers

    symbols = sorted({s for name in manifest["s2ef"] for f in splits[name] for s in f.get_chemical_symbols()}
                     | {s for name in manifest["is2rs"] for f in splits[name][0] for s in f.get_chemical_symbols()},
                     key=lambda s: atomic_numbers[s])
    # the demo generates with the default settings
    return {"dir": data_dir, "manifest": manifest, "splits": splits, "type_names": symbols,
            "settings": CatalysisSettings()}


# ---------------------------------------------------------------------------- stage 2
def stage_train(cfg: DemoConfig, out: Path, data: dict) -> dict[str, Any]:
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
            member_dir / "config.yaml", [data["dir"] / "train.extxyz"], type_names=data["type_names"],
            val_file=data["dir"] / "val.extxyz",
            callbacks=[{"_target_": ERROR_LOGGER_TARGET, "log_dir": str(log_dir), "mode": "free"}],
            seed=cfg.seed * 1000 + m + 1, data_seed=cfg.seed, max_epochs=cfg.epochs, num_layers=cfg.num_layers,
            num_features=cfg.num_features, l_max=cfg.l_max, r_max=cfg.r_max, batch_size=cfg.batch_size, lr=cfg.lr,
        )
        t0 = time.perf_counter()
        run_dir = train_nequip(config, member_dir / "run", timeout=cfg.train_timeout, threads=1)
        return run_dir, log_dir, time.perf_counter() - t0

    results: dict[int, tuple[Path, Path, float]] = {}
    with ThreadPoolExecutor(max_workers=max(1, min(cfg.members, _cpu_count()))) as pool:
        futures = {pool.submit(train_member, m): m for m in range(cfg.members)}
        for future in tqdm(as_completed(futures), total=cfg.members, desc="training ensemble", unit="model"):
            results[futures[future]] = future.result()
    runs = [results[m][0] for m in range(cfg.members)]
    logs = [results[m][1] for m in range(cfg.members)]
    times = [results[m][2] for m in range(cfg.members)]
    return {"run_dirs": runs, "log_dirs": logs, "models": [r / "last.ckpt" for r in runs], "train_times": times}


# ---------------------------------------------------------------------------- stage 3 + 4
def stage_fit(cfg: DemoConfig, out: Path, data: dict, train: dict) -> dict[str, Any]:
    """Fit the estimator for every k of the grid on member 1's descriptors and the M error logs."""
    from ltau_ase.core.errorlog import load_error_logs
    from ltau_ase.core.estimator import LTAUEstimator
    from ltau_ase.core.fileformat import sha256_file
    from ltau_ase.nequip.descriptors import extract_descriptors

    frames = data["splits"]["train"]
    atom_ids, desc = extract_descriptors(train["models"][0], frames, progress=True)
    logs = load_error_logs(train["log_dirs"])
    # Error logs order atoms by sorted id; the training file is written in increasing frame id.
    if not np.array_equal(atom_ids, logs[0].atom_ids):
        raise RuntimeError("training descriptors and error logs are not in the same atom order")
    metadata = {"model_sha256": sha256_file(train["models"][0]), "model_path": str(train["models"][0]),
                "n_members": cfg.members}
    estimators = {k: LTAUEstimator(k=k, metadata=metadata).fit(desc, logs, atom_ids=atom_ids)
                  for k in cfg.k_grid}
    return {"atom_ids": atom_ids, "descriptors": desc, "logs": logs, "estimators": estimators}


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


def stage_evaluate(cfg: DemoConfig, data: dict, train: dict) -> dict[str, Any]:
    from ltau_ase.simulate.committee import CommitteeCalculator

    members = [_load_model(p) for p in train["models"]]
    committee = CommitteeCalculator(members)
    evals = {}
    for split in ("calibration", "test_id", "test_ood"):
        frames = data["splits"][split]
        ev = evaluate_frames(frames, committee, members[0])
        ev["group"] = np.array([_frame_group(frames[f], data["settings"]) for f in ev["frame"]], dtype=object)
        evals[split] = ev
    return evals


def stage_calibrate(cfg: DemoConfig, out: Path, fit: dict, evals: dict) -> dict[str, Any]:
    """Choose k (lowest miscalibration on the calibration split at s = 1), then fit s there."""
    from ltau_ase.core.calibration import miscalibration_area

    cal = evals["calibration"]
    by_k = {}
    for k, est in fit["estimators"].items():
        pred = est.predict(cal["descriptors"])
        by_k[k] = miscalibration_area(pred["confidence"], cal["err_single"], est.atol_)
    k_best = min(by_k, key=lambda k: (by_k[k], k))
    est = fit["estimators"][k_best]
    before = {split: est.predict(evals[split]["descriptors"]) for split in DOMAINS.values()}
    scale = est.fit_scale(cal["descriptors"], cal["err_single"])
    after = {split: est.predict(evals[split]["descriptors"]) for split in DOMAINS.values()}
    k1 = {split: fit["estimators"][min(fit["estimators"])].predict(evals[split]["descriptors"])
          for split in DOMAINS.values()}
    path = out / "estimator.ltau"
    est.save(str(path))
    return {"k": k_best, "miscalibration_by_k": by_k, "scale": scale, "estimator": est, "path": path,
            "pred_k1": k1, "pred_before": before, "pred_after": after}


# ---------------------------------------------------------------------------- stage 5
def stage_is2rs(cfg: DemoConfig, out: Path, data: dict, train: dict, cal: dict) -> dict[str, Any]:
    from ltau_ase.nequip.backend import NequIPCommitteeFactory, NequIPLTAUFactory
    from ltau_ase.simulate.batch import load_results, relax_batch

    initial, refs = [], []
    for split, domain in (("is2rs_id", "in_domain"), ("is2rs_ood", "out_of_domain")):
        for a, r in zip(*data["splits"][split]):
            a, r = a.copy(), r.copy()
            for s in (a, r):
                s.info["name"] = s.info["system"]
                s.info["group"] = domain
            initial.append(a)
            refs.append(r)
    factories = {
        "ltau": NequIPLTAUFactory(model_path=str(train["models"][0]), estimator_path=str(cal["path"]),
                                  chemical_species_to_atom_type_map=True),
        "committee": NequIPCommitteeFactory(model_paths=tuple(str(p) for p in train["models"])),
    }
    (out / "is2rs").mkdir(exist_ok=True)
    results = {}
    for method, factory in factories.items():
        db = out / "is2rs" / f"{method}.db"
        counts = relax_batch(initial, db, factory, optimizer="oc20", fmax=cfg.relax_fmax, steps=cfg.relax_steps,
                             references=refs, progress=True)
        results[method] = {"db": db, "counts": counts, "records": load_results(db)}
    return results


def is2rs_analysis(records: list[dict]) -> dict[str, Any]:
    """IS2RS metrics per domain from relaxation records (failed relaxations are counted, not scored)."""
    from ltau_ase.is2rs import system_distances, uq_rmsd_analysis

    table = []
    failed = {"in_domain": 0, "out_of_domain": 0}
    for rec in records:
        if rec["status"] == "failed":
            failed[rec["group"]] += 1
            continue
        row = {"name": rec["name"], "group": rec["group"]}
        row.update({f"uq_{s}": rec[f"uq_{s}"] for s in ("initial", "final", "max", "mean")})
        row.update(system_distances(rec["atoms"], rec["reference"]))
        table.append(row)
    out: dict[str, Any] = {"failed": failed, "table": table}
    for domain in ("in_domain", "out_of_domain"):
        rows = [r for r in table if r["group"] == domain]
        # AUROC needs both classes: flag systems with an RMSD above the domain's median RMSD.
        threshold = float(np.median([r["rmsd"] for r in rows]))
        res = uq_rmsd_analysis(rows, threshold=threshold)
        g = res["groups"][domain]
        out[domain] = {
            "adwt": g["adwt"], "mean_rmsd": g["mean_rmsd"], "n_systems": g["n_systems"],
            "n_failed": failed[domain], "auroc_rmsd_threshold": threshold,
            **{f"spearman_{s}": g["stats"][s]["spearman"] for s in ("initial", "max", "mean", "final")},
            **{f"auroc_{s}": g["stats"][s]["auroc"] for s in ("initial", "max", "mean", "final")},
        }
    out["binned"] = uq_rmsd_analysis(table, groups=["in_domain", "out_of_domain"])["binned"]
    return out


# ---------------------------------------------------------------------------- stage 6
def md_system(seed: int, settings):
    """A 3x3x3 Pt(111) slab with NO (held-out adsorbate; every element seen in training)."""
    from ltau_ase.datasets import SystemSpec, slab_with_adsorbate

    spec = SystemSpec("Pt", "111", "NO", "fcc", (3, 3, 3), "out_of_domain")
    if "NO" not in settings.adsorbates_out_of_domain:
        spec = SystemSpec(settings.metals_out_of_domain[0], "111", settings.adsorbates_in_domain[0], "fcc",
                          (3, 3, 3), "out_of_domain")
    return slab_with_adsorbate(spec, np.random.default_rng([seed, 99]), settings)


def stage_md(cfg: DemoConfig, out: Path, data: dict, train: dict, cal: dict, evals: dict) -> dict[str, Any]:
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import thermalize_momenta
    from tqdm.auto import tqdm

    from ltau_ase.datasets import label_with_emt
    from ltau_ase.simulate.calculator import LTAUCalculator
    from ltau_ase.simulate.observers import UncertaintyStop

    # Threshold: a high quantile, over the in-domain calibration frames (relaxation, rattled and
    # 300-900 K MD frames), of the structure's mean per-atom uncertainty: the statistic the stop watches.
    ev = evals["calibration"]
    u_cal = cal["estimator"].predict(ev["descriptors"])["uncertainty"]
    per_frame = np.bincount(ev["frame"], weights=u_cal) / np.bincount(ev["frame"])
    threshold = float(np.quantile(per_frame, cfg.md_quantile))
    atoms = md_system(cfg.seed, data["settings"])
    atoms.calc = LTAUCalculator.from_model(train["models"][0], cal["path"], chemical_species_to_atom_type_map=True)
    rng = np.random.default_rng([cfg.seed, 7])
    thermalize_momenta(atoms, temperature_K=cfg.md_temperature, rng=rng)
    dyn = Langevin(atoms, timestep=1.0 * units.fs, temperature_K=cfg.md_temperature, friction=0.02 / units.fs,
                   fixcm=False, rng=rng)
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
def stage_costs(cfg: DemoConfig, data: dict, train: dict, cal: dict) -> dict[str, Any]:
    """Time one force call of: the single model, LTAU (same model + estimator), the committee.

    The three are evaluated on the same perturbed copies of the MD system, interleaved in one loop,
    medians over ``timing_repeats``. Graph construction (neighbour list + transforms,
    ``atoms_to_data``) and UQ (``estimator.predict``) are timed on the same structures.
    """
    from ltau_ase.simulate.calculator import LTAUCalculator
    from ltau_ase.simulate.committee import CommitteeCalculator

    single = _load_model(train["models"][0])
    ltau = LTAUCalculator(_load_model(train["models"][0]), cal["estimator"])
    committee = CommitteeCalculator([_load_model(p) for p in train["models"]])
    graph_calc = _load_model(train["models"][0])
    base = md_system(cfg.seed, data["settings"])
    rng = np.random.default_rng([cfg.seed, 11])
    t = {"single": [], "ltau": [], "committee": [], "graph": [], "uq": []}
    calcs = [("single", single), ("ltau", ltau), ("committee", committee)]
    for r in range(cfg.timing_repeats + 1):
        atoms = base.copy()
        atoms.positions += rng.normal(0.0, 0.02, size=atoms.positions.shape)
        for name, calc in calcs[r % 3:] + calcs[:r % 3]:  # rotate the order between rounds
            t0 = time.perf_counter()
            calc.get_property("forces", atoms)
            t[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        graph_calc.atoms_to_data(atoms)
        t["graph"].append(time.perf_counter() - t0)
        desc = single.results["descriptors"]
        t0 = time.perf_counter()
        cal["estimator"].predict(desc)
        t["uq"].append(time.perf_counter() - t0)
    arr = {k: np.array(v[1:]) for k, v in t.items()}  # the first round warms caches up
    med = {k: float(np.median(v)) for k, v in arr.items()}
    # ratios of the same round (same structure, seconds apart), then the median: robust to load drift
    ratio = {name: float(np.median(arr[name] / arr["single"])) for name in ("ltau", "committee")}
    forward = max(med["single"] - med["graph"], 0.0)
    step = med["ltau"]
    return {
        "n_atoms": len(base), "repeats": cfg.timing_repeats, "median_s": med,
        "ltau_over_single": ratio["ltau"],
        "committee_over_single": ratio["committee"],
        "committee_over_ltau": float(np.median(arr["committee"] / arr["ltau"])),
        "uq_fraction_of_step": float(np.median(arr["uq"] / arr["ltau"])),
        "shares": {"graph_construction": med["graph"] / step, "forward_and_forces": forward / step,
                   "uq": med["uq"] / step,
                   "other": max(step - med["graph"] - forward - med["uq"], 0.0) / step},
    }


def per_atom_comparison(cal: dict, evals: dict) -> dict[str, Any]:
    """LTAU vs committee on the S2EF test splits: Spearman, AUROC (> in-domain test MAE), miscalibration."""
    from ltau_ase.core.calibration import auroc, miscalibration_area, spearman
    from ltau_ase.simulate.committee import committee_confidence, fit_committee_scale

    est = cal["estimator"]
    atol = est.atol_
    # committee scale: the same calibration split, the same criterion (miscalibration area)
    c = evals["calibration"]
    s_comm = fit_committee_scale(c["u_committee"], c["err_committee"], atol)["scale"]
    mae = {"ltau": float(evals["test_id"]["err_single"].mean()),
           "committee": float(evals["test_id"]["err_committee"].mean())}
    out: dict[str, Any] = {"atol": atol, "test_id_mae": mae, "committee_scale": s_comm}
    for domain, split in DOMAINS.items():
        ev = evals[split]
        pred = cal["pred_after"][split]
        conf_c = committee_confidence(ev["u_committee"], atol)
        conf_cs = committee_confidence(ev["u_committee"], atol, scale=s_comm)
        out[domain] = {
            "ltau": {
                "spearman": spearman(pred["uncertainty"], ev["err_single"]),
                "spearman_expected_error": spearman(pred["expected_error"], ev["err_single"]),
                "auroc": auroc(pred["uncertainty"], ev["err_single"] > mae["ltau"]),
                "miscalibration_area": miscalibration_area(pred["confidence"], ev["err_single"], atol),
                "mae": float(ev["err_single"].mean()),
            },
            "committee": {
                "spearman": spearman(ev["u_committee"], ev["err_committee"]),
                "auroc": auroc(ev["u_committee"], ev["err_committee"] > mae["committee"]),
                "miscalibration_area": miscalibration_area(conf_cs, ev["err_committee"], atol),
                "miscalibration_area_unscaled": miscalibration_area(conf_c, ev["err_committee"], atol),
                "mae": float(ev["err_committee"].mean()),
            },
            "n_atoms": int(ev["err_single"].size),
        }
        out[domain]["spearman_ratio_ltau_over_committee"] = (
            out[domain]["ltau"]["spearman"] / out[domain]["committee"]["spearman"])
    return out


# ---------------------------------------------------------------------------- stage 8 (figures)
def paper_figures(out: Path, cfg: DemoConfig, fit: dict, cal: dict, evals: dict, is2rs: dict) -> dict[str, str]:
    from ltau_ase.core.calibration import calibration_curve
    from ltau_ase.plots import (plot_calibration_curves, plot_convergence_with_M, plot_latent_map,
                                plot_rmsd_vs_uq)
    from ltau_ase.simulate.committee import committee_confidence

    est = cal["estimator"]
    atol = est.atol_
    figs: dict[str, str] = {}

    def curves(preds: dict) -> dict:
        res = {}
        for split in DOMAINS.values():
            ev = evals[split]
            for g in dict.fromkeys(ev["group"].tolist()):
                sel = ev["group"] == g
                res[g] = calibration_curve(preds[split]["confidence"][sel], ev["err_single"][sel], atol)
        return res

    k1 = min(fit["estimators"])
    figs["fig1"] = plot_calibration_curves(curves(cal["pred_k1"]), out / "fig1_calibration_k1.png",
                                           title=f"k = {k1}, s = 1").name
    figs["fig2_tuned_k"] = plot_calibration_curves(curves(cal["pred_before"]), out / "fig2_calibration_tuned_k.png",
                                                   title=f"tuned k = {cal['k']}, s = 1").name
    figs["fig2_tuned_k_s"] = plot_calibration_curves(
        curves(cal["pred_after"]), out / "fig2_calibration_tuned_k_s.png",
        title=f"tuned k = {cal['k']}, s = {cal['scale']['scale']:.3g}").name
    comm = {}
    for domain, split in DOMAINS.items():
        ev = evals[split]
        conf = committee_confidence(ev["u_committee"], atol, scale=cal["committee_scale"])
        comm[f"committee {domain}"] = calibration_curve(conf, ev["err_committee"], atol)
        comm[f"LTAU {domain}"] = calibration_curve(cal["pred_after"][split]["confidence"], ev["err_single"], atol)
    figs["ensemble_calibration"] = plot_calibration_curves(comm, out / "ensemble_calibration.png",
                                                           title="LTAU vs committee (each with its fitted scale)").name
    figs["fig4_ltau"] = plot_rmsd_vs_uq(is2rs["ltau"]["binned"], out / "fig4_rmsd_vs_uq_ltau.png",
                                        title="LTAU: relaxation RMSD vs UQ").name
    figs["fig4_committee"] = plot_rmsd_vs_uq(is2rs["committee"]["binned"], out / "fig4_rmsd_vs_uq_committee.png",
                                             title="committee: relaxation RMSD vs UQ").name
    p_runs = est.distributions_.confidence_per_run(est.atol_)
    figs["figC3"] = plot_convergence_with_M(p_runs, out / "figC3_convergence_with_M.png", seed=cfg.seed).name
    figs["figD5"] = plot_latent_map(fit["descriptors"], est.confidence_train_, out / "figD5_latent_map.png",
                                    label="$\\mu_M(p_i)$", seed=cfg.seed).name
    return figs


# ---------------------------------------------------------------------------- report
def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    try:
        return f"{float(x):.{digits}g}"
    except (TypeError, ValueError):
        return str(x)


def comparison_table(metrics: dict) -> str:
    """Markdown table of LTAU vs committee (also used for the README)."""
    e = metrics["ensemble"]
    rows = ["| metric | domain | LTAU (1 model + estimator) | committee (M = %d) |" % e["n_members"],
            "|---|---|---|---|"]
    for domain in ("in_domain", "out_of_domain"):
        for key, label in (("spearman", "Spearman ρ (UQ vs \\|ΔF\\|)"),
                           ("auroc", "AUROC (\\|ΔF\\| > test MAE)"),
                           ("miscalibration_area", "miscalibration area")):
            rows.append(f"| {label} | {domain} | {_f(e[domain]['ltau'][key])} | {_f(e[domain]['committee'][key])} |")
        for key, label in (("adwt", "IS2RS ADwT"), ("spearman_max", "IS2RS Spearman (max UQ vs RMSD)")):
            rows.append(f"| {label} | {domain} | {_f(e['is2rs']['ltau'][domain][key])} | "
                        f"{_f(e['is2rs']['committee'][domain][key])} |")
    c = e["cost"]
    rows.append(f"| cost per MD step (× single model) | – | {_f(c['ltau_over_single'])} | "
                f"{_f(c['committee_over_single'])} |")
    return "\n".join(rows)


def write_report(out: Path, cfg: DemoConfig, metrics: dict, figs: dict[str, str]) -> Path:
    m = metrics
    e = m["ensemble"]
    cal = m["calibration"]
    lines = [
        "# LTAU on an OC20-like catalysis benchmark (EMT reference)",
        "",
        f"Run {m['run']['date']} on {m['run']['machine']}; mode {'quick' if cfg.quick else 'full'}, seed {cfg.seed}, "
        f"total {m['run']['total_s']:.0f} s. Everything below was produced by this run.",
        "",
        "## 1. Data",
        "",
        "Adsorbate + slab systems (fcc(111)/(100) slabs, OC20 tags, bottom layers fixed) labelled with ASE's EMT. "
        f"In-domain metals {', '.join(m['data']['metals_in_domain'])}, adsorbates "
        f"{', '.join(m['data']['adsorbates_in_domain'])}; out-of-domain: held-out metals "
        f"{', '.join(m['data']['metals_out_of_domain'])} and adsorbates {', '.join(m['data']['adsorbates_out_of_domain'])}.",
        "",
        "| split | frames | atoms |", "|---|---|---|",
        *[f"| {s} | {v['n_frames']} | {v['n_atoms']} |" for s, v in m["data"]["s2ef"].items()],
        *[f"| {s} (IS2RS pairs) | {v['n_systems']} | {v['n_atoms']} |" for s, v in m["data"]["is2rs"].items()],
        "",
        "## 2. Ensemble training",
        "",
        f"{cfg.members} NequIP models ({cfg.num_layers} layers, {cfg.num_features} features, l_max {cfg.l_max}, "
        f"r_max {cfg.r_max} Å), {cfg.epochs} epochs each, seeds 1..{cfg.members}, with `LTAUErrorLogger` "
        f"logging every training atom's force error every epoch. Training time per model: "
        f"{', '.join(f'{t:.0f} s' for t in m['training']['seconds'])}.",
        "",
        "## 3–4. Estimator, k and s",
        "",
        f"atol (final-epoch training MAE, averaged over runs) = {_f(cal['atol'])} eV/Å. Miscalibration on the "
        "calibration split for each k (s = 1): "
        + ", ".join(f"k={k}: {_f(v)}" for k, v in cal["miscalibration_by_k"].items())
        + f". Chosen k = {cal['k']}; fitted s = {_f(cal['scale'])} (calibration split miscalibration "
        f"{_f(cal['calibration_split']['before'])} → {_f(cal['calibration_split']['after'])}). "
        "The estimator is fitted without atomic numbers, so no species check applies: atoms of the held-out "
        "metals (elements never seen in training) are judged by their latent-space neighbours alone, which is "
        "the harder test (with atomic numbers, `LTAUCalculator` would refuse or flag them).",
        "",
        "| test split | k = 1, s = 1 | tuned k, s = 1 | tuned k, fitted s | Spearman ρ(u, \\|ΔF\\|) | "
        "Spearman ρ(expected error, \\|ΔF\\|) |",
        "|---|---|---|---|---|---|",
        *[f"| {d} | {_f(cal[d]['miscalibration_area']['k1'])} | {_f(cal[d]['miscalibration_area']['before'])} | "
          f"{_f(cal[d]['miscalibration_area']['after'])} | {_f(m['spearman'][d])} | "
          f"{_f(m['spearman_expected_error'][d])} |" for d in DOMAINS],
        "",
        "Calibration curves per group (Figs. 1–2 of the paper): k = 1; tuned k; tuned k with s.",
        "",
        f"![k=1]({figs['fig1']}) ![tuned k]({figs['fig2_tuned_k']}) ![tuned k and s]({figs['fig2_tuned_k_s']})",
        "",
        "## 5. Batch relaxations (IS2RS)",
        "",
        f"ML relaxations (fairchem's LBFGS settings, fmax {cfg.relax_fmax} eV/Å, ≤ {cfg.relax_steps} steps) of the "
        "IS2RS initial structures, run in batch on Dask with `RelaxationUQObserver` (mean UQ over free atoms per "
        "step), compared with the EMT-relaxed references over the free atoms. AUROC flags systems whose RMSD is "
        "above the domain's median RMSD (so both classes exist); failed relaxations are counted, not scored.",
        "",
        "| method | domain | systems | failed | ADwT | mean RMSD (Å) | ρ initial | ρ max | ρ mean | ρ final | "
        "AUROC initial | AUROC max |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[f"| {meth} | {d} | {r['n_systems']} | {r['n_failed']} | {_f(r['adwt'])} | {_f(r['mean_rmsd'])} | "
          f"{_f(r['spearman_initial'])} | {_f(r['spearman_max'])} | {_f(r['spearman_mean'])} | "
          f"{_f(r['spearman_final'])} | {_f(r['auroc_initial'])} | {_f(r['auroc_max'])} |"
          for meth in ("ltau", "committee") for d, r in ((d, e["is2rs"][meth][d]) for d in DOMAINS)],
        "",
        f"RMSD binned by initial / final / max / mean UQ (paper Fig. 4): ![LTAU]({figs['fig4_ltau']}) "
        f"![committee]({figs['fig4_committee']})",
        "",
        "## 6. MD with UncertaintyStop",
        "",
        f"Langevin MD at {_f(m['md']['temperature_K'])} K of {m['md']['system']}, an out-of-domain system "
        f"(held-out adsorbate). The stop watches the mean per-atom uncertainty of the structure; threshold: the "
        f"{m['md']['quantile']:.0%} quantile of that value over the in-domain calibration frames "
        f"= {_f(m['md']['threshold'])}, patience 3. "
        + (f"The stop fired at step {m['md']['stopped_at_step']}: {m['md']['reason']}."
           if m["md"]["triggered"] else
           f"The stop did not fire within {m['md']['max_steps']} steps.")
        + f" True EMT force error of the last frame: max {_f(m['md']['true_max_force_error_at_end'])} eV/Å, mean "
        f"{_f(m['md']['true_mean_force_error_at_end'])} eV/Å (in-domain test MAE {_f(e['test_id_mae']['ltau'])}).",
        "",
        "## 7. LTAU against a deep ensemble",
        "",
        f"The committee is the same {cfg.members} models; its per-atom uncertainty is the force standard deviation "
        "u_i = sqrt(Σ_c var_m F_ic) (eV/Å), its confidence the χ₃ CDF of the error under that Gaussian, with a "
        f"scale fitted on the calibration split like LTAU's s (committee scale {_f(e['committee_scale'])}). "
        "AUROC flags atoms whose error exceeds each method's in-domain test MAE.",
        "",
        comparison_table(m),
        "",
        f"Cost: median force call on a {e['cost']['n_atoms']}-atom slab, timed side by side in this process: single "
        f"model {e['cost']['median_s']['single'] * 1e3:.1f} ms, LTAU {e['cost']['median_s']['ltau'] * 1e3:.1f} ms, "
        f"committee {e['cost']['median_s']['committee'] * 1e3:.1f} ms; the ratios in the table are medians of "
        "per-round ratios (same structure, order rotated between rounds).",
        "",
        f"![calibration LTAU vs committee]({figs['ensemble_calibration']})",
        "",
        "## 8. Step-time shares (paper Table A2), convergence with M (Fig. C3), latent map (Fig. D5)",
        "",
        "| graph construction | forward pass + forces | UQ (kNN + distributions) | other |",
        "|---|---|---|---|",
        "| " + " | ".join(f"{100 * m['overhead']['shares'][k]:.1f} %" for k in
                         ("graph_construction", "forward_and_forces", "uq", "other")) + " |",
        "",
        f"![convergence with M]({figs['figC3']}) ![latent map]({figs['figD5']})",
        "",
        "## Runtime",
        "",
        "Inference (evaluation, relaxations, MD, timings) runs with one torch and one FAISS thread: on these "
        "12–30-atom structures more threads only add synchronisation; training runs the members side by side, one nequip-train process per core with one thread each.",
        "",
        f"Dominated by {max(m['run']['stages_s'], key=m['run']['stages_s'].get)} "
        f"({100 * max(m['run']['stages_s'].values()) / m['run']['total_s']:.0f} % of the total).",
        "",
        "| stage | seconds |", "|---|---|",
        *[f"| {k} | {v:.0f} |" for k, v in m["run"]["stages_s"].items()],
        "",
    ]
    if m["run"]["nonfinite"]:
        lines += ["**Warning:** these required metrics are missing or not finite: "
                  + ", ".join(m["run"]["nonfinite"]), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


# ---------------------------------------------------------------------------- main
def run_demo(output: str | Path, cfg: DemoConfig) -> dict[str, Any]:
    """Run every stage and write ``report.md``, the PNGs and ``metrics.json`` to ``output``."""
    import faiss
    import matplotlib

    matplotlib.use("Agg")
    from tqdm.auto import tqdm

    # Inference here is on small structures (12-30 atoms, one at a time): intra-op threads only add
    # synchronisation. Measured on the 2-core machine: a force call 110 ms with 2 torch threads vs
    # 17 ms with 1; one FAISS predict() 5-55 ms with OpenMP threads vs 0.3 ms with 1. Training runs in
    # nequip-train subprocesses and keeps its own threads.
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    timer = _Timer()
    t_start = time.perf_counter()
    stages = tqdm(total=9, desc="demo", unit="stage", position=0)

    def step(name, fn, *args):
        stages.set_postfix_str(name)
        result = timer.run(name, fn, *args)
        stages.update(1)
        return result

    data = step("1 data", stage_data, cfg, out)
    train = step("2 training", stage_train, cfg, out, data)
    fit = step("3 estimator", stage_fit, cfg, out, data, train)
    evals = step("4a evaluation", stage_evaluate, cfg, data, train)
    cal = step("4b k and s", stage_calibrate, cfg, out, fit, evals)
    comparison = per_atom_comparison(cal, evals)
    cal["committee_scale"] = comparison["committee_scale"]
    relax = step("5 relaxations", stage_is2rs, cfg, out, data, train, cal)
    is2rs = {meth: is2rs_analysis(r["records"]) for meth, r in relax.items()}
    md = step("6 MD", stage_md, cfg, out, data, train, cal, evals)
    costs = step("7 costs", stage_costs, cfg, data, train, cal)
    figs = step("8 figures", paper_figures, out, cfg, fit, cal, evals, is2rs)
    stages.close()

    from ltau_ase.core.calibration import miscalibration_area

    est = cal["estimator"]
    settings = data["settings"]
    calibration: dict[str, Any] = {
        "k": cal["k"], "scale": cal["scale"]["scale"], "atol": est.atol_,
        "miscalibration_by_k": cal["miscalibration_by_k"],
        "calibration_split": {"before": cal["scale"]["before"], "after": cal["scale"]["after"]},
    }
    for domain, split in DOMAINS.items():
        err = evals[split]["err_single"]
        calibration[domain] = {"miscalibration_area": {
            "k1": miscalibration_area(cal["pred_k1"][split]["confidence"], err, est.atol_),
            "before": miscalibration_area(cal["pred_before"][split]["confidence"], err, est.atol_),
            "after": miscalibration_area(cal["pred_after"][split]["confidence"], err, est.atol_),
        }}
    metrics: dict[str, Any] = {
        "calibration": calibration,
        "spearman": {d: comparison[d]["ltau"]["spearman"] for d in DOMAINS},
        "spearman_expected_error": {d: comparison[d]["ltau"]["spearman_expected_error"] for d in DOMAINS},
        "auroc": {d: comparison[d]["ltau"]["auroc"] for d in DOMAINS},
        "is2rs": {d: is2rs["ltau"][d] for d in DOMAINS},
        "overhead": {"uq_fraction_of_step": costs["uq_fraction_of_step"], "shares": costs["shares"],
                     "median_s": costs["median_s"]},
        "ensemble": {
            "n_members": cfg.members,
            **{d: {"ltau": comparison[d]["ltau"], "committee": comparison[d]["committee"],
                   "spearman_ratio_ltau_over_committee": comparison[d]["spearman_ratio_ltau_over_committee"],
                   "n_atoms": comparison[d]["n_atoms"]} for d in DOMAINS},
            "committee_scale": comparison["committee_scale"],
            "test_id_mae": comparison["test_id_mae"],
            "is2rs": {meth: {d: is2rs[meth][d] for d in DOMAINS} for meth in is2rs},
            "cost": costs,
        },
        "md": md,
        "training": {"seconds": train["train_times"], "epochs": cfg.epochs},
        "data": {
            "seed": cfg.seed,
            "metals_in_domain": list(settings.metals_in_domain),
            "metals_out_of_domain": list(settings.metals_out_of_domain),
            "adsorbates_in_domain": list(settings.adsorbates_in_domain),
            "adsorbates_out_of_domain": list(settings.adsorbates_out_of_domain),
            "s2ef": {s: {"n_frames": v["n_frames"], "n_atoms": v["n_atoms"]}
                     for s, v in data["manifest"]["s2ef"].items()},
            "is2rs": {s: {"n_systems": v["initial"]["n_frames"], "n_atoms": v["initial"]["n_atoms"]}
                      for s, v in data["manifest"]["is2rs"].items()},
        },
        "config": asdict(cfg),
        "figures": figs,
    }
    metrics["run"] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {platform.processor() or ''} {_cpu_count()} CPUs, "
                   f"Python {platform.python_version()}".replace("  ", " "),
        "stages_s": timer.stages,
        "total_s": time.perf_counter() - t_start,
    }
    metrics = to_jsonable(metrics)
    metrics["run"]["nonfinite"] = missing_or_nonfinite(metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_report(out, cfg, metrics, figs)
    return metrics


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ltau_ase.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="demo_output", help="output directory (default demo_output)")
    parser.add_argument("--quick", action="store_true", help="smaller data and models: a few minutes")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, models and MD (default 0)")
    parser.add_argument("--members", type=int, default=None, help="ensemble size M (default 4, quick 3)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs per model")
    args = parser.parse_args(argv)
    cfg = DemoConfig.preset(args.quick, seed=args.seed, members=args.members, epochs=args.epochs)
    metrics = run_demo(args.output, cfg)
    out = Path(args.output)
    print(f"\nwrote {out / 'report.md'}, {out / 'metrics.json'} and {len(metrics['figures'])} figures "
          f"in {metrics['run']['total_s']:.0f} s")
    if metrics["run"]["nonfinite"]:
        print("missing or non-finite required metrics: " + ", ".join(metrics["run"]["nonfinite"]))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
