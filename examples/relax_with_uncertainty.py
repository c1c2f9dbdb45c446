"""Relax an in-domain IS2RS initial structure with per-atom LTAU uncertainties.

Run after `make demo`:  python examples/relax_with_uncertainty.py [--demo-dir demo_output]

LTAUCalculator.from_model loads the demo's model and estimator (checking that the estimator was
fitted for this model file), a RelaxationUQObserver records the mean uncertainty of the free atoms
at every BFGS step, and store_uq_in_atoms puts the per-atom UQ into extxyz columns.
"""
import argparse
from pathlib import Path

from ase.io import read, write
from ase.optimize import BFGS

from ltau_ase.simulate.calculator import LTAUCalculator, store_uq_in_atoms
from ltau_ase.simulate.observers import RelaxationUQObserver

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--demo-dir", type=Path, default=Path("demo_output"), help="output of `make demo`")
parser.add_argument("--index", type=int, default=0, help="which in-domain IS2RS system (0)")
parser.add_argument("--fmax", type=float, default=0.05, help="convergence criterion, eV/Å (0.05)")
parser.add_argument("--steps", type=int, default=200, help="maximum BFGS steps (200)")
parser.add_argument("--output", type=Path, default=None, help="output folder (default <demo-dir>/examples/relax)")
args = parser.parse_args()
out = args.output or args.demo_dir / "examples" / "relax"
out.mkdir(parents=True, exist_ok=True)

atoms = read(args.demo_dir / "data" / "is2rs_id_initial.extxyz", index=args.index)
n_fixed = sum(len(c.get_indices()) for c in atoms.constraints)
print(f"system {atoms.info['system']}: {len(atoms)} atoms, {n_fixed} fixed by FixAtoms")

# The demo's models name their atom types by chemical symbol: map symbols to types one to one.
atoms.calc = LTAUCalculator.from_model(args.demo_dir / "models" / "member1" / "run" / "last.ckpt",
                                        args.demo_dir / "estimator.ltau", chemical_species_to_atom_type_map=True)
observer = RelaxationUQObserver(atoms, atom_reduce="mean", select="free")  # records the initial structure now
opt = BFGS(atoms, trajectory=str(out / "relax.traj"), logfile=None)
opt.attach(observer)
converged = opt.run(fmax=args.fmax, steps=args.steps)

print("mean uncertainty of the free atoms per step (step:value):")
trace = [f"{step:3d}:{value:.4f}" for step, value in enumerate(observer.trace)]
for row in range(0, len(trace), 8):
    print("  " + "  ".join(trace[row:row + 8]))
summary = observer.summary()
print(f"converged={converged} after {opt.nsteps} steps; energy {atoms.get_potential_energy():.4f} eV")
print("summary: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
print(f"trajectory: {out / 'relax.traj'} ({len(read(out / 'relax.traj', index=':'))} frames)")

# ASE writes only its own properties; copy the UQ into atoms.arrays / atoms.info so extxyz keeps it.
store_uq_in_atoms(atoms)
path = out / "relaxed_with_uq.extxyz"
write(path, atoms, format="extxyz")
back = read(path, format="extxyz")
u = back.arrays["ltau_uncertainties"]
print(f"wrote {path}; read back columns {sorted(k for k in back.arrays if k.startswith('ltau_'))}")
print(f"read back: max uncertainty {u.max():.4f} (info {back.info['ltau_max_uncertainty']:.4f}), "
      f"mean expected |F error| {back.arrays['ltau_expected_force_errors'].mean():.4f} eV/Å, "
      f"uq_final {back.info['ltau_uq_final']:.4f}")
