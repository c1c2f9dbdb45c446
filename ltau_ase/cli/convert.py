"""``ltau convert``: rewrite an estimator file in the current format, or verify one in full.

Examples::

    ltau convert old.ltau new.ltau      # format 1 (npz) or 2 -> format 2 (memory-mappable)
    ltau convert --verify big.ltau      # stream every SHA-256 digest and value check

Opening a large estimator (``LTAUEstimator.load``) checks the digests and values of arrays up to
64 MiB only and memory-maps larger ones unchecked, to stay fast; ``--verify`` checks everything in
constant memory and exits 2 with one line naming the first problem.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="estimator file to read (.ltau, format 1 or 2)")
    parser.add_argument("output", type=Path, nargs="?", default=None, help="format-2 file to write")
    parser.add_argument("--verify", action="store_true",
                        help="check every array's digest and values (streamed); with OUTPUT, before converting")


def run(args: argparse.Namespace) -> int:
    from ltau_ase.core.estimator import LTAUEstimator

    if args.output is None and not args.verify:
        raise ValueError("give an OUTPUT file to convert to, or --verify to check INPUT only")
    if args.output is not None and args.output.is_dir():
        raise ValueError(f"output {args.output} is a directory; expected a file path")
    est = LTAUEstimator.load(args.input, verify=True if args.verify else None)
    if args.verify:
        print(f"{args.input}: ok ({est.n_train_atoms_} training atoms, D={est.n_features_in_}, "
              f"{est.index_.kind} index; every digest and value checked)")
    if args.output is not None:
        est.save(args.output)
        print(f"wrote {args.output} (format 2) from {args.input}")
    return 0
