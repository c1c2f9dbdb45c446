"""``ltau compile``: checkpoint + estimator → one compiled nequip model that outputs LTAU per atom.

Example::

    ltau compile runs/seed1/best.ckpt est.ltau model_ltau.nequip.pt2 --device cpu

The compiled file (nequip-compile conventions: AOTInductor ``.nequip.pt2``) outputs energies,
forces, stress, virial, the latent ``node_features`` and the per-atom fields ``ltau_uncertainty``,
``ltau_confidence``, ``ltau_expected_force_error``, ``ltau_latent_distance``, computed in the same
forward pass (and ``ltau_distance_ratio`` for a calibrated estimator, ``ltau_force_error_bound`` with
``--coverage Q``). Use it with ``LTAUCalculator.from_nequip(OUTPUT, trusted=True)`` (no estimator needed),
nequip's own ASE calculator, or LAMMPS ``pair_style nequip`` + ``compute nequip/atom ltau_uncertainty 1 0``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ltau_ase.cli.options import open_fraction, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, metavar="MODEL", help="nequip checkpoint (.ckpt) the estimator was fitted for")
    parser.add_argument("estimator", type=Path, metavar="ESTIMATOR", help="fitted estimator file (.ltau)")
    parser.add_argument("output", type=Path, metavar="OUTPUT",
                        help="compiled model to write: *.nequip.pt2 (aotinductor) or *.nequip.pth (torchscript)")
    parser.add_argument("--mode", choices=("aotinductor", "torchscript"), default="aotinductor",
                        help="compiler, as nequip-compile --mode (torchscript needs torch < 2.10; default aotinductor)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="device the compiled model runs on (default cpu)")
    parser.add_argument("--reference", choices=("exact", "compressed"), default="exact",
                        help="exact: all training latents (equals the estimator); compressed: k-means centroids")
    parser.add_argument("--centroids", type=positive_int, default=None,
                        help="number of centroids of the compressed reference (default N/8, at most 4096)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument("--paper-form", action="store_true",
                        help="compile a calibrated estimator in the paper's form (one scale) instead of its "
                             "distance-aware form (which also outputs ltau_distance_ratio)")
    parser.add_argument("--coverage", type=open_fraction, default=None, metavar="Q",
                        help="also compile per-atom conformal force-error bounds at coverage Q in (0, 1) "
                             "(output ltau_force_error_bound, eV/Å; needs a calibrated estimator, not --paper-form)")
    parser.add_argument("--trust-model", action="store_true",
                        help="skip the checkpoint's allow-list check (needed for .nequip.zip packages)")


def run(args: argparse.Namespace) -> int:
    from ltau_ase.nequip.compiled import compile_model

    if not args.estimator.is_file():
        raise FileNotFoundError(f"estimator file {args.estimator} does not exist")
    out = compile_model(
        args.model, args.output, estimator=args.estimator, mode=args.mode, device=args.device,
        reference=args.reference, n_centroids=args.centroids, overwrite=args.overwrite, trusted=args.trust_model,
        paper_form=args.paper_form, coverage=args.coverage,
    )
    print(f"wrote {out} ({args.mode}, {args.device}, {args.reference} reference): outputs energies, forces, "
          "node_features and ltau_uncertainty / ltau_confidence / ltau_expected_force_error / ltau_latent_distance"
          " (and ltau_distance_ratio for a calibrated estimator compiled in its distance-aware form"
          + (f", ltau_force_error_bound at coverage {args.coverage}" if args.coverage is not None else "") + ")")
    return 0
