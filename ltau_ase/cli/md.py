"""``ltau md``: Langevin or NVE molecular dynamics that stops when the uncertainty is too high.

Every ``--interval`` steps (and at the stopping step) a frame goes to the extxyz ``--trajectory``
with the energy, forces and per-atom UQ columns (``ltau_uncertainties``, ``ltau_confidences``,
``ltau_expected_force_errors``, ``ltau_latent_distances``; ``ltau_force_error_bounds`` with
``--coverage``). The stop threshold is ``--threshold``, or chosen from in-domain ``--reference-runs``
(earlier ``ltau md --threshold inf --interval 1`` trajectories) for a ``--false-alarm-rate``. The file is flushed after each frame.
Langevin runs with ``fixcm=False``; a ``FixCom`` constraint keeps the centre of mass in place
unless the structure has ``FixAtoms`` (which already pins it).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ltau_ase.cli.relax import load_factory, parse_reduce


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="nequip model (.ckpt or .nequip.zip)")
    parser.add_argument("--estimator", type=Path, help="LTAU estimator file fitted for --model")
    parser.add_argument("--factory", default=None, metavar="MODULE:NAME",
                        help="instead of --model/--estimator: a calculator factory to import")
    parser.add_argument("--structure", type=Path, required=True, help="initial structure (any ASE-readable file)")
    parser.add_argument("--index", type=int, default=-1, help="frame of --structure to start from (-1: last)")
    parser.add_argument("--ensemble", choices=("langevin", "nve"), default="langevin",
                        help="langevin (NVT) or nve (velocity Verlet) (langevin)")
    parser.add_argument("--temperature", type=float, default=300.0,
                        help="K: Langevin target and initial Maxwell-Boltzmann velocities (300)")
    parser.add_argument("--timestep", type=float, default=1.0, help="fs (1.0)")
    parser.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs (0.01)")
    parser.add_argument("--steps", type=int, default=1000, help="maximum MD steps (1000)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="stop when the reduced UQ exceeds this (required unless --adaptive)")
    parser.add_argument("--reference-runs", type=Path, nargs="+", default=None, metavar="EXTXYZ",
                        help="in-domain runs written by `ltau md --interval 1` (e.g. with --threshold inf): the "
                             "threshold is chosen from their per-step --key statistic for --false-alarm-rate")
    parser.add_argument("--false-alarm-rate", type=float, default=None,
                        help="with --reference-runs: tolerated share of in-domain runs that stop, in (0, 1)")
    parser.add_argument("--patience", type=int, default=1, help="consecutive steps above the threshold (1)")
    parser.add_argument("--key", default="uncertainties",
                        help="per-atom UQ watched: uncertainties, expected_force_errors, latent_distances")
    parser.add_argument("--atom-reduce", default="max", help="'max', 'mean' or a quantile in [0, 1] (max)")
    parser.add_argument("--adaptive", action="store_true",
                        help="stop above running mean + n_sigma × std after --warmup steps")
    parser.add_argument("--warmup", type=int, default=20, help="adaptive warm-up steps (20)")
    parser.add_argument("--n-sigma", type=float, default=3.0, help="adaptive bound in standard deviations (3)")
    parser.add_argument("--uq-threshold", type=float, default=None,
                        help="force-error threshold of the confidences, eV/Å (default: the estimator's atol)")
    parser.add_argument("--coverage", type=float, default=None,
                        help="also write conformal force_error_bounds (eV/Å) at this coverage in (0, 1); needs an "
                             "estimator from `ltau calibrate`")
    parser.add_argument("--trajectory", type=Path, default=Path("md.extxyz"), help="extxyz output (md.extxyz)")
    parser.add_argument("--interval", type=int, default=1, help="write every N steps (1)")
    parser.add_argument("--save-to", type=Path, default=None, help="extxyz receiving the triggering frame")
    parser.add_argument("--seed", type=int, default=0, help="seed of velocities and Langevin noise (0)")
    parser.add_argument("--device", default="cpu", help="torch device of the model (cpu)")
    parser.add_argument("--allow-model-mismatch", action="store_true",
                        help="use an estimator fitted for a different model file (warns)")


def _calculator(args: argparse.Namespace):
    if args.factory is not None:
        if args.model is not None or args.estimator is not None:
            raise ValueError("give either --factory or --model/--estimator, not both")
        return load_factory(args.factory)()
    if args.model is None or args.estimator is None:
        raise ValueError("--model and --estimator are required (or --factory module:name)")
    from ltau_ase.simulate.calculator import LTAUCalculator

    return LTAUCalculator.from_nequip(args.model, args.estimator, device=args.device, threshold=args.uq_threshold,
                                      allow_model_mismatch=args.allow_model_mismatch, coverage=args.coverage)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from ase import units
    from ase.calculators.calculator import all_properties
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixAtoms, FixCom
    from ase.io import read, write
    from ase.md.langevin import Langevin
    from ase.md.verlet import VelocityVerlet

    from ltau_ase.simulate.calculator import PER_ATOM_UQ, PER_STRUCTURE_UQ, store_uq_in_atoms
    from ltau_ase.simulate.observers import UncertaintyStop

    if (args.reference_runs is None) != (args.false_alarm_rate is None):
        raise ValueError("--reference-runs and --false-alarm-rate go together")
    if args.reference_runs is not None:
        if args.threshold is not None:
            raise ValueError("give either --threshold or --reference-runs/--false-alarm-rate, not both")
        args.threshold = reference_threshold(args.reference_runs, args.key, parse_reduce(args.atom_reduce),
                                             args.false_alarm_rate, args.patience)
        print(f"threshold {args.threshold:.6g} from {len(args.reference_runs)} reference runs "
              f"(false-alarm rate {args.false_alarm_rate:g}, patience {args.patience})")
    if args.threshold is None and not args.adaptive:
        raise ValueError("--threshold is required unless --adaptive or --reference-runs")
    for name in ("steps", "interval"):
        if getattr(args, name) < (0 if name == "steps" else 1):
            raise ValueError(f"--{name} must be {'>= 0' if name == 'steps' else '>= 1'}, got {getattr(args, name)}")
    if not (args.timestep > 0 and args.temperature >= 0):
        raise ValueError("--timestep must be > 0 fs and --temperature >= 0 K")
    atoms = read(args.structure, index=args.index)
    atoms.calc = _calculator(args)
    rng = np.random.default_rng(args.seed)
    _thermalize(atoms, args.temperature, rng)
    if args.ensemble == "langevin":
        if not any(isinstance(c, FixAtoms) for c in atoms.constraints):
            atoms.set_constraint(list(atoms.constraints) + [FixCom()])
        dyn = Langevin(atoms, timestep=args.timestep * units.fs, temperature_K=args.temperature,
                       friction=args.friction / units.fs, fixcm=False, rng=rng, logfile=None)
    else:
        dyn = VelocityVerlet(atoms, timestep=args.timestep * units.fs, logfile=None)

    args.trajectory.parent.mkdir(parents=True, exist_ok=True)
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
    stop = UncertaintyStop(dyn, args.threshold, key=args.key, atom_reduce=parse_reduce(args.atom_reduce),
                           patience=args.patience, on_trigger=on_trigger, save_to=args.save_to,
                           adaptive=args.adaptive, warmup=args.warmup, n_sigma=args.n_sigma)
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


def reference_threshold(paths, key: str, atom_reduce, false_alarm_rate: float, patience: int) -> float:
    """:func:`ltau_ase.simulate.observers.stop_threshold` over the per-frame ``ltau_<key>`` columns of runs."""
    import numpy as np
    from ase.io import read

    from ltau_ase.simulate.observers import reduce_values, stop_threshold

    traces = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no reference run at {path}")
        frames = read(path, index=":")
        column = "ltau_" + key
        missing = [i for i, a in enumerate(frames) if column not in a.arrays]
        if missing:
            raise ValueError(f"{path} frame {missing[0]} has no {column!r} column; reference runs must be written by "
                             f"`ltau md` with the same --key")
        steps = [a.info.get("md_step") for a in frames]
        if None not in steps and len(steps) > 1 and np.any(np.diff(steps) != 1):
            raise ValueError(f"{path} was not written at every step (--interval 1); patience counts steps")
        traces.append([reduce_values(np.asarray(a.arrays[column]), atom_reduce) for a in frames])
    return stop_threshold(traces, false_alarm_rate, patience)


def _thermalize(atoms, temperature_K: float, rng) -> None:
    try:
        from ase.md.velocitydistribution import thermalize_momenta  # ASE >= 3.29
    except ImportError:
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as _mb

        _mb(atoms, temperature_K=temperature_K, rng=rng)
        return
    thermalize_momenta(atoms, temperature_K, rng=rng)
