"""The ``ltau`` command line: a thin layer of argument parsing over the Python API.

Each subcommand lives in its own module ``ltau_ase.cli.<name>`` exposing
``add_arguments(parser)`` and ``run(args) -> int``; heavy imports happen inside ``run``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> one-line help; the module ltau_ase.cli.<name> implements it
SUBCOMMANDS = {
    "fit": "fit an LTAU estimator from nequip run directories and their training data",
    "relax": "batch relaxations with per-atom uncertainties (Dask, results in ase.db)",
    "report": "IS2RS-style analysis of a relaxation database against reference structures",
    "md": "molecular dynamics that stops when the uncertainty is too high",
    "reweight": "confidence map and re-weighted training set (dataset cartography)",
    "calibrate": "choose k and fit distance-aware, per-element and conformal calibration on a labelled file",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltau", description="LTAU uncertainties for ML force fields in ASE")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        module = importlib.import_module(f"ltau_ase.cli.{name}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        # Bad input is the user's to fix: say what was wrong in one line (LTAU_DEBUG=1 shows the traceback).
        if os.environ.get("LTAU_DEBUG"):
            raise
        print(f"ltau {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
