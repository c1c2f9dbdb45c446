"""The demo's analyses of the stage results: IS2RS metrics, LTAU vs committee per atom, the paper's figures."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ltau_ase.demo.config import DOMAINS, DemoConfig
from ltau_ase.demo.stages import CalibrationStage, FitStage


def is2rs_analysis(records: list[dict]) -> dict[str, Any]:
    """IS2RS metrics per domain from relaxation records (failed relaxations are counted, not scored)."""
    from ltau_ase.is2rs import records_table, uq_rmsd_analysis

    failed = {"in_domain": 0, "out_of_domain": 0}
    for rec in records:
        if rec.status == "failed":
            failed[rec.group] += 1
    table, _ = records_table(records, strict=True)  # every demo system stores its reference
    out: dict[str, Any] = {"failed": failed, "table": table}
    for domain in ("in_domain", "out_of_domain"):
        rows = [r for r in table if r["group"] == domain]
        # AUROC needs both classes: flag systems with an RMSD above the domain's median RMSD.
        threshold = float(np.median([r["rmsd"] for r in rows]))
        res = uq_rmsd_analysis(rows, threshold=threshold)
        g = res["groups"][domain]
        out[domain] = {
            "adwt": g["adwt"], "mean_rmsd": g["mean_rmsd"], "n_systems": g["n_systems"],
            "n_failed": failed[domain], "auroc_rmsd_threshold": threshold,
            **{f"spearman_{s}": g["stats"][s]["spearman"] for s in ("initial", "max", "mean", "final")},
            **{f"auroc_{s}": g["stats"][s]["auroc"] for s in ("initial", "max", "mean", "final")},
        }
    out["binned"] = uq_rmsd_analysis(table, groups=["in_domain", "out_of_domain"])["binned"]
    return out


def per_atom_comparison(cal: CalibrationStage, evals: dict) -> dict[str, Any]:
    """LTAU vs committee on the S2EF test splits: Spearman, AUROC (> in-domain test MAE), miscalibration."""
    from ltau_ase.core.calibration import auroc, miscalibration_area, spearman
    from ltau_ase.simulate.committee import committee_confidence, fit_committee_scale

    est = cal.estimator
    atol = est.atol_
    # committee scale: the same calibration split, the same criterion (miscalibration area)
    c = evals["calibration"]
    s_comm = fit_committee_scale(c["u_committee"], c["err_committee"], atol)["scale"]
    mae = {"ltau": float(evals["test_id"]["err_single"].mean()),
           "committee": float(evals["test_id"]["err_committee"].mean())}
    out: dict[str, Any] = {"atol": atol, "test_id_mae": mae, "committee_scale": s_comm}
    for domain, split in DOMAINS.items():
        ev = evals[split]
        pred = cal.pred_after[split]
        conf_c = committee_confidence(ev["u_committee"], atol)
        conf_cs = committee_confidence(ev["u_committee"], atol, scale=s_comm)
        out[domain] = {
            "ltau": {
                "spearman": spearman(pred["uncertainty"], ev["err_single"]),
                "spearman_expected_error": spearman(pred["expected_error"], ev["err_single"]),
                "auroc": auroc(pred["uncertainty"], ev["err_single"] > mae["ltau"]),
                "miscalibration_area": miscalibration_area(pred["confidence"], ev["err_single"], atol),
                "mae": float(ev["err_single"].mean()),
            },
            "committee": {
                "spearman": spearman(ev["u_committee"], ev["err_committee"]),
                "auroc": auroc(ev["u_committee"], ev["err_committee"] > mae["committee"]),
                "miscalibration_area": miscalibration_area(conf_cs, ev["err_committee"], atol),
                "miscalibration_area_unscaled": miscalibration_area(conf_c, ev["err_committee"], atol),
                "mae": float(ev["err_committee"].mean()),
            },
            "n_atoms": int(ev["err_single"].size),
        }
        out[domain]["spearman_ratio_ltau_over_committee"] = (
            out[domain]["ltau"]["spearman"] / out[domain]["committee"]["spearman"])
    return out


# ---------------------------------------------------------------------------- stage 8 (figures)
def paper_figures(out: Path, cfg: DemoConfig, fit: FitStage, cal: CalibrationStage, evals: dict, is2rs: dict) -> dict[str, str]:
    from ltau_ase.core.calibration import calibration_curve
    from ltau_ase.plots import (plot_calibration_curves, plot_convergence_with_M, plot_latent_map,
                                plot_rmsd_vs_uq)
    from ltau_ase.simulate.committee import committee_confidence

    est = cal.estimator
    atol = est.atol_
    figs: dict[str, str] = {}

    def curves(preds: dict) -> dict:
        res = {}
        for split in DOMAINS.values():
            ev = evals[split]
            for g in dict.fromkeys(ev["group"].tolist()):
                sel = ev["group"] == g
                res[g] = calibration_curve(preds[split]["confidence"][sel], ev["err_single"][sel], atol)
        return res

    k1 = min(fit.estimators)
    figs["fig1"] = plot_calibration_curves(curves(cal.pred_k1), out / "fig1_calibration_k1.png",
                                           title=f"k = {k1}, s = 1").name
    figs["fig2_tuned_k"] = plot_calibration_curves(curves(cal.pred_before), out / "fig2_calibration_tuned_k.png",
                                                   title=f"tuned k = {cal.k}, s = 1").name
    figs["fig2_tuned_k_s"] = plot_calibration_curves(
        curves(cal.pred_after), out / "fig2_calibration_tuned_k_s.png",
        title=f"tuned k = {cal.k}, s = {cal.scale['scale']:.3g}").name
    comm = {}
    for domain, split in DOMAINS.items():
        ev = evals[split]
        conf = committee_confidence(ev["u_committee"], atol, scale=cal.committee_scale)
        comm[f"committee {domain}"] = calibration_curve(conf, ev["err_committee"], atol)
        comm[f"LTAU {domain}"] = calibration_curve(cal.pred_after[split]["confidence"], ev["err_single"], atol)
    figs["ensemble_calibration"] = plot_calibration_curves(comm, out / "ensemble_calibration.png",
                                                           title="LTAU vs committee (each with its fitted scale)").name
    figs["fig4_ltau"] = plot_rmsd_vs_uq(is2rs["ltau"]["binned"], out / "fig4_rmsd_vs_uq_ltau.png",
                                        title="LTAU: relaxation RMSD vs UQ").name
    figs["fig4_committee"] = plot_rmsd_vs_uq(is2rs["committee"]["binned"], out / "fig4_rmsd_vs_uq_committee.png",
                                             title="committee: relaxation RMSD vs UQ").name
    p_runs = est.distributions_.confidence_per_run(est.atol_)
    figs["figC3"] = plot_convergence_with_M(p_runs, out / "figC3_convergence_with_M.png", seed=cfg.seed).name
    figs["figD5"] = plot_latent_map(fit.descriptors, est.confidence_train_, out / "figD5_latent_map.png",
                                    label="$\\mu_M(p_i)$", seed=cfg.seed).name
    return figs
