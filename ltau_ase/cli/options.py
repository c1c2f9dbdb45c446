"""Shared pieces of the ``ltau`` command line: validating argument types, the model/estimator option
group, hidden aliases of renamed options, and up-front checks of output paths.

Every numeric option is checked when the command line is parsed (argparse ``type=`` functions), so a
bad value fails in one line before any file is read or any model is loaded. Options are named by the
quantity they hold: ``--error-threshold`` (a force error, eV/Å), ``--stop-threshold`` (a UQ value),
``--rmsd-threshold`` (a displacement, Å). Older names stay accepted as hidden aliases.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ltau_ase.core.paths import check_writable_dir, check_writable_file


# ----------------------------------------------------------------------------- argparse type functions
def _number(text: str, kind: type, what: str, ok: Callable[[Any], bool]) -> Any:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    """An integer ≥ 1 (counts of workers, steps between frames, neighbours, bins, ...)."""
    return _number(text, int, "a positive integer", lambda v: v >= 1)


def non_negative_int(text: str) -> int:
    """An integer ≥ 0 (step budgets, skipped epochs, seeds)."""
    return _number(text, int, "an integer >= 0", lambda v: v >= 0)


def at_least_two(text: str) -> int:
    """An integer ≥ 2 (a warm-up that defines a standard deviation)."""
    return _number(text, int, "an integer >= 2", lambda v: v >= 2)


def positive_float(text: str) -> float:
    """A finite number > 0 (thresholds in eV/Å or Å, time steps)."""
    return _number(text, float, "a finite number > 0", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    """A finite number ≥ 0 (temperatures in K, friction in 1/fs, UQ bounds, λ)."""
    return _number(text, float, "a finite number >= 0", lambda v: v >= 0)


def probability(text: str) -> float:
    """A number in [0, 1] (confidence thresholds, quantiles)."""
    return _number(text, float, "a number in [0, 1]", lambda v: 0.0 <= v <= 1.0)


def open_fraction(text: str) -> float:
    """A number strictly between 0 and 1 (coverages, false-alarm rates)."""
    return _number(text, float, "a number in (0, 1)", lambda v: 0.0 < v < 1.0)


def atom_reduce(text: str) -> str | float:
    """``mean``, ``max`` or a quantile in [0, 1]: how per-atom UQ values become one number."""
    if text in ("mean", "max"):
        return text
    try:
        return probability(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'mean', 'max' or a quantile in [0, 1], got {text!r}") from None


def atom_selection(text: str) -> str | list[int]:
    """``free``, ``all`` or comma-separated non-negative tags like ``1,2``."""
    if text in ("free", "all"):
        return text
    try:
        tags = [int(t) for t in text.split(",")]
    except ValueError:
        tags = []
    if not tags or any(t < 0 for t in tags):
        raise argparse.ArgumentTypeError(f"expected 'free', 'all' or comma-separated tags like 1,2; got {text!r}")
    return tags


def factory_spec(text: str) -> str:
    """``module:name`` of a calculator factory (imported when the command runs)."""
    module, _, name = text.partition(":")
    if not module or not name or not all(part.isidentifier() for part in module.split(".") + name.split(".")):
        raise argparse.ArgumentTypeError(f"expected module:name (e.g. mypackage.calcs:make_calc), got {text!r}")
    return text


def scheduler_address(text: str) -> str:
    """A Dask scheduler address: ``tcp://host:port`` (or ``tls://``, ``ucx://``, ``ws://``), or
    ``host:port``."""
    protocol, sep, rest = text.rpartition("://")
    host_port = rest if sep else text
    host, _, port = host_port.rpartition(":")
    if (sep and protocol not in ("tcp", "tls", "ucx", "ws", "wss")) or not host or not port.isdigit() \
            or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected a scheduler address like tcp://host:8786, got {text!r}")
    return text


def byte_size(text: str) -> int:
    """``"4G"``, ``"4GB"``, ``"512M"``, ``"4e9"`` -> bytes (decimal units: 1G = 1e9 bytes), > 0."""
    units = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    t = text.strip().upper().removesuffix("B")
    scale = units.get(t[-1:])
    try:
        value = float(t[:-1] if scale else t) * (scale or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 4G, 512M or 4e9 bytes, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a size > 0, got {text!r}")
    return int(value)


# ----------------------------------------------------------------------------- option groups
def add_dask_options(parser: argparse.ArgumentParser, what: str = "model") -> argparse._ArgumentGroup:
    """``--scheduler``, ``--scheduler-timeout``, ``--workers``, ``--dashboard`` (``ltau relax``, ``predict``)."""
    dask = parser.add_argument_group("Dask")
    dask.add_argument("--scheduler", type=scheduler_address, default=None,
                      help="address of a running Dask scheduler (default: an in-process cluster on 127.0.0.1)")
    dask.add_argument("--scheduler-timeout", type=positive_float, default=30.0,
                      help="seconds to wait for --scheduler to answer (30)")
    dask.add_argument("--workers", type=positive_int, default=1,
                      help=f"in-process cluster workers, each with its own {what} (1)")
    dask.add_argument("--dashboard", nargs="?", const="127.0.0.1:8787", default=None, metavar="HOST:PORT",
                      help="serve the Dask dashboard of the in-process cluster (default address 127.0.0.1:8787)")
    return dask


def check_dask_options(args: argparse.Namespace) -> None:
    """``--workers`` and ``--dashboard`` configure the in-process cluster only."""
    if args.scheduler is not None and (args.workers != 1 or args.dashboard is not None):
        raise ValueError("--workers and --dashboard configure the in-process cluster; they do not apply with "
                         "--scheduler")


def add_alias(parser: argparse.ArgumentParser | Any, old: str, dest: str, type: Callable[[str], Any]) -> None:
    """Accept the old option name ``old`` for ``dest``, hidden from ``--help``."""
    parser.add_argument(old, dest=dest, type=type, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_model_options(parser: argparse.ArgumentParser, *, estimator: bool = True,
                      model_help: str = "nequip model checkpoint (.ckpt)") -> argparse._ArgumentGroup:
    """The model (and estimator) options shared by ``ltau relax``, ``md``, ``fit``, ...

    ``estimator=True`` adds ``--estimator``, ``--factory``, ``--error-threshold`` (eV/Å),
    ``--allow-model-mismatch`` and ``--unknown-species``; ``estimator=False`` only ``--model`` and
    ``--device``. Returns the argument group, for command-specific additions.
    """
    group = parser.add_argument_group("model")
    group.add_argument("--model", type=Path, default=None, help=model_help)
    group.add_argument("--device", default="cpu", help="torch device of the model (cpu)")
    if estimator:
        group.add_argument("--estimator", type=Path, default=None, help="LTAU estimator file (.ltau) fitted for --model")
        group.add_argument("--factory", type=factory_spec, default=None, metavar="MODULE:NAME",
                           help="instead of --model/--estimator: a calculator factory to import")
        group.add_argument("--error-threshold", type=positive_float, default=None, metavar="EV_PER_A",
                           help="force-error threshold of the confidences, eV/Å (default: the estimator's atol)")
        group.add_argument("--allow-model-mismatch", action="store_true",
                           help="use an estimator fitted for a different model file (warns)")
        group.add_argument("--unknown-species", choices=UNKNOWN_SPECIES_CHOICES, default=None,
                           help="elements the estimator never saw: fail (raise), give their atoms uncertainty 1 "
                                "(flag) or judge them by their latent neighbours alone (ignore) (default: the "
                                "estimator's policy, raise unless it was fitted otherwise)")
    return group


#: LTAUEstimator's unknown-species vocabulary (core.estimator.UNKNOWN_SPECIES_POLICIES; spelled out so that
#: `ltau --help` does not import FAISS; tests/test_readme.py checks they agree)
UNKNOWN_SPECIES_CHOICES = ("raise", "flag", "ignore")


def check_model_options(args: argparse.Namespace) -> None:
    """``--factory`` xor ``--model`` + ``--estimator``, and the files exist (before anything runs)."""
    if args.factory is not None:
        if args.model is not None or args.estimator is not None:
            raise ValueError("give either --factory or --model/--estimator, not both")
        return
    if args.model is None or args.estimator is None:
        raise ValueError("--model and --estimator are required (or --factory module:name)")
    for option, path in (("--model", args.model), ("--estimator", args.estimator)):
        if not path.is_file():
            raise FileNotFoundError(f"{option} {path} does not exist or is not a file")


def load_factory(spec: str) -> Callable[..., Any]:
    """The object named by ``module:name`` (``--factory``)."""
    import importlib

    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"--factory must look like module:name, got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"--factory {spec}: cannot import module {exc.name!r} (is it on PYTHONPATH?)") from None
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--factory {spec}: module {module_name!r} has no attribute {name!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"--factory {spec} is a {type(obj).__name__}, not a callable returning a calculator")
    return obj


# ----------------------------------------------------------------------------- output paths
def check_output_file(path: Path, option: str) -> None:
    """Fail now, not after the work, when ``path`` cannot be written as a file (see
    :func:`ltau_ase.core.paths.check_writable_file`)."""
    check_writable_file(path, option)


def check_output_dir(path: Path, option: str) -> None:
    """Fail now when files cannot be created in directory ``path`` (created later if absent)."""
    check_writable_dir(path, option)
