"""``ltau reweight``: dataset map and confidence-based loss weights for a training set (paper App. E).

Per-atom confidence µ_M(p_i) and variability σ_M(p_i) come either from a fitted estimator file
(``--estimator``; its ``confidence_train_`` / ``variability_train_`` at the fitted threshold, keyed by
its stored atom ids) or directly from the training error logs (``--error-logs``, one directory per
run). They are matched to the atoms of ``--train-file`` through ``atoms.info["frame_id"]`` and written
to an extxyz copy with ``ltau_confidence``, ``ltau_variability``, ``ltau_region`` and ``ltau_weight``
columns, plus a PNG of the dataset map.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ltau_ase.cli.options import (
    check_output_file,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)

# λ used in the paper (App. E) for each scheme; uniform ignores it.
PAPER_LAMBDA = {"easy": 2.0, "hard": 4.5, "uniform": 0.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--estimator", type=Path, help="fitted estimator file (.ltau) that stores training atom ids")
    src.add_argument("--error-logs", type=Path, nargs="+", metavar="DIR", help="error-log directories, one per run")
    parser.add_argument("--train-file", type=Path, nargs="+", required=True,
                        help="training extxyz file(s); every frame needs info['frame_id']")
    parser.add_argument("--output", type=Path, default=Path("reweighted.extxyz"), help="weighted extxyz to write")
    parser.add_argument("--map", type=Path, default=None, help="dataset-map PNG (default: <output stem>_map.png)")
    parser.add_argument("--scheme", choices=("easy", "hard", "uniform"), default="hard",
                        help="which atoms to up-weight (default: hard)")
    parser.add_argument("--lam", type=non_negative_float, default=None,
                        help="λ of the weights (default: the paper's 2.0 for easy, 4.5 for hard)")
    parser.add_argument("--atol", type=positive_float, default=None,
                        help="error threshold in eV/Å (--error-logs only; default: MAE of the final epoch)")
    parser.add_argument("--skip-epochs", type=non_negative_int, default=0, help="ignore the first S logged epochs (--error-logs only)")
    parser.add_argument("--last-epochs", type=positive_int, default=None, help="keep only the last W epochs (--error-logs only)")
    parser.add_argument("--easy-threshold", type=probability, default=0.5, help="µ at or above which steady atoms are easy")
    parser.add_argument("--hard-threshold", type=probability, default=0.5, help="µ below which steady atoms are hard")
    parser.add_argument("--ambiguous-variability", type=probability, default=0.2, help="σ at or above which atoms are ambiguous")
    parser.add_argument("--group-key", default="config_type",
                        help="frame info key colouring the map when every frame has it (default: config_type)")


def _confidence_from_estimator(path: Path):
    from ltau_ase.core.estimator import LTAUEstimator

    est = LTAUEstimator.load(str(path))
    if est.atom_ids_ is None:
        raise ValueError(
            f"{path} stores no training atom ids, so its confidences cannot be matched to training frames; "
            "pass the training error logs with --error-logs instead"
        )
    return est.atom_ids_, est.confidence_train_, est.variability_train_, est.atol_


def _confidence_from_logs(paths, atol, window):
    from ltau_ase.core.distributions import CompactDistributions, as_runs, default_atol
    from ltau_ase.core.errorlog import load_error_logs

    logs = load_error_logs(paths, window=window)
    runs = as_runs(logs)
    atol = default_atol(runs) if atol is None else float(atol)
    # The confidence at the fitted threshold is counted exactly while streaming, in bounded memory.
    dist = CompactDistributions.from_runs(runs, atol)
    return logs[0].atom_ids, dist.confidence(atol), dist.std(atol), atol


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ltau_ase.cartography import REGIONS, export_extxyz, loss_weights, regions, values_for_frames
    from ltau_ase.core.errorlog import EpochWindow
    from ltau_ase.core.trainingset import read_training_frames
    from ltau_ase.plots import plot_cartography

    check_output_file(args.output, "--output")
    if args.map is not None:
        check_output_file(args.map, "--map")
    if args.estimator is not None:
        if args.atol is not None or args.skip_epochs or args.last_epochs is not None:
            raise ValueError("--atol, --skip-epochs and --last-epochs apply to --error-logs; "
                             "an estimator uses the threshold and window it was fitted with")
        atom_ids, mu, sigma, atol = _confidence_from_estimator(args.estimator)
        source = str(args.estimator)
    else:
        window = EpochWindow(skip=args.skip_epochs, last=args.last_epochs)
        atom_ids, mu, sigma, atol = _confidence_from_logs(args.error_logs, args.atol, window)
        source = f"{len(args.error_logs)} error log(s)"

    frames = read_training_frames(args.train_file)
    mu_f, sigma_f = values_for_frames(frames, atom_ids, mu, sigma)
    lam = PAPER_LAMBDA[args.scheme] if args.lam is None else args.lam
    weights = loss_weights(mu_f, sigma_f, scheme=args.scheme, lam=lam)
    thresholds = {
        "easy_threshold": args.easy_threshold,
        "hard_threshold": args.hard_threshold,
        "ambiguous_variability": args.ambiguous_variability,
    }
    labels = regions(mu_f, sigma_f, **thresholds)
    out = export_extxyz(frames, mu_f, sigma_f, args.output, weights=weights, **thresholds)

    groups = None
    if args.group_key and all(args.group_key in a.info for a in frames):
        groups = np.repeat([str(a.info[args.group_key]) for a in frames], [len(a) for a in frames])
    map_path = args.map if args.map is not None else out.with_name(out.stem + "_map.png")
    plot_cartography(mu_f, sigma_f, map_path, groups=groups, thresholds=thresholds)

    n = mu_f.size
    print(f"confidences from {source} (atol {atol:.4g} eV/Å) for {n} atoms in {len(frames)} frames")
    for name in REGIONS:
        count = int(np.sum(labels == name))
        print(f"  {name:14s} {count:8d} atoms ({100.0 * count / n:5.1f} %)")
    print(f"weights: scheme {args.scheme}, λ = {lam:g}, mean 1, min {weights.min():.3g}, max {weights.max():.3g}")
    print(f"wrote {out} and {map_path}")
    return 0
