"""The shift benchmark's MD-stop scoring (issue 11 item 5): threshold rules side by side, against
thresholds and stop steps worked out independently."""
from __future__ import annotations

import numpy as np
import pytest


class _ValueScorer:
    """Per-atom statistics read straight from the 'descriptors' (column 0): the ratio, and the distance = 2x."""

    def predict(self, desc, numbers=None):
        v = np.asarray(desc[:, 0], dtype=np.float64)
        return {"ltau_distance_ratio": {"uncertainty": v}, "distance": {"uncertainty": 2.0 * v}}


def _runs(rng, n, steps, jump_at=None, break_at=None):
    runs = []
    for _ in range(n):
        v = rng.uniform(0.0, 1.0, size=(steps, 3, 1)).astype(np.float32)  # 3 atoms
        err = np.full(steps, 0.1)
        if jump_at is not None:  # below the in-domain range before the jump
            v *= 0.5
            v[jump_at:, 1, 0] = 5.0
            err[break_at:] = 2.0
        runs.append({"descriptors": v, "true_max_error": err})
    return runs


def test_score_md_conformal_and_gumbel_rules_and_the_ratio_reference():
    from scipy.stats import gumbel_r

    from ltau_ase.demo.shift import ShiftBenchConfig, md_table, score_md

    rng = np.random.default_rng(0)
    md = {"T300": _runs(rng, 12, 60), "T1200": _runs(rng, 2, 40, jump_at=20, break_at=18)}
    cfg = ShiftBenchConfig(quick=True, md_runs_in_domain=12, md_runs_hot=2, md_false_alarm_rate=0.1,
                           md_extreme_value_rates=(0.01,), bootstrap=20)
    res = score_md(cfg, _ValueScorer(), md, {"groups": 2.0, "atoms": 0.5, "n_groups": 7})
    peaks = np.array([r["descriptors"][:, :, 0].max() for r in md["T300"]], dtype=np.float64)
    rules = res["reference_rules"]["whole_runs"]["threshold_rules"]
    assert list(rules) == ["conformal α=0.1", "gumbel α=0.01"]
    # conformal, hot runs: rank ceil(13 * 0.9) = 12 of 12 peaks -> the largest in-domain peak
    assert rules["conformal α=0.1"]["thresholds"]["ltau_distance_ratio"] == pytest.approx(peaks.max())
    # gumbel: the 99 % quantile of a Gumbel fitted (here by scipy) to the 12 peaks; in domain, leave one out
    gumbel = rules["gumbel α=0.01"]
    assert gumbel["thresholds"]["ltau_distance_ratio"] == pytest.approx(
        gumbel_r(*gumbel_r.fit(peaks)).ppf(0.99), rel=1e-5)
    loo = gumbel["groups"]["T300"]["ltau_distance_ratio"]["thresholds"]
    assert loo[3] == pytest.approx(gumbel_r(*gumbel_r.fit(np.delete(peaks, 3))).ppf(0.99), rel=1e-5)
    # the hot runs jump to 5 at step 20, two steps after breakdown at 18: on time under every rule
    for rule in rules.values():
        hot = rule["groups"]["T1200"]["ltau_distance_ratio"]
        assert hot["stop"] == [20, 20] and hot["delay"] == [2, 2] and hot["n_on_time"] == 2
    # the ratio under the plain reference is the ratio x 4: thresholds x 4, the same stops
    assert gumbel["thresholds"]["ltau_distance_ratio_atoms_reference"] == pytest.approx(
        4.0 * gumbel["thresholds"]["ltau_distance_ratio"])
    assert res["ratio_reference_check"]["same_stops"] is True
    assert "same stops under both: yes" in md_table({"md": res, "config": {"md_on_time_steps": 10}})

    # 9 runs: no Gumbel fit (>= 10 needed); the rule is reported with its reason, the conformal rule still works
    few = {"T300": md["T300"][:9], "T1200": md["T1200"]}
    res = score_md(cfg, _ValueScorer(), few)
    gumbel = res["reference_rules"]["whole_runs"]["threshold_rules"]["gumbel α=0.01"]
    assert "at least 10 block maxima" in gumbel["errors"]["distance"] and not gumbel["thresholds"]
    assert res["groups"]["T1200"]["distance"]["n_runs"] == 2


def test_md_model_extra_frames_are_new_in_domain_md_frames_with_fresh_ids():
    from ltau_ase.demo.shift import ShiftBenchConfig, md_model_extra_frames

    cfg = ShiftBenchConfig.preset(True, md_model_extra_systems=2, md_model_extra_frames=2, md_model_extra_steps=6)
    frames = md_model_extra_frames(cfg, np.array([5, 17, 3]))
    assert [f.info["frame_id"] for f in frames] == [18, 19, 20, 21]  # after the taken ids, in order
    assert [f.info["system"] for f in frames][::2] == [f.info["system"] for f in frames][1::2]
    assert all(f.info["config_type"] == "md" and f.info["temperature_K"] == cfg.settings.train_temperature
               and f.info["shift_domain"] == "in_domain" and f.info["system"].startswith("md_model_train-")
               for f in frames)
    # one frame every 6 / 2 = 3 steps of MD: the two frames of a system differ, and carry EMT forces
    assert not np.allclose(frames[0].positions, frames[1].positions)
    assert frames[0].get_forces().shape == (len(frames[0]), 3)
    with pytest.raises(ValueError, match="md_model_extra"):
        ShiftBenchConfig.preset(True, md_model_extra_systems=2, md_model_extra_frames=3, md_model_extra_steps=2)


class _ExpectedErrorScorer:
    """'Expected error' per atom read straight from the descriptors' column 0."""

    def predict(self, desc, numbers=None):
        return {"ltau_distance_expected_error": {"uncertainty": np.asarray(desc[:, 0], dtype=np.float64)}}


def test_score_md_per_element_statistic_against_hand_normalised_traces():
    from ltau_ase.demo.shift import ShiftBenchConfig, md_table, score_md

    rng = np.random.default_rng(1)
    z = np.array([29, 29, 8])

    def runs(n, steps, jump_at=None):
        out = []
        for _ in range(n):
            v = rng.uniform(0.0, 1.0, size=(steps, 3, 1)).astype(np.float32)
            v[:, 2] *= 0.1  # the O atom's in-domain range is a tenth of the Cu atoms'
            err = np.full(steps, 0.1)
            if jump_at is not None:  # the O atom jumps to 0.5, still inside the Cu atoms' range
                v[jump_at:, 2, 0] = 0.5
                err[jump_at - 2:] = 2.0
            out.append({"descriptors": v, "true_max_error": err, "numbers": z})
        return out

    md = {"T300": runs(12, 60), "T1200": runs(2, 40, jump_at=20)}
    cfg = ShiftBenchConfig(quick=True, md_runs_in_domain=12, md_runs_hot=2, md_false_alarm_rate=0.1,
                           md_extreme_value_rates=(), bootstrap=20)
    res = score_md(cfg, _ExpectedErrorScorer(), md)
    rule = res["reference_rules"]["whole_runs"]["threshold_rules"]["conformal α=0.1"]
    values = [r["descriptors"][:, :, 0].astype(np.float64) for r in md["T300"]]

    def scales_of(vals):  # by hand: the 0.99 quantile of every value of each element
        return {29: np.quantile(np.concatenate([v[:, :2].ravel() for v in vals]), 0.99),
                8: np.quantile(np.concatenate([v[:, 2] for v in vals]), 0.99)}

    def peak(v, sc):
        return max((v[:, :2] / sc[29]).max(), (v[:, 2] / sc[8]).max())

    sc = scales_of(values)
    pooled = np.quantile(np.concatenate([v.ravel() for v in values]), 0.99)
    assert res["element_scales"]["whole_runs"]["ltau_distance_expected_error_per_element"] == pytest.approx(
        {"29": sc[29], "8": sc[8], "pooled": pooled})
    # conformal, hot runs: rank ceil(13 * 0.9) = 12 of 12 -> the largest normalised in-domain peak
    thr = max(peak(v, sc) for v in values)
    assert rule["thresholds"]["ltau_distance_expected_error_per_element"] == pytest.approx(thr)
    # in domain, leave one out: run 3's threshold is the largest peak of the others under the others' scales
    others = values[:3] + values[4:]
    loo = rule["groups"]["T300"]["ltau_distance_expected_error_per_element"]
    assert loo["thresholds"][3] == pytest.approx(max(peak(v, scales_of(others)) for v in others))
    # the O jump (0.5) stays below the Cu atoms' raw range: the raw max-atom statistic misses it,
    # the per-element one (0.5 / ~0.1 = ~5) stops both hot runs at the jump, 2 steps after breakdown
    hot = rule["groups"]["T1200"]
    assert hot["ltau_distance_expected_error"]["n_missed"] == 2
    assert hot["ltau_distance_expected_error_per_element"]["stop"] == [20, 20]
    assert hot["ltau_distance_expected_error_per_element"]["n_on_time"] == 2
    assert "its element's in-domain quantile" in md_table({"md": res, "config": {"md_on_time_steps": 10}})
