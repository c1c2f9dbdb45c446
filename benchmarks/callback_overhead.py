"""Epoch-time overhead of LTAUErrorLogger (free mode) during nequip training (issue 3 §1/§7).

The same nequip config (tiny NequIP model: 2 layers, 8 features, l_max 1; ~6 k training atoms of
EMT-labelled Cu/Pt(111) slabs with an adsorbate) is trained with and without the callback. Runs are
interleaved (without, with, without, with, ...) in one session so that machine load affects both
alike. Each run records its per-epoch wall times with a small timing callback listed after the LTAU
callback (so an epoch's time includes the callback's end-of-epoch log write); the first epoch is
dropped as warm-up. Reported: median epoch time per condition, the median of the per-pair ratios
(with / without) of wall time and of process CPU time (runs use one torch/OpenMP thread by default,
so CPU time measures the work done and is little affected by other processes on a shared machine),
and the one-time start-up cost of the callback (reading the atom-id universe).
Also reported, robust to machine load: the time the callback itself measures inside its hooks as a
fraction of the epoch. Target: ratio ≤ 1.03.

Usage: ``python benchmarks/callback_overhead.py [--quick] [--output benchmark_output/callback_overhead.json]``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import lightning
import numpy as np


class EpochTimer(lightning.Callback):
    """Writes the wall time of each training epoch (s) and of on_train_start→end to a JSON file."""

    def __init__(self, out_file: str) -> None:
        super().__init__()
        self.out_file = out_file

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_start = time.perf_counter()
        self._epochs: list[float] = []
        self._cpu: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._epochs.append(time.perf_counter() - self._t0)
        self._cpu.append(time.process_time() - self._c0)

    def on_fit_end(self, trainer, pl_module) -> None:
        from ltau_ase.nequip.callback import LTAUErrorLogger

        record = {"epochs": self._epochs, "cpu": self._cpu, "fit": time.perf_counter() - self._fit_start}
        for cb in trainer.callbacks:
            if isinstance(cb, LTAUErrorLogger):  # the logger's own timing of its hooks
                record["callback_epoch_s"] = cb.hook_seconds_
                record["callback_epoch_end_s"] = cb.epoch_end_seconds_
                record["callback_setup_s"] = cb.setup_seconds_
        Path(self.out_file).write_text(json.dumps(record))


def main(argv: list[str] | None = None) -> int:
    from ltau_ase.nequip.training import (
        ERROR_LOGGER_TARGET,
        TINY_MODEL,
        assign_frame_ids,
        emt_slab_frames,
        train_nequip,
        write_nequip_config,
        write_training_file,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=150, help="training frames (13 atoms each)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/OpenMP threads per run (1: process CPU time is a load-robust cost measure)")
    parser.add_argument("--pairs", type=int, default=3, help="interleaved (without, with) run pairs")
    parser.add_argument("--quick", action="store_true", help="small settings for a smoke test")
    parser.add_argument("--output", type=Path, default=Path("benchmark_output/callback_overhead.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.frames, args.epochs, args.pairs = 60, 3, 1

    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix="ltau_cb_bench_") as tmp:
        tmp = Path(tmp)
        frames = assign_frame_ids(emt_slab_frames(args.frames + 10, seed=0), 0)
        train = write_training_file(tmp / "train.xyz", frames[: args.frames])
        val = write_training_file(tmp / "val.xyz", frames[args.frames :])
        n_atoms = sum(len(a) for a in frames[: args.frames])
        results: dict[str, list[dict]] = {"without": [], "with": []}
        env = {
            "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": str(args.threads),
            "MKL_NUM_THREADS": str(args.threads),
        }
        for pair in range(args.pairs):
            for cond in ("without", "with"):
                run_dir = tmp / f"{cond}_{pair}"
                timing = tmp / f"{cond}_{pair}.json"
                callbacks = []
                if cond == "with":
                    callbacks.append({"_target_": ERROR_LOGGER_TARGET, "log_dir": "ltau_errors", "mode": "free"})
                callbacks.append({"_target_": "callback_overhead.EpochTimer", "out_file": str(timing)})
                config = write_nequip_config(
                    tmp / "config" / f"{cond}_{pair}.yaml",
                    [train],
                    val_file=val,
                    type_names=["Cu", "Pt", "O", "H"],
                    seed=1,
                    max_epochs=args.epochs,
                    callbacks=callbacks,
                    **TINY_MODEL,
                )
                train_nequip(config, run_dir, timeout=1800, env=env)
                rec = json.loads(timing.read_text())
                results[cond].append(rec)
                med = float(np.median(rec["epochs"][1:] or rec["epochs"]))
                cpu = float(np.median(rec["cpu"][1:] or rec["cpu"]))
                print(f"pair {pair} {cond:>7}: median epoch {med:.3f} s wall, {cpu:.3f} s CPU; fit {rec['fit']:.2f} s", flush=True)

    def med_epoch(rec: dict, key: str = "epochs") -> float:
        return float(np.median(rec[key][1:] or rec[key]))

    pair_ratios = [med_epoch(w) / med_epoch(wo) for wo, w in zip(results["without"], results["with"])]
    cpu_ratios = [med_epoch(w, "cpu") / med_epoch(wo, "cpu") for wo, w in zip(results["without"], results["with"])]
    all_without = np.concatenate([r["epochs"][1:] or r["epochs"] for r in results["without"]])
    all_with = np.concatenate([r["epochs"][1:] or r["epochs"] for r in results["with"]])
    summary = {
        "n_train_atoms": int(n_atoms),
        "epochs_per_run": args.epochs,
        "pairs": args.pairs,
        "median_epoch_s_without": float(np.median(all_without)),
        "median_epoch_s_with": float(np.median(all_with)),
        "pair_ratios": pair_ratios,
        "median_ratio": float(np.median(pair_ratios)),
        "cpu_pair_ratios": cpu_ratios,
        "median_cpu_ratio": float(np.median(cpu_ratios)),
        "threads": args.threads,
        "pooled_median_ratio": float(np.median(all_with) / np.median(all_without)),
        "callback_in_hook_fraction": float(
            np.median(
                [
                    np.median(np.asarray(r["callback_epoch_s"][1:]) / np.asarray(r["epochs"][1:]))
                    for r in results["with"]
                ]
            )
        ),
        "callback_setup_s": float(np.median([r["callback_setup_s"] for r in results["with"]])),
        "median_fit_s_without": float(np.median([r["fit"] for r in results["without"]])),
        "median_fit_s_with": float(np.median([r["fit"] for r in results["with"]])),
        "target_ratio": 1.03,
        "model": "NequIP 2 layers, 8 features, l_max 1, float32",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "raw": results,
    }
    print(
        f"\nLTAUErrorLogger (free mode), {n_atoms} training atoms: median epoch "
        f"{summary['median_epoch_s_without']:.3f} s without, {summary['median_epoch_s_with']:.3f} s with; "
        f"median per-pair ratio {summary['median_ratio']:.4f} (pairs {', '.join(f'{r:.4f}' for r in pair_ratios)}), "
        f"pooled {summary['pooled_median_ratio']:.4f}; target <= 1.03\n"
        f"process CPU time per epoch: median per-pair ratio {summary['median_cpu_ratio']:.4f} "
        f"(pairs {', '.join(f'{r:.4f}' for r in cpu_ratios)})\n"
        f"time measured inside the callback's hooks: {100 * summary['callback_in_hook_fraction']:.2f} % of the "
        f"epoch (median); one-time setup {summary['callback_setup_s']:.2f} s"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
