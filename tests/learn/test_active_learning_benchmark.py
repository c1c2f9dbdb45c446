"""Pure helpers of benchmarks/active_learning.py against hand-computed values (no training; < 2 s)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
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
    # in domain: ltau reaches random's final 0.6 at 5 labels of random's 10: ratio 0.5 (50 % saved)
    assert g["in_domain"]["labels_ratio_vs_random"]["per_seed"] == [pytest.approx(0.5)]
    boot = g["in_domain"]["labels_ratio_vs_random"]["mean_curves"]
    # one seed: every bootstrap sample is that seed, so the interval collapses onto the estimate
    assert boot["estimate"] == pytest.approx(0.5) and boot["ci95"] == [pytest.approx(0.5)] * 2
    assert boot["p_goal_met"] == 1.0 and boot["p_not_reached"] == 0.0
    # committee final 0.55: ltau between 5 (0.6) and 10 (0.5) at 7.5 labels -> 0.75 of 10
    assert g["in_domain"]["labels_ratio_vs_committee"]["per_seed"] == [pytest.approx(0.75)]
    # out of domain: random final 1.0 reached at 5 labels; committee's 0.95 at 7.5
    assert g["out_of_domain"]["labels_ratio_vs_random"]["per_seed"] == [pytest.approx(0.5)]
    assert g["out_of_domain"]["labels_ratio_vs_committee"]["per_seed"] == [pytest.approx(0.75)]
    assert g["in_domain"]["final_mae_ltau_minus_random"]["mean"] == pytest.approx(-0.1)
    # random's 0.8 after 5 labels: ltau (1.0 -> 0.6 over 0..5 labels) reaches it at 2.5 labels
    early = g["in_domain"]["labels_ratio_vs_random"]["at_earlier_points"]
    assert len(early) == 1 and early[0]["baseline_labels"] == 5.0 and early[0]["estimate"] == pytest.approx(0.5)
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
    assert g["in_domain"]["labels_ratio_vs_random"]["n_seeds_undefined"] == 1
    assert g["in_domain"]["seeds_where_random_did_not_improve"] == 1
    assert g["in_domain"]["seeds_where_committee_did_not_improve"] == 0
    assert g["out_of_domain"]["labels_ratio_vs_committee"]["mean_curves"]["p_undefined"] == 1.0
    # in domain ltau never reaches the committee's 0.55 within its 10 labels
    assert g["in_domain"]["labels_ratio_vs_committee"]["n_seeds_not_reached"] == 1
    assert g["in_domain"]["labels_ratio_vs_committee"]["per_seed"] == ["not_reached"]
    assert g["in_domain"]["labels_ratio_vs_random"]["per_seed"] == ["undefined"]


def test_bootstrap_over_seeds_against_brute_force(al):
    """Two seeds: the bootstrap samples can only be {0,0}, {0,1}/{1,0} or {1,1}; the quantiles and
    probabilities are those of the three mean-curve ratios, computed by hand."""
    labels = [0, 10]
    base = [(labels, [1.0, 0.6]), (labels, [1.0, 0.4])]
    meth = [(labels, [1.0, 0.2]), (labels, [1.0, 0.7])]
    # {0,0}: reach 0.6 on 1 -> 0.2 at 10 * 0.4 / 0.8 = 5 -> 0.5; {1,1}: 0.4 never reached by 1 -> 0.7: inf;
    # mixed: base final 0.5, method 1 -> 0.45: reached at 10 * 0.5 / 0.55
    mixed = 0.5 / 0.55
    out = al.bootstrap_ratio(meth, base, n_boot=4000, seed=1)
    assert out["estimate"] == pytest.approx(mixed)
    s = out["samples"]
    assert set(np.round(s[np.isfinite(s)], 12)) == {round(0.5, 12), round(mixed, 12)}
    assert out["p_not_reached"] == pytest.approx(0.25, abs=0.03)  # P({1,1}) = 1/4
    assert out["ci95"] == [pytest.approx(0.5), float("inf")]
    m = al.bootstrap_mean([1.0, 3.0], n_boot=4000, seed=1)
    assert m["mean"] == 2.0 and m["std"] == pytest.approx(np.sqrt(2)) and m["ci95"] == [1.0, 3.0]
