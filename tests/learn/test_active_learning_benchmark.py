"""Pure helpers of benchmarks/active_learning.py against hand-computed values (no training; < 2 s)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "active_learning.py"


@pytest.fixture(scope="module")
def al():
    spec = importlib.util.spec_from_file_location("active_learning_benchmark", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_labels_to_reach(al):
    labels, mae = [0, 5, 10, 15], [1.0, 0.8, 0.5, 0.4]
    assert al.labels_to_reach(labels, mae, 1.2) == 0.0
    assert al.labels_to_reach(labels, mae, 0.8) == 5.0
    # between 5 (0.8) and 10 (0.5): 0.6 is reached at 5 + 5 * 0.2 / 0.3
    assert al.labels_to_reach(labels, mae, 0.6) == pytest.approx(5 + 5 * 0.2 / 0.3)
    assert al.labels_to_reach(labels, mae, 0.3) is None


def _run(labels, mae_id, mae_ood, steps):
    history = [{"labels_used": n, "evaluation": {"in_domain": {"force_mae": a}, "out_of_domain": {"force_mae": b}},
                "timings_s": {"training": 1.0}} for n, a, b in zip(labels, mae_id, mae_ood)]
    for h in history[1:]:
        h["exploration"] = {"model_steps": steps, "wall_time_s": steps / 100.0}
    return {"history": history, "wall_s": 10.0}


def test_analyse_goals(al):
    exp = al.Experiment(seeds=1, committee_size=3)
    runs = {"random": {0: _run([0, 5, 10], [1.0, 0.8, 0.6], [2.0, 1.5, 1.0], 100)},
            "ltau": {0: _run([0, 5, 10], [1.0, 0.6, 0.5], [2.0, 1.0, 0.9], 50)},
            "committee": {0: _run([0, 5, 10], [1.0, 0.7, 0.55], [2.0, 1.2, 0.95], 300)}}
    res = al.analyse(runs, exp)
    g = res["goals"]
    # in domain: ltau reaches random's final 0.6 at 5 labels of random's 10: 50 % saved
    assert g["in_domain"]["label_saving_vs_random"]["mean"] == pytest.approx(0.5)
    # committee final 0.55: ltau between 5 (0.6) and 10 (0.5) at 7.5 labels -> 0.75 of 10
    assert g["in_domain"]["labels_ratio_vs_committee"]["mean"] == pytest.approx(0.75)
    # out of domain: random final 1.0 reached at 5 labels; committee's 0.95 at 7.5
    assert g["out_of_domain"]["label_saving_vs_random"]["mean"] == pytest.approx(0.5)
    assert g["out_of_domain"]["labels_ratio_vs_committee"]["mean"] == pytest.approx(0.75)
    cost = g["exploration_cost_ratio_ltau_over_committee"]
    assert cost["model_steps"]["mean"] == pytest.approx(100 / 600) and cost["target"] == pytest.approx(1 / 3)
    assert res["curves"]["ltau"]["0"]["mae_in_domain"] == [1.0, 0.6, 0.5]


def test_no_saving_when_the_baseline_did_not_improve(al):
    exp = al.Experiment(seeds=1, committee_size=3)
    runs = {"random": {0: _run([0, 5, 10], [1.0, 1.2, 1.1], [2.0, 2.1, 2.2], 100)},
            "ltau": {0: _run([0, 5, 10], [1.0, 0.9, 0.8], [2.0, 1.0, 0.9], 50)},
            "committee": {0: _run([0, 5, 10], [1.0, 0.7, 0.55], [2.0, 2.5, 2.4], 300)}}
    g = al.analyse(runs, exp)["goals"]
    # random ended above the initial MAE: reaching its final MAE at 0 labels is no saving
    assert g["in_domain"]["label_saving_vs_random"]["values"] == [None]
    assert g["in_domain"]["seeds_where_baseline_did_not_improve"] == {"random": 1, "committee": 0}
    assert g["out_of_domain"]["labels_ratio_vs_committee"]["values"] == [None]
