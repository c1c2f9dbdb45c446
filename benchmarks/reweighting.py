"""Confidence-based re-weighting of the training set (issue 6 §3; paper Sec. 4.2, Fig. 3, App. E).

One run of this script performs the whole experiment on the demo's OC20-like EMT dataset
(:mod:`ltau_ase.datasets`, a reduced size so it fits a CPU budget), with the SAME train /
validation / in-domain-test split and the SAME number of epochs for every scheme:

1. **uniform**: an ensemble of M tiny NequIP models (seeds 1..M) trained with nequip's ordinary
   energy + force loss and :class:`ltau_ase.nequip.callback.LTAUErrorLogger` (free mode) on;
2. **cartography**: µ_M(p_i) and σ_M(p_i) of every training atom from the M error logs
   (:mod:`ltau_ase.core.distributions`; the threshold atol is the ensemble's final-epoch force MAE,
   :func:`~ltau_ase.core.distributions.default_atol`), the regions
   (:func:`ltau_ase.cartography.regions`), and weights for "easy" (λ = 2.0) and "hard" (λ = 4.5,
   the paper's values) from :func:`ltau_ase.cartography.loss_weights`, exported as weighted extxyz
   copies of the training file (:func:`ltau_ase.cartography.export_extxyz`);
3. **easy** and **hard**: ensembles with the same seeds (same initial weights and shuffling as the
   uniform run of that seed) trained with the weighted per-atom force loss of
   :mod:`ltau_ase.nequip.loss` in an ordinary nequip YAML config;
4. per-epoch train and validation force MAE read from each run's Lightning ``CSVLogger`` file
   (nequip's ``train_metric_epoch/forces_mae`` and ``val0_epoch/forces_mae``), plotted with 95 %
   bands (Fig. 3, :func:`ltau_ase.plots.plot_training_curves`); every final model (``last.ckpt``)
   evaluated on the train, validation and in-domain test frames; test-error distributions per
   scheme (Fig. E2) and the dataset map (Fig. E1);
5. a table of final train MAE, validation MAE and gap = val − train per scheme (mean ± sample std
   over the M seeds), and paired per-seed gap differences against uniform with their 95 % CI,
   from which the script states whether the paper's trend (hard widens the gap, easy narrows it)
   appears. Everything is written to ``<output>/results.json``.

Metrics, so that numbers are not compared across definitions:

* *logged* MAEs are nequip's: mean absolute force **component** error (eV/Å), unweighted (the
  ``train_metrics`` block added here never sees the loss weights); the training value is
  accumulated over the epoch's batches while the model parameters change, the validation value is the
  end-of-epoch model's;
* *final-model* MAEs are the mean over atoms of the force-error **norm** |F_pred − F_ref| (eV/Å)
  of ``last.ckpt`` on each split (the quantity the error logger records).

Speed: every ``nequip-train`` runs with one thread (``OMP_NUM_THREADS=1``; two threads per run on a
busy two-core machine were ~10× slower) and ``--jobs`` runs in parallel (default 3: the M = 3
uniform runs train in one round, and on two cores three single-thread runs take no longer in total
than two). Measured on 2 cores shared with other jobs (load ~7): full run (4.5 k training atoms,
20 epochs, 16 features, M = 3 per scheme) 12.4 min wall / 6.9 min CPU; ``--quick`` 2.6 min.

Usage::

    python benchmarks/reweighting.py [--quick] [--seeds M] [--epochs E] [--jobs J]
                                     [--output benchmark_output/reweighting] [--overwrite]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ltau_ase.cli.reweight import PAPER_LAMBDA  # λ of App. E: 2.0 (easy), 4.5 (hard)

SCHEMES = ("uniform", "easy", "hard")
#: nequip's logged keys (Lightning CSVLogger columns) for the curves of Fig. 3
TRAIN_KEY = "train_metric_epoch/forces_mae"
VAL_KEY = "val0_epoch/forces_mae"
METRICS_CSV = Path("metrics") / "version_0" / "metrics.csv"
ERROR_LOG_DIR = "ltau_errors"
CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"
#: the documented config of ltau_ase.nequip.loss: nequip's EnergyForceLoss with the force MSE weighted
WEIGHTED_LOSS = {
    "_target_": "ltau_ase.nequip.loss.WeightedEnergyForceLoss",
    "per_atom_energy": True,
    "coeffs": {"total_energy": 1.0, "forces": 1.0},
}
THRESHOLDS = {"easy_threshold": 0.5, "hard_threshold": 0.5, "ambiguous_variability": 0.2}


@dataclass(frozen=True)
class Settings:
    """Sizes of the experiment. Systems per split (8 frames each: 4 relax, 2 rattle, 2 MD)."""

    n_train: int = 30
    n_val: int = 6
    n_test: int = 8
    data_seed: int = 0
    seeds: int = 3
    epochs: int = 20
    num_layers: int = 2
    num_features: int = 16
    l_max: int = 1
    r_max: float = 4.0
    batch_size: int = 5
    lr: float = 0.01
    lam_easy: float = PAPER_LAMBDA["easy"]
    lam_hard: float = PAPER_LAMBDA["hard"]
    jobs: int = 3


FULL = Settings()
QUICK = Settings(n_train=5, n_val=2, n_test=2, seeds=3, epochs=3, num_features=8)


# --------------------------------------------------------------------------- pure helpers
def read_epoch_metrics(path: str | os.PathLike, keys: Sequence[str] = (TRAIN_KEY, VAL_KEY)) -> dict[str, np.ndarray]:
    """Per-epoch values of ``keys`` from a Lightning ``CSVLogger`` ``metrics.csv``.

    Lightning writes one row per ``log`` call group, so the train and validation values of an epoch
    sit on different rows that share the ``epoch`` column.

    Returns:
        key -> (E,) float64, E = 1 + the largest epoch in the file; NaN where an epoch has no value.
    Raises:
        FileNotFoundError: no such file. ValueError: no ``epoch`` column, a key never logged, or
        an epoch logged twice with different values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} does not exist; the run needs trainer.logger = CSVLogger")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "epoch" not in rows[0]:
        raise ValueError(f"{path} has no 'epoch' column; expected a Lightning CSVLogger metrics file")
    missing = [k for k in keys if k not in rows[0]]
    if missing:
        raise ValueError(f"{path} has no column(s) {missing}; columns are {sorted(rows[0])}")
    n_epochs = 1 + max(int(r["epoch"]) for r in rows if r["epoch"] != "")
    out = {k: np.full(n_epochs, np.nan) for k in keys}
    for r in rows:
        if r["epoch"] == "":
            continue
        e = int(r["epoch"])
        for k in keys:
            if r[k] == "":
                continue
            v = float(r[k])
            if np.isfinite(out[k][e]) and out[k][e] != v:
                raise ValueError(f"{path}: epoch {e} has two different values of {k} ({out[k][e]} and {v})")
            out[k][e] = v
    return out


def gap_summary(final: Mapping[str, Mapping[str, Sequence[float]]]) -> dict[str, dict[str, Any]]:
    """Mean ± sample std (ddof = 1) over seeds of train MAE, val MAE and gap = val − train.

    Args:
        final: scheme -> {"train": (M,), "val": (M,)} final MAEs per seed (same seed order in
            every scheme).
    Returns:
        scheme -> {"train_mean", "train_std", "val_mean", "val_std", "gap_mean", "gap_std",
        "n_seeds", "gap_per_seed"}.
    """
    out = {}
    for scheme, parts in final.items():
        train = np.asarray(parts["train"], dtype=np.float64)
        val = np.asarray(parts["val"], dtype=np.float64)
        if train.ndim != 1 or train.shape != val.shape or train.size == 0:
            raise ValueError(f"{scheme}: train and val must be equal-length (M,) arrays; got {train.shape}, {val.shape}")
        if not (np.isfinite(train).all() and np.isfinite(val).all()):
            raise ValueError(f"{scheme}: final MAEs contain NaN/inf")
        gap = val - train
        ddof = 1 if train.size > 1 else 0
        out[scheme] = {
            "n_seeds": int(train.size),
            "train_mean": float(train.mean()), "train_std": float(train.std(ddof=ddof)),
            "val_mean": float(val.mean()), "val_std": float(val.std(ddof=ddof)),
            "gap_mean": float(gap.mean()), "gap_std": float(gap.std(ddof=ddof)),
            "gap_per_seed": gap.tolist(),
        }
    return out


def paired_gap_differences(summary: Mapping[str, Mapping[str, Any]], reference: str = "uniform") -> dict[str, dict[str, float]]:
    """Per-seed gap(scheme) − gap(reference), its mean and 95 % CI (Student t over seeds).

    Seeds are paired: run s of every scheme starts from the same initial weights and shuffles
    the data in the same order, so the paired difference removes the seed-to-seed spread.
    """
    from ltau_ase.plots import mean_and_ci95

    if reference not in summary:
        raise ValueError(f"reference scheme {reference!r} not in {sorted(summary)}")
    ref = np.asarray(summary[reference]["gap_per_seed"], dtype=np.float64)
    out = {}
    for scheme, s in summary.items():
        if scheme == reference:
            continue
        g = np.asarray(s["gap_per_seed"], dtype=np.float64)
        if g.shape != ref.shape:
            raise ValueError(f"{scheme} has {g.size} seeds but {reference} has {ref.size}; expected paired seeds")
        diff = g - ref
        mean, lo, hi = mean_and_ci95(diff[:, None])
        out[scheme] = {"mean": float(mean[0]), "ci95_low": float(lo[0]), "ci95_high": float(hi[0]), "per_seed": diff.tolist()}
    return out


def trend_verdict(diff: Mapping[str, Mapping[str, float]]) -> dict[str, str]:
    """Whether the paper's trend appears: hard widens the gap (diff > 0), easy narrows it (diff < 0).

    Verdicts per scheme: ``"yes"`` (the 95 % CI of the paired difference excludes 0 on the
    expected side), ``"same sign, not significant"``, ``"no, opposite sign"`` (CI excludes 0 on the
    other side) or ``"no, opposite sign, not significant"``.
    """
    expected = {"hard": 1.0, "easy": -1.0}
    out = {}
    for scheme, sign in expected.items():
        if scheme not in diff:
            continue
        d = diff[scheme]
        lo, hi = sign * d["ci95_low"], sign * d["ci95_high"]
        lo, hi = min(lo, hi), max(lo, hi)
        if lo > 0:
            out[scheme] = "yes"
        elif sign * d["mean"] > 0:
            out[scheme] = "same sign, not significant"
        elif hi < 0:
            out[scheme] = "no, opposite sign"
        else:
            out[scheme] = "no, opposite sign, not significant"
    return out


def trend_conclusion(verdicts: Mapping[str, Mapping[str, str]]) -> str:
    """One honest sentence from :func:`trend_verdict` results per metric kind (``{kind: {scheme: verdict}}``)."""
    parts = []
    for kind, v in verdicts.items():
        hard, easy = v.get("hard", "n/a"), v.get("easy", "n/a")
        if hard == "yes" and easy == "yes":
            state = "appears (both differences significant at 95 %)"
        elif hard == "yes" or easy == "yes":
            state = "appears only in part"
        elif hard == "same sign, not significant" and easy == "same sign, not significant":
            state = "is suggested by the signs but not significant"
        else:
            state = "does not appear"
        parts.append(f"{kind}: the paper's trend {state} (hard widens: {hard}; easy narrows: {easy})")
    return "; ".join(parts)


# --------------------------------------------------------------------------- experiment steps
def make_dataset(directory: Path, settings: Settings) -> dict[str, Path]:
    """Generate the reduced demo dataset (train / val / test_id S2EF splits) and write extxyz files."""
    from ltau_ase.datasets import DatasetSize, generate_catalysis_dataset
    from ltau_ase.nequip.training import write_training_file

    size = DatasetSize(
        train=settings.n_train, val=settings.n_val, calibration=0, test_id=settings.n_test,
        test_ood=0, is2rs_id=0, is2rs_ood=0,
    )
    data = generate_catalysis_dataset(seed=settings.data_seed, size=size)
    return {split: write_training_file(directory / f"{split}.extxyz", data.s2ef[split]) for split in ("train", "val", "test_id")}


def _read(path: Path) -> list:
    import ase.io

    return ase.io.read(path, index=":", format="extxyz")


def _type_names(frames: Sequence) -> list[str]:
    return sorted({s for atoms in frames for s in atoms.get_chemical_symbols()})


def _quoted(path: Path) -> str:
    text = str(path)
    if "'" in text or "\\" in text:
        raise ValueError(f"output path {text!r} contains a quote or backslash, which Hydra overrides cannot carry")
    return f"'{text}'"


def train_run(
    scheme: str, seed: int, train_file: Path, files: Mapping[str, Path], type_names: Sequence[str],
    settings: Settings, root: Path,
) -> Path:
    """Write the nequip config of one (scheme, seed) run, train it, and return its run directory.

    Every run logs metrics with Lightning's CSVLogger and nequip's unweighted ``EnergyForceMetrics``
    on the training batches (Hydra overrides of the written config); uniform runs also carry the
    LTAU error logger, easy/hard runs the weighted force loss reading the ``ltau_weight`` column.
    """
    from ltau_ase.nequip.training import ERROR_LOGGER_TARGET, train_nequip, write_nequip_config

    run_dir = (root / "runs" / f"{scheme}_seed{seed}").resolve()
    common = dict(
        type_names=list(type_names), val_file=files["val"], seed=seed, data_seed=seed, max_epochs=settings.epochs,
        num_layers=settings.num_layers, num_features=settings.num_features, l_max=settings.l_max,
        r_max=settings.r_max, batch_size=settings.batch_size, lr=settings.lr,
    )
    if scheme == "uniform":
        extra = dict(callbacks=[{"_target_": ERROR_LOGGER_TARGET, "log_dir": ERROR_LOG_DIR, "mode": "free"}])
    else:
        from ltau_ase.nequip.fields import ATOM_WEIGHT_KEY, FRAME_ID_KEY

        extra = dict(loss=WEIGHTED_LOSS, include_keys=(FRAME_ID_KEY, ATOM_WEIGHT_KEY))
    config = write_nequip_config(root / "configs" / f"{scheme}_seed{seed}.yaml", train_file, **common, **extra)
    overrides = [
        "trainer.logger={_target_:%s,save_dir:%s,name:metrics,version:0}" % (CSV_LOGGER, _quoted(run_dir)),
        "+training_module.train_metrics={_target_:nequip.train.EnergyForceMetrics,coeffs:{forces_mae:1.0}}",
    ]
    start = time.perf_counter()
    train_nequip(config, run_dir, overrides=overrides, timeout=3600,
                 env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    print(f"  trained {scheme:7s} seed {seed}: {time.perf_counter() - start:6.1f} s", flush=True)
    return run_dir


def train_ensembles(train_files: Mapping[str, Path], files, type_names, settings: Settings, root: Path) -> dict[str, list[Path]]:
    """Train seeds 1..M of every scheme in ``train_files`` (one pool, ``settings.jobs`` runs at a
    time, so the runs of two schemes fill the cores together); run dirs per scheme in seed order."""
    seeds = range(1, settings.seeds + 1)
    with ThreadPoolExecutor(max_workers=settings.jobs) as pool:
        futures = {
            scheme: [pool.submit(train_run, scheme, s, path, files, type_names, settings, root) for s in seeds]
            for scheme, path in train_files.items()
        }
        return {scheme: [f.result() for f in fs] for scheme, fs in futures.items()}


def cartography(log_dirs: Sequence[Path], frames: Sequence) -> dict[str, Any]:
    """µ_M(p_i), σ_M(p_i) of the training atoms (frame order) from the uniform ensemble's error logs."""
    from ltau_ase.cartography import values_for_frames
    from ltau_ase.core.distributions import CompactDistributions, as_runs, default_atol
    from ltau_ase.core.errorlog import load_error_logs

    logs = load_error_logs(log_dirs)
    runs = as_runs(logs)
    atol = default_atol(runs)
    dist = CompactDistributions.from_runs(runs, atol)
    mu, sigma = values_for_frames(frames, logs[0].atom_ids, dist.confidence(atol), dist.std(atol))
    return {"atol": atol, "confidence": mu, "variability": sigma, "n_epochs": [log.n_epochs for log in logs]}


def force_errors(run_dir: Path, frames: Sequence) -> np.ndarray:
    """(N,) |F_pred − F_ref| (eV/Å) of the run's ``last.ckpt`` over ``frames`` (unconstrained forces)."""
    from ltau_ase.nequip.calculator import LatentNequIPCalculator

    # The checkpoint is verified (ltau_ase.nequip.safe_load); its config also names the CSV logger
    # this script adds, a Lightning class outside the default allow-list.
    calc = LatentNequIPCalculator.from_model_file(
        run_dir / "last.ckpt", chemical_species_to_atom_type_map=True
    )
    out = []
    for atoms in frames:
        ref = np.asarray(atoms.calc.results["forces"], dtype=np.float64)
        work = atoms.copy()
        work.calc = calc
        out.append(np.linalg.norm(work.get_forces(apply_constraint=False) - ref, axis=1))
    return np.concatenate(out)


# --------------------------------------------------------------------------- main
def _fmt(mean: float, std: float) -> str:
    return f"{mean:.4f} ± {std:.4f}"


def prepare_output(output: Path, overwrite: bool = False) -> None:
    """Create ``output``; refuse (or, with ``overwrite``, delete) runs of an earlier experiment there.

    Old runs must not mix with new ones: nequip would write into the old run directories and the
    error logger refuses to append to an existing log.
    """
    import shutil

    stale = [output / name for name in ("runs", "configs") if (output / name).exists()]
    if stale and not overwrite:
        raise FileExistsError(
            f"{output} already holds runs of an earlier experiment ({', '.join(p.name for p in stale)}); "
            "choose another --output or pass --overwrite to delete them"
        )
    for path in stale:
        shutil.rmtree(path)
    output.mkdir(parents=True, exist_ok=True)


def run_experiment(settings: Settings, output: Path, overwrite: bool = False) -> dict[str, Any]:
    import torch

    from ltau_ase.cartography import REGIONS, export_extxyz, loss_weights, regions
    from ltau_ase.plots import plot_cartography, plot_error_distributions, plot_training_curves

    torch.set_num_threads(1)
    prepare_output(output, overwrite)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    print(f"[1/5] dataset: {settings.n_train}/{settings.n_val}/{settings.n_test} systems (train/val/test_id)", flush=True)
    files = make_dataset(output / "data", settings)
    frames = {split: _read(path) for split, path in files.items()}
    type_names = _type_names(frames["train"] + frames["val"] + frames["test_id"])
    n_atoms = {split: int(sum(len(a) for a in f)) for split, f in frames.items()}
    print(f"      {', '.join(f'{s}: {len(frames[s])} frames / {n_atoms[s]} atoms' for s in frames)}", flush=True)
    timings["dataset_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    print(f"[2/5] uniform ensemble: M={settings.seeds}, {settings.epochs} epochs", flush=True)
    run_dirs = train_ensembles({"uniform": files["train"]}, files, type_names, settings, output)
    timings["train_uniform_s"] = time.perf_counter() - t

    t = time.perf_counter()
    carto = cartography([d / ERROR_LOG_DIR for d in run_dirs["uniform"]], frames["train"])
    mu, sigma = carto["confidence"], carto["variability"]
    labels = regions(mu, sigma, **THRESHOLDS)
    groups = np.repeat([str(a.info["config_type"]) for a in frames["train"]], [len(a) for a in frames["train"]])
    symbols = np.concatenate([a.get_chemical_symbols() for a in frames["train"]])
    plot_cartography(mu, sigma, output / "cartography_map.png", groups=groups, thresholds=THRESHOLDS)
    lam = {"easy": settings.lam_easy, "hard": settings.lam_hard}
    weights, weighted_files = {}, {}
    for scheme in ("easy", "hard"):
        weights[scheme] = loss_weights(mu, sigma, scheme=scheme, lam=lam[scheme])
        weighted_files[scheme] = export_extxyz(
            frames["train"], mu, sigma, output / f"train_weighted_{scheme}.extxyz", weights=weights[scheme], **THRESHOLDS
        )
    region_counts = {name: int(np.sum(labels == name)) for name in REGIONS}
    print(f"      atol {carto['atol']:.4f} eV/Å; regions " + ", ".join(f"{k} {v}" for k, v in region_counts.items()), flush=True)
    timings["cartography_s"] = time.perf_counter() - t

    t = time.perf_counter()
    print("[3/5] easy and hard ensembles (weighted force loss)", flush=True)
    run_dirs.update(train_ensembles(weighted_files, files, type_names, settings, output))
    timings["train_weighted_s"] = time.perf_counter() - t

    t = time.perf_counter()
    print("[4/5] curves from the CSV logs; final models on train / val / test_id", flush=True)
    curves, logged_final, model_final, test_errors = {}, {}, {}, {}
    for scheme in SCHEMES:
        per_run = [read_epoch_metrics(d / METRICS_CSV) for d in run_dirs[scheme]]
        for d, m in zip(run_dirs[scheme], per_run):
            for key, values in m.items():
                if values.size != settings.epochs or not np.isfinite(values).all():
                    raise RuntimeError(f"{d / METRICS_CSV}: {key} has {np.isfinite(values).sum()} of {settings.epochs} epochs")
        curves[scheme] = {"train": np.stack([m[TRAIN_KEY] for m in per_run]), "val": np.stack([m[VAL_KEY] for m in per_run])}
        logged_final[scheme] = {part: curves[scheme][part][:, -1] for part in ("train", "val")}
        errs = {split: [force_errors(d, frames[split]) for d in run_dirs[scheme]] for split in ("train", "val", "test_id")}
        model_final[scheme] = {"train": [e.mean() for e in errs["train"]], "val": [e.mean() for e in errs["val"]],
                               "test_id": [e.mean() for e in errs["test_id"]]}
        test_errors[scheme] = np.concatenate(errs["test_id"])
    plot_training_curves(curves, output / "training_curves.png",
                         title=f"force MAE, M={settings.seeds} seeds, 95 % bands")
    plot_error_distributions(test_errors, output / "test_error_distributions.png")
    timings["evaluate_s"] = time.perf_counter() - t

    logged = gap_summary(logged_final)
    model = gap_summary({s: {"train": v["train"], "val": v["val"]} for s, v in model_final.items()})
    diffs = {"logged": paired_gap_differences(logged), "final_model": paired_gap_differences(model)}
    verdict = {kind: trend_verdict(d) for kind, d in diffs.items()}
    conclusion = trend_conclusion(verdict)
    timings["total_s"] = time.perf_counter() - t0

    print(f"[5/5] results ({settings.seeds} seeds, {settings.epochs} epochs, mean ± std over seeds, eV/Å)")
    for kind, summ, what in (("logged", logged, "nequip logged force-component MAE"),
                             ("final_model", model, "last.ckpt force-norm MAE")):
        print(f"  {what}:")
        print(f"    {'scheme':8s} {'train MAE':>18s} {'val MAE':>18s} {'gap (val-train)':>18s}")
        for scheme in SCHEMES:
            s = summ[scheme]
            print(f"    {scheme:8s} {_fmt(s['train_mean'], s['train_std']):>18s} {_fmt(s['val_mean'], s['val_std']):>18s} "
                  f"{_fmt(s['gap_mean'], s['gap_std']):>18s}")
        for scheme, d in diffs[kind].items():
            print(f"    gap({scheme}) - gap(uniform), paired: {d['mean']:+.4f} [95 % CI {d['ci95_low']:+.4f}, {d['ci95_high']:+.4f}]"
                  f" -> paper trend ({'widens' if scheme == 'hard' else 'narrows'}): {verdict[kind][scheme]}")
    for scheme in SCHEMES:
        tm = np.asarray(model_final[scheme]["test_id"])
        print(f"  test_id force-norm MAE {scheme:8s} {_fmt(tm.mean(), tm.std(ddof=1) if tm.size > 1 else 0.0)}")
    print(f"  {conclusion}")
    print(f"  wall time {timings['total_s']:.0f} s; outputs in {output}")

    hard_mask = labels == REGIONS[1]
    result = {
        "benchmark": "reweighting",
        "settings": asdict(settings),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpu_count": os.cpu_count()},
        "data": {"n_frames": {s: len(f) for s, f in frames.items()}, "n_atoms": n_atoms, "type_names": type_names},
        "cartography": {
            "atol": carto["atol"], "n_epochs_logged": carto["n_epochs"], "thresholds": THRESHOLDS,
            "region_counts": region_counts,
            "region_counts_by_config_type": {
                g: {name: int(np.sum((labels == name) & (groups == g))) for name in REGIONS} for g in np.unique(groups)
            },
            "hard_fraction_by_element": {el: float(np.mean(hard_mask[symbols == el])) for el in np.unique(symbols)},
            "weights": {
                s: {"lam": lam[s], "min": float(w.min()), "max": float(w.max()),
                    "share_of_total_on_hard_atoms": float(w[hard_mask].sum() / w.sum())}
                for s, w in weights.items()
            },
        },
        "logged_mae": logged,
        "final_model_mae": model,
        "final_model_test_id_mae": {
            s: {"per_seed": [float(x) for x in v["test_id"]], "mean": float(np.mean(v["test_id"]))} for s, v in model_final.items()
        },
        "paired_gap_difference_vs_uniform": diffs,
        "paper_trend": verdict,
        "conclusion": conclusion,
        "curves": {s: {p: c[p].tolist() for p in c} for s, c in curves.items()},
        "timings_s": timings,
        "figures": ["training_curves.png", "test_error_distributions.png", "cartography_map.png"],
    }
    (output / "results.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny data, 3 epochs, 8 features (a smoke run, ~3 min)")
    parser.add_argument("--seeds", type=int, default=None, help="ensemble size M per scheme (default 3)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every run (default 20, quick 3)")
    parser.add_argument("--jobs", type=int, default=None, help="training runs in parallel, one thread each (default 3)")
    parser.add_argument("--output", type=Path, default=Path("benchmark_output/reweighting"), help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="delete the runs of an earlier experiment in --output")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    for name in ("seeds", "epochs", "jobs"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                parser.error(f"--{name} must be >= 1; got {value}")
            settings = replace(settings, **{name: value})
    if settings.seeds < 2:
        parser.error("--seeds must be >= 2: variability σ_M and the 95 % bands need several runs")
    if settings.epochs < 2:
        parser.error("--epochs must be >= 2: a loss trajectory needs several epochs")
    run_experiment(settings, args.output.resolve(), overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
