"""The ``ltau`` command line: a thin layer of argument parsing over the Python API.

Each subcommand lives in its own module ``ltau_ase.cli.<name>`` exposing
``add_arguments(parser)`` and ``run(args) -> int``; heavy imports happen inside ``run``.

Every failure is one line on stderr and exit status 2, whatever the exception (a usage error, a bad
file, a permission, a database, a network or a memory error); ``--debug`` (or ``LTAU_DEBUG=1``) shows
the traceback instead. Ctrl-C exits with status 130.
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
    "predict": "per-atom uncertainties of many structures (Dask, results in ase.db, resumable)",
    "report": "IS2RS-style analysis of a relaxation database against reference structures",
    "md": "molecular dynamics that stops when the uncertainty is too high",
    "reweight": "confidence map and re-weighted training set (dataset cartography)",
    "compile": "compile a nequip checkpoint with its estimator into one model that outputs LTAU per atom",
    "convert": "rewrite an estimator file in the current format (--verify: check every digest and value)",
    "learn": "active-learning campaign: explore, flag, select, label, retrain, refit (resumable)",
    "calibrate": "choose k and fit distance-aware, per-element and conformal calibration on a labelled file",
}

#: exit status of every failure (as argparse uses for usage errors)
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class OneLineParser(argparse.ArgumentParser):
    """``ArgumentParser`` whose usage errors are one line: ``ltau relax: error: ...`` (status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_debug(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show the full traceback of an error instead of one line")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="ltau", description="LTAU uncertainties for ML force fields in ASE")
    _add_debug(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        module = importlib.import_module(f"ltau_ase.cli.{name}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        _add_debug(p, argparse.SUPPRESS)  # `ltau relax ... --debug` as well as `ltau --debug relax ...`
        p.set_defaults(_run=module.run)
    return parser


def one_line(exc: BaseException) -> str:
    """``exc`` as one line: the message alone for input errors, prefixed by the type otherwise."""
    text = " ".join(str(exc).split())
    if isinstance(exc, MemoryError):
        return f"out of memory{': ' + text if text else ''} (MemoryError)"
    if type(exc) in (ValueError, FileNotFoundError, FileExistsError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False)) or bool(os.environ.get("LTAU_DEBUG"))
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"ltau {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # every failure, whatever its type: one line (the traceback with --debug)
        if debug:
            raise
        print(f"ltau {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
