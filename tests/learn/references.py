"""Reference calculators for the active-learning tests (importable by a subprocess).

``SlowEMT``: EMT that sleeps ``delay`` s per structure (the environment variable
``LTAU_TEST_REFERENCE_DELAY`` overrides it, so a campaign can be slowed down without changing its
fingerprint) and appends a line ``<sha1 of positions>`` to ``log`` for every calculation (to count
reference calls across a kill and a resume).
``FailingEMT``: EMT that raises for structures whose first atom is an element in ``raise_on`` and
returns NaN forces for ``nan_on`` (decided by the structure, so the outcome is reproducible).
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass

import numpy as np
from ase.calculators.emt import EMT


def positions_key(atoms) -> str:
    return hashlib.sha1(np.round(atoms.positions, 6).tobytes()).hexdigest()


class _SlowEMT(EMT):
    def __init__(self, delay: float, log: str) -> None:
        super().__init__()
        self.delay, self.log = delay, log

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        from ase.calculators.calculator import all_changes

        super().calculate(atoms, properties, system_changes or all_changes)
        time.sleep(float(os.environ.get("LTAU_TEST_REFERENCE_DELAY", self.delay)))
        with open(self.log, "a") as fh:
            fh.write(positions_key(self.atoms) + "\n")


@dataclass(frozen=True)
class SlowEMT:
    delay: float
    log: str

    def __call__(self):
        return _SlowEMT(self.delay, self.log)


class _FailingEMT(EMT):
    def __init__(self, raise_on: tuple, nan_on: tuple) -> None:
        super().__init__()
        self.raise_on, self.nan_on = raise_on, nan_on

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        from ase.calculators.calculator import all_changes

        symbol = atoms.get_chemical_symbols()[-1]  # the adsorbate atom
        if symbol in self.raise_on:
            raise RuntimeError(f"SCF did not converge for a structure with {symbol}")
        super().calculate(atoms, properties, system_changes or all_changes)
        if symbol in self.nan_on:
            self.results["forces"] = np.full_like(self.results["forces"], np.nan)


@dataclass(frozen=True)
class FailingEMT:
    raise_on: tuple = ()
    nan_on: tuple = ()

    def __call__(self):
        return _FailingEMT(self.raise_on, self.nan_on)
