"""``ltau report``: IS2RS-style analysis of a relaxation database (``ltau relax``) against references.

For every relaxed system (status ``done`` or ``unconverged``) the reference relaxed structure is
taken from ``--references`` (extxyz or ase.db, matched by name) or, without it, from the reference
stored in the database by ``ltau relax --references``. Per system: mean free-atom displacement d_s
and RMSD (OC20 ``min_diff``). Then ADwT, Spearman ρ and AUROC of each UQ statistic (initial, final,
max, mean) for RMSD above ``--rmsd-threshold``, and RMSD binned by UQ per group (paper Fig. 4).

Outputs in ``--output``: ``metrics.json`` (analysis, per-system table, failed systems, systems without
reference) and ``rmsd_vs_uq.png``. Failed systems and missing references are listed, never dropped
silently; ``--strict`` makes a missing reference an error.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ltau_ase.cli.options import add_alias, check_output_dir, positive_float, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", type=Path, required=True, help="relaxation database written by `ltau relax`")
    parser.add_argument("--references", type=Path, default=None,
                        help="reference relaxed structures (extxyz or ase.db, matched by name); default: the "
                             "references stored in --db")
    parser.add_argument("--output", type=Path, default=Path("report"), help="output directory (report/)")
    parser.add_argument("--rmsd-threshold", type=positive_float, default=0.5, metavar="ANGSTROM",
                        help="RMSD (Å) above which a relaxation counts as failed for AUROC (0.5, the ADwT ceiling)")
    add_alias(parser, "--threshold", dest="rmsd_threshold", type=positive_float)  # before: the RMSD bound
    parser.add_argument("--bins", type=positive_int, default=5, help="UQ bins per statistic (5)")
    parser.add_argument("--strategy", choices=("quantile", "uniform"), default="quantile",
                        help="equal-count or equal-width UQ bins (quantile)")
    parser.add_argument("--groups", default=None, help="comma-separated groups to report, in order (default: all)")
    parser.add_argument("--strict", action="store_true", help="a missing reference is an error")
    parser.add_argument("--fit-failure-model", type=Path, default=None, metavar="JSON",
                        help="fit P(RMSD > --rmsd-threshold | UQ trace) on these relaxations (calibration set) and "
                             "write it here")
    parser.add_argument("--failure-model", type=Path, default=None, metavar="JSON",
                        help="add each system's failure probability p_fail from a model written by "
                             "--fit-failure-model (its own RMSD threshold applies)")
    parser.add_argument("--failure-features", choices=("uq", "uq+distance"), default="uq",
                        help="trace features of --fit-failure-model: uq (initial/max/mean/final UQ and steps) or "
                             "uq+distance (also the initial/max/mean/final distance ratio, recorded by `ltau relax` "
                             "with an estimator from `ltau calibrate`) (uq)")
    parser.add_argument("--failure-transform", choices=("auto", "log", "clip", "rank"), default="auto",
                        help="feature map of --fit-failure-model: log (linear in the features; extrapolates to p -> 1 "
                             "far outside the calibration relaxations), clip (to their range), rank (their empirical "
                             "CDF), or auto: the map, tail slope beyond the range and penalty with the lowest "
                             "cross-validated log-loss on these relaxations, held-out folds beyond each feature's "
                             "range included (auto)")
    parser.add_argument("--failure-unconstrained", action="store_true",
                        help="let --fit-failure-model give features negative weights (the form before the "
                             "monotone default: it may rank relaxations beyond the calibration range in reverse); "
                             "by default p_fail never decreases when an uncertainty, distance ratio or step count "
                             "grows, and rows beyond the calibration range keep their order")


def build_table(records: list, refs: dict[str, Any] | None = None, strict: bool = False) -> tuple[list[dict], list[str]]:
    """Per-system rows and names lacking a reference: :func:`ltau_ase.is2rs.records_table` (kept name)."""
    from ltau_ase.is2rs import records_table

    return records_table(records, refs, strict=strict)


def run(args: argparse.Namespace) -> int:
    if args.output.exists() and not args.output.is_dir():
        raise ValueError(f"--output {args.output} is a file; expected a directory for metrics.json and the PNG")
    check_output_dir(args.output, "--output")
    if args.references is not None and not args.references.is_file():
        raise FileNotFoundError(f"--references {args.references} does not exist or is not a file")

    import json

    from ltau_ase.core.jsonable import to_jsonable
    from ltau_ase.is2rs import records_table, uq_rmsd_analysis
    from ltau_ase.plots import plot_rmsd_vs_uq
    from ltau_ase.simulate.batch import load_results, read_structures

    records = load_results(args.db)
    if not records:
        raise ValueError(f"{args.db} holds no relaxations")
    failed = [{"name": r.name, "reason": r.reason} for r in records if r.status == "failed"]
    relaxed = [r for r in records if r.status != "failed"]
    if not relaxed:
        raise ValueError(f"all {len(records)} relaxations in {args.db} failed; nothing to analyse")
    refs = None  # the references stored in the database
    if args.references is not None:
        refs = dict(read_structures(str(args.references), require_names=True))
    elif all(r.reference is None for r in relaxed):
        raise ValueError(f"{args.db} stores no reference structures; pass --references")
    table, missing = records_table(relaxed, refs, strict=args.strict)
    if not table:
        raise ValueError("no relaxed system has a reference structure; check the names in --references")
    groups = None if args.groups is None else [g for g in args.groups.split(",") if g]
    analysis = uq_rmsd_analysis(table, groups=groups, threshold=args.rmsd_threshold, n_bins=args.bins,
                                strategy=args.strategy)
    failure = failure_probabilities(table, args)
    args.output.mkdir(parents=True, exist_ok=True)
    png = plot_rmsd_vs_uq(analysis["binned"], args.output / "rmsd_vs_uq.png", threshold=args.rmsd_threshold)
    metrics = {"db": str(args.db), "n_records": len(records), "n_scored": len(table),
               "unconverged": [r.name for r in relaxed if r.status == "unconverged"],
               "failed": failed, "missing_references": missing, "analysis": analysis, "systems": table}
    if failure:
        metrics["failure_model"] = failure
    out = args.output / "metrics.json"
    out.write_text(json.dumps(to_jsonable(metrics), indent=2))
    print(f"scored {len(table)} of {len(records)} systems ({len(failed)} failed, {len(missing)} without "
          f"reference); {out}, {png}")
    for g, entry in analysis["groups"].items():
        rho = ", ".join(f"{s} {v['spearman']:.3f}" for s, v in entry["stats"].items())
        print(f"  {g}: n={entry['n_systems']} ADwT={entry['adwt']:.3f} mean RMSD={entry['mean_rmsd']:.3f} Å; "
              f"Spearman(UQ, RMSD): {rho}")
    if failure:
        print("  failure model: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in failure.items() if k != "path"))
    return 0


def failure_probabilities(table: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    """Fit and/or apply the IS2RS failure model (``ltau_ase.is2rs.FailureModel``); adds ``p_fail`` to rows."""
    import json

    import numpy as np

    from ltau_ase.core.calibration import auroc
    from ltau_ase.is2rs import FailureModel

    if args.fit_failure_model is None and args.failure_model is None:
        return {}
    out: dict[str, Any] = {}
    if args.fit_failure_model is not None:
        from ltau_ase.is2rs import FAILURE_FEATURES, FAILURE_FEATURES_WITH_DISTANCE

        features = FAILURE_FEATURES_WITH_DISTANCE if args.failure_features == "uq+distance" else FAILURE_FEATURES
        lacking = [r["name"] for r in table if any(f not in r for f in features)]
        if lacking:
            raise ValueError(f"{len(lacking)} system(s) lack the {args.failure_features} trace features (e.g. "
                             f"{lacking[0]!r}); the distance trace is recorded by `ltau relax` with an estimator "
                             "from `ltau calibrate` (and is absent where it was infinite: an unseen element)")
        model = FailureModel(rmsd_threshold=args.rmsd_threshold, features=features,
                             transform=getattr(args, "failure_transform", "auto"),
                             monotone=not getattr(args, "failure_unconstrained", False)).fit(table)
        args.fit_failure_model.parent.mkdir(parents=True, exist_ok=True)
        args.fit_failure_model.write_text(json.dumps(model.to_dict(), indent=2))
        out.update(fitted_to=str(args.fit_failure_model), n_fit=model.n_fit_, transform=model.transform_,
                   tail=model.tail_, l2=model.l2_, monotone=model.monotone)
    if args.failure_model is not None:
        if not args.failure_model.is_file():
            raise FileNotFoundError(f"no failure model at {args.failure_model}")
        try:
            state = json.loads(args.failure_model.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{args.failure_model} is not JSON: {exc}") from None
        model = FailureModel.from_dict(state)
    p = model.predict_proba(table)
    failed = np.array([row["rmsd"] > model.rmsd_threshold for row in table])
    for row, value in zip(table, p):
        row["p_fail"] = float(value)
    out.update(rmsd_threshold=model.rmsd_threshold, mean_p_fail=float(p.mean()), fraction_failed=float(failed.mean()),
               brier=float(np.mean((p - failed) ** 2)),
               auroc=auroc(p, failed) if 0 < failed.sum() < failed.size else float("nan"))
    return out
