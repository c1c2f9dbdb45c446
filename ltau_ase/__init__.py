"""ltau-ase: Loss Trajectory Analysis for Uncertainty (LTAU) in ASE simulations.

Public names are imported lazily so that ``import ltau_ase`` stays fast and never imports
torch or nequip (those live only in :mod:`ltau_ase.nequip`).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "LTAUEstimator": "ltau_ase.core.estimator",
    "ErrorLog": "ltau_ase.core.errorlog",
    "ErrorLogWriter": "ltau_ase.core.errorlog",
    "LTAUCalculator": "ltau_ase.simulate.calculator",
    "RelaxationUQObserver": "ltau_ase.simulate.observers",
    "UncertaintyStop": "ltau_ase.simulate.observers",
}

#: model backends shipped with the package (name -> "module:attribute"), found by
#: ltau_ase.simulate.backends next to the entry points of the group "ltau_ase.backends"; importing
#: the module must not import torch (loading a model may)
BUILTIN_BACKENDS = {"nequip": "ltau_ase.nequip.backend:NequIPBackend"}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'ltau_ase' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
