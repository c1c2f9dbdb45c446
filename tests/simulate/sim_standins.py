"""Stand-ins for the simulation-layer tests: an estimator with known outputs, a descriptor callable,
a calculator whose per-atom uncertainties follow a scripted per-structure sequence, and small EMT
systems (Cu/Pt slabs with adsorbates, bulk layers fixed by FixAtoms, OC20-style tags)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
from ase.build import add_adsorbate, fcc111
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms


class StandInEstimator:
    """Duck-typed LTAUEstimator with closed-form outputs on 2-d descriptors (d0, d1):
    uncertainty = sigmoid(d0), confidence = 1 - uncertainty, expected_error = 0.1 * |d1| (eV/Å),
    distance = sqrt(d0² + d1²)."""

    n_features_in_ = 2

    def __init__(self, species=(1, 6, 8, 29, 78)):
        self.species_ = np.array(sorted(species))
        self.metadata = {}
        self.n_predict = 0
        self.thresholds = []
        self.policies = []

    def predict(self, descriptors, threshold=None, atomic_numbers=None, unknown_species=None):
        d = np.asarray(descriptors, dtype=np.float64)
        assert d.ndim == 2 and d.shape[1] == 2
        self.n_predict += 1
        self.thresholds.append(threshold)
        self.policies.append(unknown_species)
        u = expected_uncertainty(d)
        out = {"uncertainty": u, "confidence": 1.0 - u, "expected_error": 0.1 * np.abs(d[:, 1]),
               "distance": np.hypot(d[:, 0], d[:, 1])}
        if atomic_numbers is not None:
            unknown = ~np.isin(atomic_numbers, self.species_)
            if unknown.any() and (unknown_species or "raise") == "raise":
                raise ValueError(f"elements {sorted(set(np.asarray(atomic_numbers)[unknown].tolist()))} never seen "
                                 "in training")
            if unknown_species != "flag":
                unknown[:] = False
            out["uncertainty"][unknown], out["confidence"][unknown], out["expected_error"][unknown] = 1, 0, np.nan
            out["unknown_species"] = unknown
        return out


def expected_uncertainty(d):
    return 1.0 / (1.0 + np.exp(-d[:, 0]))


class CountingDescriptors:
    """descriptors(atoms) = (z - mean z, Z / 10), counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, atoms):
        self.calls += 1
        z = atoms.positions[:, 2]
        return np.stack([z - z.mean(), atoms.numbers / 10.0], axis=1)


class CountingEMT(EMT):
    """EMT that counts its computations (one per structure when caching works)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.n_calc = 0

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        self.n_calc += 1
        super().calculate(atoms, properties or ["energy"], system_changes)


class ScriptedUQCalculator(Calculator):
    """EMT energies/forces plus per-atom 'uncertainties' whose maximum over atoms is
    ``sequence[k]`` for the k-th structure computed (k = 0 is the first); the atoms' values are
    ``sequence[k] * weights`` with weights in (0, 1], max 1. Extra keys hold scaled copies."""

    implemented_properties = ["energy", "free_energy", "forces", "stress", "uncertainties",
                              "expected_force_errors", "latent_distances"]

    def __init__(self, sequence, weights=None):
        super().__init__()
        self.sequence = list(sequence)
        self.weights = weights
        self.base = EMT()
        self.n_calc = 0

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.base.calculate(self.atoms, ["energy", "forces"], all_changes)
        n = len(self.atoms)
        w = np.linspace(0.25, 1.0, n) if self.weights is None else np.asarray(self.weights)
        value = self.sequence[min(self.n_calc, len(self.sequence) - 1)]
        self.results = {k: self.base.results[k] for k in ("energy", "free_energy", "forces", "stress")}
        self.results["uncertainties"] = value * w
        self.results["expected_force_errors"] = 2.0 * value * w
        self.results["latent_distances"] = 3.0 * value * w
        self.n_calc += 1


def make_slab(metal="Cu", adsorbate="O", size=(2, 2, 3), seed=0, rattle=0.05):
    """fcc(111) slab, bottom layer fixed (tag 3 by ase -> OC20 tags: 0 bulk, 1 surface, 2 ads)."""
    slab = fcc111(metal, size=size, vacuum=6.0)
    layer_tags = slab.get_tags()  # 1 = top layer ... size[2] = bottom
    oc20 = np.where(layer_tags == size[2], 0, 1)
    slab.set_tags(oc20)
    add_adsorbate(slab, adsorbate, 1.8, "fcc")
    tags = slab.get_tags()
    tags[-1] = 2
    slab.set_tags(tags)
    slab.set_constraint(FixAtoms(mask=slab.get_tags() == 0))
    slab.info.pop("adsorbate_info", None)  # a dict: extxyz cannot write it
    rng = np.random.default_rng(seed)
    free = slab.get_tags() > 0
    pos = slab.get_positions()
    pos[free] += rng.normal(scale=rattle, size=(free.sum(), 3))
    slab.set_positions(pos)
    return slab


# ---------------------------------------------------------------------------- batch stand-ins
FACTORY_CALLS: list[int] = []  # thread ids of factory calls in this process


class SlowEMT(EMT):
    """EMT that sleeps ``delay`` s per computation, so a batch can be killed half-way."""

    def __init__(self, delay=0.0, **kwargs):
        super().__init__(**kwargs)
        self.delay = delay

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        if self.delay:
            time.sleep(self.delay)
        super().calculate(atoms, properties or ["energy"], system_changes)


@dataclass(frozen=True)
class StandInFactory:
    """Picklable, hashable calculator factory: LTAUCalculator(SlowEMT, StandInEstimator, descriptors)."""

    delay: float = 0.0

    def __call__(self):
        from ltau_ase.simulate.calculator import LTAUCalculator

        FACTORY_CALLS.append(threading.get_ident())
        return LTAUCalculator(SlowEMT(self.delay), StandInEstimator(), descriptors=CountingDescriptors())


def batch_systems(n=10, bad=True):
    """n small named slabs (Cu or Pt, O or C adsorbate, 9 atoms), plus two built to fail:
    'overlap' (two atoms 0.1 Å apart: exploding forces) and 'unknown' (N, absent from the
    stand-in estimator's species: ValueError)."""
    systems = []
    for i in range(n):
        a = make_slab(metal="Cu" if i % 2 == 0 else "Pt", adsorbate="O" if i % 3 else "C", size=(2, 2, 2),
                      seed=i, rattle=0.08)
        a.info["name"] = f"sys{i:02d}"
        a.info["group"] = "in" if i < n // 2 else "out"
        systems.append(a)
    if bad:
        a = make_slab(size=(2, 2, 2))
        a.positions[-1] = a.positions[-2] + [0.1, 0.0, 0.0]
        a.info["name"] = "overlap"
        systems.insert(n // 2, a)
        a = make_slab(adsorbate="N", size=(2, 2, 2))
        a.info["name"] = "unknown"
        systems.insert(2, a)
    return systems


# factories importable as --factory sim_standins:NAME by the CLI tests
STANDIN_FACTORY = StandInFactory()


def scripted_md_calculator():
    """Per-structure max uncertainty 0.1 for structures 0-4, 0.9 from structure 5 on."""
    return ScriptedUQCalculator([0.1] * 5 + [0.9] * 100)
