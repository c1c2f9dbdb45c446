"""LTAUEstimator against brute-force references, property tests, persistence and bad input (issue §4, §6, §7)."""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ltau_ase.core.errorlog import ErrorLog, ErrorLogWriter
from ltau_ase.core.estimator import LTAUEstimator


def ref_confidence(runs, t):
    """µ_M over runs of the per-atom fraction of logged errors <= t (brute force)."""
    fr = [np.array([np.mean(c[~np.isnan(c)] <= tt) for c, tt in zip(r.T, np.broadcast_to(t, r.shape[1:]))]) for r in runs]
    return np.mean(fr, axis=0), np.std(fr, axis=0)


def brute_knn(x, q, k):
    x, q = np.asarray(x, np.float32).astype(np.float64), np.asarray(q, np.float32).astype(np.float64)
    d = np.sqrt(np.stack([((x - row) ** 2).sum(1) for row in q]))
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, ids, axis=1), ids


def make_data(seed=0, n=300, d=6, runs=(15, 20), n_query=40):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    level = np.exp(x[:, 0])  # errors depend smoothly on the descriptor
    errs = [(np.abs(rng.normal(size=(e, n))) * level).astype(np.float32) for e in runs]
    for r in errs:
        r[rng.random(r.shape) < 0.1] = np.nan
        r[-1] = np.where(np.isnan(r[-1]), 0.1, r[-1])
    return x, errs, rng.normal(size=(n_query, d))


@pytest.mark.parametrize("distribution", ["exact", "compact"])
def test_fit_and_predict_match_brute_force(distribution):
    x, errs, q = make_data()
    est = LTAUEstimator(k=7, distribution=distribution, window=None).fit(x, errs)  # every epoch, as Algorithm 1
    atol = np.mean([np.nanmean(r[-1].astype(np.float64)) for r in errs])
    assert est.atol_ == pytest.approx(atol, rel=1e-12)
    mu, sigma = ref_confidence(errs, atol)
    np.testing.assert_allclose(est.confidence_train_, mu, atol=1e-12)  # exact at the fitted atol
    np.testing.assert_allclose(est.variability_train_, sigma, atol=1e-12)
    mean_err = np.mean([np.nanmean(r.astype(np.float64), axis=0) for r in errs], axis=0)
    np.testing.assert_allclose(est.mean_error_train_, mean_err, rtol=1e-6)
    assert est.n_features_in_ == 6 and est.n_train_atoms_ == 300

    out = est.predict(q)
    dist, nn = brute_knn(x, q, 7)
    # threshold=None, scale=1: exactly the mean of the neighbours' confidence_train_.
    assert np.array_equal(out["confidence"], np.mean(est.confidence_train_[nn], axis=1))
    np.testing.assert_allclose(out["uncertainty"], 1 - out["confidence"])
    np.testing.assert_allclose(out["expected_error"], mean_err[nn].mean(1), rtol=1e-6)
    np.testing.assert_allclose(out["distance"], dist.mean(1), rtol=1e-5)
    assert all(v.dtype == np.float64 and v.shape == (40,) for v in out.values())

    if distribution == "exact":  # any threshold and scale: neighbours' exact CDF at threshold / scale
        est.scale = 2.5
        out = est.predict(q, threshold=0.8)
        np.testing.assert_allclose(out["confidence"], ref_confidence(errs, 0.8 / 2.5)[0][nn].mean(1), atol=1e-12)
        np.testing.assert_allclose(out["expected_error"], 2.5 * mean_err[nn].mean(1), rtol=1e-6)
        out = est.predict(q)  # None: the fitted atol / scale
        np.testing.assert_allclose(out["confidence"], ref_confidence(errs, atol / 2.5)[0][nn].mean(1), atol=1e-12)


def test_distance_weighting_and_rtol():
    x, errs, q = make_data(1)
    forces = np.abs(np.random.default_rng(5).normal(size=300)) * 3
    est = LTAUEstimator(k=5, weights="distance", atol=0.2, rtol=0.1, distribution="exact", window=None).fit(
        x, errs, reference_forces=forces
    )
    thr = 0.2 + 0.1 * forces
    mu, _ = ref_confidence(errs, thr)
    np.testing.assert_allclose(est.confidence_train_, mu, atol=1e-12)
    dist, nn = brute_knn(x, q, 5)
    w = 1 / dist
    w /= w.sum(1, keepdims=True)
    out = est.predict(q)
    np.testing.assert_allclose(out["confidence"], (w * mu[nn]).sum(1), rtol=1e-5)
    np.testing.assert_allclose(out["distance"], dist.mean(1), rtol=1e-5)  # distance stays the plain mean
    # An exact match dominates the inverse-distance weights.
    out = est.predict(x[:3])
    np.testing.assert_allclose(out["confidence"], mu[:3], atol=1e-9)


def test_error_input_forms_agree():
    x, errs, q = make_data(8, n=50, runs=(9, 9))
    stacked = LTAUEstimator(k=3).fit(x, np.stack(errs))  # (M, E, N)
    listed = LTAUEstimator(k=3).fit(x, errs)  # list of (E_m, N)
    np.testing.assert_array_equal(stacked.predict(q)["confidence"], listed.predict(q)["confidence"])
    single = LTAUEstimator(k=3, window=None).fit(x, errs[0])  # (E, N): one run, σ_M = 0
    assert np.all(single.variability_train_ == 0)
    np.testing.assert_allclose(single.confidence_train_, ref_confidence(errs[:1], single.atol_)[0], atol=1e-12)


def test_k_larger_than_n_uses_all_atoms():
    x, errs, q = make_data(2, n=12)
    with pytest.warns(UserWarning, match="exceeds the 12 training atoms"):
        est = LTAUEstimator(k=50).fit(x, errs)
    assert est.k_eff_ == 12
    out = est.predict(q)
    np.testing.assert_allclose(out["confidence"], est.confidence_train_.mean())


@pytest.mark.parametrize("distribution", ["exact", "compact"])
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), t1=st.floats(0, 3), t2=st.floats(0, 3), scale=st.floats(0.1, 10))
def test_confidence_bounded_and_monotone(distribution, seed, t1, t2, scale):
    x, errs, q = make_data(seed % 50, n=60, d=3, runs=(8,), n_query=15)
    est = LTAUEstimator(k=4, distribution=distribution, scale=scale).fit(x, errs)
    lo, hi = sorted((t1, t2))
    c_lo = est.predict(q, threshold=lo)["confidence"]
    c_hi = est.predict(q, threshold=hi)["confidence"]
    assert np.all((c_lo >= 0) & (c_hi <= 1))
    assert np.all(c_lo <= c_hi + 1e-12)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**6), k=st.integers(1, 9), distribution=st.sampled_from(["exact", "compact"]))
def test_permuting_training_atoms_leaves_predictions_unchanged(seed, k, distribution):
    x, errs, q = make_data(seed % 50, n=80, d=4, runs=(6, 9), n_query=20)
    perm = np.random.default_rng(seed).permutation(80)
    a = LTAUEstimator(k=k, distribution=distribution).fit(x, errs)
    b = LTAUEstimator(k=k, distribution=distribution).fit(x[perm], [r[:, perm] for r in errs])
    for t in (None, 0.4):
        pa, pb = a.predict(q, threshold=t), b.predict(q, threshold=t)
        for key in pa:
            np.testing.assert_allclose(pa[key], pb[key], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("index", ["flat", "hnsw", "ivfpq"])
@pytest.mark.parametrize("distribution", ["exact", "compact"])
def test_save_load_round_trip(tmp_path, index, distribution):
    x, errs, q = make_data(3, n=400, d=8)
    z = np.random.default_rng(0).choice([1, 6, 8], size=400)
    params = {"ivfpq": {"m": 4, "nbits": 5, "nprobe": 4}, "hnsw": {"efSearch": 24}}.get(index)
    est = LTAUEstimator(
        k=np.int64(6), index=index, index_params=params, distribution=distribution, bins=("linear", 20),
        window=(1, None), metadata={"model_sha256": "0" * 64, "note": "test"},
    ).fit(x, errs, atomic_numbers=z)
    est.scale = 1.7
    path = tmp_path / "est.ltau"
    est.save(path)
    loaded = LTAUEstimator.load(path)
    for t in (None, 0.3):
        a, b = est.predict(q, threshold=t), loaded.predict(q, threshold=t)
        for key in a:
            assert np.array_equal(a[key], b[key]), key
    assert loaded.metadata == {"model_sha256": "0" * 64, "note": "test"}
    assert loaded.get_params()["bins"] == ["linear", 20] and loaded.scale == 1.7
    assert loaded.atol_ == est.atol_ and loaded.k == 6 and loaded.index == index
    np.testing.assert_array_equal(loaded.species_, [1, 6, 8])
    np.testing.assert_array_equal(loaded.variability_train_, est.variability_train_)
    if index == "hnsw":
        assert loaded.index_.index.hnsw.efSearch == 24
    if index == "ivfpq":
        assert loaded.index_.index.nprobe == 4


def test_error_logs_and_atom_id_alignment(tmp_path):
    x, errs, q = make_data(4, n=50, runs=(5, 7))
    ids = np.arange(50) * 3 + 100
    paths = []
    for m, r in enumerate(errs):
        with ErrorLogWriter(tmp_path / f"r{m}", ids[::-1]) as w:  # writer accepts any id order
            for row in r:
                keep = ~np.isnan(row)
                w.append_epoch(ids[keep], row[keep])
        paths.append(tmp_path / f"r{m}")
    logs = [ErrorLog(p) for p in paths]
    from_logs = LTAUEstimator(k=3).fit(x, logs, atom_ids=ids)
    from_arrays = LTAUEstimator(k=3).fit(x, errs)
    np.testing.assert_array_equal(from_logs.confidence_train_, from_arrays.confidence_train_)
    np.testing.assert_array_equal(from_logs.atom_ids_, ids)
    with pytest.raises(ValueError, match="differ from the error logs' atom ids"):
        LTAUEstimator(k=3).fit(x, logs, atom_ids=ids[::-1])
    with pytest.raises(ValueError, match="atom_ids must be"):
        LTAUEstimator(k=3).fit(x, logs, atom_ids=ids[:10])
    single = LTAUEstimator(k=3, window={"skip": 2}).fit(x, logs[0])
    assert single.fit_info_["n_epochs"] == [3]


def test_check_species():
    x, errs, _ = make_data(5, n=30)
    z = np.array([8] * 10 + [1] * 20)
    est = LTAUEstimator(k=2).fit(x, errs, atomic_numbers=z)
    np.testing.assert_array_equal(est.species_, [1, 8])
    assert est.check_species([1, 8, 8]).size == 0
    with pytest.raises(ValueError, match=r"Pt \(Z=78\)"):
        est.check_species([1, 78])
    est.unknown_species = "warn"
    with pytest.warns(UserWarning, match="Pt"):
        assert est.check_species([78]).tolist() == [78]
    assert LTAUEstimator(k=2).fit(x, errs).check_species([78]).size == 0  # species not recorded
    # predict applies the same policy given atomic numbers: flag = maximally uncertain, ignore = plain
    q = x[:3]
    plain = est.predict(q)
    z_q = np.array([1, 78, 8])
    with pytest.raises(ValueError, match=r"Pt \(Z=78\).*unknown_species='flag'"):
        est.predict(q, atomic_numbers=z_q, unknown_species="raise")
    flagged = est.predict(q, atomic_numbers=z_q, unknown_species="flag")
    assert flagged["unknown_species"].tolist() == [False, True, False]
    assert flagged["uncertainty"][1] == 1.0 and flagged["confidence"][1] == 0.0
    assert np.isnan(flagged["expected_error"][1]) and flagged["distance"][1] == plain["distance"][1]
    np.testing.assert_array_equal(flagged["uncertainty"][[0, 2]], plain["uncertainty"][[0, 2]])
    ignored = est.predict(q, atomic_numbers=z_q, unknown_species="ignore")
    np.testing.assert_array_equal(ignored["uncertainty"], plain["uncertainty"])
    assert not ignored["unknown_species"].any()
    with pytest.warns(UserWarning, match="Pt"):  # the estimator's own policy: "warn", an alias of "flag"
        np.testing.assert_array_equal(est.predict(q, atomic_numbers=z_q)["uncertainty"], flagged["uncertainty"])
    with pytest.raises(ValueError, match="unknown_species must be one of"):
        LTAUEstimator(unknown_species="drop").fit(x, errs)
    with pytest.raises(ValueError, match="one per atom"):
        est.predict(q, atomic_numbers=np.array([1, 8]), unknown_species="ignore")
    with pytest.raises(ValueError, match="atomic_numbers"):
        LTAUEstimator(k=2).fit(x, errs, atomic_numbers=np.zeros(30, int))


def test_fit_scale_recovers_error_ratio():
    rng = np.random.default_rng(7)
    n_clusters, per = 30, 60
    centers = rng.normal(scale=10, size=(n_clusters, 4))
    sigma = np.exp(rng.uniform(-1.5, 1.0, n_clusters))  # per-cluster error level (eV/Å)
    lab = np.repeat(np.arange(n_clusters), per)
    x = centers[lab] + rng.normal(size=(lab.size, 4))
    errs = np.abs(rng.normal(size=(40, lab.size))) * sigma[lab]
    lab_t = rng.integers(n_clusters, size=3000)
    x_t = centers[lab_t] + rng.normal(size=(lab_t.size, 4))
    true = 3.0 * np.abs(rng.normal(size=lab_t.size)) * sigma[lab_t]  # test errors 3x the training ones
    est = LTAUEstimator(k=5, distribution="exact").fit(x, errs)
    res = est.fit_scale(x_t, true)
    # the fitted s is learned state; the user's scale parameter stays the prior (issue 10)
    assert 2.5 < res["scale"] < 3.6 and est.scale_ == res["scale"] and est.scale == 1.0
    assert est.effective_scale == res["scale"]
    assert res["after"] < 0.3 * res["before"] and res["after"] < 0.05
    # The returned numbers are the miscalibration of predict() at the chosen scale.
    from ltau_ase.core.calibration import miscalibration_area

    conf = est.predict(x_t)["confidence"]
    assert miscalibration_area(conf, true, est.atol_) == pytest.approx(res["after"])
    # The paper's convention (CDF at atol, observed error <= atol * s) recovers the same ratio.
    paper = LTAUEstimator(k=5, distribution="exact").fit(x, errs).fit_scale(x_t, true, convention="paper")
    assert 2.5 < paper["scale"] < 3.6 and paper["after"] < 0.05
    with pytest.raises(ValueError, match="true_errors"):
        est.fit_scale(x_t, true[:5])
    with pytest.raises(ValueError, match="convention"):
        est.fit_scale(x_t, true, convention="other")


def _fitted():
    x, errs, _ = make_data(6, n=40)
    return LTAUEstimator(k=3).fit(x, errs), x, errs


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, e: LTAUEstimator().fit(x[:, 0], e), "2-d"),  # wrong rank
        (lambda x, e: LTAUEstimator().fit(x, e[0][None, None]), "expected"),  # 4-d errors
        (lambda x, e: LTAUEstimator().fit(np.where(x > 1, np.nan, x), e), "NaN or inf"),
        (lambda x, e: LTAUEstimator().fit(np.where(x > 1, np.inf, x), e), "NaN or inf"),
        (lambda x, e: LTAUEstimator().fit(x[:-1], e), "39 rows"),  # count mismatch
        (lambda x, e: LTAUEstimator().fit(x[:0], [r[:, :0] for r in e]), "empty"),
        (lambda x, e: LTAUEstimator().fit(x, [r[:0] for r in e]), "empty"),
        (lambda x, e: LTAUEstimator().fit(x, []), "empty list"),
        (lambda x, e: LTAUEstimator().fit(x, [-r for r in e]), "negative"),
        (lambda x, e: LTAUEstimator(k=0).fit(x, e), "k must be a positive integer"),
        (lambda x, e: LTAUEstimator(k=-3).fit(x, e), "k must be a positive integer"),
        (lambda x, e: LTAUEstimator(k=2.5).fit(x, e), "k must be a positive integer"),
        (lambda x, e: LTAUEstimator(index="annoy").fit(x, e), "index must be one of"),
        (lambda x, e: LTAUEstimator(weights="gauss").fit(x, e), "weights"),
        (lambda x, e: LTAUEstimator(scale=0).fit(x, e), "scale"),
        (lambda x, e: LTAUEstimator(atol=-1).fit(x, e), "atol"),
        (lambda x, e: LTAUEstimator(rtol=0.1).fit(x, e), "reference_forces"),
        (lambda x, e: LTAUEstimator().fit(x, e, reference_forces=np.ones(3)), "reference_forces"),
        (lambda x, e: LTAUEstimator().predict(x), "not fitted"),
    ],
)
def test_bad_input_raises(call, match):
    x, errs, _ = make_data(6, n=40)
    with pytest.raises(ValueError, match=match):
        call(x, errs)


def test_bad_predict_input():
    est, x, _ = _fitted()
    with pytest.raises(ValueError, match="expected 6, the dimension used at fit"):
        est.predict(x[:, :4])
    with pytest.raises(ValueError, match="empty"):
        est.predict(x[:0])
    with pytest.raises(ValueError, match="NaN or inf"):
        est.predict(np.full((2, 6), np.nan))
    with pytest.raises(ValueError, match="2-d"):
        est.predict(x[0])
    with pytest.raises(ValueError, match="threshold"):
        est.predict(x, threshold=-0.1)
    with pytest.raises(ValueError, match="not fitted"):
        LTAUEstimator().fit_scale(x, np.ones(40))


def test_core_import_is_free_of_torch_and_ase():
    code = (
        "import sys, ltau_ase.core.estimator, ltau_ase.core.errorlog; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'ase', 'nequip')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_predict_does_not_warn_on_clean_input():
    est, x, _ = _fitted()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est.predict(x)


def test_default_window_is_the_last_half_of_the_epochs(tmp_path):
    # 9 epochs: the default keeps the last ceil(9/2) = 5; runs of different length use the shortest
    x, errs, q = make_data(9, n=30, runs=(9, 12))
    est = LTAUEstimator(k=3, distribution="exact").fit(x, errs)
    last = [e[-5:] for e in errs]
    np.testing.assert_allclose(est.confidence_train_, ref_confidence(last, est.atol_)[0], atol=1e-12)
    assert est.fit_info_["window"] == {"skip": 0, "last": 5} and est.fit_info_["window_policy"] == "last_half"
    every = LTAUEstimator(k=3, distribution="exact", window=None).fit(x, errs)
    np.testing.assert_allclose(every.confidence_train_, ref_confidence(errs, every.atol_)[0], atol=1e-12)
    est.save(tmp_path / "w.ltau")
    assert LTAUEstimator.load(tmp_path / "w.ltau").window == "last_half"
    with pytest.raises(ValueError, match="window must be"):
        LTAUEstimator(window="first_half").fit(x, errs)
