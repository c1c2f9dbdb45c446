"""Accuracy of the compressed in-model reference (k-means centroids) against exact LTAU (issue 12 §2).

    python benchmarks/compressed_reference.py --estimator est.ltau --model best.ckpt --frames test.xyz \
        [--centroids 64 128 256 ...] [--rattle 0.1] [--k 10] [--output benchmark_output/compressed_reference.json]

Query atoms are the frames' atoms (rattled by ``--rattle`` Å so that they are not training atoms);
their latents come from ``--model`` (the checkpoint the estimator was fitted for). For each number of
centroids C: Spearman ρ between the compressed readout's uncertainties and ``LTAUEstimator.predict``'s
(goal ≥ 0.98), the neighbour recall (fraction of each query's exact k nearest training atoms that
belong to a centroid the compressed search used) and the largest absolute difference. ``--k`` sets the
estimator's query-time k (``set_params(k=...)``, 1 <= k <= N, no refit: k only enters at query time) for both
readouts; both are the paper's form (a calibrated estimator's calibration holds at its own k only).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def default_centroids(n: int, k: int) -> list[int]:
    """Centroid counts N/64, N/32, N/16, N/8, N/4, each at least 4k (room for the k nearest members) and at
    most N (one centroid per training atom: the exact reference)."""
    return sorted({min(n, max(4 * k, n // d)) for d in (64, 32, 16, 8, 4)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--estimator", required=True, type=Path)
    parser.add_argument("--model", required=True, type=Path, help="checkpoint the estimator was fitted for")
    parser.add_argument("--frames", required=True, type=Path, help="structures (any ASE-readable file)")
    parser.add_argument("--max-frames", type=int, default=200)
    parser.add_argument("--rattle", type=float, default=0.1, help="Gaussian displacement (Å) of the query atoms")
    parser.add_argument("--centroids", type=int, nargs="+", default=None,
                        help="numbers of centroids (default N/64, N/32, N/16, N/8, N/4)")
    parser.add_argument("--k", type=int, default=None,
                        help="query-time k for exact and compressed (default: the estimator's own k)")
    parser.add_argument("--output", type=Path, default=Path("benchmark_output/compressed_reference.json"))
    args = parser.parse_args(argv)
    if args.k is not None and args.k < 1:
        parser.error(f"--k must be >= 1; got {args.k}")
    if args.max_frames < 1 or not args.rattle >= 0:  # no query atoms / a negative (or NaN) displacement
        parser.error(f"--max-frames must be >= 1 and --rattle >= 0 Å; got {args.max_frames} and {args.rattle}")

    import numpy as np
    from ase.io import read

    from ltau_ase.core.estimator import LTAUEstimator

    est = LTAUEstimator.load(str(args.estimator))
    n = est.n_train_atoms_
    if args.k is not None:
        if args.k > n:  # predict would average all N atoms (k_eff = N): not a compression accuracy to measure
            parser.error(f"--k {args.k} exceeds the estimator's {n} training atoms; expected 1 <= k <= {n}")
        est.set_params(k=args.k)
    bad = [c for c in args.centroids or () if not 1 <= c <= n]
    if bad:
        parser.error(f"--centroids {bad} out of range: a compressed reference has 1 to N={n} centroids")

    from ltau_ase.nequip.calculator import LatentNequIPCalculator  # torch and nequip only once the arguments hold
    from ltau_ase.nequip.inmodel import compressed_accuracy

    calc = LatentNequIPCalculator.from_model_file(args.model, chemical_species_to_atom_type_map=True)
    queries = []
    for i, atoms in enumerate(read(str(args.frames), f":{args.max_frames}")):
        atoms.rattle(args.rattle, seed=i)
        atoms.calc = calc
        atoms.get_forces()
        queries.append(calc.results["descriptors"].copy())
    q = np.concatenate(queries)
    sizes = args.centroids or default_centroids(n, est.k_eff_)
    rows = []
    for c in sizes:
        acc = compressed_accuracy(est, q, n_centroids=c)
        rows.append(acc)
        print(f"C={acc['n_centroids']:>6} (N/{n / acc['n_centroids']:.0f}): Spearman {acc['spearman']:.4f}, "
              f"recall {acc['recall']:.3f}, max |Δu| {acc['max_abs_uncertainty_diff']:.3f}", file=sys.stderr)
    payload = {"benchmark": "compressed_reference", "estimator": str(args.estimator), "n_train_atoms": n,
               "k": est.k_eff_, "n_queries": int(len(q)), "rattle_A": args.rattle, "spearman_goal": 0.98,
               "results": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
