"""``ltau md``: Langevin or NVE molecular dynamics that stops when the uncertainty is too high.

Every ``--interval`` steps (and at the stopping step) a frame goes to the extxyz ``--trajectory``
with the energy, forces and per-atom UQ columns (``ltau_uncertainties``, ``ltau_confidences``,
``ltau_expected_force_errors``, ``ltau_latent_distances``; ``ltau_force_error_bounds`` with
``--coverage``; ``ltau_latent_distance_ratios`` with an estimator from ``ltau calibrate``). The file is
flushed after each frame. The stop watches ``--stop-statistic`` (units in its help; under distribution
shift use ``expected_force_errors``, eV/Å, which does not saturate) and its threshold is
``--stop-threshold``, or chosen from in-domain ``--reference-runs`` (earlier ``ltau md --interval 1``
trajectories run with a threshold they never reach) for a stated ``--false-alarm-rate``
(``--threshold-method``: conformal, or a Gumbel fit to the runs' peaks for rates below 1/(runs + 1)).
With ``--element-quantile Q`` the stop divides each atom's value by its element's in-domain Q quantile
(from the same reference runs) before the reduction, and the threshold is chosen on those
element-normalised traces (dimensionless).
Langevin runs with ``fixcm=False``; a ``FixCom`` constraint keeps the centre of mass in place
unless the structure has ``FixAtoms`` (which already pins it).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ltau_ase.cli.options import (
    add_alias,
    add_model_options,
    at_least_two,
    atom_reduce,
    check_model_options,
    check_output_file,
    load_factory,
    non_negative_float,
    non_negative_int,
    open_fraction,
    positive_float,
    positive_int,
)


# the keys of ltau_ase.simulate.observers.STOP_STATISTICS (not imported here: parsing stays ASE-free)
STOP_STATISTIC_CHOICES = ("uncertainties", "expected_force_errors", "latent_distance_ratios", "latent_distances")
# ltau_ase.simulate.observers.THRESHOLD_METHODS, likewise
THRESHOLD_METHODS = ("conformal", "gumbel")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = add_model_options(parser)
    add_alias(model, "--uq-threshold", dest="error_threshold", type=positive_float)  # before: force-error threshold
    parser.add_argument("--structure", type=Path, required=True, help="initial structure (any ASE-readable file)")
    parser.add_argument("--index", type=int, default=-1, help="frame of --structure to start from (-1: last)")
    parser.add_argument("--ensemble", choices=("langevin", "nve"), default="langevin",
                        help="langevin (NVT) or nve (velocity Verlet) (langevin)")
    parser.add_argument("--temperature", type=non_negative_float, default=300.0,
                        help="K: Langevin target and initial Maxwell-Boltzmann velocities (300)")
    parser.add_argument("--timestep", type=positive_float, default=1.0, help="fs (1.0)")
    parser.add_argument("--friction", type=non_negative_float, default=0.01, help="Langevin friction, 1/fs (0.01)")
    parser.add_argument("--steps", type=non_negative_int, default=1000, help="maximum MD steps (1000)")
    stop = parser.add_argument_group("uncertainty stop")
    stop.add_argument("--stop-threshold", type=non_negative_float, default=None, metavar="VALUE",
                      help="stop when the reduced value (--stop-statistic, --atom-reduce; in its unit) exceeds this "
                           "(required unless --adaptive or --reference-runs)")
    add_alias(stop, "--threshold", dest="stop_threshold", type=non_negative_float)  # before: the stop bound
    stop.add_argument("--reference-runs", type=Path, nargs="+", default=None, metavar="EXTXYZ",
                      help="in-domain runs written by `ltau md --interval 1` (e.g. with a huge --stop-threshold): the "
                           "threshold is chosen from their per-step --stop-statistic for --false-alarm-rate")
    stop.add_argument("--false-alarm-rate", type=open_fraction, default=None,
                      help="with --reference-runs: tolerated share of in-domain runs that stop, in (0, 1)")
    stop.add_argument("--threshold-method", choices=THRESHOLD_METHODS, default="conformal",
                      help="with --reference-runs: conformal (distribution-free; needs a rate >= 1/(runs + 1)) or "
                           "gumbel (extreme-value fit to the runs' peaks, >= 10 runs; any rate, model-based) "
                           "(conformal)")
    stop.add_argument("--element-quantile", type=open_fraction, default=None, metavar="Q",
                      help="with --reference-runs: divide each atom's value by its element's Q quantile over the "
                           "reference runs (e.g. 0.99) before --atom-reduce, so every element is judged against its "
                           "own in-domain range; the threshold is then dimensionless (default: off)")
    stop.add_argument("--patience", type=positive_int, default=1, help="consecutive steps above the threshold (1)")
    stop.add_argument("--stop-statistic", dest="key", choices=STOP_STATISTIC_CHOICES, default="uncertainties",
                      help="per-atom UQ the stop watches, reduced by --atom-reduce; its unit is the threshold's: "
                           "uncertainties (probability in [0, 1]; saturates at 1), expected_force_errors (eV/Å; "
                           "distance-aware and unbounded with an estimator from `ltau calibrate`: use it under "
                           "distribution shift), latent_distance_ratios (dimensionless, 1 = a typical training "
                           "neighbourhood; needs `ltau calibrate`), latent_distances (latent units) (uncertainties)")
    stop.add_argument("--key", dest="key", choices=STOP_STATISTIC_CHOICES, default=argparse.SUPPRESS,
                      help=argparse.SUPPRESS)  # the earlier name of --stop-statistic
    stop.add_argument("--atom-reduce", type=atom_reduce, default="max",
                      help="'max', 'mean' or a quantile in [0, 1] (max)")
    stop.add_argument("--adaptive", action="store_true",
                      help="stop above running mean + n_sigma × std after --warmup steps")
    stop.add_argument("--warmup", type=at_least_two, default=20, help="adaptive warm-up steps (20)")
    stop.add_argument("--n-sigma", type=non_negative_float, default=3.0,
                      help="adaptive bound in standard deviations (3)")
    stop.add_argument("--save-to", type=Path, default=None, help="extxyz receiving the triggering frame")
    parser.add_argument("--coverage", type=open_fraction, default=None,
                        help="also write conformal force_error_bounds (eV/Å) at this coverage in (0, 1); needs an "
                             "estimator from `ltau calibrate`")
    parser.add_argument("--trajectory", type=Path, default=Path("md.extxyz"), help="extxyz output (md.extxyz)")
    parser.add_argument("--interval", type=positive_int, default=1, help="write every N steps (1)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of velocities and Langevin noise (0)")


def _calculator(args: argparse.Namespace):
    check_model_options(args)
    if args.factory is not None:
        return load_factory(args.factory)()
    from ltau_ase.simulate.calculator import LTAUCalculator

    return LTAUCalculator.from_model(args.model, args.estimator, device=args.device, threshold=args.error_threshold,
                                     allow_model_mismatch=args.allow_model_mismatch,
                                     unknown_species=args.unknown_species, coverage=args.coverage)


def _read_structure(path: Path, index: int):
    from ase.io import read

    if not path.is_file():
        raise FileNotFoundError(f"--structure {path} does not exist or is not a file")
    try:
        atoms = read(path, index=index)
    except Exception as exc:  # ASE raises many types for an empty or garbled file
        raise ValueError(f"cannot read a structure from {path} (frame {index}): {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())}") from None
    if len(atoms) == 0:
        raise ValueError(f"{path} frame {index} holds no atoms")
    return atoms


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from ase import units
    from ase.calculators.calculator import all_properties
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixAtoms, FixCom
    from ase.io import write
    from ase.md.langevin import Langevin
    from ase.md.verlet import VelocityVerlet

    from ltau_ase.simulate.calculator import PER_ATOM_UQ, PER_STRUCTURE_UQ, check_finite_geometry, store_uq_in_atoms
    from ltau_ase.simulate.md import thermalize
    from ltau_ase.simulate.observers import UncertaintyStop

    if (args.reference_runs is None) != (args.false_alarm_rate is None):
        raise ValueError("--reference-runs and --false-alarm-rate go together")
    scales = None
    if args.element_quantile is not None and args.reference_runs is None:
        raise ValueError("--element-quantile needs --reference-runs (the scales come from them)")
    if args.reference_runs is not None:
        if args.stop_threshold is not None:
            raise ValueError("give either --stop-threshold or --reference-runs/--false-alarm-rate, not both")
        args.stop_threshold, scales = reference_threshold(
            args.reference_runs, args.key, args.atom_reduce, args.false_alarm_rate, args.patience,
            args.threshold_method, element_quantile=args.element_quantile)
        print(f"stop threshold {args.stop_threshold:.6g} from {len(args.reference_runs)} reference runs "
              f"(false-alarm rate {args.false_alarm_rate:g}, {args.threshold_method}, patience {args.patience})")
        if scales is not None:
            print(f"per-element scales ({args.element_quantile:g} quantile of {args.key}): "
                  + ", ".join(f"Z={z}: {v:.6g}" for z, v in scales.items()))
    if args.stop_threshold is None and not args.adaptive:
        raise ValueError("--stop-threshold is required unless --adaptive or --reference-runs")
    check_output_file(args.trajectory, "--trajectory")
    if args.save_to is not None:
        check_output_file(args.save_to, "--save-to")
    atoms = _read_structure(args.structure, args.index)
    check_finite_geometry(atoms)
    atoms.calc = _calculator(args)
    rng = np.random.default_rng(args.seed)
    thermalize(atoms, args.temperature, rng)
    if args.ensemble == "langevin":
        if not any(isinstance(c, FixAtoms) for c in atoms.constraints):
            atoms.set_constraint(list(atoms.constraints) + [FixCom()])
        dyn = Langevin(atoms, timestep=args.timestep * units.fs, temperature_K=args.temperature,
                       friction=args.friction / units.fs, fixcm=False, rng=rng, logfile=None)
    else:
        dyn = VelocityVerlet(atoms, timestep=args.timestep * units.fs, logfile=None)

    args.trajectory.parent.mkdir(parents=True, exist_ok=True)
    if args.save_to is not None:
        args.save_to.parent.mkdir(parents=True, exist_ok=True)
    handle = open(args.trajectory, "w")
    written: set[int] = set()

    def write_frame() -> None:
        frame = atoms.copy()
        results = atoms.calc.results
        frame.calc = SinglePointCalculator(frame, **{k: v for k, v in results.items() if k in all_properties})
        if any(k in results for k in PER_ATOM_UQ + PER_STRUCTURE_UQ):
            store_uq_in_atoms(frame, results)
        frame.info.update(md_step=int(dyn.nsteps), md_time_fs=float(dyn.get_time() / units.fs),
                          temperature_K=float(atoms.get_temperature()))
        write(handle, frame, format="extxyz")
        handle.flush()
        written.add(int(dyn.nsteps))

    def on_trigger(_atoms, info) -> None:
        if info["step"] not in written:  # the frame writer runs every --interval steps only
            write_frame()

    dyn.attach(write_frame, interval=args.interval)
    stop = UncertaintyStop(dyn, args.stop_threshold, key=args.key, atom_reduce=args.atom_reduce,
                           patience=args.patience, on_trigger=on_trigger, save_to=args.save_to,
                           adaptive=args.adaptive, warmup=args.warmup, n_sigma=args.n_sigma,
                           element_scales=scales)
    dyn.attach(stop)
    try:
        dyn.run(args.steps)
    finally:
        handle.close()
    if stop.triggered:
        print(f"stopped at step {stop.step} (t = {stop.step * args.timestep:g} fs): {stop.reason}")
    else:
        peak = max(stop.values) if stop.values else float("nan")
        print(f"completed {dyn.nsteps} steps without stopping; highest {args.key} value {peak:.6g}")
    print(f"{len(written)} frames written to {args.trajectory}")
    return 0


def reference_threshold(paths, key: str, atom_reduce, false_alarm_rate: float, patience: int,
                        method: str = "conformal", element_quantile: float | None = None):
    """:func:`ltau_ase.simulate.observers.reference_stop_threshold` over the per-atom ``ltau_<key>``
    columns of extxyz runs: ``(threshold, per-element scales or None)``."""
    import numpy as np
    from ase.io import read

    from ltau_ase.simulate.observers import reference_stop_threshold

    per_atom, numbers = [], []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no reference run at {path}")
        frames = read(path, index=":")
        if not frames:
            raise ValueError(f"{path} holds no frame; a reference run needs at least one")
        column = "ltau_" + key
        missing = [i for i, a in enumerate(frames) if column not in a.arrays]
        if missing:
            raise ValueError(f"{path} frame {missing[0]} has no {column!r} column; reference runs must be written by "
                             f"`ltau md` with an estimator that provides {key!r}")
        steps = [a.info.get("md_step") for a in frames]
        if None not in steps and len(steps) > 1 and np.any(np.diff(steps) != 1):
            raise ValueError(f"{path} was not written at every step (--interval 1); patience counts steps")
        if any(len(a) != len(frames[0]) or np.any(a.numbers != frames[0].numbers) for a in frames):
            raise ValueError(f"{path}: the atoms change between frames; a reference run is one MD trajectory")
        per_atom.append(np.stack([np.asarray(a.arrays[column], dtype=np.float64) for a in frames]))
        numbers.append(frames[0].numbers)
    return reference_stop_threshold(per_atom, numbers, false_alarm_rate, patience, method, atom_reduce,
                                    element_quantile)
