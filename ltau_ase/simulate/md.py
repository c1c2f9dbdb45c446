"""Langevin MD set-up shared by the CLI, the datasets, the demo and the benchmarks."""
from __future__ import annotations

from typing import Any

import numpy as np
from ase import Atoms, units
from ase.md.langevin import Langevin


def thermalize(atoms: Atoms, temperature_K: float, rng: np.random.Generator) -> None:
    """Draw momenta at ``temperature_K`` (K), in place (ASE's ``thermalize_momenta``; older ASE:
    ``MaxwellBoltzmannDistribution``)."""
    try:
        from ase.md.velocitydistribution import thermalize_momenta  # ASE >= 3.29
    except ImportError:
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
        return
    thermalize_momenta(atoms, temperature_K=temperature_K, rng=rng)


def thermalized_langevin(atoms: Atoms, temperature_K: float, rng: np.random.Generator, timestep_fs: float = 1.0,
                         friction_per_fs: float = 0.02, **kwargs: Any) -> Langevin:
    """Momenta drawn at ``temperature_K``, then a Langevin integrator on ``atoms`` at that temperature
    (time step in fs, friction in fs⁻¹; momenta and Langevin noise from ``rng``). ``fixcm=False``: the slabs here have fixed
    bottom layers (or a ``FixCom``), so ASE's own centre-of-mass correction is not needed. ``kwargs``
    go to ``Langevin`` (e.g. ``logfile``)."""
    thermalize(atoms, temperature_K, rng)
    return Langevin(atoms, timestep=timestep_fs * units.fs, temperature_K=temperature_K,
                    friction=friction_per_fs / units.fs, fixcm=False, rng=rng, **kwargs)


def langevin_frames(atoms: Atoms, calc: Any, n_frames: int, temperature_K: float, seed: Any) -> list[Atoms]:
    """n_frames consecutive frames (copies, 1 fs apart) of a Langevin run of a copy of ``atoms`` driven
    by ``calc`` (:func:`thermalized_langevin`, ``rng = np.random.default_rng(seed)``): the structures a
    calculator meets, in order, during MD. Used to time a step as MD pays for it."""
    atoms = atoms.copy()
    atoms.calc = calc
    dyn = thermalized_langevin(atoms, temperature_K, np.random.default_rng(seed))
    frames = []
    for _ in range(n_frames):
        dyn.run(1)
        frames.append(atoms.copy())
    return frames
