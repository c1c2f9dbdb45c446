"""``ltau predict``: per-atom uncertainties of many structures on Dask, written to an ase.db, resumable.

Example::

    ltau predict --model run/last.ckpt --estimator est.ltau --structures candidates.extxyz --db uq.db --workers 2

Re-running the same command after a crash or kill scores only the structures not yet in the
database; two commands on one database never score or store a structure twice (each claims its
structures first). Each row holds the structure with energy and forces, ``ltau_max_uncertainty`` /
``ltau_mean_uncertainty`` and, in its data, the per-atom ``ltau_uncertainties`` etc.
(:func:`ltau_ase.simulate.predict.load_predictions` reads them back into ``atoms.arrays``/``info``).
Same calculator and Dask options as ``ltau relax``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ltau_ase.cli.options import (
    add_alias,
    add_dask_options,
    add_model_options,
    check_dask_options,
    check_output_file,
    positive_float,
    positive_int,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = add_model_options(parser)
    add_alias(model, "--threshold", dest="error_threshold", type=positive_float)
    parser.add_argument("--structures", type=Path, required=True,
                        help="structures to score (extxyz or ase.db); names from info/key 'name', else derived "
                             "from the structure's content (see ltau_ase.simulate.batch.content_name)")
    parser.add_argument("--db", type=Path, required=True, help="output database (SQLite ase.db)")
    add_dask_options(parser)
    parser.add_argument("--chunk-size", type=positive_int, default=16,
                        help="structures per Dask task and per database transaction (16)")
    parser.add_argument("--retry-failed", action="store_true", help="score structures recorded as failed again")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ltau_ase.cli.relax import factory_from_args
    from ltau_ase.simulate.predict import predict_batch

    check_output_file(args.db, "--db")
    if not args.structures.is_file():
        raise FileNotFoundError(f"--structures {args.structures} does not exist or is not a file")
    check_dask_options(args)
    factory = factory_from_args(args)
    factory()  # build the calculator once here: a bad model, estimator or factory fails before any work
    counts = predict_batch(str(args.structures), str(args.db), factory, scheduler=args.scheduler,
                           n_workers=args.workers, chunk_size=args.chunk_size, retry_failed=args.retry_failed,
                           progress=not args.no_progress, dashboard=args.dashboard,
                           scheduler_timeout=args.scheduler_timeout)
    print(f"{counts['total']} structures: {counts['done']} scored, {counts['failed']} failed, "
          f"{counts['skipped']} already in {args.db}")
    if counts.get("busy"):
        print(f"{counts['busy']} structure(s) are being scored by another running process ({counts['busy_owner']}) "
              "and were left to it")
    return 0
