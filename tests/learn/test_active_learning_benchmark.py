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


def _synthetic_runs(seeds, rng):
    """Per method and seed a decreasing-ish MAE curve over 0, 6, 12 labels (random numbers)."""
    runs = {m: {} for m in ("ltau", "random", "committee")}
    for s in seeds:
        for m, steps in (("ltau", 50), ("random", 60), ("committee", 300)):
            start = rng.uniform(0.8, 1.2, size=2)
            mae = start[:, None] * np.cumprod(rng.uniform(0.6, 1.05, size=(2, 3)), axis=1) / rng.uniform(0.6, 1.05)
            runs[m][s] = _run([0, 6, 12], mae[0].tolist(), mae[1].tolist(), steps)
    return runs


def _as_read_back(al, runs, exp, drop_first_seed=False, n_boot=None):
    """What run_experiment writes and read_results reads back, through JSON: the curves and the
    experiment (pooling reads nothing else; with ``n_boot`` also the goals, from :func:`analyse`)."""
    import json
    from dataclasses import asdict

    from ltau_ase.core.jsonable import to_jsonable

    res = {"curves": al.seed_curves(runs)} if n_boot is None else al.analyse(runs, exp, n_boot)
    res["experiment"] = asdict(exp)
    if drop_first_seed:  # results.json written before --first-seed existed
        res["experiment"].pop("first_seed")
    return json.loads(json.dumps(to_jsonable(res)))


def test_pool_equals_one_run_over_all_seeds(al):
    rng = np.random.default_rng(3)
    runs = _synthetic_runs(range(7), rng)
    old = {m: {s: r for s, r in by.items() if s < 4} for m, by in runs.items()}
    new = {m: {s: r for s, r in by.items() if s >= 4} for m, by in runs.items()}
    parts = [_as_read_back(al, old, al.Experiment(seeds=4), drop_first_seed=True),
             _as_read_back(al, new, al.Experiment(seeds=3, first_seed=4))]
    pooled = al.pool_results(parts, ["old", "new"], n_boot=200)
    # the reference: all seven seeds analysed together, as if they had run in one go
    together = _as_read_back(al, runs, al.Experiment(seeds=7), n_boot=200)
    assert pooled["seeds"] == [str(s) for s in range(7)] == together["seeds"]
    assert pooled["curves"] == together["curves"]
    assert pooled["goals"] == together["goals"]
    assert pooled["experiment"]["seeds"] == 7
    assert [p["seeds"] for p in pooled["pooled_from"]] == [["0", "1", "2", "3"], ["4", "5", "6"]]
    # and by hand: the pooled final in-domain MAE of random is the mean over all seven seeds
    finals = [runs["random"][s]["history"][-1]["evaluation"]["in_domain"]["force_mae"] for s in range(7)]
    assert pooled["goals"]["in_domain"]["final_mae"]["random"]["mean"] == pytest.approx(np.mean(finals))
    assert pooled["goals"]["in_domain"]["final_mae"]["random"]["n"] == 7


def test_pool_refuses_repeated_seeds_and_other_settings(al):
    rng = np.random.default_rng(4)
    a = _as_read_back(al, _synthetic_runs([0, 1], rng), al.Experiment(seeds=2))
    b = _as_read_back(al, _synthetic_runs([1, 2], rng), al.Experiment(seeds=2, first_seed=1))
    with pytest.raises(ValueError, match="seed 1 is in both a and b"):
        al.pool_results([a, b], ["a", "b"])
    c = _as_read_back(al, _synthetic_runs([5], rng), al.Experiment(seeds=1, first_seed=5, budget=3))
    with pytest.raises(ValueError, match=r"differs from a's in \['budget'\]"):
        al.pool_results([a, c], ["a", "c"])
    with pytest.raises(ValueError, match="not an active-learning results file"):
        al.pool_results([a, {"curves": {}}], ["a", "x"])
    with pytest.raises(ValueError, match="nothing to pool"):
        al.pool_results([])


def test_pool_cli(al, tmp_path, capsys):
    import json

    rng = np.random.default_rng(5)
    for name, seeds, exp in (("old", [0, 1], al.Experiment(seeds=2)),
                             ("new", [2], al.Experiment(seeds=1, first_seed=2))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_as_read_back(al, _synthetic_runs(seeds, rng), exp)))
    assert al.main(["--pool", str(tmp_path / "old"), str(tmp_path / "new" / "results.json"),
                    "--output", str(tmp_path / "pooled")]) == 0
    out = json.loads((tmp_path / "pooled" / "results.json").read_text())
    assert out["seeds"] == ["0", "1", "2"] and (tmp_path / "pooled" / "active_learning.png").stat().st_size > 0
    assert "3 seeds" in capsys.readouterr().out
    for argv, message in ((["--pool", str(tmp_path / "old"), "--seeds", "3"], "--pool takes only --output"),
                          (["--pool", str(tmp_path / "missing")], "no such results file"),
                          (["--pool", str(tmp_path / "old"), str(tmp_path / "old")], "seed 0 is in both")):
        with pytest.raises(SystemExit) as exit_:
            al.main(argv + ["--output", str(tmp_path / "x")])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
