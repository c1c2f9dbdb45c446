"""Stop threshold for a stated false-alarm rate (issue 11 item 5)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from ase.md.verlet import VelocityVerlet

from sim_standins import ScriptedUQCalculator, make_slab
from ltau_ase.simulate.observers import UncertaintyStop, patience_peak, stop_threshold


def test_patience_peak_hand_computed():
    trace = [0.1, 0.5, 0.4, 0.9, 0.2, 0.6, 0.7]
    assert patience_peak(trace, 1) == 0.9
    assert patience_peak(trace, 2) == 0.6  # windows' minima 0.1 .4 .4 .2 .2 .6 -> max 0.6
    assert patience_peak(trace, 3) == 0.4
    assert patience_peak(trace[:2], 3) == -math.inf
    assert patience_peak([0.1, float("nan"), float("nan")], 2) == math.inf  # NaN always exceeds
    with pytest.raises(ValueError, match="patience"):
        patience_peak(trace, 0)


def test_stop_threshold_is_the_conformal_quantile_of_run_peaks():
    peaks = np.arange(1.0, 20.0)  # 19 runs with peaks 1..19
    traces = [[0.0, p, 0.0] for p in peaks]
    # alpha = 0.1: rank ceil(20 * 0.9) = 18 -> the 18th smallest peak
    assert stop_threshold(traces, 0.1) == 18.0
    with pytest.raises(ValueError, match="at least 39 in-domain reference runs"):
        stop_threshold(traces, 0.025)
    with pytest.raises(ValueError, match="open interval"):
        stop_threshold(traces, 1.5)


def test_false_alarm_rate_holds_on_exchangeable_runs():
    # runs of 200 AR(1) steps; a threshold from 99 reference runs at alpha=0.1 stops ~<=10 % of new runs
    rng = np.random.default_rng(0)

    from scipy.signal import lfilter

    def runs(n):  # x_t = 0.8 x_{t-1} + e_t
        return list(lfilter([1.0], [1.0, -0.8], rng.normal(size=(n, 200)), axis=1))

    rates = []
    for _ in range(20):
        thr = stop_threshold(runs(99), 0.1, patience=3)
        new = np.array(runs(400))
        # brute force: a run stops iff some 3 consecutive values all exceed the threshold
        above = new > thr
        rates.append(np.mean((above[:, :-2] & above[:, 1:-1] & above[:, 2:]).any(axis=1)))
    # guarantee: E[rate] in [0.09, 0.1] (<= alpha, >= alpha - 1/(R+1)); sd of the mean over 20 trials ~0.007
    assert 0.09 - 0.025 <= np.mean(rates) <= 0.1 + 0.025


def test_from_false_alarm_rate_builds_a_working_stop():
    atoms = make_slab()
    # max uncertainty per step: 0.2, 0.3, then 0.9 from the 4th computed structure on
    atoms.calc = ScriptedUQCalculator([0.2, 0.3, 0.25, 0.9, 0.95, 0.9, 0.9])
    dyn = VelocityVerlet(atoms, timestep=0.5)
    reference = [[0.1, 0.3, 0.2], [0.2, 0.5, 0.4], [0.3, 0.4, 0.1], [0.6, 0.2, 0.2]]
    stop = UncertaintyStop.from_false_alarm_rate(dyn, reference, 0.2, patience=2)
    # patience-2 peaks 0.2, 0.4, 0.3, 0.2; rank ceil(5 * 0.8) = 4 -> 0.4
    assert stop.threshold == 0.4 and stop.patience == 2 and stop.false_alarm_rate == 0.2
    dyn.attach(stop)
    dyn.run(10)
    assert stop.triggered and stop.step == 4  # values > 0.4 at steps 3 and 4
    # threshold=inf records the statistic without ever stopping (how reference traces are collected)
    atoms = make_slab()
    atoms.calc = ScriptedUQCalculator([0.2, 5.0, 9.0])
    dyn = VelocityVerlet(atoms, timestep=0.5)
    recorder = UncertaintyStop(dyn, threshold=math.inf)
    dyn.attach(recorder)
    dyn.run(4)
    assert not recorder.triggered and recorder.values == [0.2, 5.0, 9.0, 9.0, 9.0]


# ---------------------------------------------------------------------------- extreme-value (Gumbel) thresholds
def test_gumbel_fit_solves_the_likelihood_equations_and_matches_scipy():
    from scipy.stats import gumbel_r

    from ltau_ase.core.extremes import fit_gumbel, gumbel_quantile

    x = np.random.default_rng(3).gumbel(2.0, 0.5, size=25) * 1e-3  # small units must not matter
    loc, scale = fit_gumbel(x)
    # the two likelihood equations, written out: d/dmu and d/dbeta of the Gumbel log-likelihood vanish
    z = (x - loc) / scale
    assert abs(np.mean(1.0 - np.exp(-z))) < 1e-9
    assert abs(np.mean(z * (1.0 - np.exp(-z))) - 1.0) < 1e-9
    ref_loc, ref_scale = gumbel_r.fit(x)
    assert loc == pytest.approx(ref_loc, rel=1e-6) and scale == pytest.approx(ref_scale, rel=1e-5)
    # hand-computed quantile: 1 - 0.5 ln(-ln 0.99) = 1 + 0.5 * 4.600149227 = 3.3000746
    assert gumbel_quantile(1.0, 0.5, 0.99) == pytest.approx(3.3000746, abs=1e-7)


def test_gumbel_threshold_of_run_peaks_and_rates_below_one_over_r_plus_one():
    from scipy.stats import gumbel_r

    peaks = np.arange(1.0, 20.0)
    traces = [[0.0, p, 0.5 * p] for p in peaks]  # 19 runs, peaks 1..19 (patience 2: 0.5 p)
    expected = gumbel_r(*gumbel_r.fit(peaks)).ppf(0.99)
    assert stop_threshold(traces, 0.01, method="gumbel") == pytest.approx(expected, rel=1e-5)
    assert stop_threshold(traces, 0.01, patience=2, method="gumbel") == pytest.approx(0.5 * expected, rel=1e-5)
    with pytest.raises(ValueError, match="method='gumbel'"):  # the conformal rule cannot state 0.01 with 19 runs
        stop_threshold(traces, 0.01)
    with pytest.raises(ValueError, match="at least 10 block maxima"):
        stop_threshold(traces[:9], 0.01, method="gumbel")
    with pytest.raises(ValueError, match="finite"):
        stop_threshold(traces + [[0.1, float("nan")]], 0.01, method="gumbel")
    with pytest.raises(ValueError, match="spread"):
        stop_threshold([[1.0, 2.0]] * 12, 0.01, method="gumbel")
    with pytest.raises(ValueError, match="method must be one of"):
        stop_threshold(traces, 0.01, method="gev")


def test_gumbel_threshold_achieves_about_the_stated_rate():
    # runs of L = 200 i.i.d. Exp(1) values: a run's peak has the known law P(peak <= t) = (1 - e^-t)^L
    # (Gumbel-like), so the achieved false-alarm rate of each threshold is exact, no fresh runs needed
    rng = np.random.default_rng(0)
    L, R = 200, 20
    rates = {0.01: [], 0.001: []}
    for _ in range(300):
        traces = list(rng.exponential(size=(R, L)))
        for alpha in rates:
            t = stop_threshold(traces, alpha, method="gumbel")
            rates[alpha].append(1.0 - (1.0 - math.exp(-t)) ** L)
    # the plug-in fit overshoots on average (see ltau_ase.core.extremes: 0.017 at 0.01 over 2000 fits);
    # the median fit is close to the stated rate; sd of the mean over 300 fits ~0.001 (0.01) / ~0.0002 (0.001)
    assert 0.8 * 0.01 <= np.median(rates[0.01]) <= 1.5 * 0.01
    assert 0.01 <= np.mean(rates[0.01]) <= 0.022
    assert 0.001 <= np.mean(rates[0.001]) <= 0.0035
    # a conformal threshold for the same runs cannot go below 1/21 at all; the fitted one is far lower
    assert np.mean(rates[0.01]) < 1 / (R + 1)


def test_from_false_alarm_rate_with_the_gumbel_method():
    atoms = make_slab()
    atoms.calc = ScriptedUQCalculator([0.2, 0.3, 0.25, 0.9])
    dyn = VelocityVerlet(atoms, timestep=0.5)
    reference = [[0.1, 0.2 + 0.01 * i, 0.15] for i in range(12)]
    stop = UncertaintyStop.from_false_alarm_rate(dyn, reference, 0.01, method="gumbel")
    assert stop.threshold_method == "gumbel" and stop.threshold == stop_threshold(reference, 0.01, method="gumbel")
    assert 0.31 < stop.threshold < 0.9  # above every peak (0.2..0.31), below the scripted excursion
    dyn.attach(stop)
    dyn.run(10)
    assert stop.triggered and stop.value == 0.9


# ---------------------------------------------------------------------------- per-element scales
def test_element_scales_hand_computed():
    from ltau_ase.simulate.observers import element_scales

    # run 1: atoms Cu, Cu, O over 2 steps; run 2: atoms O, H over 2 steps
    run1 = np.array([[0.1, 0.2, 1.0], [0.3, 0.4, 3.0]])
    run2 = np.array([[2.0, 5.0], [4.0, 7.0]])
    z1, z2 = np.array([29, 29, 8]), np.array([8, 1])
    # quantile 1: the largest value of each element over both runs
    assert element_scales([run1, run2], [z1, z2], 1.0) == {1: 7.0, 8: 4.0, 29: 0.4}
    # median (linear interpolation): Cu {.1,.2,.3,.4} -> 0.25; O {1,3,2,4} -> 2.5; H {5,7} -> 6
    assert element_scales([run1, run2], [z1, z2], 0.5) == pytest.approx({1: 6.0, 8: 2.5, 29: 0.25})
    # a run cut at step 0 (breakdown at its first frame) adds nothing: H, only there, gets no scale
    assert element_scales([run1, run2[:0]], [z1, z2], 1.0) == {8: 3.0, 29: 0.4}
    with pytest.raises(ValueError, match="no per-atom values"):
        element_scales([run1[:0]], [z1])
    with pytest.raises(ValueError, match="non-finite"):
        element_scales([np.array([[0.1, np.inf]])], [np.array([29, 8])])
    with pytest.raises(ValueError, match="Z=8.*> 0"):
        element_scales([np.array([[0.1, 0.0]])], [np.array([29, 8])])
    with pytest.raises(ValueError, match=r"\(steps, N\)"):
        element_scales([run1], [z2])
    with pytest.raises(ValueError, match="quantile"):
        element_scales([run1], [z1], 0.0)


def test_element_normalised_trace_hand_computed():
    from ltau_ase.simulate.observers import element_normalised_trace

    # atoms Cu, Cu, O, Au (Au: no scale -> default 2); 3 recorded steps; scales Cu 0.5, O 4
    trace = np.array([[0.2, 0.6, 2.0, 1.0],
                      [0.1, 0.4, 6.0, 5.0],
                      [0.3, 0.3, 1.0, 0.2]])
    z = np.array([29, 29, 8, 79])
    scales = {29: 0.5, 8: 4.0}
    # normalised: [.4, 1.2, .5, .5], [.2, .8, 1.5, 2.5], [.6, .6, .25, .1]
    # per-step max 1.2, 2.5, 0.6; fraction above 1: 1/4, 2/4, 0
    assert element_normalised_trace(trace, z, scales, default=2.0) == pytest.approx(
        {"initial": 1.2, "max": 2.5, "final": 0.6, "frac": 0.5})
    # only the first three atoms (e.g. the free ones): Au drops out, no default needed
    mask = np.array([True, True, True, False])
    assert element_normalised_trace(trace, z, scales, mask=mask) == pytest.approx(
        {"initial": 1.2, "max": 1.5, "final": 0.6, "frac": 1 / 3})
    with pytest.raises(ValueError, match=r"no in-domain scale for element\(s\) Z=\[79\]"):
        element_normalised_trace(trace, z, scales)
    with pytest.raises(ValueError, match=r"\(steps >= 1, N\)"):
        element_normalised_trace(trace[:0], z, scales, default=2.0)
    with pytest.raises(ValueError, match=r"\(steps >= 1, N\)"):
        element_normalised_trace(trace, z[:3], scales, default=2.0)
    with pytest.raises(ValueError, match="selects no atom"):
        element_normalised_trace(trace, z, scales, mask=np.zeros(4, dtype=bool))
    with pytest.raises(ValueError, match="bool array"):
        element_normalised_trace(trace, z, scales, mask=np.array([1, 1, 1, 0]))
    bad = trace.copy()
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="finite"):
        element_normalised_trace(bad, z, scales, default=2.0)


def test_stop_with_element_scales_watches_the_element_relative_value():
    atoms = make_slab()  # 12 Cu then 1 O
    weights = np.r_[np.full(12, 1.0), 0.5]
    sequence = [0.2, 0.4, 0.6, 0.9, 0.9]
    # raw: max over atoms = value (a Cu atom) <= 0.9: a threshold of 1 never fires
    atoms.calc = ScriptedUQCalculator(sequence, weights)
    dyn = VelocityVerlet(atoms, timestep=0.5)
    raw = UncertaintyStop(dyn, threshold=1.0)
    dyn.attach(raw)
    dyn.run(4)
    assert not raw.triggered and max(raw.values) == pytest.approx(0.9)
    # scaled: Cu value * 1 / 2, O value * 0.5 / 0.25 = 2 value -> 0.4, 0.8, 1.2: fires at step 2
    atoms = make_slab()
    atoms.calc = ScriptedUQCalculator(sequence, weights)
    dyn = VelocityVerlet(atoms, timestep=0.5)
    scaled = UncertaintyStop(dyn, threshold=1.0, element_scales={29: 2.0, 8: 0.25})
    dyn.attach(scaled)
    dyn.run(4)
    assert scaled.triggered and scaled.step == 2 and scaled.value == pytest.approx(1.2)
    assert scaled.values == pytest.approx([0.4, 0.8, 1.2]) and "element-normalised" in scaled.reason
    with pytest.raises(ValueError, match=r"no in-domain scale for element\(s\) Z=\[8\]"):
        UncertaintyStop(dyn, threshold=1.0, element_scales={29: 2.0})
    with pytest.raises(ValueError, match="finite numbers > 0"):
        UncertaintyStop(dyn, threshold=1.0, element_scales={29: 2.0, 8: 0.0})


def test_from_reference_runs_fits_scales_then_threshold():
    atoms = make_slab()
    atoms.calc = ScriptedUQCalculator([0.1], np.r_[np.full(12, 1.0), 0.5])
    dyn = VelocityVerlet(atoms, timestep=0.5)
    z = np.array([29, 29, 8])
    # four in-domain runs of 2 steps; Cu values <= 1.0, O values <= 4.0 -> scales (quantile 1) Cu 1, O 4
    runs = [np.array([[0.5, 1.0, 2.0], [0.2, 0.1, 4.0]]), np.array([[0.3, 0.4, 1.0], [0.6, 0.2, 3.0]]),
            np.array([[0.9, 0.1, 0.4], [0.2, 0.2, 0.8]]), np.array([[0.1, 0.1, 0.2], [0.3, 0.3, 0.4]])]
    stop = UncertaintyStop.from_reference_runs(dyn, runs, [z] * 4, 0.2, element_quantile=1.0)
    assert stop.element_scales == {8: 4.0, 29: 1.0}
    # normalised peaks: max(1.0, 0.5, 1.0) = 1.0; max(0.4, 0.6, 0.75) = 0.75; 0.9; 0.3
    # conformal rank ceil(5 * 0.8) = 4 of sorted (0.3, 0.75, 0.9, 1.0) -> 1.0
    assert stop.threshold == pytest.approx(1.0) and stop.n_reference_runs == 4
    plain = UncertaintyStop.from_reference_runs(dyn, runs, [z] * 4, 0.2, element_quantile=None)
    # raw peaks 4, 3, 0.9, 0.4 -> the 4th smallest, 4.0
    assert plain.element_scales is None and plain.threshold == 4.0


def test_element_normalised_by_hand_and_its_default_scale():
    from ltau_ase.simulate.observers import element_normalised

    values = np.array([[1.0, 2.0, 3.0], [4.0, 6.0, 9.0]])
    z = np.array([29, 8, 47])
    with pytest.raises(ValueError, match=r"Z=\[47\]"):
        element_normalised(values, z, {29: 2.0, 8: 0.5})
    # Ag has no scale: the default 3.0 is used for it
    assert element_normalised(values, z, {29: 2.0, 8: 0.5}, default=3.0) == pytest.approx(
        np.array([[0.5, 4.0, 1.0], [2.0, 12.0, 3.0]]))


def test_element_normalised_refuses_scales_it_cannot_divide_by():
    """A zero, negative, infinite, NaN or non-numeric scale (or default) would give infinite, negative or NaN
    normalised values, and a non-integer atomic number would be truncated to another element's scale."""
    from ltau_ase.simulate.observers import element_normalised, element_normalised_trace

    values = np.array([[0.1, 0.2, 0.3], [0.2, 0.1, 0.5]])
    z = np.array([29, 29, 8])
    # by hand: Cu / 0.2, O / 0.4 -> per-step max (1.0, 1.25), fraction above 1: (0, 1/3)
    assert element_normalised_trace(values, z, {29: 0.2, 8: 0.4}) == pytest.approx(
        {"initial": 1.0, "max": 1.25, "final": 1.25, "frac": 1 / 3})
    for bad in (0.0, -0.2, np.inf, np.nan, "0.2", True):
        with pytest.raises(ValueError, match="element scales .* must be finite numbers > 0"):
            element_normalised_trace(values, z, {29: bad, 8: 0.4})
    for bad in (-1.0, 0.0, np.nan, np.inf):
        with pytest.raises(ValueError, match="default .* must be None or a finite number > 0"):
            element_normalised_trace(values, z, {29: 0.2}, default=bad)
    with pytest.raises(ValueError, match="numbers must be integer atomic numbers"):
        element_normalised(values, z + 0.5, {29: 0.2, 8: 0.4}, default=1.0)
