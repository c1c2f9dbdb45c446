"""Hostile use of set_params after fit, class 6 of issue 9: every parameter either takes effect
(also through save/load) or is refused with a clear message; never silently ignored, never an
unloadable save."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from ltau_file_tools import small_estimator

from ltau_ase.core.estimator import LTAUEstimator


def _brute_force(est, q, k, weights="uniform"):
    """Independent reference: exact kNN in numpy over the training vectors, then the paper's averages."""
    x = np.asarray(est.index_.training_vectors(), dtype=np.float64)
    d = np.linalg.norm(q[:, None, :].astype(np.float32).astype(np.float64) - x[None], axis=2)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    dist = np.take_along_axis(d, idx, axis=1)
    w = np.ones_like(dist) if weights == "uniform" else 1.0 / np.maximum(dist, 1e-12)
    w /= w.sum(axis=1, keepdims=True)
    return (w * est.confidence_train_[idx]).sum(1), (w * est.mean_error_train_[idx]).sum(1) * est.scale


def _same_predictions(a, b, q):
    pa, pb = a.predict(q), b.predict(q)
    for key in pa:
        np.testing.assert_allclose(pa[key], pb[key], rtol=1e-6, atol=1e-9, err_msg=key)


def _round_trip(est, tmp_path):
    est.save(tmp_path / "sp.ltau")
    return LTAUEstimator.load(tmp_path / "sp.ltau")


def test_k_takes_effect_and_survives_save(tmp_path):
    est, q = small_estimator(n=60)
    for k in (1, 5, 17):
        est.set_params(k=k)
        conf, err = _brute_force(est, q, k)
        np.testing.assert_allclose(est.predict(q)["confidence"], conf, rtol=1e-6)
        np.testing.assert_allclose(est.predict(q)["expected_error"], err, rtol=1e-6)
        loaded = _round_trip(est, tmp_path)
        assert loaded.k == k and loaded.k_eff_ == k
        _same_predictions(est, loaded, q)
    with pytest.warns(UserWarning, match="exceeds the 60 training atoms"):
        est.set_params(k=100)
    assert est.k_eff_ == 60
    np.testing.assert_allclose(est.predict(q)["confidence"], np.full(7, est.confidence_train_.mean()), rtol=1e-9)
    _same_predictions(est, _round_trip(est, tmp_path), q)
    for bad in (0, -1, 2.5, True, 10**9, "3"):
        with pytest.raises(ValueError, match="k must be"):
            est.set_params(k=bad)
        assert est.k == 100 and est.k_eff_ == 60  # unchanged by the refused call


@pytest.mark.parametrize("start,target", [("flat", "hnsw"), ("hnsw", "flat"), ("flat", "ivfpq"), ("ivfpq", "flat"), ("hnsw", "ivfpq")])
def test_index_change_rebuilds_from_stored_vectors(tmp_path, start, target):
    params = {"nlist": 4, "m": 2, "nbits": 4}
    est, q = small_estimator(start, n=300, index_params=params if start == "ivfpq" else None)
    est.set_params(index=target, index_params=params if target == "ivfpq" else None)
    assert est.index_.kind == target and est.index == target
    fresh, _ = small_estimator(target, n=300, index_params=params if target == "ivfpq" else None)
    _same_predictions(est, fresh, q)  # identical to fitting with that index from the start
    loaded = _round_trip(est, tmp_path)
    assert loaded.index_.kind == target
    _same_predictions(est, loaded, q)


def test_index_change_without_vectors_refused_and_state_kept(tmp_path):
    params = {"nlist": 4, "m": 2, "nbits": 4, "refine": 0}
    est, q = small_estimator("ivfpq", n=300, index_params=params)
    before = est.predict(q)
    with pytest.raises(ValueError, match="keeps only compressed codes"):
        est.set_params(index="flat", index_params=None)
    assert est.index == "ivfpq" and est.index_params == params and est.index_.kind == "ivfpq"
    np.testing.assert_array_equal(est.predict(q)["confidence"], before["confidence"])
    _same_predictions(est, _round_trip(est, tmp_path), q)  # still saves a loadable file
    est.set_params(index_params={**params, "nprobe": 4})  # a search-time change needs no vectors
    assert est.index_.index.nprobe == 4
    assert _round_trip(est, tmp_path).index_.index.nprobe == 4
    for bad in ("lsh", None, 3):
        with pytest.raises(ValueError, match="index must be"):
            est.set_params(index=bad)
        assert est.index == "ivfpq"


def test_index_auto_after_fit_records_its_choice(tmp_path):
    est, q = small_estimator("hnsw", n=80)
    est.set_params(index="auto")
    assert est.index_.kind == "flat" and est.index_.reason.startswith("auto: flat")
    loaded = _round_trip(est, tmp_path)
    assert loaded.index == "auto" and loaded.index_.kind == "flat" and loaded.index_.reason == est.index_.reason
    with pytest.raises(ValueError, match="explicit index kind"):
        est.set_params(index_params={"efSearch": 3})


def test_index_params_search_time_in_place_and_build_time_rebuild(tmp_path):
    est, q = small_estimator("hnsw", n=300, index_params={"efSearch": 16})
    faiss_object = est.index_.index
    est.set_params(index_params={"efSearch": 40})
    assert est.index_.index is faiss_object and faiss_object.hnsw.efSearch == 40
    assert _round_trip(est, tmp_path).index_.index.hnsw.efSearch == 40
    est.set_params(index_params={"M": 8})
    assert est.index_.index is not faiss_object and est.index_.index.hnsw.nb_neighbors(1) == 8
    assert _round_trip(est, tmp_path).index_.params["M"] == 8
    for bad, match in (({"efSearch": 0}, "efSearch"), ({"efSearch": 1 << 26}, "efSearch"), ({"nprobe": 2}, "unknown index_params"), ([1], "dict")):
        with pytest.raises(ValueError, match=match):
            est.set_params(index_params=bad)
        assert est.index_params == {"M": 8}
    est2, q2 = small_estimator("ivfpq", n=300, index_params={"nlist": 4, "m": 2, "nbits": 4, "refine": 1})
    est2.set_params(index_params={"nlist": 4, "m": 2, "nbits": 4, "refine": 8})
    assert est2.index_.params["refine"] == 8
    conf, _ = _brute_force(est2, q2, 3)  # 24 of 300 re-ranked exactly on 4 coarse lists: near exact
    assert np.mean(np.isclose(est2.predict(q2)["confidence"], conf)) >= 5 / 7


def test_query_time_parameters_take_effect(tmp_path):
    est, q = small_estimator(n=60)
    est.set_params(weights="distance")
    conf, err = _brute_force(est, q, 3, weights="distance")
    np.testing.assert_allclose(est.predict(q)["confidence"], conf, rtol=1e-6)
    _same_predictions(est, _round_trip(est, tmp_path), q)
    base = est.predict(q)["expected_error"]
    est.set_params(scale=2.0)
    np.testing.assert_allclose(est.predict(q)["expected_error"], 2 * base)
    assert _round_trip(est, tmp_path).scale == 2.0
    with pytest.raises(ValueError, match="scale"):
        est.set_params(scale=-1)
    assert est.scale == 2.0
    with pytest.raises(ValueError, match="never appear"):
        est.check_species(np.array([1, 6]))
    est.set_params(unknown_species="warn")
    with pytest.warns(UserWarning, match="never appear"):
        est.check_species(np.array([1, 6]))
    assert _round_trip(est, tmp_path).unknown_species == "warn"
    est.set_params(metadata={"model_sha256": "ab" * 32})
    assert _round_trip(est, tmp_path).metadata == {"model_sha256": "ab" * 32}
    before = est.predict(q)
    est.set_params(chunk_size=7, progress=True)  # fit-time only: no effect on predictions, saved
    _same_predictions(est, _round_trip(est, tmp_path), q)
    np.testing.assert_array_equal(est.predict(q)["confidence"], before["confidence"])
    assert _round_trip(est, tmp_path).chunk_size == 7


@pytest.mark.parametrize("name,value", [("atol", 0.05), ("rtol", 0.1), ("distribution", "exact"), ("bins", 16), ("window", (1, None))])
def test_distribution_parameters_need_a_refit(tmp_path, name, value):
    est, q = small_estimator(n=60)
    old = getattr(est, name)
    before = est.predict(q)
    est.set_params(**{name: value})
    with pytest.raises(ValueError, match=f"parameters \\['{name}'\\] changed after fit"):
        est.predict(q)
    with pytest.raises(ValueError, match="changed after fit"):
        est.save(tmp_path / "stale.ltau")
    assert not (tmp_path / "stale.ltau").exists()
    est.set_params(**{name: old})  # set back: valid again, nothing was lost
    np.testing.assert_array_equal(est.predict(q)["confidence"], before["confidence"])
    _same_predictions(est, _round_trip(est, tmp_path), q)


def test_unknown_parameter_and_refit_after_change():
    est, q = small_estimator(n=60)
    with pytest.raises(ValueError, match="unknown parameter"):
        est.set_params(kk=3)
    for name, bad in (("window", "last ten"), ("window", {"skip": 1, "first": 2}), ("bins", ("cubic", 5)),
                      ("bins", 0), ("bins", [0.3, 0.1]), ("weights", "gaussian"), ("atol", -1.0), ("rtol", np.nan),
                      ("distribution", "normal"), ("unknown_species", "panic"), ("chunk_size", 0), ("index_params", "fast")):
        with pytest.raises(ValueError):
            est.set_params(**{name: bad})
    est.predict(q)  # every refused call left the estimator usable
    est.set_params(atol=0.05)
    rng = np.random.default_rng(0)
    x = est.index_.training_vectors()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est.fit(x, list(np.abs(rng.normal(size=(2, 6, 60))) * 0.1))
    assert est.atol_ == 0.05
    est.predict(q)
