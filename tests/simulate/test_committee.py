"""CommitteeCalculator against hand-computed committees of EMT-based members."""
import math

import numpy as np
import pytest
from ase.build import add_adsorbate, fcc111
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.optimize import BFGS

from ltau_ase.simulate.committee import CommitteeCalculator, committee_confidence


class ShiftedEMT(Calculator):
    """EMT with forces ``factor * F + shift`` (shift (3,) added to every atom) and energy ``factor * E + de``."""

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, factor=1.0, shift=(0.0, 0.0, 0.0), de=0.0):
        super().__init__()
        self.factor, self.shift, self.de = factor, np.asarray(shift, float), de
        self.emt = EMT()
        self.calls = 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.calls += 1
        e = self.emt.get_potential_energy(self.atoms)
        f = self.emt.get_forces(self.atoms)
        self.results = {"energy": self.factor * e + self.de, "free_energy": self.factor * e + self.de,
                        "forces": self.factor * f + self.shift}


@pytest.fixture
def slab():
    atoms = fcc111("Cu", size=(2, 2, 3), vacuum=5.0)
    add_adsorbate(atoms, "O", 1.6, "fcc")
    atoms.rattle(0.05, seed=1)
    atoms.set_constraint(FixAtoms(mask=atoms.get_tags() == 3))
    return atoms


def _emt(atoms):
    ref = atoms.copy()
    ref.calc = EMT()
    return ref.get_potential_energy(), ref.get_forces(apply_constraint=False)


def test_symmetric_shifts_give_exact_mean_and_hand_std(slab):
    delta = np.array([0.3, -0.4, 0.0])  # |delta| = 0.5 eV/Å
    members = [ShiftedEMT(), ShiftedEMT(shift=delta, de=0.2), ShiftedEMT(shift=-delta, de=-0.2)]
    slab.calc = CommitteeCalculator(members)
    e_ref, f_ref = _emt(slab)
    assert slab.get_potential_energy() == pytest.approx(e_ref)
    np.testing.assert_allclose(slab.get_forces(apply_constraint=False), f_ref, atol=1e-12)
    res = slab.calc.results
    # per component var over {0, +d, -d} = 2 d^2 / 3; u = sqrt(sum_c) = sqrt(2/3) * |d|
    np.testing.assert_allclose(res["uncertainties"], math.sqrt(2 / 3) * 0.5, rtol=1e-12)
    np.testing.assert_allclose(res["forces_var"], np.tile(2 * delta**2 / 3, (len(slab), 1)), atol=1e-12)
    assert res["energy_var"] == pytest.approx(2 * 0.2**2 / 3)
    assert res["forces_comm"].shape == (3, len(slab), 3)
    np.testing.assert_allclose(res["forces_comm"][1], f_ref + delta, atol=1e-12)
    np.testing.assert_allclose(res["energy_comm"], [e_ref, e_ref + 0.2, e_ref - 0.2])
    assert res["max_uncertainty"] == pytest.approx(math.sqrt(2 / 3) * 0.5)


def test_scaled_members_give_per_atom_std(slab):
    slab.calc = CommitteeCalculator([ShiftedEMT(1.0), ShiftedEMT(2.0)])
    e_ref, f_ref = _emt(slab)
    np.testing.assert_allclose(slab.get_forces(apply_constraint=False), 1.5 * f_ref, atol=1e-12)
    # members F and 2F: per component std = |F_c| / 2, so u_i = |F_i| / 2
    expected = 0.5 * np.sqrt((f_ref**2).sum(axis=1))
    np.testing.assert_allclose(slab.calc.results["uncertainties"], expected, atol=1e-12)
    assert slab.calc.results["mean_uncertainty"] == pytest.approx(expected.mean())


def test_each_member_computes_each_structure_once_and_drives_an_optimizer(slab):
    members = [ShiftedEMT(), ShiftedEMT(1.1), ShiftedEMT(0.9)]
    calc = CommitteeCalculator(members)
    slab.calc = calc
    slab.get_potential_energy(); slab.get_forces(); calc.get_property("uncertainties", slab)
    assert [m.calls for m in members] == [1, 1, 1]
    opt = BFGS(slab, logfile=None)
    opt.run(fmax=0.05, steps=30)
    assert np.isfinite(calc.results["uncertainties"]).all()
    assert slab.get_forces().shape == (len(slab), 3)


def test_implemented_properties_are_per_instance():
    before = list(Calculator.implemented_properties)
    calc = CommitteeCalculator([ShiftedEMT(), ShiftedEMT()])
    assert "uncertainties" in calc.implemented_properties and "forces_comm" in calc.implemented_properties
    assert "stress" not in calc.implemented_properties  # ShiftedEMT has none
    assert Calculator.implemented_properties == before
    assert "uncertainties" not in ShiftedEMT.implemented_properties


def test_stress_is_mean_when_all_members_have_it(slab):
    slab.calc = CommitteeCalculator([EMT(), EMT()])
    ref = slab.copy(); ref.calc = EMT()
    np.testing.assert_allclose(slab.get_stress(), ref.get_stress(), atol=1e-12)
    np.testing.assert_allclose(slab.calc.results["uncertainties"], 0.0, atol=1e-12)


def _chi3_cdf(x):
    # closed form of the chi distribution with 3 degrees of freedom (Maxwell)
    return math.erf(x / math.sqrt(2)) - math.sqrt(2 / math.pi) * x * math.exp(-x * x / 2)


def test_committee_confidence_matches_maxwell_cdf_and_monte_carlo():
    u = np.array([0.1, 0.3, 0.0, 1.0])
    p = committee_confidence(u, 0.2)
    for ui, pi in zip(u, p):
        expected = 1.0 if ui == 0 else _chi3_cdf(0.2 / (ui / math.sqrt(3)))
        assert pi == pytest.approx(expected, abs=1e-12)
    rng = np.random.default_rng(0)
    samples = rng.normal(0.0, 0.3 / math.sqrt(3), size=(200_000, 3))
    # Gaussian vectors with committee-like per-component std: sqrt(sum var) = 0.3
    assert np.mean(np.linalg.norm(samples, axis=1) <= 0.2) == pytest.approx(p[1], abs=0.005)
    assert committee_confidence(u, 0.2, scale=2.0)[1] == pytest.approx(_chi3_cdf(0.2 / (0.6 / math.sqrt(3))))


@pytest.mark.parametrize(
    "members, error, match",
    [
        ([EMT()], ValueError, "at least 2"),
        (["EMT", EMT()], TypeError, "not an ASE calculator"),
    ],
)
def test_bad_committees_raise(members, error, match):
    with pytest.raises(error, match=match):
        CommitteeCalculator(members)


def test_same_instance_twice_and_missing_forces_raise():
    emt = EMT()
    with pytest.raises(ValueError, match="twice"):
        CommitteeCalculator([emt, emt])

    class EnergyOnly(Calculator):
        implemented_properties = ["energy"]

    with pytest.raises(ValueError, match="forces"):
        CommitteeCalculator([EMT(), EnergyOnly()])
    with pytest.raises(ValueError, match="non-negative"):
        committee_confidence(np.array([-0.1]), 0.1)
    with pytest.raises(ValueError, match="scale"):
        committee_confidence(np.array([0.1]), 0.1, scale=0.0)


def test_fit_committee_scale_recovers_the_true_spread():
    from ltau_ase.simulate.committee import fit_committee_scale

    rng = np.random.default_rng(3)
    u = rng.uniform(0.05, 0.5, size=20_000)
    # true error vectors have per-component std 2 * u / sqrt(3): the committee is 2x overconfident
    errors = np.linalg.norm(rng.normal(size=(u.size, 3)) * (2.0 * u / math.sqrt(3))[:, None], axis=1)
    res = fit_committee_scale(u, errors, threshold=0.3)
    assert res["scale"] == pytest.approx(2.0, rel=0.1)
    assert res["after"] < 0.02 < res["before"]
    with pytest.raises(ValueError, match="one error per atom"):
        fit_committee_scale(u, errors[:-1], threshold=0.3)
