"""Calibration / UQ metrics against hand-computed cases and brute-force references."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from ltau_ase.core.calibration import (
    CalibrationCurve,
    auroc,
    calibration_curve,
    dispersion,
    miscalibration_area,
    pit_uniformity,
    pit_values,
    sharpness,
    spearman,
    uq_metrics,
)


def brute_auroc(scores, positives):
    """O(n^2) pairwise count: P(score_pos > score_neg) + 0.5 P(tie)."""
    sp = scores[positives][:, None]
    sn = scores[~positives][None, :]
    return float(((sp > sn).sum() + 0.5 * (sp == sn).sum()) / (sp.size * sn.size))


# ----------------------------------------------------------------------------- calibration curve
def test_two_bin_hand_computed():
    # bin [0, 0.5): confidences 0.1, 0.3 -> mean 0.2; errors 0.5 (<=1), 2.0 (>1) -> observed 0.5
    # bin [0.5, 1]: confidences 0.6, 0.8, 1.0 -> mean 0.8; errors 0.1, 0.2, 3.0 -> observed 2/3
    conf = np.array([0.1, 0.3, 0.6, 0.8, 1.0])
    err = np.array([0.5, 2.0, 0.1, 0.2, 3.0])
    curve = calibration_curve(conf, err, threshold=1.0, n_bins=2)
    assert isinstance(curve, CalibrationCurve)
    np.testing.assert_allclose(curve.edges, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(curve.predicted, [0.2, 0.8])
    np.testing.assert_allclose(curve.observed, [0.5, 2.0 / 3.0])
    np.testing.assert_array_equal(curve.counts, [2, 3])
    # count-weighted: (2 * |0.5 - 0.2| + 3 * |2/3 - 0.8|) / 5
    expected = (2 * 0.3 + 3 * (0.8 - 2.0 / 3.0)) / 5
    assert miscalibration_area(conf, err, 1.0, n_bins=2) == pytest.approx(expected)
    assert curve.miscalibration_area == pytest.approx(expected)


def test_error_equal_to_threshold_counts_as_below():
    curve = calibration_curve([0.5, 0.5], [1.0, 1.0000001], threshold=1.0, n_bins=1)
    np.testing.assert_allclose(curve.observed, [0.5])


def test_rounding_overshoot_of_probabilities_is_tolerated():
    curve = calibration_curve([1.0 + 2e-16, -1e-17], [0.0, 2.0], threshold=1.0, n_bins=2)
    np.testing.assert_allclose(curve.predicted, [0.0, 1.0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibration_curve([1.001, 0.5], [0.0, 2.0], threshold=1.0)


def test_empty_bins_are_left_out_and_edges_kept():
    curve = calibration_curve([0.05, 0.95], [0.0, 0.0], threshold=0.1, n_bins=10)
    np.testing.assert_array_equal(curve.bins, [0, 9])
    assert curve.edges.shape == (11,)
    np.testing.assert_array_equal(curve.counts, [1, 1])


def test_per_atom_threshold_matches_scaled_scalar():
    # The paper's "error <= atol * s" with atol + rtol|F| per atom.
    rng = np.random.default_rng(1)
    conf = rng.uniform(size=200)
    err = rng.exponential(size=200)
    f = rng.uniform(0, 3, size=200)
    atol, rtol, s = 0.4, 0.1, 2.0
    thr = (atol + rtol * f) * s
    curve = calibration_curve(conf, err, thr, n_bins=5)
    idx = np.minimum((conf * 5).astype(int), 4)
    for b, pred, obs in zip(curve.bins, curve.predicted, curve.observed):
        sel = idx == b
        assert pred == pytest.approx(conf[sel].mean())
        assert obs == pytest.approx(np.mean(err[sel] <= thr[sel]))


def test_perfectly_calibrated_synthetic_data_has_small_area():
    rng = np.random.default_rng(2)
    conf = rng.uniform(size=20000)
    below = rng.uniform(size=conf.size) < conf  # P(error <= thr) = conf exactly
    err = np.where(below, 0.5, 2.0)
    assert miscalibration_area(conf, err, 1.0) < 0.02
    # and an always-overconfident predictor is far off
    assert miscalibration_area(np.ones_like(conf), err, 1.0) == pytest.approx(1 - below.mean())


def test_quantile_strategy_equal_counts_and_ties():
    conf = np.linspace(0, 1, 100)
    curve = calibration_curve(conf, np.zeros(100), 1.0, n_bins=4, strategy="quantile")
    np.testing.assert_array_equal(curve.counts, [25, 25, 25, 25])
    tied = calibration_curve(np.full(10, 0.3), np.zeros(10), 1.0, n_bins=4, strategy="quantile")
    np.testing.assert_array_equal(tied.counts, [10])
    np.testing.assert_allclose(tied.predicted, [0.3])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(confidence=[0.1, 0.2], errors=[0.1]), "length mismatch"),
        (dict(confidence=[0.1, np.nan], errors=[0.1, 0.2]), "NaN"),
        (dict(confidence=[], errors=[]), "at least 1"),
        (dict(confidence=[0.1, 1.2], errors=[0.1, 0.2]), r"\[0, 1\]"),
        (dict(confidence=[-0.1, 0.5], errors=[0.1, 0.2]), r"\[0, 1\]"),
        (dict(confidence=[0.1, 0.5], errors=[-0.1, 0.2]), "non-negative"),
        (dict(confidence=[[0.1, 0.5]], errors=[[0.1, 0.2]]), "1-D"),
        (dict(confidence=[0.1, 0.5], errors=[0.1, 0.2], threshold=[1.0, 1.0, 1.0]), "threshold"),
        (dict(confidence=[0.1, 0.5], errors=[0.1, 0.2], n_bins=0), "n_bins"),
        (dict(confidence=[0.1, 0.5], errors=[0.1, 0.2], strategy="kmeans"), "strategy"),
    ],
)
def test_calibration_bad_input(kwargs, match):
    kwargs.setdefault("threshold", 1.0)
    with pytest.raises(ValueError, match=match):
        calibration_curve(**kwargs)


# ----------------------------------------------------------------------------- ranking metrics
@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=3, max_size=40), st.integers(0, 10**6))
def test_spearman_matches_scipy_with_ties(values, seed):
    x = np.array(values, dtype=float)
    y = np.random.default_rng(seed).integers(0, 4, size=x.size).astype(float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        expected = stats.spearmanr(x, y).statistic
    got = spearman(x, y)
    if np.isnan(expected):
        assert np.isnan(got)
    else:
        assert got == pytest.approx(expected, abs=1e-12)


def test_spearman_hand_values():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="at least 2"):
        spearman([1.0], [2.0])
    with pytest.raises(ValueError, match="length mismatch"):
        spearman([1.0, 2.0], [2.0, 3.0, 4.0])


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 60), st.integers(0, 10**6))
def test_auroc_matches_pairwise_count(n, seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=n).astype(float)  # many ties
    pos = np.zeros(n, bool)
    pos[rng.choice(n, size=rng.integers(1, n), replace=False)] = True
    assert auroc(scores, pos) == pytest.approx(brute_auroc(scores, pos), abs=1e-12)


def test_auroc_hand_values_and_errors():
    assert auroc([0.1, 0.2, 0.8, 0.9], np.array([False, False, True, True])) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], np.array([False, False, True, True])) == 0.0
    assert auroc([0.5, 0.5], np.array([False, True])) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        auroc([0.1, 0.2], np.array([True, True]))
    with pytest.raises(ValueError, match="boolean"):
        auroc([0.1, 0.2], np.array([0, 1]))
    with pytest.raises(ValueError, match="length mismatch"):
        auroc([0.1, 0.2, 0.3], np.array([False, True]))


# ----------------------------------------------------------------------------- sharpness, dispersion, PIT
def test_sharpness_and_dispersion_hand_values():
    u = np.array([0.1, 0.2, 0.3, 0.4])
    assert sharpness(u) == pytest.approx(np.sqrt((0.01 + 0.04 + 0.09 + 0.16) / 4))
    # mean 0.25, sample variance = (0.0225 + 0.0025 + 0.0025 + 0.0225) / 3
    assert dispersion(u) == pytest.approx(np.sqrt(0.05 / 3) / 0.25)
    assert dispersion([0.2, 0.2, 0.2]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="zero mean"):
        dispersion([0.0, 0.0])
    with pytest.raises(ValueError, match="at least 2"):
        dispersion([0.3])
    with pytest.raises(ValueError, match="non-negative"):
        sharpness([-0.1, 0.2])


def test_pit_uniformity_detects_miscalibration():
    rng = np.random.default_rng(3)
    errors = rng.exponential(scale=1.0, size=3000)
    good = pit_values(stats.expon.cdf(errors))  # true distribution
    bad = pit_values(stats.expon.cdf(errors, scale=3.0))  # too wide: PIT piles up near 0
    g, b = pit_uniformity(good), pit_uniformity(bad)
    assert g["p_value"] > 0.01 and g["ks_statistic"] < 0.05
    assert b["p_value"] < 1e-6 and b["ks_statistic"] > 0.2
    # KS statistic against a hand-computed value: points 0.25, 0.75 -> D = 0.25
    assert pit_uniformity([0.25, 0.75])["ks_statistic"] == pytest.approx(0.25)


def test_randomised_pit_for_step_cdfs():
    # Empirical CDFs of 4 equally likely values; true errors drawn from the same distribution.
    rng = np.random.default_rng(4)
    k = rng.integers(0, 4, size=5000)  # true error is the k-th of 4 support points
    upper, lower = (k + 1) / 4.0, k / 4.0
    plain = pit_values(upper)
    rand = pit_values(upper, cdf_left=lower, seed=0)
    assert pit_uniformity(plain)["p_value"] < 1e-6  # steps: not uniform
    assert pit_uniformity(rand)["p_value"] > 0.01
    assert np.all((rand >= lower) & (rand <= upper))
    with pytest.raises(ValueError, match="cdf_left must be <="):
        pit_values([0.2], cdf_left=[0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pit_values([1.5])


def test_uq_metrics_bundle():
    rng = np.random.default_rng(5)
    err = rng.exponential(size=500)
    unc = np.clip(err / err.max() + rng.normal(0, 0.05, 500), 0, 1)
    m = uq_metrics(unc, err, threshold=1.0)
    assert m["miscalibration_area"] == pytest.approx(miscalibration_area(1 - unc, err, 1.0))
    assert m["spearman"] == pytest.approx(stats.spearmanr(unc, err).statistic)
    assert m["auroc"] == pytest.approx(brute_auroc(unc, err > 1.0))
    assert m["sharpness"] == pytest.approx(np.sqrt(np.mean(unc**2)))
    assert m["dispersion"] == pytest.approx(np.std(unc, ddof=1) / unc.mean())
    assert m["n_exceeding"] == int((err > 1.0).sum()) and m["n_atoms"] == 500
    assert m["spearman"] > 0.8 and m["auroc"] > 0.9
    one_class = uq_metrics(unc, err, threshold=1e9)
    assert np.isnan(one_class["auroc"]) and one_class["n_exceeding"] == 0
    with pytest.raises(ValueError, match=r"uncertainty must lie in \[0, 1\]"):
        uq_metrics(unc + 2, err, 1.0)
