"""Stop statistics that follow the shift (issue 11 item 5): expected force error (eV/Å) and distance ratio.

A real LTAUEstimator calibrated with fit_calibration on 3-d descriptors; the calculator's descriptors are
scripted per structure, so each step's values are checked against a brute-force numpy kNN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.md.verlet import VelocityVerlet

from sim_standins import make_slab
from ltau_ase.cli.md import STOP_STATISTIC_CHOICES
from ltau_ase.core.estimator import LTAUEstimator
from ltau_ase.simulate.calculator import LTAUCalculator
from ltau_ase.simulate.observers import STOP_STATISTICS, UncertaintyStop, stop_threshold

K = 6


@pytest.fixture(scope="module")
def calibrated():
    """Training cloud N(0, 1) in 3-d with errors ~0.1; calibration errors grow beyond radius 2."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(800, 3))
    z = rng.choice([29, 8], size=800)
    errs = np.abs(rng.normal(size=(2, 6, 800))) * 0.1
    est = LTAUEstimator(k=K, distribution="exact").fit(x, list(errs), atomic_numbers=z)
    xc = rng.normal(size=(400, 3)) * 1.6
    grow = 1.0 + np.maximum(np.linalg.norm(xc, axis=1) - 2.0, 0.0) ** 1.5
    ec = np.abs(rng.normal(size=400)) * 0.1 * grow * np.sqrt(3)
    est.fit_calibration(xc, ec, frame_ids=np.arange(400) // 10)  # 40 structures of 10 atoms
    return est, x


class ScriptedDescriptors:
    """descriptors(atoms): a fixed (N, 3) pattern times a per-structure factor (one call per structure)."""

    def __init__(self, n, factors, seed=1):
        self.base = np.random.default_rng(seed).normal(size=(n, 3)) * 0.5
        self.factors = list(factors)
        self.calls = 0

    def __call__(self, atoms):
        f = self.factors[min(self.calls, len(self.factors) - 1)]
        self.calls += 1
        return (self.base * f).astype(np.float32)


def brute_force(est, x_train, q):
    """Distance ratio and distance-aware expected error (pooled factor) by exhaustive numpy kNN."""
    d = np.linalg.norm(q[:, None, :] - x_train[None, :, :], axis=2)
    ids = np.argsort(d, axis=1)[:, :K]
    dist = np.take_along_axis(d, ids, axis=1).mean(axis=1)
    dt = np.linalg.norm(x_train[:, None, :] - x_train[None, :, :], axis=2)
    np.fill_diagonal(dt, np.inf)
    loo = np.sort(dt, axis=1)[:, :K].mean(axis=1)
    ratio = dist / np.median(loo[loo > 0])
    m = est.mean_error_train_[ids].mean(axis=1)
    return ratio, est.pooled_factor_ * est.distance_scale_(ratio) * m


def _run(est, factors, key, threshold, steps):
    atoms = make_slab()
    desc = ScriptedDescriptors(len(atoms), factors)
    # element factors would apply per Z: flag policy on a Z-less fit uses pooled factors only
    atoms.calc = LTAUCalculator(EMT(), est, descriptors=desc, unknown_species="ignore")
    dyn = VelocityVerlet(atoms, timestep=0.1)
    stop = UncertaintyStop(dyn, threshold=threshold, key=key)
    dyn.attach(stop)
    dyn.run(steps)
    return stop, desc


def test_stop_statistics_are_documented_and_offered_by_ltau_md():
    assert tuple(STOP_STATISTICS) == STOP_STATISTIC_CHOICES
    assert "eV/Å" in STOP_STATISTICS["expected_force_errors"]
    assert "dimensionless" in STOP_STATISTICS["latent_distance_ratios"]
    import argparse

    from ltau_ase.cli import md

    parser = argparse.ArgumentParser()
    md.add_arguments(parser)
    base = ["--structure", "s.extxyz"]
    assert parser.parse_args(base).key == "uncertainties"
    assert parser.parse_args(base + ["--stop-statistic", "expected_force_errors"]).key == "expected_force_errors"
    assert parser.parse_args(base + ["--key", "latent_distance_ratios"]).key == "latent_distance_ratios"  # old name
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--stop-statistic", "forces"])


def test_expected_error_stop_does_not_saturate_and_fires_at_the_hand_computed_step(calibrated):
    est, x_train = calibrated
    # in-domain reference runs: descriptors scaled by 1.0 +- small jitter, recorded with threshold=inf
    refs = []
    for j in range(19):
        stop, _ = _run(est, [1.0 + 0.02 * np.sin(j + t) for t in range(6)], "expected_force_errors", math.inf, 5)
        refs.append(stop.values)
    threshold = stop_threshold(refs, 0.05)  # rank ceil(20 * 0.95) = 19 of 19: the largest peak
    assert threshold == pytest.approx(max(max(r) for r in refs))
    # a run drifting out: factor 1 for 3 structures, then 2, 4, 8, 16 (far beyond the calibration range)
    factors = [1.0, 1.0, 1.0, 2.0, 4.0, 8.0, 16.0]
    recorder, desc = _run(est, factors, "expected_force_errors", math.inf, 6)
    q = [desc.base * f for f in factors]
    expected = [brute_force(est, x_train, qi)[1].max() for qi in q]
    np.testing.assert_allclose(recorder.values, expected, rtol=1e-5)
    # unbounded: the distance-aware expected error keeps growing out of domain, while the uncertainty
    # (a probability) cannot exceed 1
    assert np.all(np.diff(expected[2:]) > 0) and expected[-1] > 10 * expected[0]
    first = int(np.flatnonzero(np.array(expected) > threshold)[0])
    assert first == 3  # the first drifted structure already exceeds every in-domain peak
    stop, _ = _run(est, factors, "expected_force_errors", threshold, 6)
    assert stop.triggered and stop.step == first and stop.value == pytest.approx(expected[first], rel=1e-5)
    ratio_stop, desc = _run(est, factors, "latent_distance_ratios", math.inf, 6)
    np.testing.assert_allclose(ratio_stop.values, [brute_force(est, x_train, qi)[0].max() for qi in q], rtol=1e-5)
    u_stop, _ = _run(est, factors, "uncertainties", math.inf, 6)
    assert max(u_stop.values) <= 1.0


def test_unseen_element_is_infinitely_far_under_the_flag_policy(calibrated):
    est, x_train = calibrated
    rng = np.random.default_rng(3)
    species_est = LTAUEstimator(k=K, distribution="exact").fit(
        x_train, list(np.abs(rng.normal(size=(2, 6, x_train.shape[0]))) * 0.1),
        atomic_numbers=np.full(x_train.shape[0], 29))
    xc = rng.normal(size=(300, 3))
    species_est.fit_calibration(xc, np.abs(rng.normal(size=300)) * 0.1, frame_ids=np.arange(300) // 10)
    q = rng.normal(size=(4, 3))
    out = species_est.predict(q, atomic_numbers=np.array([29, 79, 29, 79]), unknown_species="flag", coverage=0.9)
    unseen = np.array([False, True, False, True])
    np.testing.assert_array_equal(out["unknown_species"], unseen)
    assert np.all(np.isinf(out["distance_ratio"][unseen])) and np.all(np.isinf(out["scale"][unseen]))
    assert np.all(out["uncertainty"][unseen] == 1.0) and np.all(np.isnan(out["error_bound"][unseen]))
    assert np.all(np.isfinite(out["distance_ratio"][~unseen]))
    # latent-only (policy "ignore"): the same atoms get finite ratios from their latent neighbours
    plain = species_est.predict(q, atomic_numbers=np.array([29, 79, 29, 79]), unknown_species="ignore")
    assert np.all(np.isfinite(plain["distance_ratio"]))
    # through the calculator: the ratio result says so, and a stop on it fires at once
    atoms = make_slab(metal="Au")
    atoms.numbers[0] = 29
    atoms.calc = LTAUCalculator(EMT(), species_est, descriptors=ScriptedDescriptors(len(atoms), [1.0]),
                                unknown_species="flag")
    ratios = atoms.calc.get_property("latent_distance_ratios", atoms)
    assert np.isinf(ratios[atoms.numbers != 29]).all() and np.isfinite(ratios[0])
    dyn = VelocityVerlet(atoms, timestep=0.1)
    stop = UncertaintyStop(dyn, threshold=1e6, key="latent_distance_ratios")
    dyn.attach(stop)
    dyn.run(3)
    assert stop.triggered and stop.step == 0 and stop.value == math.inf


def test_distance_ratios_need_a_calibrated_estimator(calibrated):
    est, x_train = calibrated
    rng = np.random.default_rng(4)
    plain = LTAUEstimator(k=K).fit(x_train, list(np.abs(rng.normal(size=(2, 4, x_train.shape[0])))))
    atoms = make_slab()
    atoms.calc = LTAUCalculator(EMT(), plain, descriptors=ScriptedDescriptors(len(atoms), [1.0]))
    assert "latent_distance_ratios" not in atoms.calc.implemented_properties
    with pytest.raises(ValueError, match="does not provide 'latent_distance_ratios'"):
        UncertaintyStop(VelocityVerlet(atoms, timestep=0.1), threshold=2.0, key="latent_distance_ratios")


class CentredPositions:
    """descriptors(atoms) = (positions - their mean) / 3 (3-d, like the fixture's training cloud)."""

    def __call__(self, atoms):
        p = atoms.positions
        return ((p - p.mean(axis=0)) / 3.0).astype(np.float32)


@dataclass(frozen=True)
class CalibratedFactory:
    path: str

    def __call__(self):
        return LTAUCalculator(EMT(), LTAUEstimator.load(self.path), descriptors=CentredPositions(),
                              unknown_species="ignore")


def test_relax_batch_records_the_distance_trace_and_report_uses_it(calibrated, tmp_path):
    import json

    from sim_standins import batch_systems

    from ltau_ase.cli import report
    from ltau_ase.is2rs import FAILURE_FEATURES_WITH_DISTANCE, FailureModel
    from ltau_ase.simulate.batch import load_results, relax_batch

    est, _ = calibrated
    est.save(tmp_path / "cal.ltau")
    systems = batch_systems(4, bad=False)
    db = str(tmp_path / "relax.db")
    relax_batch(systems, db, CalibratedFactory(str(tmp_path / "cal.ltau")), steps=8, progress=False,
                references=systems)
    records = load_results(db)
    assert len(records) == 4
    for rec, initial in zip(records, systems):
        free = initial.get_tags() > 0
        assert rec.distance_trace.shape == rec.trace.shape
        # brute force: the mean free-atom distance ratio of the initial and final structures
        for atoms, stat in ((initial, "initial"), (rec.atoms, "final")):
            r = est.predict(CentredPositions()(atoms))["distance_ratio"][free].mean()
            assert getattr(rec, f"distance_ratio_{stat}") == pytest.approx(r, rel=1e-5)
        assert rec.distance_ratio_max == pytest.approx(rec.distance_trace.max())
        assert rec.distance_ratio_mean == pytest.approx(rec.distance_trace.mean())
    # ltau report: a model with the distance trace is applied to these rows
    rng = np.random.default_rng(0)
    calib = [{"uq_initial": u, "uq_max": u, "uq_mean": u, "uq_final": u, "nsteps": 10, "rmsd": rm,
              "distance_ratio_initial": d, "distance_ratio_max": d, "distance_ratio_mean": d,
              "distance_ratio_final": d}
             for u, d, rm in zip(rng.uniform(0, 1, 40), rng.uniform(0.5, 3, 40), np.r_[np.full(20, 0.1),
                                                                                      np.full(20, 0.9)])]
    model = FailureModel(features=FAILURE_FEATURES_WITH_DISTANCE).fit(calib)
    (tmp_path / "fail.json").write_text(json.dumps(model.to_dict()))
    out = tmp_path / "rep"
    args = report_args(["--db", db, "--output", str(out), "--failure-model", str(tmp_path / "fail.json")])
    assert report.run(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    np.testing.assert_allclose([row["p_fail"] for row in metrics["systems"]], model.predict_proba(metrics["systems"]))
    # fitting with the distance features reads them from the rows (4 systems: too few to fit, said so)
    args = report_args(["--db", db, "--output", str(out), "--fit-failure-model", str(tmp_path / "f2.json"),
                        "--failure-features", "uq+distance"])
    with pytest.raises(ValueError, match="at least 5 relaxations"):
        report.run(args)


def report_args(argv):
    import argparse

    from ltau_ase.cli import report

    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    return parser.parse_args(argv)


def test_report_says_when_rows_lack_the_distance_trace(tmp_path):
    from sim_standins import StandInFactory, batch_systems

    from ltau_ase.cli import report
    from ltau_ase.simulate.batch import relax_batch

    systems = batch_systems(2, bad=False)
    db = str(tmp_path / "relax.db")
    relax_batch(systems, db, StandInFactory(), steps=3, progress=False, references=systems)
    args = report_args(["--db", db, "--output", str(tmp_path / "rep"), "--fit-failure-model",
                        str(tmp_path / "f.json"), "--failure-features", "uq+distance"])
    with pytest.raises(ValueError, match="lack the uq\\+distance trace features"):
        report.run(args)
