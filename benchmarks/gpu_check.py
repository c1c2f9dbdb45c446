"""GPU readiness of ltau-ase: equality with the CPU and step times with and without UQ (issue 12 §3).

    python benchmarks/gpu_check.py [--budget 240] [--quick]

No downloads, no interactive steps. Builds its own random-weight NequIP models (tiny: 2 layers,
8 features, l_max 1; paper-size: 4 layers, 32 features, l_max 2) and synthetic reference sets of
10⁵ and 10⁶ training atoms (latent-like descriptors from the model itself, log-normal error logs),
then runs each check in its own try/except and prints one JSON summary (also written to
``$OUT/gpu_check.json`` when ``OUT`` is set, else ``benchmark_output/gpu_check.json``).

Checks (each reports ``ok``/``skipped``/``failed`` with its numbers or the error):

* ``model_equality_<model>``: energy, forces and descriptors of the eager ``LatentNequIPCalculator``
  on CUDA against the CPU (max relative difference; float32 models).
* ``readout_equality_<model>_<N>``: the in-model LTAU readout (torch exact kNN) on CUDA against
  ``LTAUEstimator.predict`` (FAISS flat on the CPU) on the same latents.
* ``pipeline_<device>``: the user's pipeline on the device: a tiny NequIP model trained with the
  error logger on EMT frames (Lightning ``accelerator=gpu``), the estimator fitted with the model on the
  device (``ltau fit --device``) and on the CPU (same training descriptors?), ``ltau compile --device``
  (AOTInductor; skipped when the budget cannot hold it), and the compiled file's ``LTAUCalculator``
  against the eager checkpoint + estimator (forces, uncertainties).
* ``readout_blocks_<model>_<N>``: the exact in-model scan alone on the GPU for 81 queries and
  blocks of 32 k, 128 k and 1 M reference rows (ms).
* ``step_times_<model>_<N>``: medians over interleaved steps on the 81-atom slab of (a) bare
  nequip forces, (b) eager LTAU = forces + FAISS predict on the CPU (all threads, and one thread),
  (c) eager forces + torch kNN on the GPU (latents stay on the device), (d) in-model LTAU (one
  forward pass with the readout appended). ms and UQ share of the step.

Without a GPU every CUDA check is ``skipped`` with the reason, and the CPU parts still run (so the
script can be tested anywhere). A total time guard (``--budget`` seconds) skips what no longer fits.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import overhead  # noqa: E402  (same directory: model, structure and synthetic-set builders)


class Guard:
    """Per-check try/except and the total time budget."""

    def __init__(self, budget_s: float) -> None:
        self.t0 = time.perf_counter()
        self.budget = budget_s
        self.checks: dict[str, Any] = {}

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def deadline(self, share: float) -> float:
        """perf_counter time by which a check should stop to leave (1 - share) of the budget left now."""
        return time.perf_counter() + share * max(self.left(), 0.0)

    def run(self, name: str, fn: Callable[[], dict], need_s: float = 0.0, needs_gpu: bool = False) -> Any:
        import torch

        if needs_gpu and not torch.cuda.is_available():
            self.checks[name] = {"status": "skipped", "reason": "no CUDA GPU visible to torch "
                                 f"(torch {torch.__version__}, cuda build {torch.version.cuda})"}
        elif self.left() < need_s:
            self.checks[name] = {"status": "skipped", "reason": f"time budget: {self.left():.0f} s left, needs ~{need_s:.0f} s"}
        else:
            t = time.perf_counter()
            try:
                result = fn()
                self.checks[name] = {"status": "ok", "seconds": round(time.perf_counter() - t, 2), **result}
            except Exception as exc:  # report and go on with the next check
                self.checks[name] = {"status": "failed", "seconds": round(time.perf_counter() - t, 2),
                                     "error": f"{type(exc).__name__}: {exc}",
                                     "traceback": traceback.format_exc(limit=6)}
        print(f"[gpu_check] {name}: {self.checks[name]['status']} ({self.left():.0f} s left)", file=sys.stderr, flush=True)
        return self.checks[name]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _one_faiss_thread(fn):
    import faiss

    n = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return fn()
    finally:
        faiss.omp_set_num_threads(n)


def latent_calc(model, device: str):
    from ltau_ase.nequip.calculator import LatentNequIPCalculator

    return LatentNequIPCalculator(model, device, transforms=overhead.transforms_for(model))


def check_model_equality(model, atoms) -> dict:
    import copy

    cpu = latent_calc(copy.deepcopy(model), "cpu")
    gpu = latent_calc(copy.deepcopy(model), "cuda")
    out = {}
    for name, calc in (("cpu", cpu), ("cuda", gpu)):
        a = atoms.copy()
        a.calc = calc
        a.get_forces()
        out[name] = dict(calc.results)
    return {f"max_rel_diff_{k}": _rel(out["cuda"][k], out["cpu"][k]) for k in ("energy", "forces", "descriptors")}


def time_readout_blocks(estimator, queries, device: str, block_sizes=(32768, 131072, 1 << 20), repeats: int = 20) -> dict:
    """The exact in-model scan alone on ``device`` for several block sizes (ms, medians): on a GPU each
    block costs a few kernel launches (matrix product, top-k), so larger blocks should be cheaper until
    memory (queries x block x 4 bytes) or the top-k over long rows dominates."""
    import torch

    from ltau_ase.nequip.inmodel import readout_for_estimator

    res = {}
    x = {"node_features": torch.as_tensor(np.ascontiguousarray(queries, dtype=np.float32)).to(device)}
    for block in block_sizes:
        readout = readout_for_estimator(estimator, block_size=block).to(device)
        times = []
        with torch.no_grad():
            for r in range(repeats + 3):
                _sync()
                t = time.perf_counter()
                readout(dict(x))
                _sync()
                if r >= 3:
                    times.append(time.perf_counter() - t)
        res[f"block_{block}_ms"] = 1e3 * float(np.median(times))
        del readout
    res["n_queries"] = int(len(queries))
    return res


def check_readout_equality(estimator, queries, device: str) -> dict:
    from ltau_ase.nequip.inmodel import readout_for_estimator, readout_predict

    readout = readout_for_estimator(estimator).to(device)
    got = readout_predict(readout, queries)
    exp = estimator.predict(queries)
    return {f"max_abs_diff_{k}": float(np.max(np.abs(got[k] - exp[k]))) for k in exp} | {
        "max_rel_diff_distance": _rel(got["distance"], exp["distance"]), "n_queries": int(len(queries))}


def check_pipeline(device: str, workdir: Path, deadline: float, compile_need_s: float = 90.0) -> dict:
    """Train (3 epochs, logger on), fit on ``device`` and on the CPU, compile for ``device``, compare."""
    from ase.calculators.emt import EMT

    from ltau_ase.cli import main as ltau_main
    from ltau_ase.core.estimator import LTAUEstimator
    from ltau_ase.nequip.fit import fit_estimator_from_runs
    from ltau_ase.nequip.training import (ERROR_LOGGER_TARGET, TINY_MODEL, assign_frame_ids, emt_slab_frames,
                                          train_nequip, write_nequip_config, write_training_file)
    from ltau_ase.simulate.calculator import LTAUCalculator

    res: dict[str, Any] = {"device": device}
    frames = assign_frame_ids(emt_slab_frames(48, seed=0), 0)
    train_file = write_training_file(workdir / "train.xyz", frames[:40])
    val_file = write_training_file(workdir / "val.xyz", assign_frame_ids(frames[40:], 5000))
    run_dir = workdir / "run"
    config = write_nequip_config(workdir / "config" / "tiny.yaml", [train_file], val_file=val_file,
                                 type_names=["Cu", "Pt", "O", "H"], seed=1, max_epochs=3,
                                 accelerator="gpu" if device == "cuda" else "cpu",
                                 callbacks=[{"_target_": ERROR_LOGGER_TARGET, "log_dir": str(run_dir / "ltau_errors"),
                                             "mode": "free"}], **TINY_MODEL)
    t = time.perf_counter()
    train_nequip(config, run_dir, timeout=240)
    res["train_seconds"] = round(time.perf_counter() - t, 1)
    ckpt = run_dir / "last.ckpt"
    ests = {}
    for dev in dict.fromkeys((device, "cpu")):
        t = time.perf_counter()
        ests[dev] = fit_estimator_from_runs([run_dir], [train_file], workdir / f"est_{dev}.ltau", k=4, model=ckpt,
                                            device=dev, progress=False)
        res[f"fit_seconds_{dev}"] = round(time.perf_counter() - t, 1)
    res["fit_max_rel_diff_descriptors"] = _rel(ests[device].index_.training_vectors(), ests["cpu"].index_.training_vectors())
    atoms = frames[7].copy()
    atoms.rattle(0.08, seed=11)
    kw = {"chemical_species_to_atom_type_map": True}
    results = {}
    for name, calc in (("eager_cpu", LTAUCalculator.from_nequip(ckpt, workdir / "est_cpu.ltau", **kw)),
                       (f"eager_{device}", LTAUCalculator.from_nequip(ckpt, workdir / f"est_{device}.ltau",
                                                                       device=device, **kw))):
        a = atoms.copy()
        a.calc = calc
        a.get_forces()
        results[name] = dict(calc.results)
    for key in ("forces", "descriptors", "uncertainties"):
        res[f"eager_{device}_vs_cpu_max_rel_diff_{key}"] = _rel(results[f"eager_{device}"][key], results["eager_cpu"][key])
    res["true_max_force_error"] = float(np.linalg.norm(results["eager_cpu"]["forces"] - EMT().get_forces(atoms), axis=1).max())
    if time.perf_counter() + compile_need_s > deadline:
        res["compile"] = f"skipped: {deadline - time.perf_counter():.0f} s left before the deadline, needs ~{compile_need_s:.0f} s"
        return res
    out = workdir / "tiny_ltau.nequip.pt2"
    t = time.perf_counter()
    rc = ltau_main(["compile", str(ckpt), str(workdir / "est_cpu.ltau"), str(out), "--device", device])
    res["compile_seconds"] = round(time.perf_counter() - t, 1)
    if rc != 0:
        raise RuntimeError(f"ltau compile --device {device} exited {rc}")
    calc = LTAUCalculator.from_nequip(out, device=device, trusted=True, **kw)
    a = atoms.copy()
    a.calc = calc
    a.get_forces()
    for key in ("forces", "uncertainties", "latent_distances"):
        res[f"compiled_{device}_vs_eager_cpu_max_rel_diff_{key}"] = _rel(calc.results[key], results["eager_cpu"][key])
    return res


def time_steps(model, atoms, estimator, device: str, repeats: int, deadline: float = float("inf")) -> dict:
    """Interleaved medians (ms) of bare / eager LTAU (FAISS CPU) / eager + torch kNN / in-model steps.

    Stops early (after at least one timed round) once ``time.perf_counter()`` passes ``deadline``.
    """
    import copy

    import torch
    from nequip.integrations.ase import NequIPCalculator

    from ltau_ase.nequip.inmodel import InModelLTAUCalculator, append_ltau, readout_from_estimator
    from ltau_ase.simulate.calculator import LTAUCalculator

    bare = NequIPCalculator(copy.deepcopy(model), device, transforms=overhead.transforms_for(model))
    eager = LTAUCalculator(latent_calc(copy.deepcopy(model), device), estimator)
    eager1 = LTAUCalculator(latent_calc(copy.deepcopy(model), device), estimator)  # own cache: same structures
    knn_calc = latent_calc(copy.deepcopy(model), device)
    readout = readout_from_estimator(model, estimator).to(device)
    inmodel_model = append_ltau(copy.deepcopy(model), readout_from_estimator(model, estimator)).to(device).eval()
    inmodel = LTAUCalculator(InModelLTAUCalculator(inmodel_model, device, transforms=overhead.transforms_for(model)), None)

    def run_knn(a):
        data = knn_calc.atoms_to_data(a)
        out = knn_calc.call_model(data)
        readout({"node_features": out["node_features"].detach()})

    steps = {
        "bare": lambda a: (setattr(a, "calc", bare), a.get_forces()),
        "eager_faiss_cpu": lambda a: (setattr(a, "calc", eager), a.get_forces(), eager.get_property("uncertainties", a)),
        # the same with FAISS on one thread: on a many-core host OpenMP start-up and contention with
        # torch's own thread pool can cost more than a small search
        "eager_faiss_cpu_1thread": lambda a: _one_faiss_thread(lambda: (setattr(a, "calc", eager1), a.get_forces(),
                                                                          eager1.get_property("uncertainties", a))),
        "eager_torch_knn": run_knn,
        "inmodel": lambda a: (setattr(a, "calc", inmodel), a.get_forces(), inmodel.get_property("uncertainties", a)),
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    names = list(steps)
    for r in range(repeats + 2):
        if r >= 3 and time.perf_counter() > deadline:
            break
        base = atoms.copy()
        base.rattle(0.03, seed=r)
        for name in names[r % len(names):] + names[:r % len(names)]:
            a = base.copy()
            _sync()
            t = time.perf_counter()
            steps[name](a)
            _sync()
            if r >= 2:  # warm-up rounds
                times[name].append(time.perf_counter() - t)
    med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    res = {f"{k}_ms": v for k, v in med.items()}
    res["uq_share_eager_faiss_pct"] = 100 * (med["eager_faiss_cpu"] - med["bare"]) / med["eager_faiss_cpu"]
    res["uq_share_inmodel_pct"] = 100 * (med["inmodel"] - med["bare"]) / med["inmodel"]
    res["repeats"] = len(times["bare"])
    res["device"] = str(torch.device(device))
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=240.0, help="total seconds before remaining checks are skipped")
    parser.add_argument("--quick", action="store_true", help="10^4 / 10^5 reference atoms and fewer repeats (for CPU tests)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per step kind (default 20, quick 3)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="skip the AOTInductor compile in the pipeline check")
    parser.add_argument("--output", default=None, help="JSON file (default $OUT/gpu_check.json or benchmark_output/)")
    args = parser.parse_args(argv)

    import torch
    from nequip.utils.global_state import set_global_state

    from ltau_ase.core.estimator import LTAUEstimator

    set_global_state()
    guard = Guard(args.budget)
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    sizes = (10_000, 100_000) if args.quick else (100_000, 1_000_000)
    repeats = args.repeats or (3 if args.quick else 20)
    atoms = overhead.benchmark_structure()
    summary: dict[str, Any] = {
        "benchmark": "gpu_check", "gpu": torch.cuda.get_device_name(0) if gpu else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "k": args.k, "reference_sizes": list(sizes), "quick": args.quick,
        "synthetic": "random model weights; latent-like synthetic references; log-normal synthetic error logs",
    }
    if not gpu:
        summary["note"] = "no CUDA GPU: GPU checks skipped; CPU timings below are not GPU figures"
        print("[gpu_check] no CUDA GPU visible: GPU checks are skipped, CPU parts run", file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        guard.run(f"pipeline_{device}", lambda: check_pipeline(device, Path(tmp), deadline=guard.deadline(share=0.45),
                                                 compile_need_s=float("inf") if args.no_compile else 90.0),
                  need_s=40)
    for model_name in ("tiny", "paper"):
        model = overhead.build_model(**overhead.MODELS[model_name])
        guard.run(f"model_equality_{model_name}", lambda: check_model_equality(model, atoms), 10, needs_gpu=True)
        probe = latent_calc(model, "cpu")
        for n in sizes:
            est_box: dict[str, Any] = {}

            def fit() -> dict:
                desc, errors, numbers = overhead.synthetic_training_set(probe, atoms, n, 8, seed=1)
                est_box["est"] = LTAUEstimator(k=args.k).fit(desc, errors, atomic_numbers=numbers)
                rng = np.random.default_rng(5)
                est_box["queries"] = desc[rng.integers(0, n, 200)] + 0.05 * rng.standard_normal((200, desc.shape[1])).astype(np.float32)
                return {"n_train_atoms": n, "descriptor_dim": int(desc.shape[1])}

            fitted = guard.run(f"fit_{model_name}_{n}", fit, need_s=20 if n >= 10**6 else 5)
            if fitted["status"] != "ok":
                continue
            est = est_box["est"]
            guard.run(f"readout_equality_{model_name}_{n}",
                      lambda: check_readout_equality(est, est_box["queries"], device), 5)
            guard.run(f"readout_blocks_{model_name}_{n}",
                      lambda: time_readout_blocks(est, est_box["queries"][:81], device), 10, needs_gpu=True)
            guard.run(f"step_times_{model_name}_{n}",
                      lambda: time_steps(model, atoms, est, device, repeats, deadline=guard.deadline(share=0.5)), 30)
            del est_box
    summary["checks"] = guard.checks
    summary["total_seconds"] = round(time.perf_counter() - guard.t0, 1)
    summary["failed"] = [k for k, v in guard.checks.items() if v["status"] == "failed"]
    text = json.dumps(summary, indent=2)
    print(text)
    out = Path(args.output) if args.output else (Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("benchmark_output")) / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"[gpu_check] wrote {out}", file=sys.stderr)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
