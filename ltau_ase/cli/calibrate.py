"""``ltau calibrate``: choose k and fit the distance-aware calibration on a labelled calibration file.

Example::

    ltau calibrate --estimator est.ltau --calibration-file val.extxyz --output est_calibrated.ltau

The calibration file holds structures with reference forces (extxyz ``forces`` column, e.g. the
training runs' validation split: in-domain data is enough; append one milder shifted set to refine the
distance scale). The model named in the estimator's metadata (or ``--model``, which must have the
same SHA-256) computes forces and descriptors in one forward pass per structure. Then k is chosen by
the plain estimator's miscalibration on the file (``LTAUEstimator.select_k``) and
``LTAUEstimator.fit_calibration`` fits the distance-aware scale, per-element factors and
split-conformal bounds, splitting the file's structures (not atoms) in two halves; the result is written to ``--output``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ltau_ase.cli.options import non_negative_int, open_fraction, positive_float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--estimator", type=Path, required=True, help="fitted LTAU estimator (.ltau)")
    parser.add_argument("--calibration-file", type=Path, nargs="+", required=True,
                        help="extxyz file(s) of structures with reference forces")
    parser.add_argument("--output", type=Path, required=True, help="calibrated estimator to write (.ltau)")
    parser.add_argument("--model", type=Path, default=None,
                        help="model file (.ckpt / .nequip.zip); default: metadata['model_path'] of --estimator. "
                             "Its SHA-256 must match the estimator's")
    parser.add_argument("--k-grid", default="1,2,5,10,20,50",
                        help="candidate k values, comma-separated; 'keep' keeps the estimator's k (1,2,5,10,20,50)")
    parser.add_argument("--error-threshold", "--threshold", dest="threshold", type=positive_float, default=None,
                        help="force-error threshold of the confidences, eV/Å (default: the estimator's atol)")
    parser.add_argument("--coverage", type=open_fraction, default=0.9, metavar="Q",
                        help="coverage in (0, 1) of the conformal bounds summarised at the end (0.9)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the calibration set's random halving (0)")
    parser.add_argument("--device", default="cpu", help="torch device of the model (cpu)")


def _k_grid(text: str) -> tuple[int, ...] | None:
    if text.strip().lower() == "keep":
        return None
    try:
        ks = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--k-grid must be comma-separated positive integers or 'keep'; got {text!r}") from None
    if not ks or min(ks) < 1:
        raise ValueError(f"--k-grid must be comma-separated positive integers or 'keep'; got {text!r}")
    return ks


def read_labelled(paths) -> list:
    """Frames of the calibration file(s); raises ValueError for a frame without reference forces."""
    from ase.io import read

    frames = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no calibration file at {path}")
        for i, atoms in enumerate(read(path, index=":")):
            results = getattr(atoms.calc, "results", None) or {}
            if "forces" not in results:
                raise ValueError(f"{path} frame {i} has no reference forces (an extxyz 'forces' column); "
                                 "a calibration file needs the true forces of every structure")
            frames.append(atoms)
    if not frames:
        raise ValueError(f"the calibration file(s) {[str(p) for p in paths]} hold no structure")
    return frames


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    from ltau_ase.core.conformal import check_coverage
    from ltau_ase.core.estimator import MIN_CALIBRATION_ATOMS, MIN_CALIBRATION_STRUCTURES, LTAUEstimator
    from ltau_ase.core.fileformat import check_model_fingerprint
    from ltau_ase.simulate.backends import backend_for

    coverage = check_coverage(args.coverage)
    ks = _k_grid(args.k_grid)
    if args.threshold is not None and not (np.isfinite(args.threshold) and args.threshold > 0):
        raise ValueError(f"--error-threshold must be a finite number > 0 eV/Å; got {args.threshold}")
    if not args.estimator.is_file():
        raise FileNotFoundError(f"--estimator {args.estimator} does not exist or is not a file")
    est = LTAUEstimator.load(args.estimator)
    model = args.model if args.model is not None else (est.metadata or {}).get("model_path")
    if model is None:
        raise ValueError(f"{args.estimator} records no model path; pass --model")
    model = Path(model)
    if not model.is_file():
        raise FileNotFoundError(f"no model file at {model}")
    backend = backend_for(model)  # the model backend that claims the file (nequip for .ckpt)
    # descriptors of another model live in another latent space: refuse before any forward pass
    check_model_fingerprint(est.metadata, backend.fingerprint(model), model=model, estimator=args.estimator)
    frames = read_labelled(args.calibration_file)
    n_atoms = sum(len(a) for a in frames)
    if n_atoms < MIN_CALIBRATION_ATOMS:
        raise ValueError(f"the calibration file(s) hold {n_atoms} atoms; at least {MIN_CALIBRATION_ATOMS} are needed "
                         "(half fit the distance scale and per-element factors, half the conformal quantiles)")
    if len(frames) < MIN_CALIBRATION_STRUCTURES:
        raise ValueError(f"the calibration file(s) hold {len(frames)} structures; at least {MIN_CALIBRATION_STRUCTURES} "
                         "are needed (whole structures go to each half, and atoms of one structure share their errors)")

    calc = backend.calculator(model, device=args.device)
    descriptors, errors, numbers, frame_ids = [], [], [], []
    for atoms in tqdm(frames, desc="calibration forces", unit="frame"):
        reference = np.asarray(atoms.calc.results["forces"], dtype=np.float64)
        work = atoms.copy()
        work.calc = calc
        forces = work.get_forces(apply_constraint=False)
        errors.append(np.linalg.norm(forces - reference, axis=1))
        descriptors.append(np.asarray(calc.results["descriptors"], dtype=np.float32))
        numbers.append(work.numbers.astype(np.int64))
        frame_ids.append(np.full(len(work), len(frame_ids), dtype=np.int64))
    x, err, z = np.concatenate(descriptors), np.concatenate(errors), np.concatenate(numbers)
    if ks is not None:
        by_k = est.select_k(x, err, k_grid=ks, threshold=args.threshold)
        print("k by miscalibration on the calibration file: "
              + ", ".join(f"k={k}: {v:.3f}" for k, v in by_k.items()) + f" -> k={est.k}")
    est.fit_calibration(x, err, atomic_numbers=z, threshold=args.threshold, seed=args.seed,
                        frame_ids=np.concatenate(frame_ids))
    est.save(str(args.output))
    info = est.calibration_info_
    pred = est.predict(x, threshold=args.threshold, coverage=coverage, atomic_numbers=z)
    factors = ", ".join(f"Z={a}: {b:.3g}" for a, b in zip(est.element_factor_z_, est.element_factors_)) or "none"
    print(f"calibrated on {n_atoms} atoms of {len(frames)} structures: distance ratio {info['ratio_range'][0]:.3g}"
          f"-{info['ratio_range'][1]:.3g}, tail exponent {est.distance_scale_.tail_exponent:.3g}, pooled factor "
          f"{est.pooled_factor_:.3g}, per-element factors {factors}; miscalibration (scale half) "
          f"{info['miscalibration_before']:.3f} -> {info['miscalibration_after']:.3f}")
    print(f"{coverage:g} conformal bounds on the calibration atoms: median {np.median(pred['error_bound']):.3g} eV/Å, "
          f"covering {np.mean(err <= pred['error_bound']):.3f}")
    print(f"wrote {args.output}")
    return 0
