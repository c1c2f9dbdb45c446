"""Class 4 of issue 9 on the nequip backend: a non-finite structure is refused before nequip builds
its neighbour list (a NaN atom used to hang it at 100 % CPU; an infinite cell gave finite numbers)."""
import faulthandler

import numpy as np
import pytest

from ltau_ase.nequip.descriptors import extract_descriptors


@pytest.fixture(autouse=True)
def no_hang():
    faulthandler.dump_traceback_later(120, exit=True)  # a hang kills the run with a traceback
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.mark.parametrize("spoil, match", [
    (lambda a: a.positions.__setitem__((3, 0), np.nan), "non-finite positions"),
    (lambda a: a.positions.__setitem__((0, 2), -np.inf), "non-finite positions"),
    (lambda a: a.cell.array.__setitem__((0, 0), np.inf), "non-finite entries"),
    (lambda a: a.cell.array.__setitem__(1, 0.0), "zero or linearly dependent"),
])
def test_latent_calculator_and_extraction_refuse_bad_geometry(latent_calc, tiny_nequip_run, spoil, match):
    atoms = tiny_nequip_run.frames[0].copy()
    spoil(atoms)
    atoms.calc = latent_calc
    with pytest.raises(ValueError, match=match):
        atoms.get_potential_energy()
    frames = [f.copy() for f in tiny_nequip_run.frames[1:4]] + [atoms]
    with pytest.raises(ValueError, match=match):
        extract_descriptors(latent_calc, frames, progress=False)
