"""The demo's configuration and the metrics it must report."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Sequence

REQUIRED_METRICS = (
    "calibration.in_domain.miscalibration_area.before",
    "calibration.in_domain.miscalibration_area.after",
    "calibration.out_of_domain.miscalibration_area.before",
    "calibration.out_of_domain.miscalibration_area.after",
    "spearman.in_domain",
    "spearman.out_of_domain",
    *(f"is2rs.{d}.{k}" for d in ("in_domain", "out_of_domain")
      for k in ("adwt", "spearman_initial", "spearman_max", "spearman_mean", "spearman_final",
                "auroc_initial", "auroc_max")),
    "overhead.uq_fraction_of_step",
    "ensemble.n_members",
    "ensemble.in_domain.ltau.spearman",
    "ensemble.in_domain.committee.spearman",
    "ensemble.out_of_domain.ltau.spearman",
    "ensemble.out_of_domain.committee.spearman",
    "ensemble.in_domain.ltau.auroc",
    "ensemble.in_domain.committee.auroc",
    "ensemble.out_of_domain.ltau.auroc",
    "ensemble.out_of_domain.committee.auroc",
    "ensemble.in_domain.ltau.miscalibration_area",
    "ensemble.in_domain.committee.miscalibration_area",
    "ensemble.out_of_domain.ltau.miscalibration_area",
    "ensemble.out_of_domain.committee.miscalibration_area",
    "ensemble.cost.ltau_over_single",
    "ensemble.cost.committee_over_single",
    "md.stopped_at_step",
)
DOMAINS = {"in_domain": "test_id", "out_of_domain": "test_ood"}


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one demo run (see :meth:`preset`)."""

    quick: bool = False
    seed: int = 0
    members: int = 4
    epochs: int = 30
    num_layers: int = 2
    num_features: int = 16
    l_max: int = 1
    r_max: float = 4.5
    batch_size: int = 16
    lr: float = 0.01
    k_grid: tuple[int, ...] = (1, 2, 5, 10, 20, 50)
    relax_steps: int = 100
    relax_fmax: float = 0.05
    md_steps: int = 1000
    md_temperature: float = 1500.0
    md_quantile: float = 0.99
    timing_repeats: int = 60
    train_timeout: float = 900.0
    train_workers: int | None = None  # members trained at a time (None: one per core)

    @classmethod
    def preset(cls, quick: bool, seed: int = 0, members: int | None = None, epochs: int | None = None) -> "DemoConfig":
        cfg = cls(quick=True, seed=seed, members=3, epochs=8, relax_steps=60, md_steps=300,
                  timing_repeats=15, k_grid=(1, 2, 5, 10, 20)) if quick else cls(seed=seed)
        if members is not None:
            cfg = replace(cfg, members=members)
        if epochs is not None:
            cfg = replace(cfg, epochs=epochs)
        if cfg.members < 2:
            raise ValueError(f"the ensemble needs at least 2 members (3 or more recommended), got {cfg.members}")
        if cfg.epochs < 2:
            raise ValueError(f"at least 2 epochs are needed for an error trajectory, got {cfg.epochs}")
        return cfg


# ---------------------------------------------------------------------------- helpers
class _Timer:
    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.stages[name] = time.perf_counter() - t0
        return out


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def missing_or_nonfinite(metrics: dict, keys: Sequence[str] = REQUIRED_METRICS) -> list[str]:
    """Required metric keys that are absent or not finite numbers."""
    bad = []
    for key in keys:
        try:
            value = _get(metrics, key)
        except (KeyError, TypeError):
            bad.append(f"{key} (missing)")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            bad.append(f"{key} = {value!r}")
    return bad


def cpu_count() -> int:
    """CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
