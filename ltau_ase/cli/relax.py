"""``ltau relax``: batch relaxations with per-atom uncertainties on Dask, results in an ase.db.

Re-running the same command after a crash or kill skips the systems already in the database; two
commands on one database never relax or store a system twice (each claims its systems first).
The calculator is ``LTAUCalculator.from_model(--model, --estimator)`` (through the model backend's batch factory), or any picklable, hashable
factory importable as ``--factory module:name`` (a callable returning an ASE calculator that
provides per-atom ``uncertainties``). The calculator is built once before any system is submitted,
so a bad model, estimator or factory fails at once. The in-process Dask cluster listens on
127.0.0.1 only and serves no dashboard unless ``--dashboard`` asks for one.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ltau_ase.cli.options import (
    add_alias,
    add_model_options,
    atom_reduce,
    atom_selection,
    check_model_options,
    check_output_file,
    load_factory,
    non_negative_int,
    positive_float,
    positive_int,
    scheduler_address,
)

# kept importable for older callers: `ltau_ase.cli.relax.load_factory`
__all__ = ["add_arguments", "run", "factory_from_args", "load_factory"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = add_model_options(parser)
    add_alias(model, "--threshold", dest="error_threshold", type=positive_float)  # before: force-error threshold
    parser.add_argument("--structures", type=Path, required=True,
                        help="initial structures (extxyz or ase.db); names from info/key 'name', else derived "
                             "from the structure's content (see ltau_ase.simulate.batch.content_name)")
    parser.add_argument("--db", type=Path, required=True, help="results database (SQLite ase.db)")
    parser.add_argument("--references", type=Path, default=None,
                        help="reference relaxed structures (extxyz or ase.db), matched by name, stored for reports")
    parser.add_argument("--optimizer", choices=("BFGS", "LBFGS", "FIRE", "oc20"), default="BFGS",
                        help="oc20 = LBFGS with maxstep 0.04, memory 50, damping 1, alpha 70 (default BFGS)")
    parser.add_argument("--fmax", type=positive_float, default=0.05, help="force convergence criterion, eV/Å (0.05)")
    parser.add_argument("--steps", type=non_negative_int, default=300, help="maximum optimizer steps (300)")
    dask = parser.add_argument_group("Dask")
    dask.add_argument("--scheduler", type=scheduler_address, default=None,
                      help="address of a running Dask scheduler (default: an in-process cluster on 127.0.0.1)")
    dask.add_argument("--scheduler-timeout", type=positive_float, default=30.0,
                      help="seconds to wait for --scheduler to answer (30)")
    dask.add_argument("--workers", type=positive_int, default=1,
                      help="in-process cluster workers, each with its own model (1)")
    dask.add_argument("--dashboard", nargs="?", const="127.0.0.1:8787", default=None, metavar="HOST:PORT",
                      help="serve the Dask dashboard of the in-process cluster (default address 127.0.0.1:8787)")
    parser.add_argument("--atom-reduce", type=atom_reduce, default="mean",
                        help="'mean', 'max' or a quantile in [0, 1] (mean)")
    parser.add_argument("--select", type=atom_selection, default="free",
                        help="atoms the UQ is reduced over: free, all, or tags like 1,2")
    parser.add_argument("--retry-failed", action="store_true", help="relax systems recorded as failed again")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def factory_from_args(args: argparse.Namespace):
    """The picklable calculator factory the workers call (``--factory`` or model + estimator)."""
    from ltau_ase.simulate.backends import backend_for

    check_model_options(args)
    if args.factory is not None:
        return load_factory(args.factory)
    return backend_for(args.model).ltau_factory(
        str(args.model.resolve()), str(args.estimator.resolve()), device=args.device, threshold=args.error_threshold,
        allow_model_mismatch=args.allow_model_mismatch, unknown_species=args.unknown_species)


def run(args: argparse.Namespace) -> int:
    from ltau_ase.simulate.batch import relax_batch

    check_output_file(args.db, "--db")
    for option, path in (("--structures", args.structures), ("--references", args.references)):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{option} {path} does not exist or is not a file")
    if args.scheduler is not None and (args.workers != 1 or args.dashboard is not None):
        raise ValueError("--workers and --dashboard configure the in-process cluster; they do not apply with "
                         "--scheduler")
    factory = factory_from_args(args)
    factory()  # build the calculator once here: a bad model, estimator or factory fails before any work
    counts = relax_batch(str(args.structures), str(args.db), factory, optimizer=args.optimizer, fmax=args.fmax,
                         steps=args.steps, scheduler=args.scheduler, n_workers=args.workers,
                         references=None if args.references is None else str(args.references),
                         progress=not args.no_progress, atom_reduce=args.atom_reduce,
                         select=args.select, retry_failed=args.retry_failed, dashboard=args.dashboard,
                         scheduler_timeout=args.scheduler_timeout)
    print(f"{counts['total']} systems: {counts['done']} done, {counts['unconverged']} unconverged, "
          f"{counts['failed']} failed, {counts['skipped']} already in {args.db}")
    if counts.get("busy"):
        print(f"{counts['busy']} system(s) are being relaxed by another running process ({counts['busy_owner']}) "
              "and were left to it")
    return 0
