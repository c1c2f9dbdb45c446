"""``ltau predict``: per-atom uncertainties of many structures on Dask, written to an ase.db, resumable.

Example::

    ltau predict --model run/last.ckpt --estimator est.ltau --structures candidates.extxyz --db uq.db --workers 2

Re-running the same command after a crash or kill scores only the structures not yet in the
database. Each row holds the structure with energy and forces, ``ltau_max_uncertainty`` /
``ltau_mean_uncertainty`` and, in its data, the per-atom ``ltau_uncertainties`` etc.
(:func:`ltau_ase.simulate.predict.load_predictions` reads them back into ``atoms.arrays``/``info``).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="model file (.ckpt or .nequip.zip)")
    parser.add_argument("--estimator", type=Path, help="LTAU estimator file fitted for --model")
    parser.add_argument("--factory", default=None, metavar="MODULE:NAME",
                        help="instead of --model/--estimator: a calculator factory to import")
    parser.add_argument("--structures", type=Path, required=True,
                        help="structures to score (extxyz or ase.db; names from info/key 'name')")
    parser.add_argument("--db", type=Path, required=True, help="output database (SQLite ase.db)")
    parser.add_argument("--scheduler", default=None,
                        help="address of a running Dask scheduler (default: an in-process LocalCluster)")
    parser.add_argument("--workers", type=int, default=1, help="LocalCluster workers, each with its own model (1)")
    parser.add_argument("--chunk-size", type=int, default=16, help="structures per task and per transaction (16)")
    parser.add_argument("--device", default="cpu", help="torch device of the model (cpu)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="force-error threshold of the confidences, eV/Å (default: the estimator's atol)")
    parser.add_argument("--allow-model-mismatch", action="store_true",
                        help="use an estimator fitted for a different model file (warns)")
    parser.add_argument("--unknown-species", choices=("raise", "flag"), default="raise",
                        help="elements the estimator never saw: fail the structure (raise) or give their atoms "
                             "uncertainty 1 (flag)")
    parser.add_argument("--retry-failed", action="store_true", help="score structures recorded as failed again")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ltau_ase.cli.relax import factory_from_args
    from ltau_ase.simulate.predict import predict_batch

    factory = factory_from_args(args)
    counts = predict_batch(str(args.structures), str(args.db), factory, scheduler=args.scheduler,
                           n_workers=args.workers, chunk_size=args.chunk_size, retry_failed=args.retry_failed,
                           progress=not args.no_progress)
    print(f"{counts['total']} structures: {counts['done']} scored, {counts['failed']} failed, "
          f"{counts['skipped']} already in {args.db}")
    return 0
