"""``ltau fit``: nequip run directories + training data → one estimator file (.ltau).

Example::

    ltau fit runs/seed1 runs/seed2 runs/seed3 --train-file train.extxyz --output est.ltau --k 10

Each run directory holds the ``ltau_errors`` log written by
``ltau_ase.nequip.callback.LTAUErrorLogger`` (or pass the log directory itself). Descriptors come
from ``--model`` (default: the first run's ``last.ckpt``, else ``best.ckpt``: the file a simulation then loads).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ltau_ase.cli.options import (
    add_model_options,
    byte_size,
    check_output_file,
    non_negative_int,
    positive_float,
    positive_int,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR",
                        help="nequip run directories (or their error-log directories), one per ensemble member")
    parser.add_argument("--train-file", type=Path, nargs="+", required=True,
                        help="training extxyz file(s) the runs were trained on; every frame needs info['frame_id']")
    parser.add_argument("--output", type=Path, required=True, help="estimator file to write (.ltau)")
    parser.add_argument("--k", type=positive_int, default=10, help="nearest training atoms per test atom (default 10)")
    parser.add_argument("--index", choices=("auto", "flat", "hnsw", "ivfpq"), default="auto",
                        help="FAISS index (auto: flat below 1e5 training atoms, HNSW below 1e6, "
                             "IVF-PQ with exact re-ranking above)")
    parser.add_argument("--atol", type=positive_float, default=None, metavar="EV_PER_A",
                        help="error threshold in eV/Å (default: the final models' training MAE)")
    parser.add_argument("--skip-epochs", type=non_negative_int, default=0, help="ignore the first S logged epochs")
    parser.add_argument("--last-epochs", type=positive_int, default=None, help="then keep only the last W epochs")
    parser.add_argument("--all-epochs", action="store_true",
                        help="use every logged epoch (default without --skip/--last-epochs: the last half)")
    add_model_options(parser, estimator=False,
                      model_help="checkpoint (.ckpt) giving the descriptors (default: first run's last.ckpt, "
                                 "else best.ckpt)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="frames per forward pass (default 16)")
    parser.add_argument("--max-memory", type=byte_size, default=None, metavar="SIZE",
                        help="memory budget of the fit, e.g. 4G or 4e9 bytes: refuse (with the estimate) "
                             "before extracting descriptors when the fit would need more")
    parser.add_argument("--reference-groups", default=None, metavar="INFO_KEY",
                        help="atoms.info key of each training frame's structure group (e.g. system): the latent "
                             "distance ratio's reference distance then leaves each group out, so near-duplicate "
                             "frames of one MD run or relaxation do not shrink it (default: leave one atom out)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    from ltau_ase.core.errorlog import EpochWindow
    from ltau_ase.nequip.fit import fit_estimator_from_runs

    # every input check before the descriptors are extracted (the expensive part)
    check_output_file(args.output, "--output")
    for path in args.train_file:
        if not path.is_file():
            raise FileNotFoundError(f"--train-file {path} does not exist or is not a file")
    for path in args.run_dirs:
        if not path.is_dir():
            raise FileNotFoundError(f"run directory {path} does not exist or is not a directory")
    if args.model is not None and not args.model.is_file():
        raise FileNotFoundError(f"--model {args.model} does not exist or is not a file")
    if args.all_epochs and (args.skip_epochs or args.last_epochs is not None):
        raise ValueError("--all-epochs excludes --skip-epochs and --last-epochs")
    if args.all_epochs:
        window = None
    elif args.skip_epochs == 0 and args.last_epochs is None:
        window = "last_half"  # in-domain calibration without a calibration set (LTAUEstimator's window)
    else:
        window = EpochWindow(skip=args.skip_epochs, last=args.last_epochs)
    est = fit_estimator_from_runs(
        args.run_dirs,
        args.train_file,
        args.output,
        k=args.k,
        index=args.index,
        atol=args.atol,
        window=window,
        model=args.model,
        device=args.device,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        max_memory=args.max_memory,
        group_key=args.reference_groups,
    )
    print(
        f"wrote {args.output}: {est.n_train_atoms_} training atoms, {len(args.run_dirs)} run(s), "
        f"k={est.k}, index={est.index}, atol={est.atol_:.4g} eV/Å, model sha256 {est.metadata['model_sha256'][:12]}…"
    )
    if args.index == "auto":
        print(est.metadata["index_choice"])
    return 0
