"""``ltau relax``: batch relaxations with per-atom uncertainties on Dask, results in an ase.db.

Re-running the same command after a crash or kill skips the systems already in the database.
The calculator is ``LTAUCalculator.from_model(--model, --estimator)`` (through the model backend's batch factory), or any picklable, hashable
factory importable as ``--factory module:name`` (a callable returning an ASE calculator that
provides per-atom ``uncertainties``).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="nequip model (.ckpt or .nequip.zip)")
    parser.add_argument("--estimator", type=Path, help="LTAU estimator file fitted for --model")
    parser.add_argument("--factory", default=None, metavar="MODULE:NAME",
                        help="instead of --model/--estimator: a calculator factory to import")
    parser.add_argument("--structures", type=Path, required=True,
                        help="initial structures (extxyz or ase.db; names from info/key 'name')")
    parser.add_argument("--db", type=Path, required=True, help="results database (SQLite ase.db)")
    parser.add_argument("--references", type=Path, default=None,
                        help="reference relaxed structures (extxyz or ase.db), matched by name, stored for reports")
    parser.add_argument("--optimizer", choices=("BFGS", "LBFGS", "FIRE", "oc20"), default="BFGS",
                        help="oc20 = LBFGS with maxstep 0.04, memory 50, damping 1, alpha 70 (default BFGS)")
    parser.add_argument("--fmax", type=float, default=0.05, help="force convergence criterion, eV/Å (0.05)")
    parser.add_argument("--steps", type=int, default=300, help="maximum optimizer steps (300)")
    parser.add_argument("--scheduler", default=None,
                        help="address of a running Dask scheduler (default: an in-process LocalCluster)")
    parser.add_argument("--workers", type=int, default=1, help="LocalCluster workers, each with its own model (1)")
    parser.add_argument("--device", default="cpu", help="torch device of the model (cpu)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="force-error threshold of the confidences, eV/Å (default: the estimator's atol)")
    parser.add_argument("--atom-reduce", default="mean", help="'mean', 'max' or a quantile in [0, 1] (mean)")
    parser.add_argument("--select", default="free", help="atoms the UQ is reduced over: free, all, or tags like 1,2")
    parser.add_argument("--allow-model-mismatch", action="store_true",
                        help="use an estimator fitted for a different model file (warns)")
    parser.add_argument("--unknown-species", choices=("raise", "flag"), default="raise",
                        help="elements the estimator never saw: fail the system (raise) or give their atoms "
                             "uncertainty 1 (flag)")
    parser.add_argument("--retry-failed", action="store_true", help="relax systems recorded as failed again")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_reduce(text: str):
    return text if text in ("mean", "max") else float(text)


def parse_select(text: str):
    if text in ("free", "all"):
        return text
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"--select must be 'free', 'all' or comma-separated tags like 1,2; got {text!r}") from None


def load_factory(spec: str):
    import importlib

    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--factory must look like module:name, got {spec!r}")
    return getattr(importlib.import_module(module), name)


def factory_from_args(args: argparse.Namespace):
    from ltau_ase.simulate.backends import backend_for

    if args.factory is not None:
        if args.model is not None or args.estimator is not None:
            raise ValueError("give either --factory or --model/--estimator, not both")
        return load_factory(args.factory)
    if args.model is None or args.estimator is None:
        raise ValueError("--model and --estimator are required (or --factory module:name)")
    for path in (args.model, args.estimator):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
    return backend_for(args.model).ltau_factory(
        str(args.model.resolve()), str(args.estimator.resolve()), device=args.device, threshold=args.threshold,
        allow_model_mismatch=args.allow_model_mismatch, unknown_species=args.unknown_species)


def run(args: argparse.Namespace) -> int:
    from ltau_ase.simulate.batch import relax_batch

    factory = factory_from_args(args)
    counts = relax_batch(str(args.structures), str(args.db), factory, optimizer=args.optimizer, fmax=args.fmax,
                         steps=args.steps, scheduler=args.scheduler, n_workers=args.workers,
                         references=None if args.references is None else str(args.references),
                         progress=not args.no_progress, atom_reduce=parse_reduce(args.atom_reduce),
                         select=parse_select(args.select), retry_failed=args.retry_failed)
    print(f"{counts['total']} systems: {counts['done']} done, {counts['unconverged']} unconverged, "
          f"{counts['failed']} failed, {counts['skipped']} already in {args.db}")
    return 0
