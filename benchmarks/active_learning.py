"""Active learning on the EMT catalysis domain: LTAU selection vs random vs a DP-GEN committee.

    python benchmarks/active_learning.py [--quick] --output DIR [--seeds 8] [--first-seed 0] [--iterations 4]
        [--jobs 1] [--quantile 0.5] [--max-reference-force 20]
    python benchmarks/active_learning.py --pool RESULTS [RESULTS ...] --output DIR

More seeds later: ``--first-seed 10 --seeds 5`` runs seeds 10-14 (never an earlier run's), and
``--pool OLD/results.json NEW --output POOLED`` analyses all seeds together (:func:`pool_results`:
same settings required, a repeated seed refused).

For every seed, three campaigns (:class:`ltau_ase.learn.Campaign`) start from the same small
in-domain training set and the same initial model, with the same label budget per iteration, the same
training settings and the same exploration seeds. The exploration pool is mostly redundant: in-domain
seeds at 300 and 600 K (the training data's range), and a few informative trajectories: held-out
adsorbates (CO, NO) and 1200 K.

* ``ltau``: one model; MD with the LTAU calculator and an UncertaintyStop (threshold: a quantile of
  the calibration frames' mean-atom uncertainty); flagged frames chosen by uncertainty and latent
  diversity (farthest-point sampling).
* ``random``: the same kind of exploration (one model, the LTAU stop); the batch is drawn uniformly
  among all explored frames.
* ``committee``: M models (DP-GEN); MD on the committee mean force, stopped above the upper trust
  level; frames with lo < max force deviation <= hi drawn uniformly (lo: the same calibration
  quantile of the deviation, hi = 3 lo, as DP-GEN's 0.05 / 0.15 eV/Å).

Retraining is warm-started for every method (``warm_start``): each iteration continues from the
previous iteration's weights with the same seed and schedule (``epochs`` more epochs), so the
methods differ by the frames they chose, not by a fresh random initialisation (a retraining from
scratch moved the test MAE by 0.1-0.3 eV/Å between seeds, as much as the labels did). A trajectory
whose start was labelled earlier explores on (every iteration can spend its budget).

Every method has the same reference trust cap (``max_reference_force``, default 20 eV/Å): a labelled
frame above it is recorded as rejected (a label spent, never trained on), and the test MAE is over
the test frames within the cap (frames above it are reported apart). The initial model is shared:
the ``random`` campaign starts from a copy of the ``ltau`` campaign's iteration 0 and the committee's
first member is that model. After every iteration the test force MAE (member 1, eV/Å) is measured on
held-out in-domain and out-of-domain frames.

Output: ``DIR/results.json`` (every curve, per method and seed; the label ratios of LTAU against
random and the committee, per seed and of the seed-averaged curves with a bootstrap over seeds;
paired final-MAE differences; exploration cost ratios), ``DIR/active_learning.png`` (MAE vs labels,
mean ± std bands), ``DIR/seeds/seed<N>.json`` (each finished seed alone, poolable), and the
campaigns in ``DIR/campaigns/``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

METHODS = ("ltau", "random", "committee")
DOMAINS = ("in_domain", "out_of_domain")


@dataclass(frozen=True)
class Experiment:
    quick: bool = False
    seeds: int = 8
    # seeds run are first_seed, ..., first_seed + seeds - 1: a later run adds new independent seeds
    # (never repeating earlier ones) that --pool combines with the earlier results
    first_seed: int = 0
    iterations: int = 4
    budget: int = 6
    committee_size: int = 3
    initial_systems: int = 6  # in-domain systems of the initial training set (4 frames each)
    # the exploration pool: mostly redundant (in-domain seeds at and near the training temperatures),
    # a few informative trajectories (held-out adsorbates, 1200 K)
    seed_systems_id: int = 6  # exploration seeds per domain
    seed_systems_ood: int = 2
    temperatures: tuple[float, ...] = (300.0, 600.0, 1200.0)
    replicas: int = 1
    md_steps: int = 60
    stride: int = 5
    epochs: int = 15  # the initial model's epochs, and the epochs each later iteration adds
    # every iteration continues from the previous iteration's weights (same seed, same schedule, same
    # initial model for every method): the methods differ by their data, not by a fresh initialisation
    warm_start: bool = True
    # stop early: at the 0.9 quantile young models drove 10-20 % of the MD snapshots into collisions
    # (EMT max force > 20 eV/Å) before the stop fired; at 0.5 far fewer (README, active learning)
    threshold_quantile: float = 0.5
    max_reference_force: float | None = 20.0  # eV/Å: reference trust cap, above every training frame's 15 eV/Å
    jobs: int = 1
    train_parallel: int = 1  # committee members trained side by side within one campaign

    @classmethod
    def preset(cls, quick: bool, **overrides: Any) -> "Experiment":
        base = cls(quick=True, seeds=1, iterations=2, budget=3, committee_size=2, initial_systems=4,
                   seed_systems_id=2, seed_systems_ood=1, temperatures=(900.0,), md_steps=40, stride=5,
                   epochs=6) if quick else cls()
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


# ---------------------------------------------------------------------------- data
def catalysis_settings():
    from ltau_ase.datasets import CatalysisSettings

    # small slabs (13-14 atoms); out of domain = held-out adsorbates on the same metals (no new element)
    return CatalysisSettings(metals_in_domain=("Cu", "Pd", "Pt"), metals_out_of_domain=(),
                             adsorbates_in_domain=("H", "O", "N", "C", "OH", "CH", "NH"),
                             adsorbates_out_of_domain=("CO", "NO"), slab_sizes=((2, 2, 3),))


def make_data(exp: Experiment, seed: int, out: Path) -> dict[str, Any]:
    """Initial train / val / calibration / test files and exploration seeds for one seed (kept in
    ``out``; a rerun with the same sizes reuses them)."""
    from ase.data import atomic_numbers
    from ase.io import write

    from ltau_ase.datasets import generate_catalysis_dataset
    from ltau_ase.datasets.catalysis import DatasetSize

    meta = out / "data.json"
    sizes = {"initial_systems": exp.initial_systems, "seed_systems_id": exp.seed_systems_id,
             "seed_systems_ood": exp.seed_systems_ood, "seed": seed}
    if meta.exists():
        cached = json.loads(meta.read_text())
        if cached["sizes"] == sizes and all(Path(f).exists() for f in cached["data"]["files"].values()):
            return cached["data"]
    settings = catalysis_settings()
    size = DatasetSize(train=exp.initial_systems, val=2, calibration=4, test_id=6, test_ood=6, is2rs_id=0,
                       is2rs_ood=0, relax_frames=2, rattle_frames=1, md_frames=1)
    data = generate_catalysis_dataset(seed=seed, size=size, settings=settings)
    seed_size = DatasetSize(train=exp.seed_systems_id, val=0, calibration=0, test_id=0,
                            test_ood=exp.seed_systems_ood, is2rs_id=0, is2rs_ood=0, relax_frames=1,
                            rattle_frames=0, md_frames=0)
    seeds = generate_catalysis_dataset(seed=10_000 + seed, size=seed_size, settings=settings)
    seed_frames = []
    for frame in seeds.s2ef["train"] + seeds.s2ef["test_ood"]:
        frame.info["name"] = frame.info["system"]
        seed_frames.append(frame)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in ("train", "val", "calibration", "test_id", "test_ood"):
        files[split] = out / f"{split}.extxyz"
        write(files[split], data.s2ef[split], format="extxyz")
    files["seeds"] = out / "seeds.extxyz"
    write(files["seeds"], seed_frames, format="extxyz")
    symbols = {s for frames in list(data.s2ef.values()) + [seed_frames] for f in frames
               for s in f.get_chemical_symbols()}
    result = {"files": {k: str(v) for k, v in files.items()},
              "type_names": sorted(symbols, key=lambda s: atomic_numbers[s]),
              "n_frames": {k: len(v) for k, v in data.s2ef.items()}, "n_seeds": len(seed_frames)}
    meta.write_text(json.dumps({"sizes": sizes, "data": result}))
    return result


def campaign_settings(exp: Experiment, method: str, seed: int, type_names: Sequence[str]):
    from ltau_ase.learn import CampaignSettings, ExploreSettings, TrainingSettings

    return CampaignSettings(
        type_names=tuple(type_names), selection=method, n_iterations=exp.iterations, budget=exp.budget,
        explore=ExploreSettings(kinds=("md",), temperatures=tuple(exp.temperatures), md_steps=exp.md_steps,
                                replicas=exp.replicas, stride=exp.stride, patience=1,
                                # LTAU uncertainties lie in [0, 1] and the max over atoms of a young
                                # model saturates at 1: watch the mean; DP-GEN watches the max deviation
                                atom_reduce="max" if method == "committee" else "mean"),
        training=TrainingSettings(epochs=exp.epochs, parallel=exp.train_parallel), warm_start=exp.warm_start,
        threshold_quantile=exp.threshold_quantile, committee_size=exp.committee_size, seed=seed,
        max_reference_force=exp.max_reference_force)


def run_campaign(exp: Experiment, method: str, seed: int, data: dict, workdir: str,
                 n_iterations: int | None = None) -> dict[str, Any]:
    """One campaign in its own process (one torch / FAISS thread); returns its history and timing."""
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    from ltau_ase.learn import CalculatorFactory, Campaign

    files = data["files"]
    t0 = time.perf_counter()
    campaign = Campaign(workdir, campaign_settings(exp, method, seed, data["type_names"]), train=files["train"],
                        val=files["val"], calibration=files["calibration"], seeds=files["seeds"],
                        reference=CalculatorFactory("ase.calculators.emt:EMT"),
                        test_sets={"in_domain": files["test_id"], "out_of_domain": files["test_ood"]},
                        progress=False)
    history = campaign.run(n_iterations)
    return {"method": method, "seed": seed, "history": history, "wall_s": time.perf_counter() - t0}


def share_initial_model(src: Path, method: str, dst: Path) -> None:
    """Start ``random`` / ``committee`` from the ltau campaign's initial model (same data, settings, seed)."""
    if (dst / "iter_000").exists():
        return
    (dst / "iter_000").mkdir(parents=True)
    if method == "random":  # same model, estimator and calibration; metrics are recomputed
        for item in (src / "iter_000").iterdir():
            if item.name != "metrics.json":
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, dst / "iter_000" / item.name)
    else:  # the committee's member 1 is the same model; members 2..M are trained
        shutil.copytree(src / "iter_000" / "models" / "member1", dst / "iter_000" / "models" / "member1")


# ---------------------------------------------------------------------------- analysis
def labels_to_reach(labels: Sequence[float], mae: Sequence[float], target: float) -> float | None:
    """Labels at which a curve first reaches ``mae <= target`` (linear interpolation between
    iterations); None when it never does."""
    for j, (x, y) in enumerate(zip(labels, mae)):
        if y <= target:
            if j == 0:
                return float(x)
            x0, y0 = labels[j - 1], mae[j - 1]
            return float(x0 + (x - x0) * (y0 - target) / (y0 - y)) if y0 != y else float(x)
    return None


def _mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    v = np.array([x for x in values if x is not None], dtype=float)
    return {"mean": float(v.mean()) if v.size else None, "std": float(v.std(ddof=1)) if v.size > 1 else None,
            "n": int(v.size), "n_missing": int(sum(x is None for x in values)), "values": list(values)}


def _mean_curve(curves: Sequence[tuple[Sequence[float], Sequence[float]]]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, MAE) averaged over seeds, iteration by iteration."""
    labels = np.mean([np.asarray(c[0], dtype=float) for c in curves], axis=0)
    return labels, np.mean([np.asarray(c[1], dtype=float) for c in curves], axis=0)


def label_ratio(method: tuple[Sequence[float], Sequence[float]],
                baseline: tuple[Sequence[float], Sequence[float]], point: int = -1) -> float:
    """Labels ``method`` needs to reach the baseline's MAE at ``point`` (default: its final one), over
    the baseline's labels there.

    ``nan`` when the baseline did not improve on its first point (reaching its MAE is then met at 0
    labels and says nothing); ``inf`` when ``method`` never reaches it within its own curve.
    """
    (lm, mm), (lb, mb) = method, baseline
    if not mb[point] < mb[0] or lb[point] <= 0:
        return float("nan")
    need = labels_to_reach(list(lm), list(mm), float(mb[point]))
    return float("inf") if need is None else need / float(lb[point])


def bootstrap_ratio(method: Sequence[tuple], baseline: Sequence[tuple], n_boot: int = 2000,
                    seed: int = 0, point: int = -1) -> dict[str, Any]:
    """:func:`label_ratio` of the seed-averaged curves, with a percentile bootstrap over seeds.

    ``method`` and ``baseline`` hold one (labels, MAE) curve per seed, paired by seed; each bootstrap
    sample resamples seeds with replacement (the same seeds for both). Returns the ratio of the mean
    curves (``estimate``), the 2.5 / 97.5 % bootstrap quantiles (``ci95``; ``inf`` = not reached within
    the curve), the fraction of samples where the method never reaches the baseline (``p_not_reached``)
    and where the baseline did not improve (``p_undefined``), and ``samples`` for further quantiles.
    """
    n = len(method)
    if n != len(baseline) or n == 0:
        raise ValueError(f"need the same positive number of seeds for both curves, got {n} and {len(baseline)}")
    rng = np.random.default_rng(seed)
    ratios = np.empty(n_boot)
    for b in range(n_boot):
        pick = rng.integers(0, n, size=n)
        ratios[b] = label_ratio(_mean_curve([method[j] for j in pick]), _mean_curve([baseline[j] for j in pick]),
                                point)
    defined = np.sort(ratios[~np.isnan(ratios)])
    ci = ([float(defined[int(np.floor(0.025 * (defined.size - 1)))]), float(defined[int(np.ceil(0.975 * (defined.size - 1)))])]
          if defined.size else [None, None])
    return {"estimate": label_ratio(_mean_curve(method), _mean_curve(baseline), point), "ci95": ci,
            "p_not_reached": float(np.isinf(ratios).mean()), "p_undefined": float(np.isnan(ratios).mean()),
            "samples": ratios}


def bootstrap_mean(values: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Mean ± std (ddof 1) of paired per-seed values with a 95 % percentile bootstrap CI of the mean."""
    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = np.sort(v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1))
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else None, "n": int(v.size),
            "ci95": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
            "n_negative": int((v < 0).sum()), "values": v.tolist()}


def _ratio_json(x: float | None) -> float | str | None:
    """A label ratio for JSON: the number, ``"not_reached"`` (inf) or ``"undefined"`` (nan)."""
    if x is None:
        return None
    return "not_reached" if np.isinf(x) else "undefined" if np.isnan(x) else float(x)


def analyse(runs: dict[str, dict[int, dict]], exp: Experiment, n_boot: int = 2000) -> dict[str, Any]:
    """Curves per method and seed (:func:`seed_curves`), and the goal numbers (:func:`summarise`)."""
    curves = seed_curves(runs)
    return {"curves": curves, **summarise(curves, exp, n_boot)}


def seed_curves(runs: dict[str, dict[int, dict]]) -> dict[str, dict[str, dict]]:
    """``{method: {str(seed): curve}}`` from the campaigns' histories: labels, in/out-of-domain test
    force MAE (eV/Å) after every iteration, exploration and training cost, selection statistics."""
    curves: dict[str, dict] = {}
    for method, by_seed in runs.items():
        curves[method] = {}
        for seed, run in sorted(by_seed.items()):
            h = run["history"]
            curves[method][str(seed)] = {
                "labels": [x["labels_used"] for x in h],
                **{f"mae_{d}": [x["evaluation"][d]["force_mae"] for x in h] for d in DOMAINS},
                **{f"mae_{d}_above_cap": [x["evaluation"][d].get("force_mae_above_cap") for x in h] for d in DOMAINS},
                **{f"n_test_frames_{d}_above_cap": h[-1]["evaluation"][d].get("n_frames_above_cap", 0)
                   for d in DOMAINS},
                "exploration_model_steps": sum(x.get("exploration", {}).get("model_steps", 0) for x in h),
                "exploration_wall_s": sum(x.get("exploration", {}).get("wall_time_s", 0.0) for x in h),
                "training_wall_s": sum(x["timings_s"].get("training", 0.0) for x in h),
                "campaign_wall_s": run["wall_s"],
                "n_candidates": [x.get("selection_stats", {}).get("n_candidates") for x in h],
                "n_flagged": [x.get("exploration", {}).get("n_flagged") for x in h],
                "n_triggered": [x.get("exploration", {}).get("n_triggered") for x in h],
                "n_rejected": [x.get("labelling", {}).get("n_rejected", 0) for x in h],
                "spearman_selected": [x.get("selected_uq_vs_error", {}).get("spearman_statistic_vs_max_error")
                                      for x in h],
            }
    return curves


def summarise(curves: dict[str, dict[str, dict]], exp: Experiment, n_boot: int = 2000) -> dict[str, Any]:
    """The goal numbers over the seeds every method finished: ``{"goals": ..., "seeds": [...]}``
    (``n_boot`` bootstrap samples for every interval).

    Label savings: :func:`label_ratio` per seed and of the seed-averaged curves with a bootstrap over
    seeds (:func:`bootstrap_ratio`); saving vs random = 1 − ratio (goal ≥ 0.30), labels vs the
    committee = ratio (goal ≤ 1.10). Paired final-MAE differences per seed with a bootstrap CI.
    """
    goals: dict[str, Any] = {}
    seeds = sorted(set.intersection(*(set(curves[m]) for m in METHODS)), key=int)
    for domain in DOMAINS + ("mean_of_domains",):
        def curve(method, seed):
            c = curves[method][seed]
            if domain == "mean_of_domains":
                return c["labels"], [(a + b) / 2 for a, b in zip(c["mae_in_domain"], c["mae_out_of_domain"])]
            return c["labels"], c[f"mae_{domain}"]

        per_seed = {m: [curve(m, s) for s in seeds] for m in METHODS}
        out: dict[str, Any] = {}
        for base in ("random", "committee"):
            ratios = [label_ratio(a, b) for a, b in zip(per_seed["ltau"], per_seed[base])]
            boot = bootstrap_ratio(per_seed["ltau"], per_seed[base], n_boot)
            samples = boot.pop("samples")
            if base == "random":
                boot["p_goal_met"] = float((1.0 - samples[~np.isnan(samples)] >= 0.30).mean()) \
                    if (~np.isnan(samples)).any() else None
            else:
                boot["p_goal_met"] = float((samples[~np.isnan(samples)] <= 1.10).mean()) \
                    if (~np.isnan(samples)).any() else None
            boot["estimate"] = _ratio_json(boot["estimate"])
            boot["ci95"] = [_ratio_json(x) for x in boot["ci95"]]
            out[f"labels_ratio_vs_{base}"] = {
                "per_seed": [_ratio_json(x) for x in ratios], "n_seeds_undefined": int(np.isnan(ratios).sum()),
                "n_seeds_not_reached": int(np.isinf(ratios).sum()), "mean_curves": boot}
            # secondary (not a goal): the same ratio at every earlier point of the baseline's curve
            by_point = []
            for k in range(1, len(per_seed[base][0][0]) - 1):
                b = bootstrap_ratio(per_seed["ltau"], per_seed[base], n_boot, point=k)
                by_point.append({"baseline_labels": float(np.mean([c[0][k] for c in per_seed[base]])),
                                 "estimate": _ratio_json(b["estimate"]), "ci95": [_ratio_json(x) for x in b["ci95"]],
                                 "p_not_reached": b["p_not_reached"], "p_undefined": b["p_undefined"]})
            out[f"labels_ratio_vs_{base}"]["at_earlier_points"] = by_point
            out[f"final_mae_ltau_minus_{base}"] = bootstrap_mean([a[1][-1] - b[1][-1] for a, b in
                                                                   zip(per_seed["ltau"], per_seed[base])], n_boot)
            out[f"seeds_where_{base}_did_not_improve"] = int(sum(b[1][-1] >= b[1][0] for b in per_seed[base]))
        out["final_mae"] = {m: bootstrap_mean([c[1][-1] for c in per_seed[m]], n_boot) for m in METHODS}
        out["initial_mae"] = bootstrap_mean([c[1][0] for c in per_seed["ltau"]], n_boot)
        goals[domain] = out
    cost = [curves["ltau"][s]["exploration_model_steps"] / curves["committee"][s]["exploration_model_steps"]
            for s in seeds if curves["committee"][s]["exploration_model_steps"]]
    wall = [curves["ltau"][s]["exploration_wall_s"] / curves["committee"][s]["exploration_wall_s"]
            for s in seeds if curves["committee"][s]["exploration_wall_s"]]
    goals["exploration_cost_ratio_ltau_over_committee"] = {"model_steps": _mean_std(cost), "wall": _mean_std(wall),
                                                          "target": 1.0 / exp.committee_size}
    return {"goals": goals, "seeds": seeds}


# Experiment fields that may differ between pooled runs: which seeds ran, and how many campaigns ran
# side by side (each campaign is its own process, so that does not change a result).
POOL_FREE_FIELDS = ("seeds", "first_seed", "jobs")


def pool_results(parts: Sequence[dict[str, Any]], sources: Sequence[str] | None = None,
                 n_boot: int = 2000) -> dict[str, Any]:
    """Combine the curves of independent runs (``results.json`` dicts, or ``seeds/seed<N>.json``)
    into one analysis over all their seeds, as if they had run together.

    Every part must have the same :class:`Experiment` apart from :data:`POOL_FREE_FIELDS` (an older
    ``results.json`` without ``first_seed`` counts as 0); a seed in two parts is an error (it would
    be counted twice), as is a seed some method lacks. Returns the :func:`analyse` layout with
    ``experiment`` (``seeds`` = the pooled count), ``data`` and ``pooled_from`` (each part's seeds
    and run record).
    """
    if not parts:
        raise ValueError("nothing to pool: give at least one results file")
    sources = list(sources) if sources is not None else [f"part {i}" for i in range(len(parts))]
    if len(sources) != len(parts):
        raise ValueError(f"{len(parts)} parts but {len(sources)} source names")
    known = {f.name for f in fields(Experiment)}

    def settings(part: dict, source: str) -> dict[str, Any]:
        if not isinstance(part, dict) or not {"experiment", "curves"} <= set(part):
            raise ValueError(f"{source}: not an active-learning results file (needs 'experiment' and 'curves')")
        exp = {"first_seed": 0, **part["experiment"]}
        unknown = set(exp) - known
        if unknown:
            raise ValueError(f"{source}: unknown experiment fields {sorted(unknown)}; expected {sorted(known)}")
        return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in exp.items()
                if k not in POOL_FREE_FIELDS}

    first = settings(parts[0], sources[0])
    curves: dict[str, dict[str, dict]] = {m: {} for m in METHODS}
    owner: dict[str, str] = {}
    data: dict[str, Any] = {}
    for part, source in zip(parts, sources):
        same = settings(part, source)
        if same != first:
            diff = sorted(k for k in set(first) | set(same) if first.get(k) != same.get(k))
            raise ValueError(f"{source}: experiment differs from {sources[0]}'s in {diff}; only runs with the "
                             f"same settings (apart from {list(POOL_FREE_FIELDS)}) can be pooled")
        part_seeds = set.union(*(set(part["curves"].get(m, {})) for m in METHODS))
        for seed in sorted(part_seeds, key=int):
            if any(seed not in part["curves"].get(m, {}) for m in METHODS):
                raise ValueError(f"{source}: seed {seed} lacks the curve of some method; every method must have it")
            if seed in owner:
                raise ValueError(f"seed {seed} is in both {owner[seed]} and {source}: pooled seeds must be "
                                 "independent (run new ones with --first-seed)")
            owner[seed] = source
            for m in METHODS:
                curves[m][seed] = part["curves"][m][seed]
            if seed in part.get("data", {}):
                data[seed] = part["data"][seed]
    if not owner:
        raise ValueError("the parts hold no finished seed")
    exp = Experiment(**{**{k: (tuple(v) if isinstance(v, list) else v) for k, v in first.items()},
                        "seeds": len(owner), "first_seed": 0})
    curves = {m: dict(sorted(c.items(), key=lambda kv: int(kv[0]))) for m, c in curves.items()}
    out = {"curves": curves, **summarise(curves, exp, n_boot)}
    out["experiment"] = {k: v for k, v in asdict(exp).items() if k not in ("first_seed", "jobs")}
    out["data"] = data
    out["pooled_from"] = [{"source": src, "seeds": sorted((s for s, o in owner.items() if o == src), key=int),
                           "run": part.get("run")} for part, src in zip(parts, sources)]
    return out


def read_results(path: Path) -> dict[str, Any]:
    """A ``results.json`` (or the directory holding one) for :func:`pool_results`; ValueError when it
    is missing or not JSON."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such results file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None


def _write_json(results: dict, path: Path) -> None:
    """Write atomically (a reader never sees half a file; an interrupted run keeps the previous one)."""
    from ltau_ase.core.jsonable import to_jsonable

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(results), indent=2))
    os.replace(tmp, path)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    colours = {"ltau": "C0", "random": "C1", "committee": "C2"}
    for ax, domain in zip(axes, DOMAINS):
        for method, by_seed in results["curves"].items():
            labels = np.array([c["labels"] for c in by_seed.values()], dtype=float)
            mae = np.array([c[f"mae_{domain}"] for c in by_seed.values()], dtype=float)
            x, y = labels.mean(axis=0), mae.mean(axis=0)
            ax.plot(x, y, "o-", color=colours[method], label=method)
            if mae.shape[0] > 1:
                s = mae.std(axis=0, ddof=1)
                ax.fill_between(x, y - s, y + s, color=colours[method], alpha=0.2)
        ax.set_xlabel("labels used (EMT calculations)")
        ax.set_ylabel("test force MAE (eV/Å)")
        ax.set_title(domain.replace("_", " "))
        ax.legend()
    fig.suptitle(f"active learning, mean ± std over {len(results['seeds'])} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- main
def run_experiment(exp: Experiment, output: Path) -> dict[str, Any]:
    """Every campaign of seeds ``first_seed ... first_seed + seeds - 1``; ``results.json`` and the
    figure are rewritten after every finished seed (all three methods), and each finished seed also
    gets its own ``seeds/seed<N>.json`` (the same layout, that seed alone), so a run cut short still
    leaves the analysis of the seeds it finished."""
    t_start = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    root = output / "campaigns"
    seed_ids = range(exp.first_seed, exp.first_seed + exp.seeds)
    data: dict[int, dict] = {}

    def seed_data(seed: int) -> dict:
        if seed not in data:
            data[seed] = make_data(exp, seed, output / "data" / f"seed{seed}")
        return data[seed]
    runs: dict[str, dict[int, dict]] = {m: {} for m in METHODS}
    results: dict[str, Any] = {}

    def analysed(done: Sequence[int]) -> dict[str, Any]:
        res = analyse({m: {s: runs[m][s] for s in done} for m in METHODS}, exp)
        res["experiment"] = asdict(exp)
        res["data"] = {str(s): {k: v for k, v in data[s].items() if k != "files"} for s in done}
        res["run"] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
                      "total_s": time.perf_counter() - t_start, "seeds_finished": len(done)}
        return res

    def write_results(seed: int) -> None:
        nonlocal results
        if not all(seed in runs[m] for m in METHODS):
            return
        _write_json(analysed([seed]), output / "seeds" / f"seed{seed}.json")
        results = analysed([s for s in seed_ids if all(s in runs[m] for m in METHODS)])
        _write_json(results, output / "results.json")
        plot(results, output / "active_learning.png")

    def record(r: dict) -> None:
        runs[r["method"]][r["seed"]] = r
        print(f"finished {r['method']} seed {r['seed']} in {r['wall_s']:.0f} s", flush=True)
        write_results(r["seed"])

    ctx = __import__("multiprocessing").get_context("spawn")
    with ProcessPoolExecutor(max_workers=exp.jobs, mp_context=ctx) as pool:
        if exp.jobs == 1:  # seed by seed: every finished seed is a complete comparison
            for s in seed_ids:
                pool.submit(run_campaign, exp, "ltau", s, seed_data(s), str(root / f"ltau_seed{s}"), 0).result()
                for method in ("random", "committee"):
                    share_initial_model(root / f"ltau_seed{s}", method, root / f"{method}_seed{s}")
                for m in METHODS:
                    record(pool.submit(run_campaign, exp, m, s, data[s], str(root / f"{m}_seed{s}")).result())
        else:
            # phase 1: the shared initial models
            futs = [pool.submit(run_campaign, exp, "ltau", s, seed_data(s), str(root / f"ltau_seed{s}"), 0)
                    for s in seed_ids]
            for f in as_completed(futs):
                f.result()
            for s in seed_ids:
                for method in ("random", "committee"):
                    share_initial_model(root / f"ltau_seed{s}", method, root / f"{method}_seed{s}")
            # phase 2: every campaign to the end (committees first: they take longest)
            order = [(m, s) for m in ("committee", "ltau", "random") for s in seed_ids]
            futs = {pool.submit(run_campaign, exp, m, s, data[s], str(root / f"{m}_seed{s}")): (m, s)
                    for m, s in order}
            for f in as_completed(futs):
                record(f.result())
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="output directory")
    parser.add_argument("--pool", type=Path, nargs="+", default=None, metavar="RESULTS",
                        help="run nothing: pool the seeds of these results.json files (or directories holding "
                             "one, or seeds/seed<N>.json files) into OUTPUT/results.json and its figure")
    parser.add_argument("--quick", action="store_true", help="one seed, two small iterations (< 5 min)")
    parser.add_argument("--seeds", type=int, default=None, help="independent repetitions (default 8)")
    parser.add_argument("--first-seed", type=int, default=None,
                        help="first seed (default 0): seeds first-seed ... first-seed + seeds - 1, so a later run "
                             "adds seeds that never repeat an earlier run's")
    parser.add_argument("--iterations", type=int, default=None, help="label-and-retrain iterations (default 4)")
    parser.add_argument("--budget", type=int, default=None, help="labels per iteration (default 6)")
    parser.add_argument("--committee-size", type=int, default=None, help="committee models M (default 3)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs per model (default 15)")
    parser.add_argument("--md-steps", type=int, default=None, help="maximum MD steps per trajectory (default 60)")
    parser.add_argument("--jobs", type=int, default=None, help="campaigns run side by side (default 1: seed by seed)")
    parser.add_argument("--quantile", type=float, default=None,
                        help="stop threshold quantile of the calibration frames (default 0.5)")
    parser.add_argument("--max-reference-force", type=float, default=None,
                        help="reference trust cap, eV/Å (default 20; 0: no cap)")
    parser.add_argument("--train-parallel", type=int, default=None,
                        help="committee members trained side by side within a campaign (default 1)")
    args = parser.parse_args(argv)
    if args.pool is not None:
        given = [k for k, v in vars(args).items() if k not in ("output", "pool") and v not in (None, False)]
        if given:
            parser.error(f"--pool takes only --output (the settings come from the pooled runs); got {given}")
        try:
            results = pool_results([read_results(p) for p in args.pool], [str(p) for p in args.pool])
        except ValueError as e:
            parser.error(str(e))
        args.output.mkdir(parents=True, exist_ok=True)
        _write_json(results, args.output / "results.json")
        plot(results, args.output / "active_learning.png")
        print_summary(results)
        print(f"pooled {len(results['seeds'])} seeds into {args.output / 'results.json'}")
        return 0
    exp = Experiment.preset(args.quick, seeds=args.seeds, first_seed=args.first_seed, iterations=args.iterations,
                            budget=args.budget,
                            committee_size=args.committee_size, epochs=args.epochs, jobs=args.jobs,
                            md_steps=args.md_steps, train_parallel=args.train_parallel,
                            threshold_quantile=args.quantile)
    if args.max_reference_force is not None:
        exp = replace(exp, max_reference_force=args.max_reference_force or None)
    if exp.budget < 1:
        raise SystemExit("--budget must be >= 1")
    if exp.first_seed < 0 or exp.seeds < 1:
        raise SystemExit("--first-seed must be >= 0 and --seeds >= 1")
    results = run_experiment(exp, args.output)
    print_summary(results)
    print(f"wrote {args.output / 'results.json'} in {results['run']['total_s']:.0f} s")
    return 0


def print_summary(results: dict[str, Any]) -> None:
    """The goal numbers, one line each: final MAE per method, label ratios with their bootstrap CIs."""
    g = results["goals"]
    print(f"{len(results['seeds'])} seeds")
    for domain in DOMAINS + ("mean_of_domains",):
        finals = ", ".join(f"{m} {f['mean']:.3f} ± {f['std'] or 0:.3f}" for m, f in g[domain]["final_mae"].items())
        print(f"{domain}: final MAE (eV/Å) {finals}")
        r, c = g[domain]["labels_ratio_vs_random"]["mean_curves"], g[domain]["labels_ratio_vs_committee"]["mean_curves"]
        print(f"{domain}: LTAU labels / random's {r['estimate']} (95 % CI {r['ci95']}, P(<= 0.7) {r['p_goal_met']}), "
              f"/ committee's {c['estimate']} (95 % CI {c['ci95']}, P(<= 1.1) {c['p_goal_met']})")
    print(f"exploration cost ltau/committee: {g['exploration_cost_ratio_ltau_over_committee']['model_steps']['mean']}")


if __name__ == "__main__":
    sys.exit(main())
