"""The nequip model backend: plugs nequip model files into the model-agnostic simulation layer.

Registered as the built-in backend ``"nequip"`` (:data:`ltau_ase.BUILTIN_BACKENDS`), so
``LTAUCalculator.from_model("run/last.ckpt", "model.ltau")`` finds it by the file name. This module
imports neither torch nor nequip at import time (claiming a file must stay cheap); loading a model
does.

Batch recipes (picklable, hashable by value, so a Dask worker builds each one once):
:class:`NequIPLTAUFactory` (one model + estimator → ``LTAUCalculator``) and
:class:`NequIPCommitteeFactory` (M models → ``CommitteeCalculator``, the deep-ensemble baseline).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any

from ltau_ase.simulate.backends import ModelBackend

#: eager model files, which expose the latent features (checkpoints built by ltau_ase.nequip.safe_load;
#: .nequip.zip packages only with trusted=True)
EAGER_SUFFIXES = (".ckpt", ".nequip.zip")
#: nequip-compile outputs (AOTI, TorchScript), loaded by :mod:`ltau_ase.nequip.compiled` when they
#: output the latent features (``ltau compile`` / ``nequip-compile --output-fields ... node_features``)
AOTI_SUFFIXES = (".nequip.pt2", ".nequip.pth")


class NequIPBackend(ModelBackend):
    """nequip 0.19 checkpoints (``.ckpt``) and ``nequip-package`` files (``.nequip.zip``)."""

    name = "nequip"
    suffixes = EAGER_SUFFIXES + AOTI_SUFFIXES

    def calculator(self, path: str | PathLike, device: str = "cpu", **kwargs: Any):
        """``LatentNequIPCalculator.from_model_file(path, device, **kwargs)`` (torch is imported here)."""
        from ltau_ase.nequip.calculator import LatentNequIPCalculator

        return LatentNequIPCalculator.from_model_file(path, device=device, **kwargs)

    def fingerprint(self, path: str | PathLike) -> str:
        """The file's SHA-256; for a compiled file, that of the checkpoint it was compiled from.

        ``ltau compile`` records the source checkpoint's SHA-256 in the compiled file's metadata
        (``ltau_source``), so an estimator fitted for the checkpoint matches its compiled model and
        one fitted for another checkpoint does not. Read from the archive without loading its code.
        """
        if str(path).endswith(AOTI_SUFFIXES):
            from ltau_ase.nequip.compiled import recorded_source_sha256

            return recorded_source_sha256(path)
        return super().fingerprint(path)

    def ltau_factory(self, model_path: str, estimator_path: str, **kwargs: Any) -> "NequIPLTAUFactory":
        return NequIPLTAUFactory(str(model_path), str(estimator_path), **kwargs)

    def committee_factory(self, model_paths: Sequence[str], **kwargs: Any) -> "NequIPCommitteeFactory":
        return NequIPCommitteeFactory(tuple(str(p) for p in model_paths), **kwargs)


@dataclass(frozen=True)
class NequIPLTAUFactory:
    """Picklable recipe for ``LTAUCalculator.from_model(model_path, estimator_path, ...)`` of a nequip model.

    Frozen (hashable by value), so a worker recognises the same recipe and builds it once.
    """

    model_path: str
    estimator_path: str
    device: str = "cpu"
    threshold: float | None = None
    allow_model_mismatch: bool = False
    #: unknown-element policy ("raise" | "flag" | "ignore"); None: the estimator's own
    unknown_species: str | None = None
    #: nequip's type-name mapping (True: the model's type names are chemical symbols); None: nequip's default
    chemical_species_to_atom_type_map: bool | None = None

    def __call__(self):
        from ltau_ase.simulate.calculator import LTAUCalculator

        loader = {} if self.chemical_species_to_atom_type_map is None else {
            "chemical_species_to_atom_type_map": self.chemical_species_to_atom_type_map}
        return LTAUCalculator.from_model(self.model_path, self.estimator_path, device=self.device,
                                         threshold=self.threshold, allow_model_mismatch=self.allow_model_mismatch,
                                         unknown_species=self.unknown_species, backend=NequIPBackend.name, **loader)


@dataclass(frozen=True)
class NequIPCommitteeFactory:
    """Picklable, hashable recipe for a ``CommitteeCalculator`` of nequip models.

    For :func:`ltau_ase.simulate.batch.relax_batch` (each worker builds it once). ``model_paths``
    are ``.ckpt`` / ``.nequip.zip`` files of the members, loaded with
    ``LatentNequIPCalculator.from_model_file`` (checkpoints are verified against an allow-list of exact
    nequip classes; ``.nequip.zip`` packages carry code and are refused unless trusted).
    """

    model_paths: tuple[str, ...]
    device: str = "cpu"

    def __call__(self):
        from ltau_ase.simulate.committee import CommitteeCalculator

        backend = NequIPBackend()
        return CommitteeCalculator([backend.calculator(p, device=self.device) for p in self.model_paths])


__all__ = ["NequIPBackend", "NequIPCommitteeFactory", "NequIPLTAUFactory"]
