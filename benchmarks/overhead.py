"""Step-time overhead of LTAU uncertainties in ASE (issue 3 §7, paper Table A2 style).

For each model (a tiny NequIP model and a paper-size one: 4 layers, 32 features, l_max 2) and each
index (flat over 13.5 k training atoms, HNSW over 400 k), one process times, interleaved and on the
same perturbed structures:

* a bare ``NequIPCalculator`` step (energy + forces), and
* an ``LTAUCalculator(LatentNequIPCalculator)`` step (energy + forces + per-atom uncertainties),

and splits the LTAU step into graph (neighbour list) construction, model forward pass (including the
autograd forces) and UQ (kNN search + averaging of the neighbours' error distributions), each as a
median over the repeats and as % of the median LTAU step time. Target: UQ ≤ 2 % of the step for the
paper-size model with HNSW and k = 10.

What is synthetic (timing only; say so when quoting the numbers):
* model weights are random (``NequIPGNNModel`` with a fixed seed): the cost of a forward pass does
  not depend on the weights;
* the training set's descriptors are "latent-like": the model's own descriptors of rattled copies of
  the benchmark structure, resampled with Gaussian noise of the per-feature spread to N atoms;
* the error logs are log-normal random numbers (E epochs × N atoms).

Usage: ``python benchmarks/overhead.py [--quick] [--output benchmark_output/overhead.json]``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

TYPE_NAMES = ["Cu", "Pt", "O", "H"]
MODELS = {
    "tiny": dict(num_layers=2, num_features=8, l_max=1),
    "paper": dict(num_layers=4, num_features=32, l_max=2),
}
R_MAX = 5.0


def build_model(num_layers: int, num_features: int, l_max: int, seed: int = 0):
    """A NequIP model with random weights (float32), in eval mode."""
    from nequip.model import NequIPGNNModel

    model = NequIPGNNModel(
        seed=seed, model_dtype="float32", type_names=TYPE_NAMES, r_max=R_MAX, l_max=l_max, parity=True,
        num_layers=num_layers, num_features=num_features, radial_mlp_depth=2, radial_mlp_width=64,
        avg_num_neighbors=20.0,
        per_type_energy_shifts={t: 0.0 for t in TYPE_NAMES}, per_type_energy_scales={t: 1.0 for t in TYPE_NAMES},
    )
    return model.eval()


def benchmark_structure():
    """An OC20-like slab: Cu(111) 4×4×5 with four Pt substitutions and an O adsorbate (81 atoms)."""
    from ase.build import add_adsorbate, fcc111

    slab = fcc111("Cu", size=(4, 4, 5), vacuum=7.0)
    symbols = slab.get_chemical_symbols()
    for i in (3, 21, 42, 77):
        symbols[i] = "Pt"
    slab.set_chemical_symbols(symbols)
    add_adsorbate(slab, "O", 1.5, "fcc")
    return slab


def transforms_for(model):
    from nequip.integrations.utils import basic_transforms

    return basic_transforms(model.metadata, R_MAX, TYPE_NAMES, {t: t for t in TYPE_NAMES})


def synthetic_training_set(calc, atoms, n_atoms: int, n_epochs: int, seed: int):
    """Latent-like descriptors (n_atoms, D) float32, log-normal errors (E, n_atoms), atomic numbers."""
    rng = np.random.default_rng(seed)
    feats, numbers = [], []
    for i in range(8):
        a = atoms.copy()
        a.rattle(0.1, seed=seed + i)
        a.calc = calc
        a.get_forces()
        feats.append(calc.results["descriptors"])
        numbers.append(a.numbers)
    feats, numbers = np.concatenate(feats), np.concatenate(numbers)
    pick = rng.integers(0, len(feats), n_atoms)
    spread = feats.std(axis=0, keepdims=True) + 1e-3
    desc = (feats[pick] + 0.5 * spread * rng.standard_normal((n_atoms, feats.shape[1]))).astype(np.float32)
    errors = rng.lognormal(mean=np.log(0.05), sigma=0.8, size=(n_epochs, n_atoms)).astype(np.float32)
    return desc, errors, numbers[pick]


@dataclass
class _Timer:
    """Accumulates the time of wrapped calls during one step."""

    seconds: float = 0.0

    def wrap(self, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed


def time_config(model, atoms, estimator, repeats: int, warmup: int, seed: int) -> dict[str, Any]:
    """Interleaved bare vs LTAU steps on identical perturbed structures; medians in ms."""
    from nequip.integrations.ase import NequIPCalculator

    from ltau_ase.nequip.calculator import LatentNequIPCalculator
    from ltau_ase.simulate.calculator import LTAUCalculator

    bare = NequIPCalculator(model, "cpu", transforms=transforms_for(model))
    latent = LatentNequIPCalculator(model, "cpu", transforms=transforms_for(model))
    ltau = LTAUCalculator(latent, estimator)
    timers = {name: {"graph": _Timer(), "forward": _Timer()} for name in ("bare", "ltau")}
    uq_timer = _Timer()
    # instance-level wrappers (nequip's classes are untouched): graph = from_ase + type mapping +
    # neighbour list, forward = model call incl. autograd forces, UQ = estimator.predict
    for name, calc in (("bare", bare), ("ltau", latent)):
        calc.atoms_to_data = timers[name]["graph"].wrap(calc.atoms_to_data)
        calc.call_model = timers[name]["forward"].wrap(calc.call_model)
    estimator.predict = uq_timer.wrap(estimator.predict)

    rows: dict[str, list[dict[str, float]]] = {"bare": [], "ltau": []}
    for r in range(warmup + repeats):
        a0 = atoms.copy()
        a0.rattle(0.05, seed=seed + r)
        order = (("bare", bare), ("ltau", ltau)) if r % 2 == 0 else (("ltau", ltau), ("bare", bare))
        for name, calc in order:
            a = a0.copy()
            a.calc = calc
            for t in (*timers[name].values(), uq_timer):
                t.seconds = 0.0
            t0 = time.perf_counter()
            a.get_potential_energy()
            a.get_forces()
            if name == "ltau":
                a.calc.get_property("uncertainties", a)
            step = time.perf_counter() - t0
            if r >= warmup:
                rows[name].append({
                    "step": step, "graph": timers[name]["graph"].seconds, "forward": timers[name]["forward"].seconds,
                    "uq": uq_timer.seconds if name == "ltau" else 0.0,
                })
    med = {name: {k: 1e3 * float(np.median([row[k] for row in rs])) for k in rs[0]} for name, rs in rows.items()}
    ltau_ms = med["ltau"]
    result = {
        "bare_step_ms": med["bare"]["step"],
        "ltau_step_ms": ltau_ms["step"],
        "overhead_ratio": ltau_ms["step"] / med["bare"]["step"],
        # per-repeat pairs share the machine load of that moment: the robust ratio on a busy machine
        "overhead_ratio_paired": float(np.median([lt["step"] / b["step"] for lt, b in zip(rows["ltau"], rows["bare"])])),
        "graph_ms": ltau_ms["graph"], "forward_ms": ltau_ms["forward"], "uq_ms": ltau_ms["uq"],
        "bare_graph_ms": med["bare"]["graph"], "bare_forward_ms": med["bare"]["forward"],
    }
    # shares of each LTAU step, then the median over steps (robust to load changes between steps)
    for part in ("graph", "forward", "uq"):
        result[f"{part}_pct"] = 100.0 * float(np.median([row[part] / row["step"] for row in rows["ltau"]]))
    result["other_pct"] = 100.0 * float(np.median(
        [1.0 - (row["graph"] + row["forward"] + row["uq"]) / row["step"] for row in rows["ltau"]]))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller HNSW set (50 k atoms) and fewer repeats")
    parser.add_argument("--output", default="benchmark_output/overhead.json", help="JSON results file")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per calculator (default 30, quick 8)")
    parser.add_argument("--epochs", type=int, default=20, help="synthetic error-log epochs (default 20)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and FAISS threads (default 1: on a shared machine, idle-spinning OpenMP "
                             "threads make multi-threaded timings meaningless)")
    args = parser.parse_args(argv)

    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    from nequip.utils.global_state import set_global_state

    from ltau_ase.core.estimator import LTAUEstimator
    from ltau_ase.nequip.calculator import LatentNequIPCalculator

    set_global_state()
    repeats = args.repeats or (8 if args.quick else 30)
    warmup = 2 if args.quick else 3
    indexes = {"flat": 13_500, "hnsw": 50_000 if args.quick else 400_000}
    atoms = benchmark_structure()

    results = []
    for model_name, hp in MODELS.items():
        model = build_model(**hp)
        probe = LatentNequIPCalculator(model, "cpu", transforms=transforms_for(model))
        for index, n_train in indexes.items():
            t0 = time.perf_counter()
            desc, errors, numbers = synthetic_training_set(probe, atoms, n_train, args.epochs, seed=1)
            estimator = LTAUEstimator(k=args.k, index=index).fit(desc, errors, atomic_numbers=numbers)
            fit_s = time.perf_counter() - t0
            print(f"[{model_name}/{index}] fitted on {n_train} atoms x {probe.descriptor_dim} features in {fit_s:.1f} s",
                  file=sys.stderr, flush=True)
            res = time_config(model, atoms, estimator, repeats, warmup, seed=100)
            res.update(model=model_name, index=index, n_train_atoms=n_train, k=args.k, n_atoms=len(atoms),
                       descriptor_dim=probe.descriptor_dim, fit_seconds=fit_s, **hp)
            results.append(res)

    header = (f"{'model':6} {'index':5} {'N_train':>8} {'bare ms':>8} {'LTAU ms':>8} {'ratio':>6} {'paired':>6} "
              f"{'graph %':>8} {'forward %':>9} {'UQ %':>6} {'other %':>7} {'UQ ms':>6}")
    print(f"\nStep time, {len(atoms)}-atom slab, k={args.k}, CPU ({args.threads} torch/FAISS threads), "
          f"median of {repeats} interleaved steps; ratio = LTAU/bare medians, paired = median of per-repeat ratios; "
          "graph/forward/UQ/other = % of the LTAU step")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['model']:6} {r['index']:5} {r['n_train_atoms']:>8} {r['bare_step_ms']:>8.1f} {r['ltau_step_ms']:>8.1f} "
              f"{r['overhead_ratio']:>6.3f} {r['overhead_ratio_paired']:>6.3f} {r['graph_pct']:>8.1f} {r['forward_pct']:>9.1f} {r['uq_pct']:>6.2f} {r['other_pct']:>7.1f} {r['uq_ms']:>6.2f}")
    target = next(r for r in results if r["model"] == "paper" and r["index"] == "hnsw")
    verdict = "met" if target["uq_pct"] <= 2.0 else "NOT met"
    print(f"\nTarget UQ <= 2 % of step time (paper-size model, HNSW, k={args.k}): {target['uq_pct']:.2f} % -> {verdict}")

    payload = {
        "benchmark": "ltau_step_overhead",
        "synthetic": "random model weights; latent-like synthetic training descriptors; log-normal synthetic error logs",
        "quick": args.quick, "repeats": repeats, "warmup": warmup, "k": args.k, "epochs": args.epochs,
        "threads": args.threads, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "target_uq_pct": 2.0, "target_met": target["uq_pct"] <= 2.0, "results": results,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
