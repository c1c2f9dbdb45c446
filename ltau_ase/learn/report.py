"""Campaign report: ``report.md`` and ``report.png`` (matplotlib, Agg) in the campaign directory."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np


def _f(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def write_campaign_report(workdir: Path, settings: Any, history: Sequence[dict]) -> Path:
    """Write the report of the iterations in ``history`` (each an iteration's metrics dict)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = Path(workdir)
    test_names = sorted({n for h in history for n in h.get("evaluation", {})})
    labels = [h["labels_used"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name in test_names:
        axes[0].plot(labels, [h["evaluation"].get(name, {}).get("force_mae", np.nan) for h in history], "o-",
                     label=name)
    axes[0].set_xlabel("labels used")
    axes[0].set_ylabel("test force MAE (eV/Å)")
    axes[0].set_title(f"{settings.selection}: test error vs labels")
    if test_names:
        axes[0].legend()
    for h in history[1:]:
        rows = h.get("selected_uq_vs_error", {}).get("frames", [])
        if rows:
            axes[1].scatter([r["statistic"] for r in rows], [r["max_error"] for r in rows], s=14,
                            label=f"iteration {h['iteration']}")
    axes[1].set_xlabel("stop statistic at selection")
    axes[1].set_ylabel("true max atom force error (eV/Å)")
    axes[1].set_title("selected frames: uncertainty vs true error")
    if len(history) > 1:
        axes[1].legend(fontsize=7)
        steps = [h["exploration"]["stop_steps"] for h in history[1:]]
        axes[2].boxplot([s if s else [np.nan] for s in steps], tick_labels=[str(h["iteration"]) for h in history[1:]])
    axes[2].set_xlabel("iteration")
    axes[2].set_ylabel("step at which the stop fired")
    axes[2].set_title("stop statistics")
    fig.tight_layout()
    png = workdir / "report.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)

    lines = [f"# Active-learning campaign ({settings.selection})", "",
             f"Budget {settings.budget} labels per iteration; exploration {', '.join(settings.explore.kinds)} "
             f"(temperatures {', '.join(f'{t:g} K' for t in settings.explore.temperatures)}, "
             f"{settings.explore.replicas} replica(s), ≤ {settings.explore.md_steps} MD steps); "
             f"threshold: {settings.threshold_quantile:.0%} quantile of the calibration frames' "
             f"{settings.explore.atom_reduce} uncertainty"
             + (" (adaptive)" if settings.explore.adaptive else "") + "; training "
             + ("warm-started" if settings.warm_start else "from scratch") + " every iteration.", "",
             "| iteration | labels used | train frames | "
             + " | ".join(f"MAE {n} (eV/Å)" for n in test_names)
             + " | threshold | trajectories | stopped | mean stop step | flagged | selected | failed labels | "
               "rejected labels | ρ(stat, true max error) |",
             "|" + "---|" * (12 + len(test_names))]
    for h in history:
        ex = h.get("exploration", {})
        sel = h.get("selection_stats", {})
        lab = h.get("labelling", {})
        uq = h.get("selected_uq_vs_error", {})
        lines.append(
            f"| {h['iteration']} | {h['labels_used']} | {h['n_train_frames']} | "
            + " | ".join(_f(h["evaluation"].get(n, {}).get("force_mae")) for n in test_names)
            + f" | {_f(h['calibration'].get('threshold'))} | {_f(ex.get('n_tasks'))} | {_f(ex.get('n_triggered'))} | "
              f"{_f(ex.get('mean_stop_step'))} | {_f(ex.get('n_flagged'))} | {_f(sel.get('n_selected'))} | "
              f"{_f(lab.get('n_failed'))} | {_f(lab.get('n_rejected'))} | "
              f"{_f(uq.get('spearman_statistic_vs_max_error'))} |")
    above = {n: history[-1]["evaluation"][n] for n in test_names
             if history[-1]["evaluation"].get(n, {}).get("n_frames_above_cap")}
    if above:
        lines += ["", f"Test MAE is over the test frames within the reference cap ({settings.max_reference_force:g} "
                  "eV/Å max-atom reference force); frames above it are reported apart (last iteration): "
                  + "; ".join(f"{n}: {v['n_frames_above_cap']} of {v['n_frames']} frames, MAE "
                              f"{_f(v.get('force_mae_above_cap'))} eV/Å" for n, v in above.items())]
    failures = {n: r for h in history for n, r in h.get("labelling", {}).get("failures", {}).items()}
    if failures:
        lines += ["", "Failed reference calculations (not in the training set):", ""]
        lines += [f"- `{n}`: {r}" for n, r in failures.items()]
    rejections = {n: r for h in history for n, r in h.get("labelling", {}).get("rejections", {}).items()}
    if rejections:
        lines += ["", "Rejected labels (over the reference trust cap; kept in labels.db, not trained on):", ""]
        lines += [f"- `{n}`: {r}" for n, r in rejections.items()]
    lines += ["", "![campaign](report.png)", ""]
    path = workdir / "report.md"
    path.write_text("\n".join(lines))
    return path
