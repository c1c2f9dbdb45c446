"""``ltau learn``: an active-learning campaign (explore, flag, select, label, retrain, refit).

Re-running the same command in the same ``--workdir`` resumes the campaign; a working directory of
another campaign (other settings or inputs) is refused. The reference calculator is any ASE
calculator importable as ``--reference module:Name`` (default ``ase.calculators.emt:EMT``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ltau_ase.cli.options import at_least_two, non_negative_int, open_fraction, positive_float, positive_int


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise ValueError(f"expected comma-separated numbers like 300,900; got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, required=True, help="campaign directory (created; reused to resume)")
    parser.add_argument("--train", type=Path, required=True, help="initial training frames (extxyz with frame_id)")
    parser.add_argument("--val", type=Path, required=True, help="validation frames (extxyz with frame_id)")
    parser.add_argument("--calibration", type=Path, required=True,
                        help="labelled frames the stop threshold is calibrated on (extxyz)")
    parser.add_argument("--seeds", type=Path, required=True, help="exploration seed structures (extxyz or ase.db)")
    parser.add_argument("--type-names", required=True, help="the model's chemical symbols, comma-separated")
    parser.add_argument("--test", action="append", default=[], metavar="NAME=FILE",
                        help="labelled test set evaluated after every iteration (repeatable)")
    parser.add_argument("--reference", default="ase.calculators.emt:EMT", metavar="MODULE:NAME",
                        help="reference ASE calculator class or factory (default ase.calculators.emt:EMT)")
    parser.add_argument("--selection", choices=("ltau", "random", "committee"), default="ltau",
                        help="how frames are chosen (default ltau: uncertainty + latent diversity)")
    parser.add_argument("--iterations", type=positive_int, default=3, help="label-and-retrain iterations (3)")
    parser.add_argument("--budget", type=positive_int, default=8, help="labels per iteration (8)")
    parser.add_argument("--explore", default="md", choices=("md", "relax", "md,relax"), help="exploration kind(s)")
    parser.add_argument("--temperatures", type=_floats, default=(300.0, 900.0), help="MD temperatures, K (300,900)")
    parser.add_argument("--md-steps", type=positive_int, default=200, help="maximum MD steps per trajectory (200)")
    parser.add_argument("--relax-steps", type=positive_int, default=100, help="maximum relaxation steps (100)")
    parser.add_argument("--replicas", type=positive_int, default=1, help="trajectories per seed and temperature (1)")
    parser.add_argument("--stride", type=positive_int, default=10, help="snapshot every N steps (10)")
    parser.add_argument("--adaptive", action="store_true",
                        help="adaptive stop bound (running mean + n_sigma std), calibrated threshold as ceiling")
    parser.add_argument("--quantile", type=open_fraction, default=0.95,
                        help="threshold = this quantile of the calibration frames' stop statistic (0.95)")
    parser.add_argument("--committee-size", type=at_least_two, default=4, help="models of --selection committee (4)")
    parser.add_argument("--epochs", type=positive_int, default=20, help="training epochs per iteration (20)")
    parser.add_argument("--max-reference-force", type=positive_float, default=None, metavar="EV_PER_A",
                        help="reference trust cap, eV/Å: a labelled frame whose reference max-atom force exceeds it "
                             "is recorded as rejected in labels.db and never trained on (default: no cap)")
    parser.add_argument("--warm-start", action="store_true", help="train each iteration from the previous checkpoint")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of models, MD and random choices (0)")
    parser.add_argument("--scheduler", default=None,
                        help="address of a running Dask scheduler (default: an in-process LocalCluster)")
    parser.add_argument("--workers", type=positive_int, default=1, help="LocalCluster workers (1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ltau_ase.learn import CalculatorFactory, Campaign, CampaignSettings, ExploreSettings, TrainingSettings

    tests = {}
    for item in args.test:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--test must look like NAME=FILE, got {item!r}")
        tests[name] = Path(path)
    type_names = tuple(t.strip() for t in args.type_names.split(",") if t.strip())
    settings = CampaignSettings(
        type_names=type_names, selection=args.selection, n_iterations=args.iterations, budget=args.budget,
        explore=ExploreSettings(kinds=tuple(args.explore.split(",")), temperatures=args.temperatures,
                                md_steps=args.md_steps, relax_steps=args.relax_steps, replicas=args.replicas,
                                stride=args.stride, adaptive=args.adaptive),
        training=TrainingSettings(epochs=args.epochs), threshold_quantile=args.quantile,
        committee_size=args.committee_size, warm_start=args.warm_start, seed=args.seed,
        max_reference_force=args.max_reference_force)
    campaign = Campaign(args.workdir, settings, train=args.train, val=args.val, calibration=args.calibration,
                        seeds=args.seeds, reference=CalculatorFactory(args.reference), test_sets=tests,
                        scheduler=args.scheduler, n_workers=args.workers, progress=not args.no_progress)
    history = campaign.run()
    last = history[-1]
    maes = ", ".join(f"{n} " + ("no frame within the reference cap" if v["force_mae"] is None
                                else f"{v['force_mae']:.4g} eV/Å") for n, v in last["evaluation"].items())
    print(f"{len(history) - 1} iterations, {last['labels_used']} labels used"
          + (f"; test force MAE: {maes}" if maes else "") + f"; report: {args.workdir / 'report.md'}")
    return 0
