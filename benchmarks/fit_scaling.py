"""Fit scaling benchmark: an LTAU estimator on N training atoms × E epochs × M runs (issue 13, item 2).

Synthetic inputs in the real formats:

* M error logs written by the project's own :class:`ltau_ase.core.errorlog.ErrorLogWriter`, one
  epoch row at a time (frames of ``--frame-atoms`` atoms with global ids ``frame_id·2**20 + a``).
  Atom i's errors follow a per-atom scale tied to its descriptor (so the UQ has something to find),
  decaying over epochs, times log-normal epoch noise, independent per run (eV/Å);
* D = ``--dim`` clustered latent-like descriptors (:func:`knn_scaling.latent_like`), saved as .npy.

The fit itself runs in a fresh child process (so its peak RSS is the fit's alone): it loads the
descriptors (in RAM), opens the logs (streamed, never loaded whole) and calls
:meth:`LTAUEstimator.fit` — the same call ``ltau fit`` makes after extracting descriptors from the
model — with ``max_memory`` set, so a fit over budget stops before reading any error. It reports the
estimator's own estimate, the wall time per stage (``fit_info_["seconds"]``: distributions, training
confidences, index), saving, loading, a 10⁴-atom predict, and the peak RSS (``ru_maxrss`` of the
child, plus a psutil sampler per stage).

Usage::

    python benchmarks/fit_scaling.py --n-atoms 1000000 --epochs 100 --runs 2 --index ivfpq \\
        --workdir /work/tmp-scale --max-memory 4e9 --output benchmark_output/fit_scaling_1e6.json

The logs take N × E × 4 bytes per run (10⁷ × 100: 4 GB); ``--workdir`` should be outside the
repository, and it is deleted at the end unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from knn_scaling import latent_like  # noqa: E402  (benchmarks/ is not a package)

from ltau_ase.core.atom_ids import global_atom_ids  # noqa: E402
from ltau_ase.core.errorlog import ErrorLogWriter  # noqa: E402


class RssSampler:
    """Samples this process's RSS every ``interval`` s; ``peak(label)`` gives the peak of a stage."""

    def __init__(self, interval: float = 0.2) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._label = "start"
        self.peaks: dict[str, int] = {}
        self.trace: list[tuple[float, int]] = []  # (perf_counter s, RSS bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stage(self, label: str) -> None:
        self._sample()
        self._label = label

    def _sample(self) -> None:
        rss = self._proc.memory_info().rss
        self.peaks[self._label] = max(self.peaks.get(self._label, 0), rss)
        self.trace.append((time.perf_counter(), rss))

    def peak_between(self, start: float, stop: float) -> int:
        """Peak sampled RSS in [start, stop] (perf_counter seconds); 0 when no sample fell there."""
        return max((rss for t, rss in self.trace if start <= t <= stop), default=0)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def stop(self) -> dict[str, int]:
        self._sample()
        self._stop.set()
        self._thread.join()
        return self.peaks


def write_logs(workdir: Path, n_atoms: int, n_epochs: int, n_runs: int, dim: int, frame_atoms: int, seed: int) -> dict:
    """Write descriptors.npy and M error logs; returns timings (s) and sizes."""
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    x = latent_like(n_atoms, dim, rng)
    np.save(workdir / "descriptors.npy", x)
    # Per-atom error scale from a latent direction: atoms of some clusters are harder than others.
    proj = x @ (np.random.default_rng(7).normal(size=dim) / np.sqrt(dim)).astype(np.float32)
    scale = (0.05 * np.exp(0.5 * (proj - proj.mean()) / proj.std())).astype(np.float32)
    del x, proj
    t_desc = time.perf_counter() - t0
    n_frames = -(-n_atoms // frame_atoms)
    sizes = np.full(n_frames, frame_atoms, dtype=np.int64)
    sizes[-1] = n_atoms - frame_atoms * (n_frames - 1)
    ids = global_atom_ids(np.arange(n_frames), sizes)
    t_logs = []
    for m in range(n_runs):
        t0 = time.perf_counter()
        run_rng = np.random.default_rng([seed, m])
        with ErrorLogWriter(workdir / f"run{m}", ids, metadata={"synthetic": True, "run": m}) as writer:
            for e in range(n_epochs):
                decay = np.float32(1.0 + 3.0 * np.exp(-e / 15.0))
                noise = np.exp(np.float32(0.5) * run_rng.standard_normal(n_atoms, dtype=np.float32))
                writer.append_epoch(ids, scale * decay * noise, epoch=e)
                if (e + 1) % 10 == 0:
                    print(f"{time.strftime('%H:%M:%S')} run {m}: {e + 1} epochs written", flush=True)
        t_logs.append(time.perf_counter() - t0)
        print(f"run {m}: {n_epochs} epochs of {n_atoms} atoms written in {t_logs[-1]:.0f} s", flush=True)
    return {"descriptors_s": t_desc, "write_log_s": t_logs,
            "log_bytes_per_run": n_atoms * n_epochs * 4}


def fit_stage(args: argparse.Namespace) -> dict:
    """Runs in the child process: load descriptors, fit, save, load, predict; per-stage times and RSS."""
    from ltau_ase.core.errorlog import load_error_logs
    from ltau_ase.core.estimator import LTAUEstimator

    workdir = Path(args.workdir)
    sampler = RssSampler()
    out: dict = {}
    sampler.stage("load_descriptors")
    t0 = time.perf_counter()
    x = np.load(workdir / "descriptors.npy")
    logs = load_error_logs([workdir / f"run{m}" for m in range(args.runs)])
    out["load_descriptors_s"] = time.perf_counter() - t0
    est = LTAUEstimator(k=10, index=args.index, distribution="compact", max_memory=args.max_memory,
                        chunk_size=args.chunk_size, progress=True)
    out["estimate_bytes"] = est.estimate_fit_memory(x.shape[0], x.shape[1], [log.n_epochs for log in logs])
    print("estimated fit memory (GB):", {k: round(v / 1e9, 3) for k, v in out["estimate_bytes"].items()}, flush=True)
    sampler.stage("fit")
    t0 = time.perf_counter()
    try:
        est.fit(x, logs)
    except ValueError as exc:  # over the budget: refused before reading any error
        out["budget_refusal"] = str(exc)
        out["budget_refusal_s"] = time.perf_counter() - t0
        print(f"refused: {exc}", flush=True)
        if not args.over_budget:
            raise
        est.set_params(max_memory=None)  # measure what it really takes
        t0 = time.perf_counter()
        est.fit(x, logs)
    t_end = time.perf_counter()
    out["fit_s"] = t_end - t0
    out["fit_stage_s"] = est.fit_info_["seconds"]
    # peak RSS within each stage of the fit, from its stage times (the remainder: checks before the
    # distributions, the leave-one-out reference distances after the index)
    bounds, start = {}, t0
    for stage, seconds in est.fit_info_["seconds"].items():
        bounds[stage] = (start, start + seconds)
        start += seconds
    bounds["reference_distances"] = (start, t_end)
    out["fit_stage_rss_peak_bytes"] = {stage: sampler.peak_between(a, b) for stage, (a, b) in bounds.items()}
    out["index_params"] = est.index_.params
    out["index_kind"] = est.index_.kind
    out["index_choice"] = est.index_.reason
    print(f"fit {out['fit_s']:.0f} s: {out['fit_stage_s']}", flush=True)
    sampler.stage("save")
    t0 = time.perf_counter()
    path = workdir / "estimator.ltau"
    est.save(str(path))
    out["save_s"] = time.perf_counter() - t0
    out["estimator_bytes"] = path.stat().st_size
    queries = x[np.random.default_rng(1).choice(x.shape[0], 10_000, replace=False)] + np.float32(0.01)
    del est, x
    sampler.stage("load")
    t0 = time.perf_counter()
    est = LTAUEstimator.load(str(path))
    out["load_s"] = time.perf_counter() - t0
    sampler.stage("predict")
    t0 = time.perf_counter()
    pred = est.predict(queries)
    out["predict_us_per_atom"] = (time.perf_counter() - t0) / queries.shape[0] * 1e6
    out["predict_mean_uncertainty"] = float(pred["uncertainty"].mean())
    out["rss_peak_bytes_per_stage"] = sampler.stop()
    out["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-atoms", type=int, default=1_000_000)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--frame-atoms", type=int, default=100)
    ap.add_argument("--index", default="auto", choices=("auto", "flat", "hnsw", "ivfpq"))
    ap.add_argument("--chunk-size", type=int, default=1 << 16)
    ap.add_argument("--max-memory", type=float, default=4e9, help="bytes; the fit refuses to start above it")
    ap.add_argument("--workdir", type=Path, default=Path("/work/tmp-scale"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the logs and the estimator in --workdir")
    ap.add_argument("--over-budget", action="store_true",
                    help="when the fit refuses the --max-memory budget, record that and fit without it")
    ap.add_argument("--output", type=Path, default=Path("benchmark_output/fit_scaling.json"))
    ap.add_argument("--stage", choices=("all", "fit"), default="all", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage == "fit":
        Path(args.workdir, "fit_result.json").write_text(json.dumps(fit_stage(args)))
        return
    workdir = args.workdir / f"fit_scaling_{args.n_atoms}"
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    result = {
        "n_atoms": args.n_atoms, "epochs": args.epochs, "runs": args.runs, "dim": args.dim,
        "index": args.index, "max_memory": args.max_memory, "chunk_size": args.chunk_size,
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_start": os.getloadavg(),
    }
    try:
        result.update(write_logs(workdir, args.n_atoms, args.epochs, args.runs, args.dim, args.frame_atoms, args.seed))
        cmd = [sys.executable, __file__, "--stage", "fit", "--workdir", str(workdir), "--runs", str(args.runs),
               "--index", args.index, "--max-memory", str(args.max_memory), "--chunk-size", str(args.chunk_size)]
        cmd += ["--over-budget"] if args.over_budget else []
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2))  # partial results, in case the fit is stopped
        print(f"{time.strftime('%H:%M:%S')} logs written; fitting", flush=True)
        t0 = time.perf_counter()
        err_path = workdir / "fit_stderr.log"  # the child's progress bars and errors (tail -f it)
        with open(err_path, "w") as err:
            proc = subprocess.run(cmd, stderr=err, text=True)
        result["fit_process_s"] = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = err_path.read_text()[-4000:]
            sys.stderr.write(tail)
            result["fit_error"] = (tail.strip().splitlines() or ["?"])[-1]
        else:
            result.update(json.loads((workdir / "fit_result.json").read_text()))
            result["fit_within_budget"] = result["ru_maxrss_bytes"] <= args.max_memory
    finally:
        result["load_average_end"] = os.getloadavg()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
