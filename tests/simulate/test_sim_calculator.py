"""LTAUCalculator with ASE's EMT as base and the generic descriptors= callable path."""
from __future__ import annotations

import numpy as np
import pytest
from ase.calculators.calculator import Calculator, PropertyNotImplementedError
from ase.calculators.emt import EMT
from ase.db import connect
from ase.io import read, write
from ase.optimize import BFGS

from sim_standins import CountingDescriptors, CountingEMT, StandInEstimator, expected_uncertainty, make_slab
from ltau_ase.simulate.backends import ModelBackend, backend_for, register_backend, unregister_backend
from ltau_ase.simulate.calculator import LTAUCalculator, store_uq_in_atoms


def _wrapped(atoms, estimator=None, **kw):
    base = CountingEMT()
    desc = CountingDescriptors()
    calc = LTAUCalculator(base, estimator or StandInEstimator(), descriptors=desc, **kw)
    atoms.calc = calc
    return calc, base, desc



class EMTModelBackend(ModelBackend):
    """A registered test backend whose "model files" (*.emtmodel) load as EMT: these tests are about the
    backend lookup, the hash check and estimator loading, not about loading any real model family."""

    name = "test-emt"
    suffixes = (".emtmodel",)

    def __init__(self):
        self.loaded = []

    def calculator(self, path, device="cpu", **kwargs):
        self.loaded.append((str(path), device, kwargs))
        return EMT()


@pytest.fixture
def emt_backend():
    backend = register_backend(EMTModelBackend())
    yield backend
    unregister_backend(backend.name)


def test_results_contract_matches_base_and_independent_formula(slab):
    calc, base, desc = _wrapped(slab, threshold=0.3)
    forces = slab.get_forces()
    ref = slab.copy()
    ref.calc = EMT()
    np.testing.assert_array_equal(forces, ref.get_forces())
    assert slab.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=0)
    np.testing.assert_array_equal(slab.get_stress(), ref.get_stress())
    z = slab.positions[:, 2]
    d = np.stack([z - z.mean(), slab.numbers / 10.0], axis=1)
    u = slab.calc.get_property("uncertainties", slab)  # the normal ASE path
    np.testing.assert_allclose(u, 1 / (1 + np.exp(-(z - z.mean()))), rtol=1e-6)
    r = calc.results
    for key in ("uncertainties", "confidences", "expected_force_errors", "latent_distances"):
        assert r[key].shape == (len(slab),) and r[key].dtype == np.float64
    np.testing.assert_allclose(r["confidences"], 1 - u, rtol=1e-6)
    np.testing.assert_allclose(r["expected_force_errors"], 0.1 * slab.numbers / 10.0, rtol=1e-6)
    np.testing.assert_allclose(r["latent_distances"], np.hypot(d[:, 0], d[:, 1]), rtol=1e-6)
    assert r["max_uncertainty"] == pytest.approx(u.max())
    assert r["mean_uncertainty"] == pytest.approx(u.mean())
    assert calc.estimator.thresholds == [0.3]
    # one base computation, one descriptor call and one prediction for all properties of a structure
    assert (base.n_calc, desc.calls, calc.estimator.n_predict) == (1, 1, 1)
    assert isinstance(calc.get_property("max_uncertainty", slab), float)


def test_implemented_properties_are_per_instance(slab):
    before = list(Calculator.implemented_properties)
    before_emt = list(EMT.implemented_properties)
    calc, _, _ = _wrapped(slab)
    assert "uncertainties" in calc.implemented_properties
    assert "forces" in calc.implemented_properties and "stress" in calc.implemented_properties
    assert Calculator.implemented_properties == before and EMT.implemented_properties == before_emt
    assert "uncertainties" not in LTAUCalculator.implemented_properties
    with pytest.raises(PropertyNotImplementedError):
        calc.get_property("dipole", slab)


def test_one_base_computation_per_optimizer_step(slab):
    calc, base, desc = _wrapped(slab)
    opt = BFGS(slab, logfile=None)
    seen = []
    opt.attach(lambda: seen.append(slab.calc.get_property("uncertainties", slab)))
    opt.run(fmax=1e-4, steps=6)
    assert opt.nsteps == 6
    # initial structure + one per step, for EMT, the descriptors and the estimator alike
    assert base.n_calc == desc.calls == calc.estimator.n_predict == 7
    z = slab.positions[:, 2]
    np.testing.assert_allclose(seen[-1], 1 / (1 + np.exp(-(z - z.mean()))), rtol=1e-6)


def test_uq_only_request_computes_base_once(slab):
    calc, base, _ = _wrapped(slab)
    calc.get_property("uncertainties", slab)
    slab.get_forces()
    slab.get_potential_energy()
    assert base.n_calc == 1


def test_descriptors_from_base_results_same_pass(slab):
    class EMTWithDescriptors(CountingEMT):
        def calculate(self, atoms=None, properties=None, system_changes=None):
            super().calculate(atoms, properties, system_changes or ["positions"])
            self.results["descriptors"] = CountingDescriptors()(atoms).astype(np.float32)

    base = EMTWithDescriptors()
    slab.calc = LTAUCalculator(base, StandInEstimator())
    u = slab.calc.get_property("uncertainties", slab)
    z = slab.positions[:, 2]
    np.testing.assert_allclose(u, expected_uncertainty(np.stack([z - z.mean(), z], 1)), rtol=1e-6)
    assert base.n_calc == 1


def test_missing_descriptors_and_dimension_mismatch_raise(slab):
    slab.calc = LTAUCalculator(EMT(), StandInEstimator())
    with pytest.raises(ValueError, match="no 'descriptors'"):
        slab.get_forces()
    atoms = make_slab()
    atoms.calc = LTAUCalculator(EMT(), StandInEstimator(), descriptors=lambda a: np.zeros((len(a), 5)))
    with pytest.raises(ValueError, match=r"shape \(13, 5\), expected \(13, 2\)"):
        atoms.get_forces()
    atoms.calc = LTAUCalculator(EMT(), StandInEstimator(), descriptors=lambda a: np.zeros((3, 2)))
    with pytest.raises(ValueError, match="expected \\(13, 2\\)"):
        atoms.get_forces()


def test_unknown_species_raise_and_flag():
    atoms = make_slab(adsorbate="O")
    with pytest.raises(ValueError, match=r"\[8\] never seen"):
        _wrapped(atoms, StandInEstimator(species=(29,)))
        atoms.get_forces()
    atoms = make_slab(adsorbate="O")
    calc, _, _ = _wrapped(atoms, StandInEstimator(species=(29,)), unknown_species="flag")
    atoms.get_forces()
    r = calc.results
    o = atoms.numbers == 8
    assert r["unknown_species"].tolist() == o.tolist()
    assert np.all(r["uncertainties"][o] == 1.0) and np.all(r["confidences"][o] == 0.0)
    assert np.all(np.isnan(r["expected_force_errors"][o]))
    assert np.all(np.isfinite(r["expected_force_errors"][~o])) and np.all(r["uncertainties"][~o] < 1)
    assert r["max_uncertainty"] == 1.0
    assert calc.estimator.policies[-1] == "flag"  # the calculator passes the policy on, the estimator applies it
    with pytest.raises(ValueError, match="unknown_species must be one of"):
        LTAUCalculator(EMT(), StandInEstimator(), unknown_species="drop")


def test_store_uq_round_trips_through_extxyz_and_db(slab, tmp_path):
    calc, _, _ = _wrapped(slab)
    slab.get_forces()
    store_uq_in_atoms(slab)
    write(tmp_path / "a.extxyz", slab)
    back = read(tmp_path / "a.extxyz")
    for key in ("uncertainties", "confidences", "expected_force_errors", "latent_distances"):
        np.testing.assert_allclose(back.arrays["ltau_" + key], calc.results[key], rtol=1e-6)  # extxyz: 8 digits
    assert back.info["ltau_max_uncertainty"] == pytest.approx(calc.results["max_uncertainty"])
    with connect(tmp_path / "a.db") as db:
        db.write(slab, key_value_pairs={"ltau_max_uncertainty": slab.info["ltau_max_uncertainty"]},
                 data={k: v for k, v in slab.arrays.items() if k.startswith("ltau_")})
    row = connect(tmp_path / "a.db").get(id=1)
    np.testing.assert_allclose(row.data["ltau_uncertainties"], calc.results["uncertainties"])
    assert row.ltau_max_uncertainty == pytest.approx(calc.results["max_uncertainty"])
    with pytest.raises(ValueError, match="none of the UQ keys"):
        store_uq_in_atoms(slab, {"energy": 1.0})


def test_from_model_finds_the_backend_and_checks_the_hash(tmp_path, monkeypatch, emt_backend):
    est_mod = pytest.importorskip("ltau_ase.core.estimator")

    from ltau_ase.core.fileformat import sha256_file

    model = tmp_path / "model.emtmodel"
    model.write_bytes(b"not really a model")
    other = tmp_path / "other.emtmodel"
    other.write_bytes(b"another model")
    assert backend_for(model) is emt_backend
    est = StandInEstimator()
    est.metadata = {"model_sha256": sha256_file(other), "model_path": str(other)}
    monkeypatch.setattr(est_mod.LTAUEstimator, "load", classmethod(lambda cls, path: est))
    with pytest.raises(ValueError, match=r"sha256.*other\.emtmodel.*allow_model_mismatch=True"):
        LTAUCalculator.from_model(model, "x.ltau")
    assert emt_backend.loaded == []  # refused before loading the model
    with pytest.warns(UserWarning, match="allowed by allow_model_mismatch"):
        calc = LTAUCalculator.from_model(model, "x.ltau", allow_model_mismatch=True)
    assert isinstance(calc.calc, EMT)
    est.metadata = {"model_sha256": sha256_file(model)}
    calc = LTAUCalculator.from_model(model, "x.ltau", threshold=0.2, device="cuda", extra=1)
    assert calc.threshold == 0.2 and emt_backend.loaded[-1] == (str(model), "cuda", {"extra": 1})
    # from_nequip is an alias; a fitted estimator object works in place of a file
    assert isinstance(LTAUCalculator.from_nequip(model, est).calc, EMT)
    est.metadata = {}
    with pytest.raises(ValueError, match="records no model hash"):
        LTAUCalculator.from_model(model, est)
    with pytest.raises(ValueError, match="no model backend claims .*unknown.xyz.*test-emt"):
        LTAUCalculator.from_model(tmp_path / "unknown.xyz", est)


def test_backend_registry_rules(emt_backend):
    from ltau_ase.simulate.backends import get_backend, registered_backends

    assert registered_backends()[0] is emt_backend and get_backend("test-emt") is emt_backend
    with pytest.raises(ValueError, match="registered already"):
        register_backend(EMTModelBackend())
    with pytest.raises(TypeError, match="expected a ltau_ase.simulate.backends.ModelBackend"):
        register_backend(object())
    with pytest.raises(ValueError, match="no model backend named 'nope'"):
        get_backend("nope")
    # the built-in nequip backend claims its files without importing torch (checked in a subprocess
    # by tests/test_package.py); ModelBackend's unimplemented hooks say so
    with pytest.raises(NotImplementedError, match="no batch factory"):
        ModelBackend().ltau_factory("m", "e")


# ---------------------------------------------------------------------------- the real estimator
def _fitted_real_estimator(tmp_path=None):
    from ltau_ase.core.estimator import LTAUEstimator

    rng = np.random.default_rng(0)
    train = [make_slab(seed=s, rattle=0.2) for s in range(4)]
    desc = np.concatenate([CountingDescriptors()(a) for a in train]).astype(np.float32)
    z = np.concatenate([a.numbers for a in train])
    errors = rng.gamma(2.0, 0.05, size=(15, desc.shape[0])) * (1 + desc[:, :1].T ** 2)
    est = LTAUEstimator(k=4, index="flat", atol=0.1, distribution="exact", window=None).fit(desc, errors, atomic_numbers=z)
    return est, desc, errors


def test_real_estimator_results_equal_brute_force_knn():
    est, train_desc, errors = _fitted_real_estimator()
    atoms = make_slab(seed=11, rattle=0.2)
    atoms.calc = LTAUCalculator(EMT(), est, descriptors=CountingDescriptors())
    u = atoms.calc.get_property("uncertainties", atoms)
    r = atoms.calc.results
    q = CountingDescriptors()(atoms).astype(np.float32).astype(np.float64)
    dist = np.linalg.norm(q[:, None, :] - train_desc.astype(np.float64)[None], axis=2)
    nn = np.argsort(dist, axis=1, kind="stable")[:, :4]
    p_train = (errors <= 0.1).mean(axis=0)
    conf = p_train[nn].mean(axis=1)
    np.testing.assert_allclose(r["confidences"], conf, atol=1e-6)
    np.testing.assert_allclose(u, 1 - conf, atol=1e-6)
    np.testing.assert_allclose(r["expected_force_errors"], errors.mean(axis=0)[nn].mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(r["latent_distances"], np.take_along_axis(dist, nn, 1).mean(axis=1), rtol=1e-4,
                               atol=1e-6)
    # a tighter threshold from the constructor reaches predict through ASE's normal path
    atoms.calc = LTAUCalculator(EMT(), est, descriptors=CountingDescriptors(), threshold=0.05)
    np.testing.assert_allclose(atoms.calc.get_property("confidences", atoms),
                               (errors <= 0.05).mean(axis=0)[nn].mean(axis=1), atol=1e-6)


def test_real_estimator_unknown_species_and_saved_file_hash(tmp_path, emt_backend):

    from ltau_ase.core.fileformat import sha256_file

    est, _, _ = _fitted_real_estimator()
    atoms = make_slab(adsorbate="N")
    atoms.calc = LTAUCalculator(EMT(), est, descriptors=CountingDescriptors())
    with pytest.raises(ValueError, match=r"N \(Z=7\)"):
        atoms.get_forces()
    atoms.calc = LTAUCalculator(EMT(), est, descriptors=CountingDescriptors(), unknown_species="flag")
    atoms.get_forces()
    assert atoms.calc.results["unknown_species"].tolist() == (atoms.numbers == 7).tolist()
    assert atoms.calc.results["uncertainties"][-1] == 1.0
    flagged = atoms.calc.results
    # one vocabulary: the estimator's own policy applies when the calculator sets none ...
    est.set_params(unknown_species="flag")
    atoms.calc = LTAUCalculator(EMT(), est, descriptors=CountingDescriptors())
    atoms.get_forces()
    np.testing.assert_array_equal(atoms.calc.results["uncertainties"], flagged["uncertainties"])
    # ... "ignore" judges the N atom by its neighbours alone (the plain predict), and "warn" is "flag"
    atoms.calc = LTAUCalculator(EMT(), est, descriptors=CountingDescriptors(), unknown_species="ignore")
    atoms.get_forces()
    plain = est.predict(CountingDescriptors()(atoms).astype(np.float32))
    np.testing.assert_allclose(atoms.calc.results["uncertainties"], plain["uncertainty"])
    assert not atoms.calc.results["unknown_species"].any() and plain["uncertainty"][-1] < 1.0
    est.set_params(unknown_species="raise")

    model = tmp_path / "model.emtmodel"
    model.write_bytes(b"weights v1")
    est.metadata = {"model_sha256": sha256_file(model)}
    est.save(str(tmp_path / "est.ltau"))

    calc = LTAUCalculator.from_model(model, tmp_path / "est.ltau")
    assert calc.estimator.n_features_in_ == 2
    model.write_bytes(b"weights v2")
    with pytest.raises(ValueError, match="was fitted for a model with sha256"):
        LTAUCalculator.from_model(model, tmp_path / "est.ltau")


def test_real_estimator_along_md_equals_brute_force_knn_at_every_step():
    """Along an MD run (the calculator's per-step path: cell checked only when it changes, base
    calculator reset on each change), every step's results equal brute-force kNN on its descriptors."""
    from ase import units
    from ase.md.verlet import VelocityVerlet

    est, train_desc, errors = _fitted_real_estimator()
    atoms = make_slab(seed=11, rattle=0.2)
    calc = LTAUCalculator(EMT(), est, descriptors=CountingDescriptors())
    atoms.calc = calc
    atoms.set_momenta(np.random.default_rng(3).normal(0, 0.3, size=(len(atoms), 3)))
    p_train = (errors <= 0.1).mean(axis=0)
    dyn = VelocityVerlet(atoms, 2 * units.fs)
    for _ in range(12):
        dyn.run(1)
        q = CountingDescriptors()(atoms).astype(np.float32).astype(np.float64)
        dist = np.linalg.norm(q[:, None, :] - train_desc.astype(np.float64)[None], axis=2)
        nn = np.argsort(dist, axis=1, kind="stable")[:, :4]
        np.testing.assert_allclose(calc.results["confidences"], p_train[nn].mean(axis=1), atol=1e-6)
        np.testing.assert_allclose(calc.results["latent_distances"], np.take_along_axis(dist, nn, 1).mean(axis=1),
                                   rtol=1e-4, atol=1e-6)


def test_a_cell_made_singular_after_a_good_step_is_refused_every_time(slab, estimator):
    """The cell's SVD check runs only when the cell differs from the last one that passed: a bad cell
    must be refused on the step it appears and again on a repeated call."""
    slab.calc = LTAUCalculator(EMT(), estimator, descriptors=CountingDescriptors())
    slab.get_forces()
    slab.cell[1] = slab.cell[0]
    for _ in range(2):
        with pytest.raises(ValueError, match="linearly dependent"):
            slab.get_forces()
