"""Hot Langevin MD of an out-of-domain system that stops itself when the model becomes uncertain.

Run after `make demo`:  python examples/md_uncertainty_stop.py [--demo-dir demo_output] [--threshold 0.5]

UncertaintyStop watches the mean per-atom uncertainty; above --threshold for --patience steps in a
row it ends the run cleanly, appends the frame to uncertain_frames.extxyz (e.g. to label with DFT)
and calls on_trigger. Every MD step goes to md.extxyz with the per-atom UQ columns.
"""
import argparse
from pathlib import Path

import numpy as np
from ase import units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms, FixCom
from ase.io import read, write
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta

from ltau_ase.simulate.calculator import LTAUCalculator, store_uq_in_atoms
from ltau_ase.simulate.observers import UncertaintyStop

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--demo-dir", type=Path, default=Path("demo_output"), help="output of `make demo`")
parser.add_argument("--index", type=int, default=0, help="which out-of-domain IS2RS system (0)")
parser.add_argument("--temperature", type=float, default=1500.0, help="K (1500)")
parser.add_argument("--steps", type=int, default=200, help="maximum MD steps of 1 fs (200)")
parser.add_argument("--threshold", type=float, default=None,
                    help="mean uncertainty that stops the run (default: the initial structure's + --margin)")
parser.add_argument("--margin", type=float, default=0.02, help="default threshold above the initial value (0.02)")
parser.add_argument("--patience", type=int, default=3, help="consecutive steps above the threshold (3)")
parser.add_argument("--output", type=Path, default=None, help="output folder (default <demo-dir>/examples/md)")
args = parser.parse_args()
out = args.output or args.demo_dir / "examples" / "md"
out.mkdir(parents=True, exist_ok=True)

atoms = read(args.demo_dir / "data" / "is2rs_ood_initial.extxyz", index=args.index)
atoms.calc = LTAUCalculator.from_model(args.demo_dir / "models" / "member1" / "run" / "last.ckpt",
                                        args.demo_dir / "estimator.ltau", chemical_species_to_atom_type_map=True)
initial = atoms.calc.get_property("mean_uncertainty", atoms)
threshold = initial + args.margin if args.threshold is None else args.threshold
print(f"system {atoms.info['system']} ({atoms.info['domain']}): {len(atoms)} atoms; initial mean uncertainty "
      f"{initial:.4f}, stop threshold {threshold:.4f}")
rng = np.random.default_rng(0)
thermalize_momenta(atoms, temperature_K=args.temperature, rng=rng)
if not any(isinstance(c, FixAtoms) for c in atoms.constraints):  # FixAtoms already pins the centre of mass
    atoms.set_constraint(list(atoms.constraints) + [FixCom()])
dyn = Langevin(atoms, timestep=1.0 * units.fs, temperature_K=args.temperature, friction=0.02 / units.fs,
               fixcm=False, rng=rng, logfile=None)
traj = open(out / "md.extxyz", "w")


def write_frame():  # energy/forces as results, the UQ as columns (ASE writes only its own properties)
    frame = atoms.copy()
    frame.calc = SinglePointCalculator(frame, energy=atoms.get_potential_energy(),
                                       forces=atoms.get_forces(apply_constraint=False))
    store_uq_in_atoms(frame, atoms.calc.results)
    frame.info.update(md_step=dyn.nsteps, temperature_K=atoms.get_temperature())
    write(traj, frame, format="extxyz")
    traj.flush()


def on_trigger(_atoms, info):
    worst = int(np.argmax(info["per_atom"]))
    print(f"on_trigger: step {info['step']}, value {info['value']:.4f} > {info['threshold']:.4f}; "
          f"most uncertain atom {worst} ({atoms[worst].symbol}, u={info['per_atom'][worst]:.3f})")


save_to = out / "uncertain_frames.extxyz"
save_to.unlink(missing_ok=True)  # UncertaintyStop appends
dyn.attach(write_frame)
stop = UncertaintyStop(dyn, threshold=threshold, atom_reduce="mean", patience=args.patience,
                       save_to=save_to, on_trigger=on_trigger)
dyn.attach(stop)
dyn.run(args.steps)
traj.close()

trace = np.array(stop.values)
print(f"mean uncertainty over {trace.size} checks: min {trace.min():.4f}, max {trace.max():.4f}")
if stop.triggered:
    print(f"stopped at step {stop.step} of {args.steps}: {stop.reason}")
    print(f"saved triggering frame to {save_to} ({len(read(save_to, index=':'))} frame)")
else:
    print(f"ran all {args.steps} steps without exceeding {threshold:.4f}")
frames = read(out / "md.extxyz", index=":")
print(f"{out / 'md.extxyz'}: {len(frames)} frames, last md_step {frames[-1].info['md_step']}, "
      f"max per-atom uncertainty in the last frame {frames[-1].arrays['ltau_uncertainties'].max():.4f}")
