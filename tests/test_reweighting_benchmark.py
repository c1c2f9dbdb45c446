"""Pure helpers of benchmarks/reweighting.py (no training; < 2 s).

The full experiment trains 3 × M nequip models (minutes), so only the parts that turn logs into the
reported numbers are tested here, against hand-computed values.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "reweighting.py"


@pytest.fixture(scope="module")
def rw():
    spec = importlib.util.spec_from_file_location("reweighting_benchmark", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


# Lightning's CSVLogger layout: the train and validation values of an epoch are on separate rows.
CSV = """epoch,step,train_metric_epoch/forces_mae,val0_epoch/forces_mae,val0_epoch/weighted_sum
0,47,,0.139,1.15
0,47,0.197,,
1,95,,0.178,0.57
1,95,0.156,,
2,143,,0.190,1.30
2,143,0.155,,
"""


def test_read_epoch_metrics_merges_rows_per_epoch(rw, tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(CSV)
    m = rw.read_epoch_metrics(path)
    np.testing.assert_array_equal(m[rw.TRAIN_KEY], [0.197, 0.156, 0.155])
    np.testing.assert_array_equal(m[rw.VAL_KEY], [0.139, 0.178, 0.190])


def test_read_epoch_metrics_marks_missing_epochs_nan(rw, tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("\n".join(CSV.splitlines()[:-1]) + "\n")  # epoch 2 has no train row
    m = rw.read_epoch_metrics(path)
    assert np.isnan(m[rw.TRAIN_KEY][2]) and m[rw.VAL_KEY][2] == 0.190


def test_read_epoch_metrics_errors(rw, tmp_path):
    with pytest.raises(FileNotFoundError, match="CSVLogger"):
        rw.read_epoch_metrics(tmp_path / "absent.csv")
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,val0_epoch/forces_mae\n0,1,0.2\n")
    with pytest.raises(ValueError, match="train_metric_epoch/forces_mae"):
        rw.read_epoch_metrics(path)
    path.write_text(CSV + "0,47,0.5,,\n")  # a second, different train value for epoch 0
    with pytest.raises(ValueError, match="two different values"):
        rw.read_epoch_metrics(path)


def test_gap_summary_hand_computed(rw):
    s = rw.gap_summary({"uniform": {"train": [0.10, 0.20, 0.30], "val": [0.15, 0.30, 0.35]}})["uniform"]
    # gaps 0.05, 0.10, 0.05: mean 0.2/3, sample std sqrt(((−1/60)² · 2 + (1/30)²) / 2) = sqrt(1/1200)
    assert s["n_seeds"] == 3
    assert s["train_mean"] == pytest.approx(0.2) and s["train_std"] == pytest.approx(0.1)
    assert s["val_mean"] == pytest.approx(0.8 / 3)
    assert s["gap_mean"] == pytest.approx(0.2 / 3)
    assert s["gap_std"] == pytest.approx(np.sqrt(1 / 1200))
    assert s["gap_per_seed"] == pytest.approx([0.05, 0.10, 0.05])


def test_gap_summary_rejects_bad_input(rw):
    with pytest.raises(ValueError, match="equal-length"):
        rw.gap_summary({"easy": {"train": [0.1, 0.2], "val": [0.1]}})
    with pytest.raises(ValueError, match="NaN"):
        rw.gap_summary({"easy": {"train": [0.1, np.nan], "val": [0.1, 0.2]}})


def test_paired_differences_and_verdicts(rw):
    summary = {
        "uniform": {"gap_per_seed": [0.10, 0.20, 0.30]},
        "hard": {"gap_per_seed": [0.20, 0.31, 0.39]},  # +0.10, +0.11, +0.09
        "easy": {"gap_per_seed": [0.11, 0.19, 0.32]},  # +0.01, −0.01, +0.02
    }
    d = rw.paired_gap_differences(summary)
    # hard: mean 0.10, sample std 0.01, half-width t(0.975, 2) · 0.01 / sqrt(3) = 4.302653 · 0.0057735
    half = 4.302652729911275 * 0.01 / np.sqrt(3)
    assert d["hard"]["mean"] == pytest.approx(0.10)
    assert d["hard"]["ci95_low"] == pytest.approx(0.10 - half)
    assert d["hard"]["ci95_high"] == pytest.approx(0.10 + half)
    assert d["easy"]["per_seed"] == pytest.approx([0.01, -0.01, 0.02])
    v = rw.trend_verdict(d)
    assert v["hard"] == "yes"  # CI [0.075, 0.125] excludes 0 above
    assert v["easy"] == "no, opposite sign, not significant"  # mean +0.0067, CI spans 0


def test_verdict_cases(rw):
    def diff(mean, lo, hi):
        return {"mean": mean, "ci95_low": lo, "ci95_high": hi}

    v = rw.trend_verdict({"easy": diff(-0.02, -0.03, -0.01), "hard": diff(0.01, -0.01, 0.03)})
    assert v == {"easy": "yes", "hard": "same sign, not significant"}
    v = rw.trend_verdict({"easy": diff(0.02, 0.01, 0.03), "hard": diff(-0.02, -0.03, -0.01)})
    assert v == {"easy": "no, opposite sign", "hard": "no, opposite sign"}


def test_paired_differences_need_paired_seeds(rw):
    with pytest.raises(ValueError, match="paired"):
        rw.paired_gap_differences({"uniform": {"gap_per_seed": [0.1, 0.2]}, "hard": {"gap_per_seed": [0.1]}})


def test_trend_conclusion(rw):
    both = {"logged": {"hard": "yes", "easy": "yes"}}
    assert "appears (both" in rw.trend_conclusion(both)
    part = {"logged": {"hard": "yes", "easy": "no, opposite sign"}}
    assert "appears only in part" in rw.trend_conclusion(part)
    signs = {"m": {"hard": "same sign, not significant", "easy": "same sign, not significant"}}
    assert "suggested by the signs but not significant" in rw.trend_conclusion(signs)
    none = {"final_model": {"hard": "no, opposite sign, not significant", "easy": "same sign, not significant"}}
    text = rw.trend_conclusion(none)
    assert text.startswith("final_model: the paper's trend does not appear")


def test_prepare_output_refuses_or_clears_old_runs(rw, tmp_path):
    rw.prepare_output(tmp_path / "fresh")
    assert (tmp_path / "fresh").is_dir()
    (tmp_path / "old" / "runs" / "uniform_seed1").mkdir(parents=True)
    (tmp_path / "old" / "results.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite"):
        rw.prepare_output(tmp_path / "old")
    assert (tmp_path / "old" / "runs" / "uniform_seed1").is_dir()  # nothing deleted without overwrite
    rw.prepare_output(tmp_path / "old", overwrite=True)
    assert not (tmp_path / "old" / "runs").exists()
