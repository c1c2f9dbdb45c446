"""The shift benchmark (issue 11 item 7): its metrics against hand-computed and brute-force references,
its data splits, and one tiny end-to-end run on the quick demo's trained ensemble."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ltau_ase.shift_metrics import (bootstrap_ci, conformal_quantile, coverage, normalised_conformal_bound,
                                    species_aware, stop_outcomes, stop_step)


# ---------------------------------------------------------------------------- metrics
def test_bootstrap_resamples_whole_groups():
    groups = np.repeat(["a", "b", "c", "d"], [1, 2, 3, 4])
    seen = []

    def stat(idx):
        seen.append(np.sort(idx))
        return float(len(idx))

    ci = bootstrap_ci(groups, stat, n_boot=50, seed=3)
    assert ci["value"] == 10 and ci["n_groups"] == 4 and ci["n_boot"] == 50
    sizes = {"a": 1, "b": 2, "c": 3, "d": 4}
    for idx in seen[1:]:
        labels, counts = np.unique(groups[idx], return_counts=True)
        # every group drawn appears with all its items, a whole number of times
        for label, count in zip(labels, counts):
            assert count % sizes[label] == 0


def test_bootstrap_ci_of_a_mean_matches_brute_force():
    rng = np.random.default_rng(0)
    values = rng.normal(size=40)
    groups = np.repeat(np.arange(20), 2)
    ci = bootstrap_ci(groups, lambda i: values[i].mean(), n_boot=400, seed=1)
    # brute force with the same draws: resample group labels, mean of the pairs
    r = np.random.default_rng(1)
    pair_means = values.reshape(20, 2).mean(axis=1)
    draws = [pair_means[r.integers(0, 20, size=20)].mean() for _ in range(400)]
    lo, hi = np.quantile(draws, [0.025, 0.975])
    assert ci["value"] == pytest.approx(values.mean())
    assert ci["low"] == pytest.approx(lo) and ci["high"] == pytest.approx(hi)


def test_bootstrap_undefined_resamples_are_counted():
    pos = np.array([True, False, False])
    groups = np.array([0, 1, 2])

    def one_class_fails(idx):
        if pos[idx].all() or not pos[idx].any():
            raise ValueError("one class")
        return 1.0

    ci = bootstrap_ci(groups, one_class_fails, n_boot=200, seed=0)
    # P(no positive drawn) = (2/3)^3, P(only positives) = (1/3)^3
    assert 0.2 < ci["n_undefined"] / 200 < 0.45


def test_conformal_quantile_hand_computed():
    scores = np.arange(1.0, 11.0)  # 1..10
    assert conformal_quantile(scores, 0.8) == 9.0  # ceil(11 * 0.8) = 9th smallest
    assert conformal_quantile(scores, 0.5) == 6.0  # ceil(5.5) = 6
    assert math.isinf(conformal_quantile(scores, 0.95))  # ceil(10.45) = 11 > 10
    with pytest.raises(ValueError, match="coverage"):
        conformal_quantile(scores, 1.0)


def test_normalised_conformal_covers_exchangeable_data():
    rng = np.random.default_rng(4)
    sigma = rng.uniform(0.1, 2.0, size=8000)
    err = sigma * np.abs(rng.normal(size=8000))
    for q in (0.8, 0.9, 0.95):
        bound = normalised_conformal_bound(sigma[:4000], err[:4000], sigma[4000:], q)
        assert q - 0.02 <= coverage(bound, err[4000:]) <= q + 0.02


def test_stop_step_and_outcomes_hand_made():
    assert stop_step(np.array([0, 2, 0, 2, 2, 2]), 1.0, patience=2) == 4
    assert stop_step(np.array([0, 2, 0]), 1.0, patience=2) is None
    stats = [np.array([0, 0, 0, 5, 5, 5, 5]),   # breaks at 2, stops at 3: delay 1
             np.array([5, 0, 0, 0, 0, 0, 0]),   # never breaks, stops at 0: false alarm
             np.array([0, 0, 0, 0, 0, 0, 0]),   # breaks at 1, never stopped: missed
             np.array([0, 5, 0, 0, 0, 0, 0])]   # breaks at 4, stopped at 1: early (on time, also a false alarm)
    errs = [np.array([0, 0, 2, 2, 2, 2, 2]), np.zeros(7), np.array([0, 3, 3, 3, 3, 3, 3]),
            np.array([0, 0, 0, 0, 3, np.nan, 3])]
    o = stop_outcomes(stats, errs, threshold=1.0, error_bound=1.0, on_time=10)
    assert o["stop"] == [3, 0, None, 1]
    assert o["breakdown"] == [2, None, 1, 4]
    assert o["delay"] == [1, None, None, -3]
    assert o["n_false_alarms"] == 2 and o["n_broken"] == 3 and o["n_missed"] == 1 and o["n_on_time"] == 2
    # one threshold per run
    o2 = stop_outcomes(stats[:2], errs[:2], threshold=[1.0, 10.0], error_bound=1.0)
    assert o2["stop"] == [3, None]


def test_species_aware_ranks_unseen_atoms_first_and_keeps_order():
    u = np.array([0.9, 0.1, 0.5, 0.3])
    unseen = np.array([False, True, False, True])
    out = species_aware(u, unseen)
    assert out[1] > out[0] and out[3] > out[0]
    assert out[3] > out[1]  # order among unseen atoms kept
    assert np.array_equal(out[~unseen], u[~unseen])


def test_calibration_groups_are_systems_when_there_are_enough():
    from ltau_ase.core.estimator import MIN_CALIBRATION_STRUCTURES
    from ltau_ase.demo.shift import calibration_groups

    n = MIN_CALIBRATION_STRUCTURES
    system = np.repeat([f"s{i}" for i in range(n)], 6)  # n systems, 2 frames of 3 atoms each
    frame = np.repeat(np.arange(2 * n), 3)
    labels, how = calibration_groups(system, frame)
    assert how == "systems" and np.array_equal(labels, np.repeat(np.argsort(np.argsort([f"s{i}" for i in range(n)])), 6))
    labels, how = calibration_groups(system[: 6 * (n - 1)], frame[: 6 * (n - 1)])  # one system short: frames
    assert how == "frames" and np.unique(labels).size == 2 * (n - 1)
    assert all(np.unique(labels[frame[: 6 * (n - 1)] == f]).size == 1 for f in range(2 * (n - 1)))


# ---------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def tiny_settings():
    from ltau_ase.datasets.shift import ShiftSettings

    return ShiftSettings(n_train=1, n_val=1, n_calibration=1, n_calibration_mild=1, n_test=1, n_is2rs=1,
                         n_is2rs_calibration=1, md_frames=1, relax_frames=2, md_stride=2, md_equilibration=0,
                         slab_sizes=((2, 2, 3),))


def test_shift_domains_hold_what_they_claim(tiny_settings):
    from ltau_ase.datasets.shift import domain_systems

    s = tiny_settings
    for domain, (metals, ads, facet) in {
        "in_domain": (s.metals_in, s.adsorbates_in, s.facet_in),
        "T1200": (s.metals_in, s.adsorbates_in, s.facet_in),
        "adsorbate": (s.metals_in, s.adsorbates_out, s.facet_in),
        "facet": (s.metals_in, s.adsorbates_in, s.facet_out),
        "element": (s.metals_out, s.adsorbates_in, s.facet_in),
    }.items():
        for spec in domain_systems(s, domain, 12, seed=0, stream=5):
            assert spec.metal in metals and spec.adsorbate in ads and spec.facet == facet
    assert s.domain_spec("T1200")[3] == 1200.0 and s.domain_spec("in_domain")[3] == 300.0
    with pytest.raises(ValueError, match="unknown shift domain"):
        s.domain_spec("T42x")


def test_settings_validation(tiny_settings):
    from dataclasses import replace

    with pytest.raises(ValueError, match="both seen and held out"):
        replace(tiny_settings, metals_out=("Cu",)).validate()
    with pytest.raises(ValueError, match="n_test must be >= 1"):
        replace(tiny_settings, n_test=0).validate()
    with pytest.raises(ValueError, match="not an fcc metal"):
        replace(tiny_settings, metals_out=("Fe",)).validate()


def test_md_split_frames_are_labelled_at_their_temperature(tiny_settings):
    from ltau_ase.datasets.shift import generate_split

    frames = generate_split(tiny_settings, "test_T1200", seed=0)
    assert len(frames) == 1
    f = frames[0]
    assert f.info["temperature_K"] == 1200.0 and f.info["shift_domain"] == "T1200"
    assert f.info["config_type"] == "md" and f.info["facet"] == "111"
    # the stored forces are EMT's, unconstrained
    from ase.calculators.emt import EMT

    ref = f.copy()
    ref.calc = EMT()
    np.testing.assert_allclose(f.get_forces(apply_constraint=False), ref.get_forces(apply_constraint=False),
                               atol=1e-10)


# ---------------------------------------------------------------------------- end to end (quick demo's ensemble)
def test_quick_run_on_the_demo_ensemble(quick_demo_dir, tmp_path):
    pytest.importorskip("nequip")
    from ltau_ase.datasets.shift import ShiftSettings
    from ltau_ase.demo.shift import ShiftBenchConfig, ensemble_from_demo, run_shift_benchmark

    # fit_calibration needs >= 200 calibration atoms in >= 20 structures: 9 + 1 systems x 2 frames = 20
    # frames (the benchmark splits by frame below 20 systems) x 14 atoms = 280
    settings = ShiftSettings(n_train=1, n_val=1, n_calibration=9, n_calibration_mild=1, n_test=1, n_is2rs=1,
                             n_is2rs_calibration=1, md_frames=2, relax_frames=1, md_stride=3, md_equilibration=0,
                             slab_sizes=((2, 2, 3),))
    cfg = ShiftBenchConfig(quick=True, k=5, relax_steps=5, committee_stride=2, md_runs_reference=1,
                           md_runs_in_domain=1, md_steps_in_domain=6, md_runs_hot=1, md_steps_hot=6,
                           md_false_alarm_rate=0.5, bootstrap=10, timing_repeats=2, workers=1, settings=settings)
    out = tmp_path / "shift"
    results = run_shift_benchmark(out, cfg, ensemble=ensemble_from_demo(quick_demo_dir))
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["config"]["settings"]["n_test"] == 1
    domains = on_disk["s2ef"]["domains"]
    assert set(domains) == {"in_domain", "T600", "T1200", "adsorbate", "facet", "element",
                            "element_species_aware"}
    for row in domains.values():
        for method in ("ltau_paper", "distance", "committee"):
            assert -1 <= row[method]["spearman"]["value"] <= 1
        assert row["committee"]["coverage"]["0.9"]["value"] is not None
    # the committee has the demo's members; cost ratios are positive
    assert results["config"]["members"] == len(ensemble_from_demo(quick_demo_dir)["models"])
    assert all(v > 0 for v in on_disk["cost"]["over_single"].values())
    assert set(on_disk["is2rs"]["domains"]) == {"calibration", "in_domain", "adsorbate", "facet", "element"}
    # every scored relaxation carries the element-normalised traces (scales: the in-domain calibration split)
    assert set(on_disk["is2rs"]["element_scales"]) == {"expected_error", "distance_ratio", "uq"}
    scored = [row for rows in on_disk["is2rs"]["table"].values() for row in rows if "ltau_distance" in row]
    assert scored
    for row in scored:
        feats = row["element_normalised"]
        assert len(feats) == 12 and all(feats[f"{q}_elnorm_max"] >= feats[f"{q}_elnorm_final"] > 0
                                        and 0 <= feats[f"{q}_elnorm_frac"] <= 1
                                        for q in ("expected_error", "distance_ratio", "uq"))
    assert on_disk["md"]["groups"]["T1200"]["n_runs"] == 1
    text = (out / "summary.md").read_text()
    for name in on_disk["figures"].values():
        assert (out / name).is_file() and name in text
    # the "follow" means are the plain means of the cached per-atom arrays (member 1's errors, the
    # committee's spreads), and the table reports each against the in-domain mean
    assert "Do the predictions follow the shift?" in text
    for domain in ("in_domain", "T1200", "element"):
        with np.load(out / "raw" / f"s2ef_test_{domain}.npz") as z:
            follow = domains[domain]["follow"]
            assert follow["true_error"]["mean"] == pytest.approx(float(np.mean(z["err_single"])), rel=1e-12)
            assert follow["committee_spread"]["mean"] == pytest.approx(float(np.mean(z["u_committee"])), rel=1e-12)
    assert "element_species_aware" in domains and "follow" not in domains["element_species_aware"]
    ratio = domains["T1200"]["follow"]["true_error"]["mean"] / domains["in_domain"]["follow"]["true_error"]["mean"]
    assert f"(×{ratio:.2f})" in text


def test_follow_table_and_headline_with_undefined_means():
    """All-NaN values, an in-domain mean of 0 and a quantity missing from one domain give "n/a" ratios (NaN in
    the headline), never a crash or a ratio against 0; defined ratios are the plain quotient of the means."""
    from ltau_ase.demo.shift import follow_means, follow_ratio, follow_table, headline

    nan = float("nan")
    ev = {"err_single": np.array([nan, nan]), "err_committee": np.zeros(2), "u_committee": np.array([1.0, 2.0])}
    pred = {"distance": {"uncertainty": np.array([1.0, 3.0])}, "ltau_paper": {"expected_error": np.array([1.0, 1.0])},
            "ltau_distance_expected_error": {"uncertainty": np.array([nan, 2.0])}}
    base = follow_means(ev, pred)
    assert math.isnan(base["true_error"]["mean"]) and base["true_error"]["n_nan"] == 2
    assert base["ltau_distance_expected_error"] == {"mean": 2.0, "n_nan": 1}
    hot = follow_means({"err_single": np.array([1.0, 2.0]), "err_committee": np.array([1.0, 3.0]),
                        "u_committee": np.array([3.0, 3.0])},
                       {"distance": {"uncertainty": np.array([2.0, 4.0])},
                        "ltau_paper": {"expected_error": np.array([1.0, 2.0])}})  # no distance-aware estimator
    assert follow_ratio(hot, base, "committee_spread") == 2.0  # 3 / 1.5
    assert follow_ratio(hot, base, "latent_distance") == 1.5  # 3 / 2
    for key in ("true_error", "true_error_committee", "ltau_distance_expected_error"):  # NaN base, base 0, missing
        assert math.isnan(follow_ratio(hot, base, key))
    results = {"s2ef": {"domains": {"in_domain": {"follow": base}, "T1200": {"follow": hot}}},
               "is2rs": {"domains": {}}, "md": {"groups": {}}, "cost": {"over_single": {}}}
    table = follow_table(results)
    t1200 = next(line for line in table.splitlines() if line.startswith("| T1200 |")).split(" | ")
    assert t1200[1:] == ["1.5 (× n/a)", "1.500 (×1.50)", "n/a (× n/a)", "3.000 (×1.50)", "2 (× n/a)",
                         "3.000 (×2.00) |"]
    h = headline(results)
    assert h["T1200.follow.committee_spread_ratio"] == 2.0 and math.isnan(h["T1200.follow.true_error_ratio"])
    assert "T1200.follow.ltau_distance_expected_error_ratio" not in h  # T1200 has no such mean to compare
    assert follow_table({"s2ef": {"domains": {"T1200": {"follow": hot}}}}).startswith("(no in-domain")
