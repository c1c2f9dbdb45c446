"""Structure-aware conformal bounds: σ_j × h(R_f), R_f the geometric mean distance ratio of atom j's structure."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from ltau_ase.core.estimator import MIN_CALIBRATION_STRUCTURES, LTAUEstimator
from ltau_ase.core.shift import structure_ratios

ATOMS_PER_STRUCTURE = 12


def _temperature_problem(seed=0):
    """Training atoms ~ N(0, I); a structure at "temperature" T spreads its atoms by 1 + 0.5 (T - 1) and has
    errors ∝ T. At a fixed per-atom distance the error still grows with T (the shift benchmark's failure
    mode), while the structure's mean log distance ratio tells the temperatures apart."""
    rng = np.random.default_rng(seed)
    n_train = 1500
    x = rng.normal(size=(n_train, 3))
    z = rng.choice([1, 8], size=n_train)
    errs = np.abs(rng.normal(size=(4, 10, n_train))) * 0.1
    est = LTAUEstimator(k=8, distribution="exact").fit(x, list(errs), atomic_numbers=z)

    def structures(temperatures):
        t = np.repeat(np.asarray(temperatures, dtype=float), ATOMS_PER_STRUCTURE)
        xs = rng.normal(size=(t.size, 3)) * (1.0 + 0.5 * (t[:, None] - 1.0))
        err = np.abs(rng.normal(size=t.size)) * 0.1 * np.sqrt(3) * t
        index = np.repeat(np.arange(len(temperatures)), ATOMS_PER_STRUCTURE)
        return xs, err, rng.choice([1, 8], size=t.size), index, t

    return est, structures


def test_structure_ratios_match_a_per_structure_loop():
    rng = np.random.default_rng(0)
    r = rng.exponential(size=40)
    r[3] = 0.0  # an exact training match sits at the floor
    s = rng.integers(0, 7, size=40)
    got = structure_ratios(r, s, floor=0.05)
    for f in np.unique(s):
        expected = math.exp(np.mean([math.log(max(v, 0.05)) for v in r[s == f]]))
        np.testing.assert_allclose(got[s == f], expected, rtol=1e-12)


def test_structure_aware_bounds_quantile_coverage_and_monotone_h():
    est, structures = _temperature_problem()
    n_cal = 60
    xc, ec, zc, sc, tc = structures([1.0] * n_cal + [2.0] * n_cal)
    aware = copy.deepcopy(est).fit_calibration(xc, ec, structure_index=sc, seed=3)
    per_atom = copy.deepcopy(est).fit_calibration(xc, ec, frame_ids=sc, seed=3)  # the same halves
    h = aware.structure_scale_
    assert per_atom.structure_scale_ is None and aware.calibration_info_["structure"]["n_structures"] == 2 * n_cal
    grid = np.exp(np.linspace(-3, 4, 400))
    assert np.all(np.diff(h(grid)) >= -1e-12)  # monotone non-decreasing, tail included
    assert h.values[-1] > 1.3 * h.values[0]  # it did pick up the temperature

    # brute force: the quantile is the ceil((n+1) q)-th smallest second-half score |ΔF| / (σ h(R))
    frames = np.random.default_rng(3).permutation(np.unique(sc))
    half_b = ~np.isin(sc, frames[: frames.size // 2])
    cal = aware.predict(xc, structure_index=sc, coverage=0.9)
    scores = np.sort(ec[half_b] / (cal["expected_error"][half_b] * cal["structure_scale"][half_b]))
    np.testing.assert_allclose(aware.conformal_.pooled_, scores, rtol=1e-12)
    for q in (0.8, 0.9, 0.95):
        brute = scores[math.ceil((scores.size + 1) * q) - 1]
        assert aware.conformal_.quantiles(q)[1] == pytest.approx(brute, rel=1e-12)
        out = aware.predict(xc[:50], structure_index=sc[:50], coverage=q)
        np.testing.assert_allclose(out["error_bound"], brute * out["expected_error"] * out["structure_scale"], rtol=1e-12)

    # coverage on new exchangeable structures, per temperature: the per-atom form over-covers the cold ones and
    # under-covers the hot ones; the structure term evens them out
    xt, et, zt, st, tt = structures([1.0] * 300 + [2.0] * 300)
    b_aware = aware.predict(xt, structure_index=st, coverage=0.9)["error_bound"]
    b_atom = per_atom.predict(xt, coverage=0.9)["error_bound"]
    cov = {name: {t: float(np.mean(et[tt == t] <= b[tt == t])) for t in (1.0, 2.0)}
           for name, b in (("aware", b_aware), ("atom", b_atom))}
    assert abs(np.mean(et <= b_aware) - 0.9) < 0.03  # marginal: the split-conformal guarantee (n_b = 720)
    assert all(abs(c - 0.9) < 0.05 for c in cov["aware"].values()), cov
    assert cov["atom"][2.0] < cov["aware"][2.0] - 0.02 and cov["atom"][1.0] > cov["aware"][1.0] + 0.02, cov
    # the structure ratio grows with the temperature, and h with it
    r = aware.predict(xt, structure_index=st)
    assert np.median(r["structure_ratio"][tt == 2.0]) > np.median(r["structure_ratio"][tt == 1.0])
    order = np.argsort(r["structure_ratio"])
    assert np.all(np.diff(r["structure_scale"][order]) >= -1e-12)


def test_structure_aware_round_trip_errors_and_old_form(tmp_path):
    from ltau_ase.core.fileformat import read_container, write_container

    est, structures = _temperature_problem(seed=1)
    xc, ec, zc, sc, _ = structures([1.0] * 20 + [2.0] * 20)
    aware = copy.deepcopy(est).fit_calibration(xc, ec, atomic_numbers=zc, structure_index=sc)
    aware.save(tmp_path / "s.ltau")
    loaded = LTAUEstimator.load(tmp_path / "s.ltau")
    x, _, z, s, _ = structures([1.5] * 10)
    a = aware.predict(x, atomic_numbers=z, structure_index=s, coverage=0.95)
    b = loaded.predict(x, atomic_numbers=z, structure_index=s, coverage=0.95)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert loaded.calibration_info_ == aware.calibration_info_

    # clear errors
    with pytest.raises(ValueError, match="structure-aware.*pass structure_index"):
        loaded.predict(x, coverage=0.9)
    n = x.shape[0]
    for bad, what in ((s[:-1], "shape"), (s.astype(float), "dtype"), (s.astype(bool), "dtype"),
                      (s - 1, r"\[0, "), (s + n, r"\[0, ")):
        with pytest.raises(ValueError, match=f"structure_index.*{what}"):
            loaded.predict(x, structure_index=bad, coverage=0.9)
    with pytest.raises(ValueError, match=f"{MIN_CALIBRATION_STRUCTURES - 1} structures.*at least {MIN_CALIBRATION_STRUCTURES}"):
        copy.deepcopy(est).fit_calibration(xc, ec, structure_index=sc % (MIN_CALIBRATION_STRUCTURES - 1))
    # without coverage the bounds are not needed, and a per-atom estimator accepts (and ignores) the index
    assert "error_bound" not in loaded.predict(x)
    per_atom = copy.deepcopy(est).fit_calibration(xc, ec, frame_ids=sc)
    np.testing.assert_array_equal(per_atom.predict(x, coverage=0.9, structure_index=s)["error_bound"],
                                  per_atom.predict(x, coverage=0.9)["error_bound"])

    # a file whose structure scale is damaged or half missing is refused
    header, arrays = read_container(tmp_path / "s.ltau")
    for key in ("magic", "format_version", "arrays"):
        header.pop(key, None)
    arrays = {name: np.array(v) for name, v in arrays.items()}
    broken = dict(arrays, cal_h_values=arrays["cal_h_values"][::-1].copy())
    if arrays["cal_h_values"].size > 1 and arrays["cal_h_values"][0] != arrays["cal_h_values"][-1]:
        write_container(tmp_path / "bad.ltau", header, broken)
        with pytest.raises(ValueError, match="malformed calibration"):
            LTAUEstimator.load(tmp_path / "bad.ltau")
    missing = {k: v for k, v in arrays.items() if not k.startswith("cal_h_")}
    write_container(tmp_path / "half.ltau", header, missing)
    with pytest.raises(ValueError, match="structure"):
        LTAUEstimator.load(tmp_path / "half.ltau")


def test_calculator_passes_one_structure_and_compile_refuses():
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from ltau_ase.simulate.calculator import LTAUCalculator

    est, structures = _temperature_problem(seed=2)
    xc, ec, _, sc, _ = structures([1.0] * 20 + [2.0] * 20)
    est.fit_calibration(xc, ec, structure_index=sc)
    atoms = bulk("Cu", cubic=True) * (2, 1, 1)
    atoms.rattle(0.1, seed=0)
    desc = np.random.default_rng(0).normal(size=(len(atoms), 3))
    atoms.calc = LTAUCalculator(EMT(), est, descriptors=lambda a: desc, coverage=0.9, unknown_species="ignore")
    bounds = atoms.calc.get_property("force_error_bounds", atoms)
    expected = est.predict(desc, atomic_numbers=atoms.numbers, unknown_species="ignore", coverage=0.9,
                           structure_index=np.zeros(len(atoms), dtype=int))["error_bound"]
    np.testing.assert_array_equal(bounds, expected)

    pytest.importorskip("torch")
    from ltau_ase.nequip.inmodel import check_readout_form

    with pytest.raises(ValueError, match="structure-aware.*per atom"):
        check_readout_form(est, paper_form=False, coverage=0.9)
    check_readout_form(est, paper_form=False)  # without bounds the readout form is unchanged


def test_structure_ratios_include_leaves_atoms_out_and_an_empty_structure_is_inf():
    r = np.array([0.5, 2.0, 1e9, 0.0, 4.0, np.inf])
    s = np.array([0, 0, 0, 1, 1, 2])
    got = structure_ratios(r, s, floor=0.25, include=np.array([True, True, False, True, True, False]))
    # by hand: structure 0 over r = 0.5, 2 (geometric mean 1); structure 1 over max(0, 0.25), 4 (mean 1);
    # structure 2 has no included atom
    np.testing.assert_allclose(got, [1.0, 1.0, 1.0, 1.0, 1.0, np.inf], rtol=1e-12)


def test_unseen_element_atoms_stay_out_of_the_structure_ratio():
    """Under unknown_species="flag" an atom of an unseen element (its reported r is +inf, its searched r
    meaningless) does not move R_f: the seen atoms' bounds are those of the structure without it."""
    est, structures = _temperature_problem(seed=1)
    xc, ec, zc, sc, _ = structures([1.0] * 20 + [2.0] * 20)
    aware = est.fit_calibration(xc, ec, atomic_numbers=zc, structure_index=sc)
    x, _, z, s, _ = structures([1.5] * 3)
    x, z = x.copy(), z.copy()
    x[0], z[0] = 50.0, 79  # far from training: its searched r would blow up R_f of structure 0
    z[12:24] = 79  # structure 1: every atom of the unseen element
    out = aware.predict(x, atomic_numbers=z, structure_index=s, coverage=0.9, unknown_species="flag")
    seen = z != 79
    floor = aware.calibration_info_["structure"]["ratio_floor"]
    expected_r0 = math.exp(np.mean(np.log(np.maximum(out["distance_ratio"][1:12], floor))))
    np.testing.assert_allclose(out["structure_ratio"][:12], expected_r0, rtol=1e-12)
    alone = aware.predict(x[seen], atomic_numbers=z[seen], structure_index=s[seen], coverage=0.9)
    for key in ("structure_ratio", "structure_scale", "error_bound"):
        np.testing.assert_allclose(out[key][seen], alone[key], rtol=1e-12)
    assert np.all(np.isfinite(out["error_bound"][seen])) and np.all(np.isnan(out["error_bound"][~seen]))
    assert np.all(out["structure_ratio"][12:24] == np.inf) and np.all(out["structure_scale"][12:24] == np.inf)


def test_a_file_cannot_make_the_structure_scale_overflow(tmp_path):
    """Tail exponents beyond fit_calibration's cap, a ratio floor above every structure ratio, or an h larger
    than its mean-1 normalisation allows would give huge or infinite bounds: refused at load."""
    from ltau_ase.core.fileformat import read_container, write_container

    est, structures = _temperature_problem(seed=1)
    xc, ec, zc, sc, _ = structures([1.0] * 20 + [2.0] * 20)
    est.fit_calibration(xc, ec, atomic_numbers=zc, structure_index=sc).save(tmp_path / "s.ltau")
    header, arrays = read_container(tmp_path / "s.ltau")
    for key in ("magic", "format_version", "arrays"):
        header.pop(key, None)
    arrays = {name: np.array(v) for name, v in arrays.items()}
    info = header["calibration"]["info"]
    values = arrays["cal_h_values"]
    high_floor = {**header, "calibration": {**header["calibration"], "info": {
        **info, "structure": {**info["structure"], "ratio_floor": 10 * math.exp(arrays["cal_h_log_ratio"][0])}}}}
    cases = {"tail exponent is 1e\\+300": (header, dict(arrays, cal_h_tail_exponent=np.array(1e300))),
             "distance scale's tail exponent is 5": (header, dict(arrays, cal_g_tail_exponent=np.array(5.0))),
             "ratio floor .* lies above its first knot": (high_floor, arrays),
             "structure scale reaches 1e\\+308": (header, dict(arrays, cal_h_values=np.r_[values[:-1], 1e308]))}
    for i, (message, (hdr, arr)) in enumerate(cases.items()):
        write_container(tmp_path / f"bad{i}.ltau", hdr, arr)
        with pytest.raises(ValueError, match=message):
            LTAUEstimator.load(tmp_path / f"bad{i}.ltau")
    # the fitted file itself sits inside every bound
    assert LTAUEstimator.load(tmp_path / "s.ltau").structure_scale_.tail_exponent <= 4.0


def test_set_params_k_after_calibration_refuses_distance_aware_predictions(tmp_path):
    """The calibration's distances are means over k_eff neighbours: at another k they shift and the bounds lose
    their coverage. predict refuses until k is set back or fit_calibration runs again; the paper form works."""
    est, structures = _temperature_problem(seed=1)
    xc, ec, zc, sc, _ = structures([1.0] * 20 + [2.0] * 20)
    est.fit_calibration(xc, ec, structure_index=sc)
    assert est.calibration_info_["k"] == est.k_eff_ == 8
    x, _, _, s, _ = structures([1.5] * 3)
    before = est.predict(x, structure_index=s, coverage=0.9)
    est.set_params(k=2)
    with pytest.raises(ValueError, match=r"fitted with k=8 neighbours and k is now 2.*set_params\(k=8\)"):
        est.predict(x, structure_index=s, coverage=0.9)
    est.save(tmp_path / "k2.ltau")  # the file keeps the calibration's k, so the loaded copy refuses too
    with pytest.raises(ValueError, match="fitted with k=8"):
        LTAUEstimator.load(tmp_path / "k2.ltau").predict(x)
    # the paper form does not use the calibration: equal to an uncalibrated estimator at k = 2
    plain = _temperature_problem(seed=1)[0].set_params(k=2)
    np.testing.assert_array_equal(est.predict(x, distance_aware=False)["confidence"], plain.predict(x)["confidence"])
    est.set_params(k=8)
    after = est.predict(x, structure_index=s, coverage=0.9)
    assert all(np.array_equal(before[key], after[key]) for key in before)
    est.set_params(k=2).fit_calibration(xc, ec, structure_index=sc)  # recalibrated at k = 2
    assert est.calibration_info_["k"] == 2 and np.all(np.isfinite(est.predict(x, structure_index=s, coverage=0.9)["error_bound"]))
