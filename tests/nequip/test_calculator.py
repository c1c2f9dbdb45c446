"""LTAUCalculator around the nequip adapter: physics unchanged, one forward pass, invariances, errors."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

pytest.importorskip("nequip")

from ase.md.langevin import Langevin  # noqa: E402
from ase.optimize import BFGS  # noqa: E402
from ase import units  # noqa: E402

from ltau_ase.core.errorlog import ErrorLog  # noqa: E402
from ltau_ase.core.estimator import LTAUEstimator  # noqa: E402
from ltau_ase.core.fileformat import sha256_file  # noqa: E402
from ltau_ase.nequip.calculator import LatentNequIPCalculator  # noqa: E402
from ltau_ase.nequip.descriptors import extract_descriptors  # noqa: E402
from ltau_ase.simulate.calculator import LTAUCalculator  # noqa: E402

pytestmark = pytest.mark.slow
PER_ATOM = ("uncertainties", "confidences", "expected_force_errors", "latent_distances")


@pytest.fixture(scope="module")
def training_set(latent_calc, tiny_nequip_run):
    """Descriptors, errors and atomic numbers of the training atoms, in the error log's atom order."""
    ids, desc = extract_descriptors(latent_calc, tiny_nequip_run.frames, progress=False)
    numbers = np.concatenate([a.numbers for a in tiny_nequip_run.frames])
    log = ErrorLog(tiny_nequip_run.error_log_dir)
    row = {int(i): r for r, i in enumerate(ids)}
    rows = np.array([row[int(i)] for i in log.atom_ids])  # KeyError = log atom missing from frames
    return log.atom_ids, desc[rows], np.asarray(log.errors()), numbers[rows]


@pytest.fixture(scope="module")
def estimator_file(training_set, tiny_nequip_run, tmp_path_factory):
    ids, desc, errors, numbers = training_set
    est = LTAUEstimator(k=5, metadata={"model_sha256": sha256_file(tiny_nequip_run.checkpoint)})
    est.fit(desc, errors, atomic_numbers=numbers, atom_ids=ids)
    path = tmp_path_factory.mktemp("ltau_est") / "tiny.ltau"
    est.save(str(path))
    return path


@pytest.fixture(scope="module")
def ltau_calc(tiny_nequip_run, estimator_file):
    return LTAUCalculator.from_nequip(tiny_nequip_run.checkpoint, estimator_file, chemical_species_to_atom_type_map=True)


@pytest.fixture
def atoms(tiny_nequip_run, request):
    """A rattled training frame, different in every test (so no test sees another's cached results)."""
    a = tiny_nequip_run.frames[5].copy()
    a.calc = None
    a.rattle(0.05, seed=zlib.crc32(request.node.name.encode()))
    return a


class ForwardCounter:
    """Counts calls of a torch module through a forward hook (independent of the calculator code)."""

    def __init__(self, module):
        self.n = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.n += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def uq(atoms, calc):
    atoms = atoms.copy()
    atoms.calc = calc
    return {k: calc.get_property(k, atoms) for k in PER_ATOM}


def test_energy_and_forces_equal_bare_nequip_calculator(ltau_calc, tiny_nequip_run, atoms):
    from nequip.integrations.ase import NequIPCalculator

    bare = NequIPCalculator._from_saved_model(
        str(tiny_nequip_run.checkpoint), device="cpu", chemical_species_to_atom_type_map=True
    )
    a, b = atoms.copy(), atoms.copy()
    a.calc, b.calc = ltau_calc, bare
    assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), rel=1e-6, abs=1e-6)
    np.testing.assert_allclose(a.get_forces(), b.get_forces(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(a.get_stress(), b.get_stress(), rtol=1e-6, atol=1e-7)


def test_uncertainties_through_ase_and_one_forward_pass_per_step(ltau_calc, atoms):
    atoms.calc = ltau_calc
    with ForwardCounter(ltau_calc.calc.model) as count:
        atoms.get_potential_energy()
        forces = atoms.get_forces()
        u = atoms.calc.get_property("uncertainties", atoms)
        m = atoms.calc.get_property("max_uncertainty", atoms)
        assert count.n == 1
        atoms.positions[0, 2] += 0.02  # a new structure: exactly one more pass
        u2 = atoms.calc.get_property("uncertainties", atoms)
        atoms.get_forces()
        assert count.n == 2
    assert forces.shape == (len(atoms), 3)
    assert u.shape == u2.shape == (len(atoms),) and np.all((u >= 0) & (u <= 1))
    assert m == pytest.approx(u.max())
    res = atoms.calc.results
    np.testing.assert_allclose(res["confidences"], 1.0 - res["uncertainties"], atol=1e-12)
    assert np.all(res["expected_force_errors"] > 0) and np.all(res["latent_distances"] >= 0)


def test_uq_equals_estimator_on_batch_extracted_descriptors(ltau_calc, atoms, estimator_file):
    """The calculator's UQ equals the estimator applied to independently batch-extracted descriptors."""
    frame = atoms.copy()
    frame.info["frame_id"] = 0
    _, desc = extract_descriptors(ltau_calc.calc, [frame], progress=False)
    expected = LTAUEstimator.load(str(estimator_file)).predict(desc)
    got = uq(atoms, ltau_calc)
    np.testing.assert_allclose(got["uncertainties"], expected["uncertainty"], atol=1e-6)
    np.testing.assert_allclose(got["latent_distances"], expected["distance"], rtol=1e-5, atol=1e-6)


def test_uq_invariant_to_rotation_translation_and_permutation(ltau_calc, atoms):
    ref = uq(atoms, ltau_calc)
    assert ref["uncertainties"].std() > 0 or ref["latent_distances"].std() > 0  # a non-trivial check

    rotated = atoms.copy()
    rotated.rotate(37.0, (1.0, 2.0, 0.5), rotate_cell=True)
    shifted = atoms.copy()
    shifted.translate((0.7, -1.3, 2.1))
    for moved in (rotated, shifted):
        got = uq(moved, ltau_calc)
        for k in PER_ATOM:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=k)

    perm = np.random.default_rng(1).permutation(len(atoms))
    got = uq(atoms[perm], ltau_calc)
    for k in PER_ATOM:
        np.testing.assert_allclose(got[k], ref[k][perm], rtol=1e-4, atol=1e-5, err_msg=k)


def test_bfgs_relaxation_with_calculator_attached(ltau_calc, atoms):
    atoms.calc = ltau_calc
    seen = []
    opt = BFGS(atoms, logfile=None)
    opt.attach(lambda: seen.append(atoms.calc.get_property("max_uncertainty", atoms)))
    with ForwardCounter(ltau_calc.calc.model) as count:
        e0 = atoms.get_potential_energy()
        opt.run(fmax=0.05, steps=8)
        e1 = atoms.get_potential_energy()
    assert e1 < e0
    assert len(seen) == opt.nsteps + 1 and all(0.0 <= s <= 1.0 for s in seen)
    # one pass per structure: the start plus one after each BFGS step (energy/UQ reads reuse it)
    assert count.n == opt.nsteps + 1


def test_langevin_20_steps_one_forward_pass_each(ltau_calc, atoms):
    from ase.constraints import FixCom

    atoms.calc = ltau_calc
    atoms.set_constraint(FixCom())
    dyn = Langevin(atoms, 1.0 * units.fs, temperature_K=300, friction=0.02, fixcm=False,
                   rng=np.random.default_rng(0), logfile=None)
    seen = []
    dyn.attach(lambda: seen.append(atoms.calc.get_property("uncertainties", atoms).copy()))
    with ForwardCounter(ltau_calc.calc.model) as count:
        dyn.run(20)
    assert dyn.nsteps == 20
    assert count.n == 21  # the initial forces + one evaluation per MD step, UQ included
    assert len(seen) == 21 and all(s.shape == (len(atoms),) for s in seen)
    assert not np.allclose(seen[0], seen[-1])  # the UQ follows the trajectory


def test_model_hash_mismatch_raises_unless_allowed(tiny_nequip_run, estimator_file, tmp_path):
    est = LTAUEstimator.load(str(estimator_file))
    est.metadata = {"model_sha256": "0" * 64}
    wrong = tmp_path / "wrong_hash.ltau"
    est.save(str(wrong))
    with pytest.raises(ValueError, match="sha256.*allow_model_mismatch"):
        LTAUCalculator.from_nequip(tiny_nequip_run.checkpoint, wrong, chemical_species_to_atom_type_map=True)
    with pytest.warns(UserWarning, match="allow_model_mismatch"):
        calc = LTAUCalculator.from_nequip(
            tiny_nequip_run.checkpoint, wrong, allow_model_mismatch=True, chemical_species_to_atom_type_map=True
        )
    assert isinstance(calc.calc, LatentNequIPCalculator)


def test_descriptor_dimension_mismatch_raises(latent_calc, training_set, atoms):
    ids, desc, errors, numbers = training_set
    wider = LTAUEstimator(k=5).fit(np.hstack([desc, desc[:, :1]]), errors, atomic_numbers=numbers)
    atoms.calc = LTAUCalculator(latent_calc, wider)
    with pytest.raises(ValueError, match=r"shape \(\d+, 8\), expected \(\d+, 9\)"):
        atoms.calc.get_property("uncertainties", atoms)


def test_unknown_elements_raise(latent_calc, training_set, tiny_nequip_run, atoms):
    ids, desc, errors, numbers = training_set
    cu_only = numbers == 29
    est = LTAUEstimator(k=5).fit(desc[cu_only], errors[:, cu_only], atomic_numbers=numbers[cu_only])
    assert (atoms.numbers != 29).any()
    atoms.calc = LTAUCalculator(latent_calc, est)
    with pytest.raises(ValueError, match="never appear in the training set"):
        atoms.calc.get_property("uncertainties", atoms)

    gold = atoms.copy()  # an element even the model does not know
    gold.numbers[0] = 79
    gold.calc = LTAUCalculator(latent_calc, est)
    with pytest.raises(ValueError, match=r"elements \['Au'\]"):
        gold.get_forces()


def test_symbol_type_names_load_without_nequip_species_warning(tiny_nequip_run, atoms, latent_calc):
    """The tiny model's type names are chemical symbols: loading it without a species map (as `ltau fit` and
    `ltau md` do) maps them by identity, silently, and gives the same forces as the explicit identity map."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nequip's "chemical_species_to_atom_type_map" warning would raise
        calc = LatentNequIPCalculator.from_model_file(tiny_nequip_run.checkpoint)
    a, b = atoms.copy(), atoms.copy()
    a.calc, b.calc = calc, latent_calc
    np.testing.assert_array_equal(a.get_forces(), b.get_forces())
