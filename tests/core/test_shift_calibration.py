"""Distance-aware calibration, conformal bounds and the shared scale search (issue 11 items 1, 3, 4)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ltau_ase.core.calibration import miscalibration_area, search_scale
from ltau_ase.core.conformal import MondrianConformal, check_coverage, conformal_quantile, conformal_rank
from ltau_ase.core.estimator import MIN_CALIBRATION_ATOMS, MIN_CALIBRATION_STRUCTURES, MIN_ELEMENT_ATOMS, LTAUEstimator
from ltau_ase.core.shift import DistanceScale, reference_distances


# ---------------------------------------------------------------------------- conformal
def test_conformal_quantile_hand_computed():
    scores = np.arange(1.0, 11.0)  # 1..10
    assert conformal_rank(10, 0.9) == 10  # ceil(11 * 0.9) = ceil(9.9)
    assert conformal_quantile(scores, 0.9) == 10.0
    assert conformal_quantile(scores, 0.5) == 6.0  # ceil(5.5) = 6
    assert conformal_quantile(scores, 0.8) == 9.0  # ceil(8.8) = 9
    assert conformal_quantile(scores, 0.95) == math.inf  # ceil(10.45) = 11 > 10: no finite bound
    assert conformal_rank(9, 0.9) == 9  # (9 + 1) * 0.9 = 9 exactly: not rounded up to 10
    for bad in (0, 1, 1.5, -0.1, float("nan"), True, "0.9"):
        with pytest.raises(ValueError, match="coverage"):
            check_coverage(bad)


@pytest.mark.parametrize("q", [0.8, 0.9, 0.95])
def test_split_conformal_coverage_on_exchangeable_data(q):
    # Marginal coverage over calibration draws lies in [q, q + 1/(n+1)] (exchangeable, continuous).
    rng = np.random.default_rng(1)
    n, trials, n_test = 100, 400, 500
    covered = []
    for _ in range(trials):
        cal = rng.exponential(size=n)
        bound = MondrianConformal(1).fit(cal).quantiles(q)[1]
        covered.append(np.mean(rng.exponential(size=n_test) <= bound))
    mean = float(np.mean(covered))
    # standard error of the mean over trials (calibration-draw variance dominates): ~0.0015-0.002
    sd = float(np.std(covered)) / math.sqrt(trials)
    assert q - 4 * sd <= mean <= q + 1 / (n + 1) + 4 * sd


def test_mondrian_groups_and_pooled_fallback():
    rng = np.random.default_rng(2)
    scores = np.concatenate([rng.uniform(0, 1, 300), rng.uniform(0, 10, 300), rng.uniform(0, 5, 20)])
    groups = np.repeat([1, 8, 29], [300, 300, 20])
    mc = MondrianConformal(min_count=50).fit(scores, groups)
    np.testing.assert_array_equal(mc.groups_, [1, 8])  # 20 Cu scores < 50: pooled
    q = mc.quantile_for(np.array([1, 8, 29, 47]), 0.9)
    assert q[0] == conformal_quantile(np.sort(scores[:300]), 0.9)
    assert q[1] == conformal_quantile(np.sort(scores[300:600]), 0.9)
    pooled = conformal_quantile(np.sort(scores), 0.9)
    assert q[2] == pooled and q[3] == pooled  # too few, and never seen: pooled
    back = MondrianConformal.from_arrays(50, mc.to_arrays())
    np.testing.assert_array_equal(back.quantile_for(np.array([1, 8, 29]), 0.8), mc.quantile_for(np.array([1, 8, 29]), 0.8))
    bad = mc.to_arrays()
    bad["group_counts"] = bad["group_counts"] + 1
    with pytest.raises(ValueError, match="malformed"):
        MondrianConformal.from_arrays(50, bad)


# ---------------------------------------------------------------------------- distance scale
def _pava(y):
    """Brute-force reference: pool adjacent violators, one value per point."""
    blocks = [[float(v), 1] for v in y]
    i = 0
    while i < len(blocks) - 1:
        if blocks[i][0] > blocks[i + 1][0]:
            s = blocks[i][0] * blocks[i][1] + blocks[i + 1][0] * blocks[i + 1][1]
            c = blocks[i][1] + blocks[i + 1][1]
            blocks[i:i + 2] = [[s / c, c]]
            i = max(i - 1, 0)
        else:
            i += 1
    return np.concatenate([[v] * c for v, c in blocks])


def test_distance_scale_is_isotonic_and_extrapolates():
    rng = np.random.default_rng(3)
    r = np.exp(rng.uniform(-1, 1, 400))
    y = r ** 1.5 * rng.exponential(size=400)
    g = DistanceScale.fit(r, y)
    # knots are the isotonic fit's block values (checked against a brute-force PAVA)
    ref = _pava(y[np.argsort(r, kind="stable")])
    np.testing.assert_allclose(np.unique(ref), np.unique(g.values), rtol=1e-10)
    grid = np.exp(np.linspace(-3, 4, 300))
    values = g(grid)
    assert np.all(np.diff(values) >= -1e-12)  # monotone non-decreasing everywhere, tail included
    assert 1.0 < g.tail_exponent < 2.0  # binned log-log slope of a power 1.5 law
    far = np.exp(g.log_ratio[-1]) * np.array([2.0, 4.0])
    np.testing.assert_allclose(g(far), g.values[-1] * np.array([2.0, 4.0]) ** g.tail_exponent)
    assert g(np.array([0.0]))[0] == g.values[0]
    back = DistanceScale.from_arrays(g.to_arrays())
    np.testing.assert_array_equal(back(grid), values)
    with pytest.raises(ValueError, match="non-decreasing"):
        DistanceScale(np.array([0.0, 1.0]), np.array([2.0, 1.0]), 0.5)


def test_reference_distances_match_brute_force_leave_one_out():
    from ltau_ase.core.index import NeighbourIndex

    rng = np.random.default_rng(4)
    x = rng.normal(size=(150, 3)).astype(np.float32)
    x[10] = x[11]  # an exact duplicate: its twin is a neighbour at distance 0, itself is not
    ref = reference_distances(NeighbourIndex.build(x), x, k=4)
    d = np.linalg.norm(x[:, None, :].astype(np.float64) - x[None, :, :], axis=2)
    np.fill_diagonal(d, np.inf)
    brute = np.sort(np.sort(d, axis=1)[:, :4].mean(axis=1))
    np.testing.assert_allclose(ref, brute, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- scale search
def test_search_scale_finds_minimum_and_keeps_current_when_no_better():
    res = search_scale(lambda s: (math.log(s) - math.log(3.0)) ** 2, bounds=(0.1, 10), current=1.0)
    assert res["scale"] == pytest.approx(3.0, rel=2e-3) and res["before"] == pytest.approx(math.log(3) ** 2)
    flat = search_scale(lambda s: 1.0, bounds=(0.1, 10), current=2.0)
    assert flat == {"scale": 2.0, "before": 1.0, "after": 1.0}
    with pytest.raises(ValueError, match="bounds"):
        search_scale(lambda s: 0.0, bounds=(1.0, 0.5))


def test_pair_confidence_matches_brute_force():
    rng = np.random.default_rng(5)
    errs = np.abs(rng.normal(size=(3, 12, 30)))  # 3 runs, 12 epochs, 30 atoms
    est = LTAUEstimator(k=3, distribution="exact", window=None).fit(rng.normal(size=(30, 2)), list(errs))
    atoms = rng.integers(30, size=50)
    t = rng.uniform(0, 2, size=50)
    brute = np.array([np.mean([(errs[m, :, a] <= tt).mean() for m in range(3)]) for a, tt in zip(atoms, t)])
    np.testing.assert_allclose(est.distributions_.pair_confidence(atoms, t), brute, atol=1e-12)


# ---------------------------------------------------------------------------- estimator
def _shift_problem(seed=0, n_train=1500, n_cal=1200):
    """Training atoms near the origin; a test atom's error grows with its distance from the training cloud."""
    rng = np.random.default_rng(seed)

    def sample(n, spread):
        x = rng.normal(size=(n, 3)) * spread
        level = 0.1 * np.exp(0.3 * x[:, 0])
        grow = 1.0 + np.maximum(np.linalg.norm(x, axis=1) - 2.0, 0.0) ** 1.5
        z = rng.choice([1, 8], size=n, p=[0.7, 0.3])
        return x, level, grow, z

    x, level, _, z = sample(n_train, 1.0)
    errs = np.abs(rng.normal(size=(4, 10, n_train))) * level  # 4 runs, 10 epochs
    est = LTAUEstimator(k=8, distribution="exact").fit(x, list(errs), atomic_numbers=z)

    def labelled(n, spread):
        xq, lq, gq, zq = sample(n, spread)
        return xq, np.abs(rng.normal(size=n)) * lq * gq * np.sqrt(3), zq

    return est, labelled(n_cal, 1.0), labelled


def test_fit_calibration_distance_aware_and_conformal_coverage():
    est, (xc, ec, zc), labelled = _shift_problem()
    plain_id = est.predict(labelled(1, 1.0)[0])
    assert "error_bound" not in plain_id and "scale" not in plain_id
    assert est.fit_calibration(xc, ec, atomic_numbers=zc) is est and est.is_calibrated
    for spread, tol in ((1.0, 0.03), (2.0, 0.08)):
        x, e, z = labelled(4000, spread)
        plain = est.predict(x, distance_aware=False)
        out = est.predict(x, coverage=0.9, atomic_numbers=z)
        assert set(out) >= {"confidence", "uncertainty", "expected_error", "distance", "error_bound", "scale"}
        np.testing.assert_allclose(out["uncertainty"], 1 - out["confidence"])
        np.testing.assert_array_equal(out["distance"], plain["distance"])
        assert abs(np.mean(e <= out["error_bound"]) - 0.9) < tol
        # the distance-aware confidences are better calibrated than the paper's form under shift
        mis_aware = miscalibration_area(out["confidence"], e, est.atol_)
        mis_plain = miscalibration_area(plain["confidence"], e, est.atol_)
        assert mis_aware <= mis_plain + 0.01
        if spread > 1:
            assert mis_aware < 0.5 * mis_plain
    # bounds and scales widen with distance (monotone in the distance ratio, same element and neighbours)
    x, e, z = labelled(500, 3.0)
    out = est.predict(x, coverage=0.8, atomic_numbers=np.full(500, 1))
    order = np.argsort(out["distance_ratio"])
    assert np.all(np.diff(out["scale"][order]) >= -1e-12)
    # paper form is still there and unchanged by the calibration
    again = est.predict(x, distance_aware=False)
    assert "error_bound" not in again
    with pytest.raises(ValueError, match="coverage needs distance_aware"):
        est.predict(x, coverage=0.9, distance_aware=False)


def test_per_element_factors_fall_back_to_pooled():
    est, (xc, ec, zc), _ = _shift_problem(seed=1)
    zc = zc.copy()
    zc[:MIN_ELEMENT_ATOMS] = 29  # Cu: < MIN_ELEMENT_ATOMS atoms per half
    est.fit_calibration(xc, ec * np.where(zc == 8, 2.0, 1.0), atomic_numbers=zc)
    assert 29 not in est.element_factor_z_.tolist()
    factors = est._element_factors(np.array([1, 8, 29, 47]), 4)
    assert factors[2] == factors[3] == est.pooled_factor_  # rare and unseen elements: pooled
    if 8 in est.element_factor_z_.tolist():  # O errors doubled: its own factor is larger than H's
        assert factors[1] > factors[0]
    x = xc[:5]
    np.testing.assert_array_equal(est.predict(x)["scale"], est.pooled_factor_ * est.distance_scale_(
        est.predict(x)["distance_ratio"]))


def test_fit_calibration_save_load_round_trip(tmp_path):
    est, (xc, ec, zc), labelled = _shift_problem(seed=2)
    frames = np.arange(xc.shape[0]) // 12  # 100 "structures" of 12 atoms
    est.fit_calibration(xc, ec, atomic_numbers=zc, frame_ids=frames)
    assert est.calibration_info_["split"] == "structures"
    est.save(tmp_path / "cal.ltau")
    loaded = LTAUEstimator.load(tmp_path / "cal.ltau")
    x, _, z = labelled(200, 2.0)
    a, b = est.predict(x, coverage=0.95, atomic_numbers=z), loaded.predict(x, coverage=0.95, atomic_numbers=z)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert loaded.calibration_info_ == est.calibration_info_
    # a refit drops the calibration (it belonged to the old training set)
    est.fit(xc[:300], [np.abs(np.random.default_rng(0).normal(size=(5, 300)))])
    assert not est.is_calibrated


def test_fit_scale_leaves_the_prior_and_old_files_load(tmp_path):
    est, (xc, ec, _), _ = _shift_problem(seed=3)
    est.fit_scale(xc, ec)
    assert est.scale == 1.0 and est.effective_scale == est.scale_
    est.save(tmp_path / "s.ltau")
    assert LTAUEstimator.load(tmp_path / "s.ltau").scale_ == est.scale_
    # an estimator file written before this change (no scale_, no reference distances) still loads
    from ltau_ase.core.fileformat import read_container, write_container

    header, arrays = read_container(tmp_path / "s.ltau")
    header["learned"].pop("scale_")
    header["settings"]["scale"] = 2.0
    arrays.pop("train_distance_ref_")
    for key in ("magic", "format_version", "arrays"):  # added by write_container
        header.pop(key, None)
    arrays = {name: np.array(a) for name, a in arrays.items()}
    write_container(tmp_path / "old.ltau", header, arrays)
    old = LTAUEstimator.load(tmp_path / "old.ltau")
    assert old.effective_scale == 2.0 and not old.is_calibrated
    with pytest.raises(ValueError, match="refit"):
        old.fit_calibration(xc, ec)


def test_fit_calibration_bad_inputs():
    est, (xc, ec, zc), _ = _shift_problem(seed=4, n_cal=400)
    n_small = MIN_CALIBRATION_ATOMS - 1
    with pytest.raises(ValueError, match=f"at least {MIN_CALIBRATION_ATOMS}"):
        est.fit_calibration(xc[:n_small], ec[:n_small])
    with pytest.raises(ValueError, match="errors has shape"):
        est.fit_calibration(xc, ec[:-1])
    with pytest.raises(ValueError, match="finite"):
        est.fit_calibration(xc, np.where(np.arange(ec.size) == 3, np.nan, ec))
    with pytest.raises(ValueError, match="atomic_numbers"):
        est.fit_calibration(xc, ec, atomic_numbers=np.zeros(ec.size, dtype=int))
    with pytest.raises(ValueError, match="single structure"):
        est.fit_calibration(xc, ec, frame_ids=np.zeros(ec.size, dtype=int))
    # enough atoms (400) but 19 structures: refused, naming the number needed
    with pytest.raises(ValueError, match=f"has 19 structures .*at least {MIN_CALIBRATION_STRUCTURES}"):
        est.fit_calibration(xc, ec, frame_ids=np.arange(ec.size) % (MIN_CALIBRATION_STRUCTURES - 1))
    import copy

    copy.deepcopy(est).fit_calibration(xc, ec, frame_ids=np.arange(ec.size) % MIN_CALIBRATION_STRUCTURES)  # 20: accepted
    with pytest.raises(ValueError, match="descriptors"):
        est.fit_calibration(xc[:, :2], ec)
    with pytest.raises(ValueError, match="fit_calibration"):
        est.predict(xc[:3], coverage=0.9)  # not calibrated yet
    est.fit_calibration(xc, ec)
    for bad in (0.0, 1.0, 1.2, -0.5):
        with pytest.raises(ValueError, match="open interval"):
            est.predict(xc[:3], coverage=bad)


def test_edited_calibration_in_a_file_is_refused(tmp_path):
    from ltau_file_tools import rewrite

    est, (xc, ec, zc), _ = _shift_problem(seed=5, n_train=400, n_cal=400)
    est.fit_calibration(xc, ec, atomic_numbers=zc)
    est.save(tmp_path / "cal.ltau")


    def decreasing(header, arrays):
        arrays["cal_g_values"] = arrays["cal_g_values"][::-1].copy()

    def too_many_groups(header, arrays):
        arrays["cal_conformal_groups"] = np.arange(1, 201, dtype=np.int64)
        arrays["cal_conformal_group_counts"] = np.ones(200, dtype=np.int64)

    def nan_factor(header, arrays):
        arrays["cal_element_factors"] = np.full_like(arrays["cal_element_factors"], np.nan)
        header["calibration"]["pooled_factor_"] = -1.0

    for name, edit, match in (("a.ltau", decreasing, "non-decreasing"), ("b.ltau", too_many_groups, r"\[0, 118\]"),
                              ("c.ltau", nan_factor, "factors")):
        with pytest.raises(ValueError, match=match):
            LTAUEstimator.load(rewrite(tmp_path / "cal.ltau", tmp_path / name, edit=edit))


def test_select_k_matches_refits_with_each_k():
    est, (xc, ec, _), _ = _shift_problem(seed=6, n_train=500, n_cal=300)
    x_train = est.index_.training_vectors().copy()
    errs = np.abs(np.random.default_rng(6).normal(size=(3, 8, 500)))
    est = LTAUEstimator(k=10, distribution="exact").fit(x_train, list(errs))
    by_k = est.select_k(xc, ec, k_grid=(1, 3, 7))
    for k, value in by_k.items():  # brute force: an estimator fitted with that k
        ref = LTAUEstimator(k=k, distribution="exact").fit(x_train, list(errs))
        assert value == pytest.approx(miscalibration_area(ref.predict(xc)["confidence"], ec, ref.atol_), abs=1e-12)
    best = min(by_k, key=lambda k: (by_k[k], k))
    refit = LTAUEstimator(k=best, distribution="exact").fit(x_train, list(errs))
    assert est.k == best and est.k_eff_ == best
    np.testing.assert_allclose(est.train_distance_ref_, refit.train_distance_ref_, rtol=1e-6)
    np.testing.assert_array_equal(est.predict(xc[:20])["confidence"], refit.predict(xc[:20])["confidence"])
    with pytest.raises(ValueError, match="k_grid"):
        est.select_k(xc, ec, k_grid=(0, 2))


# ---------------------------------------------------------------------------- structures (clusters)
def test_mondrian_group_needs_min_clusters_by_hand():
    scores = np.arange(1.0, 401.0)
    groups = np.repeat([28, 29], 200)
    clusters = np.r_[np.repeat([0, 1], 100), np.arange(2, 202)]  # Ni from 2 structures, Cu from 200
    mc = MondrianConformal(min_count=50, min_clusters=10).fit(scores, groups, clusters=clusters)
    np.testing.assert_array_equal(mc.groups_, [29])
    q = mc.quantile_for(np.array([28, 29]), 0.8)
    assert q[0] == conformal_quantile(scores, 0.8) == 321.0  # ceil(401 * 0.8) = 321: pooled
    assert q[1] == conformal_quantile(scores[200:], 0.8) == 361.0  # 200 + ceil(201 * 0.8) = 361
    assert MondrianConformal(50, 2).fit(scores, groups, clusters=clusters).groups_.tolist() == [28, 29]
    with pytest.raises(ValueError, match="clusters"):
        MondrianConformal(50, 2).fit(scores, groups, clusters=clusters[:10])
    with pytest.raises(ValueError, match="min_clusters"):
        MondrianConformal(50, 0)


def test_conformal_with_correlated_structures_group_quantile_from_few_structures():
    # Atoms of one structure share a structure-level error factor. A group (an element) present in 2
    # calibration structures gets a quantile that is those 2 structures', so its coverage on new
    # structures swings with the draw; with the structure minimum it uses the pooled quantile from
    # ~60 structures, whose coverage of new structures is near nominal with a much smaller spread.
    rng = np.random.default_rng(3)
    q, trials = 0.8, 300

    def structures(n):
        factor = np.exp(rng.normal(0.0, 0.5, n))  # structure-level
        scores = np.concatenate([f * rng.exponential(size=20) for f in factor])
        return scores, np.repeat(np.arange(n), 20)

    few, many = [], []
    for _ in range(trials):
        scores, cl = structures(60)
        groups = np.where(cl < 2, 28, 1)  # element 28 in structures 0 and 1 only (40 atoms)
        new, _ = structures(50)
        for store, min_clusters in ((few, 1), (many, 10)):
            mc = MondrianConformal(min_count=20, min_clusters=min_clusters).fit(scores, groups, clusters=cl)
            store.append(np.mean(new <= mc.quantile_for(np.array([28]), q)[0]))
    few, many = np.array(few), np.array(many)
    assert abs(many.mean() - q) < 0.02  # exchangeable structures: near nominal on average
    assert many.std() < 0.5 * few.std()


def test_fit_calibration_element_in_few_structures_uses_the_pooled_quantile():
    from ltau_ase.core.estimator import MIN_ELEMENT_STRUCTURES

    est, (xc, ec, zc), labelled = _shift_problem(seed=4)
    frames = np.arange(xc.shape[0]) // 12  # 100 structures of 12 atoms
    zc = zc.copy()
    zc[frames < 8] = 28  # Ni: 96 atoms (>= MIN_ELEMENT_ATOMS per half possible) in only 8 structures
    est.fit_calibration(xc, ec * np.where(zc == 28, 3.0, 1.0), atomic_numbers=zc, frame_ids=frames)
    assert 8 < 2 * MIN_ELEMENT_STRUCTURES
    assert 28 not in est.conformal_.groups_.tolist()
    assert est.conformal_.groups_.tolist() == [1, 8]  # ~35 and ~15 structures per half
    x, _, _ = labelled(5, 1.0)
    q_ni = est.conformal_.quantile_for(np.full(5, 28), 0.9)
    np.testing.assert_array_equal(q_ni, est.conformal_.quantiles(0.9)[1])
    # without structure labels the same atoms form an element group of their own
    est.fit_calibration(xc, ec * np.where(zc == 28, 3.0, 1.0), atomic_numbers=zc)
    assert 28 in est.conformal_.groups_.tolist()
