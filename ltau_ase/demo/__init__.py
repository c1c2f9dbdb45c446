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

Code: :mod:`~ltau_ase.demo.config` (sizes, required metrics), :mod:`~ltau_ase.demo.stages`
(the stages and the small dataclasses they pass on), :mod:`~ltau_ase.demo.analysis` (metrics and
figures from the stage results), :mod:`~ltau_ase.demo.report` (``report.md``); this module runs them.

Output in ``--output``: ``report.md`` (read it top to bottom), the PNGs it shows, ``metrics.json``,
and the intermediate files (``data/``, ``models/``, ``estimator.ltau``, ``is2rs/*.db``, ``md/``).

Per-atom force errors are |F_pred − F_EMT|₂ (eV/Å) over all atoms of a frame (EMT forces without
constraints, as in training). The LTAU model is member 1; the committee predicts with the mean of
all M members. Each method's uncertainty is scored against its own prediction's error.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from ltau_ase.core.jsonable import to_jsonable
from ltau_ase.demo.analysis import is2rs_analysis, paper_figures, per_atom_comparison
from ltau_ase.demo.config import DOMAINS, REQUIRED_METRICS, DemoConfig, _Timer, cpu_count, missing_or_nonfinite
from ltau_ase.demo.report import comparison_table, write_report
from ltau_ase.demo.shift import demo_shift_headline
from ltau_ase.demo.stages import (
    CalibrationStage,
    DataStage,
    FitStage,
    TrainStage,
    md_system,
    stage_calibrate,
    stage_costs,
    stage_data,
    stage_evaluate,
    stage_fit,
    stage_is2rs,
    stage_md,
    stage_train,
)


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
    stages = tqdm(total=10, desc="demo", unit="stage", position=0)

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
    cal.committee_scale = comparison["committee_scale"]
    relax = step("5 relaxations", stage_is2rs, cfg, out, data, train, cal)
    is2rs = {meth: is2rs_analysis(r["records"]) for meth, r in relax.items()}
    md = step("6 MD", stage_md, cfg, out, data, train, cal, evals)
    costs = step("7 costs", stage_costs, cfg, data, train, cal)
    # the shift benchmark's per-atom scoring on this run's ensemble (benchmarks/shift.py trains its own)
    shift = step("8 shift", demo_shift_headline, out, cfg.quick, cfg.seed)
    figs = step("9 figures", paper_figures, out, cfg, fit, cal, evals, is2rs)
    stages.close()

    from ltau_ase.core.calibration import miscalibration_area

    est = cal.estimator
    settings = data.settings
    calibration: dict[str, Any] = {
        "k": cal.k, "scale": cal.scale["scale"], "atol": est.atol_,
        "miscalibration_by_k": cal.miscalibration_by_k,
        "calibration_split": {"before": cal.scale["before"], "after": cal.scale["after"]},
    }
    for domain, split in DOMAINS.items():
        err = evals[split]["err_single"]
        calibration[domain] = {"miscalibration_area": {
            "k1": miscalibration_area(cal.pred_k1[split]["confidence"], err, est.atol_),
            "before": miscalibration_area(cal.pred_before[split]["confidence"], err, est.atol_),
            "after": miscalibration_area(cal.pred_after[split]["confidence"], err, est.atol_),
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
        "shift": shift["headline"],
        "training": {"seconds": train.train_times, "epochs": cfg.epochs},
        "data": {
            "seed": cfg.seed,
            "metals_in_domain": list(settings.metals_in_domain),
            "metals_out_of_domain": list(settings.metals_out_of_domain),
            "adsorbates_in_domain": list(settings.adsorbates_in_domain),
            "adsorbates_out_of_domain": list(settings.adsorbates_out_of_domain),
            "s2ef": {s: {"n_frames": v["n_frames"], "n_atoms": v["n_atoms"]}
                     for s, v in data.manifest["s2ef"].items()},
            "is2rs": {s: {"n_systems": v["initial"]["n_frames"], "n_atoms": v["initial"]["n_atoms"]}
                      for s, v in data.manifest["is2rs"].items()},
        },
        "config": asdict(cfg),
        "figures": figs,
    }
    metrics["run"] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {platform.processor() or ''} {cpu_count()} CPUs, "
                   f"Python {platform.python_version()}".replace("  ", " "),
        "stages_s": timer.stages,
        "total_s": time.perf_counter() - t_start,
    }
    metrics = to_jsonable(metrics)
    metrics["run"]["nonfinite"] = missing_or_nonfinite(metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_report(out, cfg, metrics, figs, shift_table=shift["markdown"])
    return metrics


#: what a demo run writes into its output directory (``--overwrite`` removes these and nothing else)
DEMO_OUTPUTS = ("data", "models", "is2rs", "md", "shift", "estimator.ltau", "metrics.json", "report.md")


def prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse an output directory holding a previous run (its models' error logs must not be appended
    to or mixed), or with ``overwrite`` remove that run's files (:data:`DEMO_OUTPUTS` and top-level
    PNG figures; anything else in the directory is kept).

    Raises:
        FileExistsError: a previous run is there and ``overwrite`` is False.
        NotADirectoryError: ``out`` is a file.
    """
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output {out} is a file; expected a directory for the demo's outputs")
    previous = [p for p in (out.iterdir() if out.is_dir() else ()) if p.name in DEMO_OUTPUTS or p.suffix == ".png"]
    if not previous:
        return
    if not overwrite:
        raise FileExistsError(f"{out} already holds a demo run ({', '.join(sorted(p.name for p in previous)[:4])}, ...); "
                              "remove it (make clean-demo) or pass --overwrite to replace it")
    for path in previous:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ltau_ase.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="demo_output", help="output directory (default demo_output)")
    parser.add_argument("--quick", action="store_true", help="smaller data and models: a few minutes")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, models and MD (default 0)")
    parser.add_argument("--members", type=int, default=None, help="ensemble size M (default 4, quick 3)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs per model")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous demo run in --output")
    args = parser.parse_args(argv)
    cfg = DemoConfig.preset(args.quick, seed=args.seed, members=args.members, epochs=args.epochs)
    out = Path(args.output)
    try:
        prepare_output(out, args.overwrite)
    except (FileExistsError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metrics = run_demo(args.output, cfg)
    print(f"\nwrote {out / 'report.md'}, {out / 'metrics.json'} and {len(metrics['figures'])} figures "
          f"in {metrics['run']['total_s']:.0f} s")
    if metrics["run"]["nonfinite"]:
        print("missing or non-finite required metrics: " + ", ".join(metrics["run"]["nonfinite"]))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["CalibrationStage", "DOMAINS", "DataStage", "DemoConfig", "FitStage", "REQUIRED_METRICS", "TrainStage",
           "comparison_table", "is2rs_analysis", "main", "md_system", "missing_or_nonfinite", "paper_figures",
           "per_atom_comparison", "run_demo", "stage_calibrate", "stage_costs", "stage_data", "stage_evaluate",
           "stage_fit", "stage_is2rs", "stage_md", "stage_train", "write_report"]
