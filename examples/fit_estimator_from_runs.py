"""Fit an LTAU estimator from your own nequip runs (here: the demo's ensemble) and calibrate it.

Run after `make demo`:  python examples/fit_estimator_from_runs.py [--demo-dir demo_output] [--k 10]

The runs were trained with the LTAUErrorLogger callback, so each member directory holds an
``ltau_errors`` log. fit_estimator_from_runs reads the M logs, extracts the training descriptors
from one checkpoint, checks they line up atom by atom, fits and saves the estimator (recording the
model's SHA-256). The scale s is then fitted on the held-out calibration split.
"""
import argparse
from pathlib import Path

import numpy as np
from ase.io import read

from ltau_ase.core.errorlog import EpochWindow
from ltau_ase.core.estimator import LTAUEstimator
from ltau_ase.nequip.fit import fit_estimator_from_runs
from ltau_ase.simulate.calculator import LTAUCalculator

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--demo-dir", type=Path, default=Path("demo_output"), help="output of `make demo`")
parser.add_argument("--k", type=int, default=10, help="neighbours per test atom (10)")
parser.add_argument("--skip-epochs", type=int, default=1, help="first logged epochs left out (1)")
parser.add_argument("--output", type=Path, default=None, help="estimator file (default <demo-dir>/examples/my.ltau)")
args = parser.parse_args()
output = args.output or args.demo_dir / "examples" / "my.ltau"
members = sorted((args.demo_dir / "models").glob("member*"))  # each holds ltau_errors/ and run/last.ckpt
model = members[0] / "run" / "last.ckpt"

estimator = fit_estimator_from_runs(members, args.demo_dir / "data" / "train.extxyz", output, k=args.k,
                                    index="auto", window=EpochWindow(skip=args.skip_epochs), model=model,
                                    progress=False)
meta = estimator.metadata
print(f"fitted on {meta['n_runs']} runs, {estimator.n_train_atoms_} training atoms, "
      f"{estimator.n_features_in_}-dim descriptors")
print(f"k={estimator.k} index={meta['index']} atol={estimator.atol_:.4f} eV/Å (final training MAE) "
      f"window={meta['epoch_window']} elements Z={estimator.species_.tolist()}")
print(f"model {model} sha256 {meta['model_sha256'][:16]}...; saved {output}")

# The saved file is all a simulation needs; from_model checks the model hash against it.
calc = LTAUCalculator.from_model(model, output, chemical_species_to_atom_type_map=True)
test = read(args.demo_dir / "data" / "test_id.extxyz", index=0)
reference = test.get_forces(apply_constraint=False)  # EMT forces stored in the file
test.calc = calc
error = np.linalg.norm(test.get_forces(apply_constraint=False) - reference, axis=1)
u, expected = calc.results["uncertainties"], calc.results["expected_force_errors"]
print(f"test structure {test.info['system']}: {len(test)} atoms, uncertainty mean {u.mean():.3f} max {u.max():.3f}; "
      f"expected |F error| {expected.mean():.4f}, true {error.mean():.4f} eV/Å (mean over atoms)")

# Scale s: test errors ≈ s × training errors; fitted on held-out in-domain frames (descriptors + true errors).
descriptors, errors = [], []
for frame in read(args.demo_dir / "data" / "calibration.extxyz", index=":"):
    reference = frame.get_forces(apply_constraint=False)
    frame.calc = calc
    errors.append(np.linalg.norm(frame.get_forces(apply_constraint=False) - reference, axis=1))
    descriptors.append(calc.calc.results["descriptors"])  # the model's latent features, same forward pass
result = estimator.fit_scale(np.concatenate(descriptors), np.concatenate(errors))
print(f"fit_scale on {len(errors)} calibration frames ({sum(map(len, errors))} atoms): s={result['scale']:.3f}, "
      f"miscalibration area {result['before']:.4f} -> {result['after']:.4f}")
estimator.save(str(output))
print(f"reloaded fitted scale: {LTAUEstimator.load(output).scale_:.3f}")
