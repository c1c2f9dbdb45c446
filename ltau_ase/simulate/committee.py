"""`CommitteeCalculator`: the deep-ensemble (committee) baseline, for any ASE calculators.

M member calculators (e.g. the same architecture trained from M seeds) are evaluated one after the
other on the same structure, so one step costs about M single-model steps. Results:

``energy``, ``free_energy``, ``forces``, ``stress``
    the committee mean (eV, eV/Å, eV/Å³) of the properties every member implements.
``energy_comm`` (M,), ``forces_comm`` (M, N, 3)
    the members' predictions, in member order (``forces_comm`` as in MACE's committee).
``energy_var``
    population variance (ddof=0) of the members' energies, eV².
``forces_var`` (N, 3)
    population variance (ddof=0) over members of every force component, (eV/Å)².
``uncertainties`` (N,)
    per-atom committee force uncertainty, eV/Å:
    ``u_i = sqrt(sum_c var_m(F_ic))`` with ``var_m`` the population variance over the M members and
    ``c`` the three Cartesian components, i.e. the root mean square distance of the members'
    force vectors from the committee mean force. (It is *not* a probability: LTAU's
    ``uncertainties`` lie in [0, 1]; pick stop thresholds accordingly.)
``max_uncertainty``, ``mean_uncertainty``
    max / mean of ``uncertainties`` over all atoms, eV/Å.

:func:`committee_confidence` turns ``u_i`` into a probability that the force error is below a
threshold, so that the committee can be compared with LTAU on the same calibration curves.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

MEAN_PROPERTIES = ("energy", "free_energy", "forces", "stress")
COMMITTEE_PROPERTIES = (
    "energy_comm", "forces_comm", "energy_var", "forces_var",
    "uncertainties", "max_uncertainty", "mean_uncertainty",
)


class CommitteeCalculator(Calculator):
    """Committee mean and spread of several ASE calculators.

    Parameters
    ----------
    calculators
        Two or more distinct ASE calculator instances that all implement ``energy`` and ``forces``.
        Each keeps its own cache; a structure is computed once per member.
    **kwargs
        Passed to :class:`ase.calculators.calculator.Calculator`.
    """

    def __init__(self, calculators: Sequence[Calculator], **kwargs: Any) -> None:
        calculators = list(calculators)
        if len(calculators) < 2:
            raise ValueError(f"a committee needs at least 2 calculators, got {len(calculators)}")
        for i, calc in enumerate(calculators):
            if not hasattr(calc, "get_property") or not hasattr(calc, "implemented_properties"):
                raise TypeError(f"calculators[{i}] is not an ASE calculator: {type(calc).__name__}")
        if len({id(c) for c in calculators}) != len(calculators):
            raise ValueError("the same calculator instance appears twice in the committee; pass distinct members")
        super().__init__(**kwargs)
        self.calculators = calculators
        common = [p for p in MEAN_PROPERTIES if all(p in c.implemented_properties for c in calculators)]
        missing = {"energy", "forces"} - set(common)
        if missing:
            raise ValueError(f"every committee member must implement energy and forces; {sorted(missing)} missing "
                             f"from at least one of {[type(c).__name__ for c in calculators]}")
        self._mean_properties = common
        # per instance: the class attribute of Calculator is shared by every calculator
        self.implemented_properties = common + list(COMMITTEE_PROPERTIES)

    @property
    def n_members(self) -> int:
        return len(self.calculators)

    def calculate(self, atoms: Atoms | None = None, properties: list[str] | None = None,
                  system_changes: list[str] = all_changes) -> None:
        properties = list(properties or ["energy"])
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        energies = np.array([float(c.get_property("energy", atoms)) for c in self.calculators])
        forces = np.stack([np.asarray(c.get_property("forces", atoms), dtype=np.float64) for c in self.calculators])
        if forces.shape[1:] != (len(atoms), 3):
            raise ValueError(f"a committee member returned forces of shape {forces.shape[1:]}, "
                             f"expected ({len(atoms)}, 3)")
        forces_var = forces.var(axis=0)
        uncertainties = np.sqrt(forces_var.sum(axis=1))
        self.results = {
            "energy": float(energies.mean()),
            "forces": forces.mean(axis=0),
            "energy_comm": energies,
            "forces_comm": forces,
            "energy_var": float(energies.var()),
            "forces_var": forces_var,
            "uncertainties": uncertainties,
            "max_uncertainty": float(uncertainties.max()) if len(atoms) else float("nan"),
            "mean_uncertainty": float(uncertainties.mean()) if len(atoms) else float("nan"),
        }
        if "free_energy" in self._mean_properties:
            self.results["free_energy"] = float(
                np.mean([c.get_property("free_energy", atoms) for c in self.calculators]))
        if "stress" in properties and "stress" in self._mean_properties:
            self.results["stress"] = np.mean([c.get_property("stress", atoms) for c in self.calculators], axis=0)

    def todict(self) -> dict[str, Any]:
        return {"members": [type(c).__name__ for c in self.calculators]}


def committee_confidence(uncertainties: np.ndarray, threshold: float | np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Probability that an atom's force error norm is ≤ ``threshold`` under the committee's Gaussian.

    Assumes the error vector is isotropic Gaussian with per-component variance
    ``(scale * u_i)**2 / 3`` (``u_i`` from :class:`CommitteeCalculator`), so
    ``|ΔF_i| / (scale * u_i / sqrt(3))`` follows a χ distribution with 3 degrees of freedom and
    ``P(|ΔF_i| ≤ t) = χ₃.cdf(sqrt(3) * t / (scale * u_i))``. ``u_i = 0`` gives 1 for t ≥ 0.

    Args:
        uncertainties: (n,) committee uncertainties, eV/Å, ≥ 0.
        threshold: scalar or (n,) force-error threshold, eV/Å, ≥ 0.
        scale: positive factor on the uncertainties (a recalibration; 1 = as predicted).
    Returns:
        (n,) float64 probabilities in [0, 1].
    """
    from scipy.stats import chi

    u = np.asarray(uncertainties, dtype=np.float64)
    if u.ndim != 1 or not np.all(np.isfinite(u)) or np.any(u < 0):
        raise ValueError(f"uncertainties must be a finite non-negative (n,) array, got shape {u.shape}")
    t = np.broadcast_to(np.asarray(threshold, dtype=np.float64), u.shape)
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise ValueError("threshold must be finite and ≥ 0 eV/Å")
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    sigma = scale * u / np.sqrt(3.0)
    out = np.ones_like(u)
    positive = sigma > 0
    out[positive] = chi(df=3).cdf(t[positive] / sigma[positive])
    return out


def fit_committee_scale(
    uncertainties: np.ndarray,
    errors: np.ndarray,
    threshold: float,
    bounds: tuple[float, float] = (0.05, 20.0),
    n_grid: int = 121,
    n_bins: int = 10,
) -> dict[str, float]:
    """Scale of the committee uncertainties minimising the miscalibration area on a calibration set.

    The committee counterpart of ``LTAUEstimator.fit_scale``: the confidence of atom i is
    :func:`committee_confidence` ``(u_i, threshold, scale)`` and the observed outcome
    ``errors_i <= threshold``; the count-weighted miscalibration area
    (:func:`ltau_ase.core.calibration.miscalibration_area`) is minimised by the shared
    :func:`ltau_ase.core.calibration.search_scale` over a log grid of ``n_grid`` scales in ``bounds``
    (scale 1 kept unless a grid scale is strictly better).

    Args:
        uncertainties: (n,) committee uncertainties u_i (eV/Å).
        errors: (n,) true force-error norms of the committee mean (eV/Å).
        threshold: force-error threshold (eV/Å), e.g. the LTAU ``atol_``.
    Returns:
        dict(scale=best scale, before=miscalibration at scale 1, after=at the best scale).
    """
    from ltau_ase.core.calibration import miscalibration_area, search_scale

    err = np.asarray(errors, dtype=np.float64)
    u = np.asarray(uncertainties, dtype=np.float64)
    if err.shape != u.shape:
        raise ValueError(f"errors has shape {err.shape} but uncertainties {u.shape}; expected one error per atom")
    lo, hi = (float(b) for b in bounds)
    if not (0 < lo <= 1 <= hi and np.isfinite(hi)):
        raise ValueError(f"bounds must satisfy 0 < low <= 1 <= high; got {bounds}")
    return search_scale(lambda s: miscalibration_area(committee_confidence(u, threshold, scale=s), err, threshold,
                                                      n_bins=n_bins),
                        bounds=(lo, hi), n_grid=int(n_grid), refine=False, current=1.0)

__all__ = ["COMMITTEE_PROPERTIES", "CommitteeCalculator", "committee_confidence",
           "fit_committee_scale"]
