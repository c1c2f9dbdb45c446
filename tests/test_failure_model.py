"""IS2RS failure probability from a relaxation's UQ trace (issue 11 item 6)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import minimize

from ltau_ase.core.calibration import auroc
from ltau_ase.is2rs import FAILURE_FEATURES, FailureModel


def _rows(n, seed):
    rng = np.random.default_rng(seed)
    uq_max = rng.uniform(0, 1, n)
    logit = -3.0 + 6.0 * uq_max
    failed = rng.uniform(size=n) < 1 / (1 + np.exp(-logit))
    rmsd = np.where(failed, 0.5 + rng.uniform(0.01, 1, n), rng.uniform(0, 0.5, n))
    return [{"name": f"s{i}", "uq_initial": 0.5 * uq_max[i] + 0.1 * rng.uniform(), "uq_max": uq_max[i],
             "uq_mean": 0.7 * uq_max[i], "uq_final": rng.uniform(), "nsteps": int(rng.integers(5, 200)),
             "rmsd": rmsd[i]} for i in range(n)]


def test_logistic_fit_matches_brute_force_likelihood():
    rows = _rows(300, 0)
    model = FailureModel(features=("uq_max",), l2=0.0, transform="log").fit(rows)
    x = np.array([r["uq_max"] for r in rows])
    y = np.array([r["rmsd"] > 0.5 for r in rows], dtype=float)

    def nll(w):  # unstandardised maximum likelihood, derivative-free reference
        z = w[0] + w[1] * x
        return np.sum(np.logaddexp(0, z) - y * z)

    ref = minimize(nll, [0.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 4000})
    p_ref = 1 / (1 + np.exp(-(ref.x[0] + ref.x[1] * x)))
    np.testing.assert_allclose(model.predict_proba(rows), p_ref, atol=1e-4)
    # maximum likelihood with an intercept is calibrated in the large: mean p = observed failure rate
    assert model.predict_proba(rows).mean() == pytest.approx(y.mean(), abs=1e-5)


def test_failure_model_ranks_new_relaxations_and_round_trips():
    model = FailureModel().fit(_rows(200, 1))
    assert model.features == FAILURE_FEATURES
    test = _rows(400, 2)
    p = model.predict_proba(test)
    failed = np.array([r["rmsd"] > 0.5 for r in test])
    assert auroc(p, failed) > 0.8
    # binned reliability on new data: each third of predicted probability within 0.12 of its observed rate
    order = np.argsort(p)
    for part in np.array_split(order, 3):
        assert abs(p[part].mean() - failed[part].mean()) < 0.12
    back = FailureModel.from_dict(json.loads(json.dumps(model.to_dict())))
    np.testing.assert_array_equal(back.predict_proba(test), p)


def test_failure_model_bad_inputs():
    rows = _rows(40, 3)
    few = [dict(r, rmsd=0.1) for r in rows]
    few[0]["rmsd"] = 2.0
    with pytest.raises(ValueError, match="at least 5 relaxations with RMSD above"):
        FailureModel().fit(few)
    with pytest.raises(ValueError, match="lacks feature 'uq_max'"):
        FailureModel().fit([{k: v for k, v in r.items() if k != "uq_max"} for r in rows])
    with pytest.raises(ValueError, match="not fitted"):
        FailureModel().predict_proba(rows)
    with pytest.raises(ValueError, match="rmsd_threshold"):
        FailureModel(rmsd_threshold=0)
    state = FailureModel().fit(_rows(100, 4)).to_dict()
    with pytest.raises(ValueError, match="coefficients"):
        FailureModel.from_dict(dict(state, coef=[1.0]))
    with pytest.raises(ValueError, match="kind"):
        FailureModel.from_dict(dict(state, kind="pickle"))


def test_distance_trace_features_enter_as_log_ratio_and_carry_the_signal():
    from ltau_ase.is2rs import DISTANCE_FEATURES, FAILURE_FEATURES_WITH_DISTANCE

    assert FAILURE_FEATURES_WITH_DISTANCE == FAILURE_FEATURES + DISTANCE_FEATURES
    rng = np.random.default_rng(7)

    def rows(n):
        # failures come from far structures (distance ratio r), the UQ trace is noise
        log_r = rng.normal(0.5, 1.0, n)
        failed = rng.uniform(size=n) < 1 / (1 + np.exp(-(3.0 * (log_r - 0.5))))
        out = []
        for i in range(n):
            r = np.exp(log_r[i] + rng.normal(0, 0.1, 3))
            out.append({"uq_initial": rng.uniform(), "uq_max": rng.uniform(), "uq_mean": rng.uniform(),
                        "uq_final": rng.uniform(), "nsteps": int(rng.integers(5, 100)),
                        "distance_ratio_initial": r[0], "distance_ratio_max": r.max(),
                        "distance_ratio_mean": r.mean(), "distance_ratio_final": r[2],
                        "rmsd": 1.0 if failed[i] else 0.1})
        return out

    fit, test = rows(300), rows(300)
    failed = np.array([r["rmsd"] > 0.5 for r in test])
    uq_only = FailureModel().fit(fit)
    with_distance = FailureModel(features=FAILURE_FEATURES_WITH_DISTANCE).fit(fit)
    assert auroc(with_distance.predict_proba(test), failed) > 0.8 > 0.65 > auroc(uq_only.predict_proba(test), failed)
    # calibrated in the large on its fit set (maximum likelihood with an intercept, small penalty)
    y_fit = np.array([r["rmsd"] > 0.5 for r in fit])
    assert with_distance.predict_proba(fit).mean() == pytest.approx(y_fit.mean(), abs=0.01)
    # hand-computed: one feature, log r, standardised; p = sigmoid(b0 + b1 (log r - mean) / std)
    one = FailureModel(features=("distance_ratio_max",), l2=0.0, transform="log").fit(fit)
    x = np.log([r["distance_ratio_max"] for r in test])
    z = one.coef_[0] + one.coef_[1] * (x - one.mean_[0]) / one.std_[0]
    np.testing.assert_allclose(one.predict_proba(test), 1 / (1 + np.exp(-z)), rtol=1e-9, atol=1e-15)
    assert one.mean_[0] == pytest.approx(np.mean(np.log([r["distance_ratio_max"] for r in fit])))
    with pytest.raises(ValueError, match="distance_ratio_max must be a distance ratio > 0"):
        one.predict_proba([dict(test[0], distance_ratio_max=0.0)])
    with pytest.raises(ValueError, match="finite"):
        one.predict_proba([dict(test[0], distance_ratio_max=np.inf)])


def test_element_normalised_features_enter_as_log_scale_and_raw_fraction():
    from ltau_ase.is2rs import (
        ELEMENT_NORMALISED_FEATURES,
        FAILURE_FEATURES_WITH_DISTANCE,
        FAILURE_FEATURES_WITH_ELEMENT_NORMALISED,
    )

    assert FAILURE_FEATURES_WITH_ELEMENT_NORMALISED == FAILURE_FEATURES_WITH_DISTANCE + ELEMENT_NORMALISED_FEATURES
    assert ELEMENT_NORMALISED_FEATURES[:4] == tuple(f"expected_error_elnorm_{s}" for s in ("initial", "max", "final",
                                                                                           "frac"))
    rng = np.random.default_rng(11)
    n = 120
    v = np.exp(rng.normal(0.0, 1.0, n))  # element-normalised max (> 0)
    frac = rng.uniform(0, 1, n)
    fail = rng.uniform(size=n) < 1 / (1 + np.exp(-2 * np.log(v)))
    rows = [{"distance_ratio_elnorm_max": v[i], "uq_elnorm_frac": frac[i], "rmsd": 1.0 if fail[i] else 0.1}
            for i in range(n)]
    model = FailureModel(features=("distance_ratio_elnorm_max", "uq_elnorm_frac"), l2=0.0, transform="log").fit(rows)
    # hand-computed: log of the scale statistic, the fraction as is, each standardised
    x = np.column_stack([np.log(v), frac])
    np.testing.assert_allclose(model.mean_, x.mean(axis=0), rtol=1e-12)
    z = model.coef_[0] + ((x - x.mean(axis=0)) / x.std(axis=0)) @ model.coef_[1:]
    np.testing.assert_allclose(model.predict_proba(rows), 1 / (1 + np.exp(-z)), rtol=1e-9, atol=1e-15)
    with pytest.raises(ValueError, match="distance_ratio_elnorm_max must be an element-normalised value > 0"):
        model.predict_proba([dict(rows[0], distance_ratio_elnorm_max=0.0)])
    with pytest.raises(ValueError, match=r"uq_elnorm_frac must be a fraction of atoms in \[0, 1\]"):
        model.predict_proba([dict(rows[0], uq_elnorm_frac=1.5)])
    # the monotone default keeps its guarantee with these features: p never falls as one grows
    mono = FailureModel(features=("distance_ratio_elnorm_max", "uq_elnorm_frac")).fit(rows)
    assert np.all(mono.coef_[1:] >= 0)
    grid = [dict(rows[0], distance_ratio_elnorm_max=float(t)) for t in np.geomspace(1e-3, 1e4, 50)]
    assert np.all(np.diff(mono.predict_proba(grid)) >= 0)


def test_empirical_cdf_mid_ranks_by_hand():
    from ltau_ase.is2rs import _empirical_cdf

    ref = np.array([1.0, 2.0, 2.0, 3.0])
    # (#below + #equal / 2) / 4
    np.testing.assert_allclose(_empirical_cdf(ref, np.array([0.0, 1.0, 2.0, 2.5, 3.0, 4.0])),
                               [0.0, 0.125, 0.5, 0.75, 0.875, 1.0])


def _far_rows(rows, factor):
    return [dict(r, uq_max=r["uq_max"] * factor + 5.0, uq_initial=r["uq_initial"] + 5.0) for r in rows]


def test_bounded_transforms_cap_the_probability_beyond_the_fit_range():
    rows = _rows(200, 11)
    far = _far_rows(_rows(50, 12), 10.0)
    feats = ("uq_initial", "uq_max")
    x = np.array([[r["uq_initial"], r["uq_max"]] for r in rows])
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731

    linear = FailureModel(features=feats, l2=1.0, transform="log").fit(rows)
    assert linear.predict_proba(far).min() > 0.999  # the unbounded model's extrapolation to p -> 1

    clip = FailureModel(features=feats, l2=1.0, transform="clip", tail=0.0).fit(rows)
    np.testing.assert_array_equal(clip.low_, x.min(axis=0))
    # hand-computed: every far row sits at the fit maximum of both features
    z = clip.coef_[0] + np.sum(clip.coef_[1:] * (x.max(axis=0) - clip.mean_) / clip.std_)
    np.testing.assert_allclose(clip.predict_proba(far), sig(z), rtol=1e-12)
    np.testing.assert_allclose(clip.mean_, x.mean(axis=0))  # clipping leaves the fit rows unchanged

    rank = FailureModel(features=feats, l2=1.0, transform="rank", tail=0.0).fit(rows)
    ecdf = np.column_stack([(np.argsort(np.argsort(x[:, j])) + 0.5) / len(rows) for j in range(2)])  # no ties
    np.testing.assert_allclose(rank.mean_, ecdf.mean(axis=0))
    np.testing.assert_allclose(rank.std_, ecdf.std(axis=0))
    z = rank.coef_[0] + np.sum(rank.coef_[1:] * (1.0 - rank.mean_) / rank.std_)  # ECDF = 1 beyond the range
    np.testing.assert_allclose(rank.predict_proba(far), sig(z), rtol=1e-12)
    # inside the range, the rank model still ranks like the others
    test = _rows(300, 13)
    failed = np.array([r["rmsd"] > 0.5 for r in test])
    assert auroc(rank.predict_proba(test), failed) > 0.8
    back = FailureModel.from_dict(json.loads(json.dumps(rank.to_dict())))
    np.testing.assert_array_equal(back.predict_proba(test + far), rank.predict_proba(test + far))
    assert back.transform_ == "rank"


def test_auto_choice_is_the_cross_validated_log_loss_minimum():
    from ltau_ase.is2rs import FAILURE_L2_GRID, FAILURE_TAIL_GRID, _cv_folds

    rows = _rows(120, 21)
    feats = ("uq_initial", "uq_max", "nsteps")
    model = FailureModel(features=feats, monotone=False).fit(rows)
    # log; clip with tails 0 and 0.3 (clip with tail 1 is log); rank with every tail; each with every l2
    expected = ({f"log/l2={l2:g}" for l2 in FAILURE_L2_GRID}
                | {f"{t}/tail={tail:g}/l2={l2:g}" for t in ("clip", "rank") for tail in FAILURE_TAIL_GRID
                   for l2 in FAILURE_L2_GRID if not (t == "clip" and tail == 1.0)})
    assert set(model.cv_) == expected
    best = min(model.cv_, key=lambda k: model.cv_[k]["score"])
    chosen = (f"log/l2={model.l2_:g}" if model.transform_ == "log"
              else f"{model.transform_}/tail={model.tail_:g}/l2={model.l2_:g}")
    assert best == chosen
    # folds: 5-fold x 2 stratified (each row held out exactly twice) and, per feature, its top 20 % held out
    x = model._matrix(rows)
    y = np.array([r["rmsd"] > 0.5 for r in rows], dtype=float)
    shuffled, extrapolation = _cv_folds(x, y, 0)
    assert len(shuffled) == 10 and np.array_equal(np.bincount(np.concatenate(shuffled)), np.full(120, 2))
    assert len(extrapolation) == 3
    for j, held in enumerate(extrapolation):
        assert held.size == 24 and x[held, j].min() >= np.sort(x[:, j])[-24]
    # one candidate's scores recomputed through the public API (fixed transform and penalty per fold)

    def held_out_loss(folds):
        losses = []
        for held in folds:
            keep = np.setdiff1d(np.arange(120), held)
            m = FailureModel(features=feats, l2=1.0, transform="clip", tail=0.0,
                             monotone=False).fit([rows[i] for i in keep])
            p = m.predict_proba([rows[i] for i in held])
            losses.append(-np.mean(y[held] * np.log(p) + (1 - y[held]) * np.log(1 - p)))
        return np.mean(losses)

    ref = model.cv_["clip/tail=0/l2=1"]
    assert ref["kfold"] == pytest.approx(held_out_loss(shuffled), rel=1e-6)
    assert ref["extrapolation"] == pytest.approx(held_out_loss(extrapolation), rel=1e-6)
    assert ref["score"] == pytest.approx((ref["kfold"] + ref["extrapolation"]) / 2)


def test_old_failure_model_files_load_as_linear_and_bad_transforms_are_refused():
    rows = _rows(100, 31)
    model = FailureModel(features=("uq_max",), l2=1.0, transform="log").fit(rows)
    old = {k: v for k, v in model.to_dict().items() if k not in ("transform", "low", "high", "reference", "cv")}
    back = FailureModel.from_dict(old)
    assert back.transform_ == "log"
    np.testing.assert_array_equal(back.predict_proba(rows), model.predict_proba(rows))
    with pytest.raises(ValueError, match="transform"):
        FailureModel(transform="sigmoid")
    with pytest.raises(ValueError, match="l2"):
        FailureModel(l2="big")
    state = FailureModel(features=("uq_max",), transform="rank").fit(rows).to_dict()
    with pytest.raises(ValueError, match="unknown transform"):
        FailureModel.from_dict(dict(state, transform="pickle"))
    with pytest.raises(ValueError, match="ascending"):
        FailureModel.from_dict(dict(state, reference=state["reference"][::-1]))


def test_tail_continues_the_edge_slope_beyond_the_fit_range_by_hand():
    rows = _rows(200, 41)
    x = np.array([r["uq_max"] for r in rows])
    far = [dict(rows[0], uq_max=x.max() + d) for d in (0.5, 1.0, 2.0)]
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    # clip with tail 0.3: max + 0.3 (x - max) beyond the range
    clip = FailureModel(features=("uq_max",), l2=1.0, transform="clip", tail=0.3).fit(rows)
    t = x.max() + 0.3 * np.array([0.5, 1.0, 2.0])
    z = clip.coef_[0] + clip.coef_[1] * (t - clip.mean_[0]) / clip.std_[0]
    np.testing.assert_allclose(clip.predict_proba(far), sig(z))
    # rank with tail 1: 1 + (x - max) * 0.1 / (max - q90), the empirical CDF's mean slope over its top 10 %
    rank = FailureModel(features=("uq_max",), l2=1.0, transform="rank", tail=1.0).fit(rows)
    t = 1.0 + np.array([0.5, 1.0, 2.0]) * 0.1 / (x.max() - np.quantile(x, 0.9))
    z = rank.coef_[0] + rank.coef_[1] * (t - rank.mean_[0]) / rank.std_[0]
    np.testing.assert_allclose(rank.predict_proba(far), sig(z))
    assert np.all(np.diff(rank.predict_proba(far)) > 0)  # rows beyond the range keep their order
    back = FailureModel.from_dict(json.loads(json.dumps(rank.to_dict())))
    np.testing.assert_array_equal(back.predict_proba(far), rank.predict_proba(far))


def _contrast_rows(n, seed):
    # failure follows a - b, so the unconstrained fit puts a negative weight on b
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), rng.normal(size=n)
    failed = rng.uniform(size=n) < 1 / (1 + np.exp(-(2.0 * a - 1.0 * b)))
    return [{"uq_max": a[i], "uq_mean": b[i], "nsteps": 10, "rmsd": 1.0 if failed[i] else 0.1} for i in range(n)]


def test_monotone_fit_is_the_constrained_likelihood_optimum():
    rows = _contrast_rows(400, 51)
    feats = ("uq_max", "uq_mean")
    free = FailureModel(features=feats, l2=0.0, transform="log", monotone=False).fit(rows)
    assert free.coef_[2] < 0
    mono = FailureModel(features=feats, l2=0.0, transform="log", monotone=True).fit(rows)
    # convex likelihood whose free optimum has w_b < 0: the constrained optimum sits at w_b = 0, i.e. it is
    # the one-feature maximum likelihood fit on a; reference by derivative-free Nelder-Mead, unstandardised
    assert mono.coef_[2] == 0.0 and mono.coef_[1] > 0
    a = np.array([r["uq_max"] for r in rows])
    y = np.array([r["rmsd"] > 0.5 for r in rows], dtype=float)
    ref = minimize(lambda w: np.sum(np.logaddexp(0, w[0] + w[1] * a) - y * (w[0] + w[1] * a)), [0.0, 0.0],
                   method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 4000})
    np.testing.assert_allclose(mono.predict_proba(rows), 1 / (1 + np.exp(-(ref.x[0] + ref.x[1] * a))), atol=1e-4)
    # and no point with w_b >= 0 has a higher likelihood (brute-force grid around the optimum)
    x = (np.column_stack([a, [r["uq_mean"] for r in rows]]) - mono.mean_) / mono.std_

    def nll(w):
        z = w[0] + x @ w[1:]
        return np.sum(np.logaddexp(0, z) - y * z)

    best = nll(mono.coef_)
    for d0 in (-0.05, 0, 0.05):
        for d1 in (-0.05, 0, 0.05):
            for wb in (0.0, 0.02, 0.1):
                assert nll(mono.coef_ + np.array([d0, d1, wb])) >= best - 1e-9
    back = FailureModel.from_dict(json.loads(json.dumps(mono.to_dict())))
    assert back.monotone
    np.testing.assert_array_equal(back.predict_proba(rows), mono.predict_proba(rows))
    with pytest.raises(ValueError, match="non-negative"):
        FailureModel.from_dict(dict(mono.to_dict(), coef=[0.0, 1.0, -0.5]))
    with pytest.raises(ValueError, match="monotone"):
        FailureModel(monotone="yes")


def test_monotone_auto_keeps_rows_beyond_the_fit_range_in_order():
    rows = _rows(150, 61)
    feats = ("uq_initial", "uq_max", "uq_final", "nsteps")
    mono = FailureModel(features=feats).fit(rows)
    assert mono.monotone and np.all(mono.coef_[1:] >= 0)
    # the auto grid has no saturating tail (0) under the constraint
    assert not any("tail=0/" in k for k in mono.cv_) and any(k.startswith("rank/tail=0.3/") for k in mono.cv_)
    assert mono.tail_ > 0
    # probes: raising any one feature, inside or far beyond the fit range, never lowers p;
    # raising one with a positive coefficient beyond the range strictly raises it
    base = _rows(40, 62)
    for j, key in enumerate(feats):
        steps = (0.0, 0.1, 1.0, 5.0, 50.0) if key != "nsteps" else (0, 10, 100, 1000, 10000)
        p = np.array([mono.predict_proba([dict(r, **{key: r[key] + d})])[0] for d in steps for r in base])
        p = p.reshape(len(steps), len(base))
        assert np.all(np.diff(p, axis=0) >= -1e-12)
        if mono.coef_[j + 1] > 0:
            assert np.all(np.diff(p[2:], axis=0) > 0)
    # rows beyond the range in uq_max keep their order, where the saturating rank map ties them
    far = [dict(base[0], uq_max=2.0 + d) for d in (0.0, 0.5, 1.0, 3.0)]
    assert np.all(np.diff(FailureModel(features=("uq_max",)).fit(rows).predict_proba(far)) > 0)
    saturating = FailureModel(features=("uq_max",), transform="rank", tail=0.0, monotone=False).fit(rows)
    assert np.unique(saturating.predict_proba(far)).size == 1


def test_report_fits_the_monotone_model_unless_told_otherwise(tmp_path):
    import argparse

    from ltau_ase.cli import report

    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    table = [dict(r, name=f"s{i}") for i, r in enumerate(_contrast_rows(120, 71))]
    for flags, monotone in (([], True), (["--failure-unconstrained"], False)):
        path = tmp_path / f"fail{monotone}.json"
        args = parser.parse_args(["--db", "x.db", "--fit-failure-model", str(path), "--failure-transform", "log",
                                  "--failure-features", "uq"] + flags)
        rows = [dict(r, uq_initial=r["uq_max"], uq_final=r["uq_max"]) for r in table]
        out = report.failure_probabilities(rows, args)
        assert out["monotone"] is monotone
        ref = FailureModel(features=FAILURE_FEATURES, transform="log", monotone=monotone).fit(rows)
        np.testing.assert_allclose([r["p_fail"] for r in rows], ref.predict_proba(rows), rtol=1e-12)
        saved = FailureModel.from_dict(json.loads(path.read_text()))
        assert saved.monotone is monotone
        # uq_mean follows -failure here: only the unconstrained fit weights it negatively
        assert (saved.coef_[FAILURE_FEATURES.index("uq_mean") + 1] < 0) is not monotone


def test_feature_sets_are_compared_on_shared_outer_folds():
    from ltau_ase.is2rs import _cv_folds, select_failure_features

    rows = _rows(80, 81)
    sets = [("uq_final",), ("uq_max",), ("uq_final", "uq_max")]  # uq_final is noise
    model, scores = select_failure_features(rows, sets, transform="log", l2=1.0)
    assert list(scores) == ["uq_final", "uq_max", "uq_final,uq_max"]
    # brute force: the outer folds of the union (uq_final, uq_max), a plain fit per fold, log-loss by hand
    y = np.array([r["rmsd"] > 0.5 for r in rows], dtype=float)
    x = np.array([[r["uq_final"], r["uq_max"]] for r in rows])
    shuffled, extrapolation = _cv_folds(x, y, 0)
    assert len(extrapolation) == 2
    for fs in sets:
        ref = {}
        for name, folds in (("kfold", shuffled), ("extrapolation", extrapolation)):
            losses = []
            for held in folds:
                keep = np.setdiff1d(np.arange(80), held)
                m = FailureModel(features=fs, transform="log", l2=1.0).fit([rows[i] for i in keep])
                p = m.predict_proba([rows[i] for i in held])
                losses.append(-np.mean(y[held] * np.log(p) + (1 - y[held]) * np.log(1 - p)))
            ref[name] = np.mean(losses)
        got = scores[",".join(fs)]
        assert got["kfold"] == pytest.approx(ref["kfold"], rel=1e-9)
        assert got["extrapolation"] == pytest.approx(ref["extrapolation"], rel=1e-9)
        assert got["score"] == pytest.approx((ref["kfold"] + ref["extrapolation"]) / 2, rel=1e-9)
    best = min(scores, key=lambda k: scores[k]["score"])
    assert ",".join(model.features) == best and "uq_max" in model.features
    np.testing.assert_array_equal(model.predict_proba(rows),
                                  FailureModel(features=model.features, transform="log", l2=1.0).fit(rows)
                                  .predict_proba(rows))
    with pytest.raises(ValueError, match="feature_sets"):
        select_failure_features(rows, [])
    with pytest.raises(ValueError, match="feature_sets, not"):
        select_failure_features(rows, sets, features=("uq_max",))


def test_shift_benchmark_scores_the_default_rule_per_method(monkeypatch):
    from types import SimpleNamespace

    import ltau_ase.demo.shift as shift
    import ltau_ase.is2rs as is2rs
    from ltau_ase.demo.shift import _failure_models, is2rs_table
    from ltau_ase.is2rs import FAILURE_FEATURES, FAILURE_FEATURES_WITH_DISTANCE, select_failure_features

    # smaller grids and two methods keep the nested CV fast; the logic scored is the same
    monkeypatch.setattr(is2rs, "FAILURE_L2_GRID", (1.0,))
    monkeypatch.setattr(is2rs, "FAILURE_TAIL_GRID", (0.0, 0.3))
    monkeypatch.setattr(shift, "METHOD_LABELS", {m: shift.METHOD_LABELS[m] for m in ("ltau_distance", "committee")})

    rng = np.random.default_rng(91)

    def table(n, shift):
        rows = []
        for i in range(n):
            log_r = rng.normal(shift, 0.5)
            u = rng.uniform()
            stats = lambda v: {"initial": v, "max": v * 1.1, "mean": v * 0.9, "final": v * 0.8}  # noqa: E731
            rows.append({"system": f"s{i}", "status": "done", "nsteps": int(rng.integers(5, 40)),
                         "rmsd": 1.0 if rng.uniform() < 1 / (1 + np.exp(-3 * (log_r - shift - 0.2))) else 0.1,
                         "ltau_distance": stats(u), "committee": stats(0.1 + u),
                         "ltau_distance_ratio": stats(float(np.exp(log_r)))})
        return rows

    tables = {"is2rs_calibration": table(60, 0.0), "is2rs_adsorbate": table(40, 2.0)}
    out = {"table": tables, "failure_rmsd": 0.5, "domains": {
        d[len("is2rs_"):]: {"n_systems": len(t), "n_failed": sum(r["rmsd"] > 0.5 for r in t),
                            "ltau_distance": {}, "committee": {}, "ltau_distance_ratio": {}}
        for d, t in tables.items()}}
    _failure_models(SimpleNamespace(failure_rmsd=0.5, bootstrap=20, seed=0), out)

    def rows_of(split, method):
        return [{**{f"uq_{k}": v for k, v in r[method].items()}, "nsteps": r["nsteps"], "rmsd": r["rmsd"],
                 **{f"distance_ratio_{k}": v for k, v in r["ltau_distance_ratio"].items()}} for r in tables[split]]

    test_fail = np.array([r["rmsd"] > 0.5 for r in tables["is2rs_adsorbate"]])
    for method, pool in (("ltau_distance", (FAILURE_FEATURES_WITH_DISTANCE, ("uq_max", "distance_ratio_max"))),
                         ("committee", (FAILURE_FEATURES, ("uq_max",)))):
        ref, _ = select_failure_features(rows_of("is2rs_calibration", method), pool)
        saved = out["failure_model"][method + "_selected"]
        assert tuple(saved["features"]) == ref.features and saved["monotone"] is True
        got = out["domains"]["adsorbate"][method]["auroc_failure_probability_selected"]["value"]
        assert got == pytest.approx(auroc(ref.predict_proba(rows_of("is2rs_adsorbate", method)), test_fail))
        # the earlier forms stay scored side by side
        assert out["failure_model"][method + "_with_distance_unconstrained"]["monotone"] is False
    text = is2rs_table({"is2rs": out})
    assert "default rule" in text and text.count("| adsorbate |") == 2


def test_shift_benchmark_rule_pools_gain_the_element_normalised_traces(monkeypatch):
    """Rows with ``element_normalised`` add a third set per pool: the committee's own spread, LTAU's estimator's."""
    from types import SimpleNamespace

    import ltau_ase.demo.shift as shift
    import ltau_ase.is2rs as is2rs
    from ltau_ase.demo.shift import _failure_models
    from ltau_ase.is2rs import select_failure_features

    # small grids, one statistic per trace and two methods keep the nested CV fast; the wiring scored is the same
    monkeypatch.setattr(is2rs, "FAILURE_L2_GRID", (1.0,))
    monkeypatch.setattr(is2rs, "FAILURE_TAIL_GRID", (0.3,))
    monkeypatch.setattr(is2rs, "FAILURE_FEATURES", ("uq_max",))
    monkeypatch.setattr(is2rs, "FAILURE_FEATURES_WITH_DISTANCE", ("uq_max", "distance_ratio_max"))
    monkeypatch.setattr(is2rs, "ELEMENT_NORMALISED_STATISTICS", ("max",))
    monkeypatch.setattr(is2rs, "FAILURE_FEATURES_WITH_ELEMENT_NORMALISED",
                        ("uq_max", "distance_ratio_max", "distance_ratio_elnorm_max"))
    monkeypatch.setattr(shift, "FAILURE_REDUCED_WITH_DISTANCE", ("distance_ratio_max",))
    monkeypatch.setattr(shift, "METHOD_LABELS", {m: shift.METHOD_LABELS[m] for m in ("ltau_distance", "committee")})
    rng = np.random.default_rng(5)

    def table(n, shift_by):
        rows = []
        for i in range(n):
            signal = rng.normal(shift_by, 1.0)  # failures follow the element-normalised traces
            stats = lambda v: {"initial": v, "max": v, "mean": v, "final": v}  # noqa: E731
            rows.append({"system": f"s{i}", "status": "done", "nsteps": 10,
                         "rmsd": 1.0 if rng.uniform() < 1 / (1 + np.exp(-3 * (signal - shift_by))) else 0.1,
                         "ltau_distance": stats(rng.uniform()), "committee": stats(rng.uniform()),
                         "ltau_distance_ratio": stats(float(np.exp(rng.normal()))),
                         "element_normalised": {"distance_ratio_elnorm_max": float(np.exp(signal)),
                                                "uq_elnorm_max": float(np.exp(signal + rng.normal(0, 0.3)))}})
        return rows

    tables = {"is2rs_calibration": table(50, 0.0), "is2rs_element": table(30, 1.0)}
    out = {"table": tables, "failure_rmsd": 0.5, "domains": {
        d[len("is2rs_"):]: {"n_systems": len(t), "n_failed": sum(r["rmsd"] > 0.5 for r in t),
                            "ltau_distance": {}, "committee": {}} for d, t in tables.items()}}
    _failure_models(SimpleNamespace(failure_rmsd=0.5, bootstrap=10, seed=0), out)

    def rows_of(method):
        own = "uq_elnorm_max" if method == "committee" else "distance_ratio_elnorm_max"
        return [{"uq_max": r[method]["max"], "nsteps": 10, "rmsd": r["rmsd"],
                 "distance_ratio_max": r["ltau_distance_ratio"]["max"], own: r["element_normalised"][own]}
                for r in tables["is2rs_calibration"]]

    # (full set, reduced set, full set + element-normalised trace) with the patched constants
    pools = {"ltau_distance": [("uq_max", "distance_ratio_max"), ("distance_ratio_max",),
                               ("uq_max", "distance_ratio_max", "distance_ratio_elnorm_max")],
             "committee": [("uq_max",), ("uq_max",), ("uq_max", "uq_elnorm_max")]}
    for method, pool in pools.items():
        ref, scores = select_failure_features(rows_of(method), pool)
        saved = out["failure_model"][method + "_selected"]
        assert tuple(saved["features"]) == ref.features and "elnorm" in saved["features"][-1]
        assert {k: v["score"] for k, v in saved["feature_set_scores"].items()} == pytest.approx(
            {k: v["score"] for k, v in scores.items()})
        # the side-by-side variant with the element-normalised traces: the committee's own spread's
        assert out["failure_model"][method + "_with_element_normalised"]["features"][-1] == pool[-1][-1]
        assert "auroc_failure_probability_with_element_normalised" in out["domains"]["element"][method]


def test_failure_model_file_with_hostile_fields_is_refused():
    """Feature names are row keys read from the rows, never instantiated; the file must name them as a list of
    distinct strings (a string or object would be read as its characters / keys, a repeat would enter twice),
    with finite scales and integer counts."""
    rows = _rows(60, 6)
    features = ("uq_max", "uq_final")
    state = json.loads(json.dumps(FailureModel(features=features, l2=1.0, transform="log").fit(rows).to_dict()))
    assert FailureModel.from_dict(state).features == features
    cases = {"features must be a list": [dict(state, features="uq_max"),
                                         dict(state, features={"uq_max": 0, "uq_final": 1})],
             "features must be distinct": [dict(state, features=["uq_max", "uq_max"])],
             "non-finite coefficients or scales": [dict(state, std=[float("inf"), 1.0])],
             "n_fit must be a positive integer": [dict(state, n_fit=2.7), dict(state, n_fit="60"),
                                                  dict(state, n_fit=True)],
             "n_failed_fit must be a non-negative integer": [dict(state, n_failed_fit=-1)],
             "exceeds n_fit": [dict(state, n_failed_fit=61)]}
    for message, bad in cases.items():
        for s in bad:
            with pytest.raises(ValueError, match=message):
                FailureModel.from_dict(s)
    with pytest.raises(ValueError, match="features must be distinct"):
        FailureModel(features=("uq_max", "nsteps", "uq_max"))
    with pytest.raises(ValueError, match="a failure model is a JSON object; got list"):
        FailureModel.from_dict([state])
