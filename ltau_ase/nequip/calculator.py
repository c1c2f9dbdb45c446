"""NequIP ASE calculator that also returns per-atom latent descriptors.

:class:`LatentNequIPCalculator` extends nequip's own ``NequIPCalculator`` through its
``save_extra_outputs(out)`` hook: the descriptors are the per-atom invariant ``node_features`` of the
last message-passing (convnet) layer, read from the SAME model output that yields energy, forces and
stress. No second forward pass is ever made.

Load ``.ckpt`` checkpoints, ``nequip-package`` ``.nequip.zip`` files or compiled ``.nequip.pt2`` /
``.nequip.pth`` files with :meth:`LatentNequIPCalculator.from_model_file`. A compiled file must list
``node_features`` among its outputs (``ltau compile`` or ``nequip-compile --output-fields ...
node_features``, see :mod:`ltau_ase.nequip.compiled`); one without is refused with the flags to use.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch
from ase import Atoms
from ase.data import chemical_symbols
from nequip.data import AtomicDataDict
from nequip.integrations.ase import NequIPCalculator

from ltau_ase.nequip.safe_load import load_eager_model
from ltau_ase.simulate.calculator import check_finite_geometry

#: result key holding the (N, D) float32 descriptors
DESCRIPTORS_KEY = "descriptors"
#: model output field holding the latent features (last convnet output, before the readout)
LATENT_FIELD = AtomicDataDict.NODE_FEATURES_KEY

_EAGER_SUFFIXES = (".ckpt", ".nequip.zip")
_AOTI_SUFFIXES = (".pt2",)
#: nequip-compile outputs (AOTI, TorchScript); loaded by :mod:`ltau_ase.nequip.compiled`
_COMPILED_SUFFIXES = (".nequip.pt2", ".nequip.pth")


def latent_dim(model: torch.nn.Module) -> int:
    """Number D of latent features per atom of an eager nequip model.

    The latent field must consist of ``0e`` scalars only (true for NequIP's and Allegro's last
    layer), because only invariant features give rotation/reflection-invariant distances.

    Raises:
        ValueError: the model declares no ``node_features`` output (e.g. a compiled model), or the
            features contain non-scalar irreps.
    """
    irreps_out = getattr(model, "irreps_out", None)
    irreps = None if irreps_out is None else irreps_out.get(LATENT_FIELD)
    if irreps is None:
        raise ValueError(
            f"model {type(model).__name__} declares no '{LATENT_FIELD}' output; expected an eager nequip "
            "GraphModel loaded from a .ckpt or .nequip.zip file (compiled models expose no latent features)"
        )
    not_scalar = [str(ir) for _, ir in irreps if ir.l != 0 or ir.p != 1]
    if not_scalar:
        raise ValueError(
            f"model's '{LATENT_FIELD}' have irreps {irreps}, including non-scalar {sorted(set(not_scalar))}; "
            "expected only 0e scalars (the last message-passing layer's invariant output)"
        )
    return int(irreps.dim)


def _known_atomic_numbers(transforms: list) -> set[int] | None:
    """Atomic numbers the calculator's type mapper accepts (None without a type mapper)."""
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper

    for t in transforms:
        if isinstance(t, ChemicalSpeciesToAtomTypeMapper):
            return set(np.flatnonzero(t.lookup_table.detach().cpu().numpy() >= 0).tolist())
    return None


class LatentNequIPCalculator(NequIPCalculator):
    """``NequIPCalculator`` that also fills ``results["descriptors"]``.

    Results are nequip's (``energy`` eV, ``forces`` eV/Å, ``stress``, ...) plus ``descriptors``:
    (N, D) float32 per-atom invariant latent features in the model's latent units, taken from the
    forward pass that computed the energy and forces. Inference runs with autograd enabled because
    nequip computes forces as energy gradients.

    Args: those of ``nequip.integrations.ase.NequIPCalculator`` (``model`` in ``.eval()`` mode,
    ``device``, ``transforms``, unit factors). Prefer :meth:`from_model_file`.
    """

    def __init__(self, model: torch.nn.Module, device: Union[str, torch.device], **kwargs: Any) -> None:
        super().__init__(model, device, **kwargs)
        # per instance: extending the class list would change every NequIPCalculator
        self.implemented_properties = [*type(self).implemented_properties, DESCRIPTORS_KEY]
        self.descriptor_dim: int | None = self._descriptor_dim()
        self.model_path: Path | None = None
        #: hex SHA-256 of the model file's bytes the model was built from (set by from_model_file)
        self.model_sha256: str | None = None
        self._known_numbers = _known_atomic_numbers(self.transforms)

    def _descriptor_dim(self) -> int | None:
        """D of the latent features (subclass hook: compiled models read it from their metadata)."""
        return latent_dim(self.model)

    @classmethod
    def from_model_file(
        cls,
        path: Union[str, Path],
        device: Union[str, torch.device] = "cpu",
        trusted: bool = False,
        trusted_targets: Iterable[Callable[..., Any]] = (),
        chemical_species_to_atom_type_map: Optional[Union[Dict[str, str], bool]] = None,
        neighborlist_backend: Optional[str] = None,
        neighborlist_backend_kwargs: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
    ) -> "LatentNequIPCalculator":
        """Load an eager model from a ``.ckpt`` checkpoint (or, trusted only, a ``.nequip.zip`` package).

        Unless ``trusted=True``, the checkpoint is read once and its model is built from that in-memory
        copy by :func:`ltau_ase.nequip.safe_load.load_checkpoint_model`: ``torch.load(weights_only=True)``,
        and only the exact nequip classes and functions of the allow-list (plus ``trusted_targets``,
        objects such as a plugin's model builder) may be named by the file. ``.nequip.zip`` packages
        carry code and are refused unless ``trusted=True`` (then nequip's own loader reads the file).

        ``chemical_species_to_atom_type_map`` and the neighbour-list options are nequip's (as in
        ``NequIPCalculator.from_compiled_model``); None maps chemical symbols to the type names of the
        same name without nequip's warning when every type name is a chemical symbol; other keyword arguments go to the constructor (unit
        factors). The SHA-256 of the bytes the model was built from is kept as :attr:`model_sha256`.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: an AOTI ``.nequip.pt2`` file, an unknown file type, a checkpoint that fails
                verification, or an untrusted package.
        """
        path = Path(path)
        name = path.name
        if name.endswith(_COMPILED_SUFFIXES):
            if not trusted:
                raise ValueError(
                    f"{path} is a compiled model: loading it runs the native code (AOTInductor shared library) or "
                    "TorchScript code stored in the file, which cannot be verified. Pass trusted=True if you trust "
                    "the file's origin (e.g. you compiled it with `ltau compile`)"
                )
            from ltau_ase.nequip.compiled import load_compiled_calculator

            return load_compiled_calculator(path, device=device, **kwargs)
        if name.endswith(_AOTI_SUFFIXES):
            raise ValueError(
                f"{path} is an AOTI-compiled model (nequip-compile --mode aotinductor); it returns only "
                f"energies, forces and stress, not the latent '{LATENT_FIELD}' that LTAU needs. "
                "Use the training checkpoint (.ckpt) or a nequip-package file (.nequip.zip) instead."
            )
        if not name.endswith(_EAGER_SUFFIXES):
            raise ValueError(
                f"unrecognised model file {path}; expected a nequip checkpoint (.ckpt) or a "
                "nequip-package file (.nequip.zip)"
            )
        loaded = load_eager_model(path, trusted=trusted, trusted_targets=trusted_targets)
        calc = cls._from_eager_model(
            loaded.model, device, chemical_species_to_atom_type_map,
            neighborlist_backend, neighborlist_backend_kwargs, **kwargs,
        )
        calc.model_path = path
        calc.model_sha256 = loaded.sha256
        return calc

    @classmethod
    def _from_eager_model(
        cls,
        model: torch.nn.Module,
        device: Union[str, torch.device],
        chemical_species_to_atom_type_map: Optional[Union[Dict[str, str], bool]],
        neighborlist_backend: Optional[str],
        neighborlist_backend_kwargs: Optional[Dict[str, Any]],
        **kwargs: Any,
    ) -> "LatentNequIPCalculator":
        """The calculator around an eager ``GraphModel``: the type mapper and neighbour list that
        nequip's ``_from_saved_model`` builds from the model's metadata."""
        from nequip.data._nl import DEFAULT_NEIGHBORLIST_BACKEND
        from nequip.integrations.utils import basic_transforms, handle_chemical_species_map
        from nequip.nn import graph_model

        if "transforms" in kwargs:
            raise ValueError("transforms are built from the model's metadata; do not pass `transforms`")
        r_max = float(model.metadata[graph_model.R_MAX_KEY])
        type_names = model.metadata[graph_model.TYPE_NAMES_KEY].split(" ")
        if chemical_species_to_atom_type_map is None and all(t in chemical_symbols[1:] for t in type_names):
            # type names that are chemical symbols: nequip's default (identity) is the right map, so
            # spare `ltau fit` / `ltau md` users its warning on every model load
            chemical_species_to_atom_type_map = True
        species_map = handle_chemical_species_map(chemical_species_to_atom_type_map, type_names)
        transforms = basic_transforms(
            model.metadata, r_max, type_names, species_map,
            neighborlist_backend=neighborlist_backend or DEFAULT_NEIGHBORLIST_BACKEND,
            neighborlist_backend_kwargs=neighborlist_backend_kwargs,
        )
        return cls(model=model, device=device, transforms=transforms, **kwargs)

    def atoms_to_data(self, atoms: Atoms) -> AtomicDataDict.Type:
        """nequip's conversion (which builds the neighbour list), after checking that the geometry is
        finite and that the model knows every element of ``atoms``."""
        check_finite_geometry(atoms)
        if self._known_numbers is not None:
            unknown = sorted(set(atoms.numbers.tolist()) - self._known_numbers)
            if unknown:
                raise ValueError(
                    f"structure contains elements {[chemical_symbols[z] for z in unknown]} that the model does "
                    f"not know; its type map covers {[chemical_symbols[z] for z in sorted(self._known_numbers)]}"
                )
        return super().atoms_to_data(atoms)

    def save_extra_outputs(self, out: AtomicDataDict.Type) -> None:
        """Keep the last convnet's per-atom scalars of this very forward pass as (N, D) float32."""
        features = out.get(LATENT_FIELD)
        n_atoms = len(self.atoms)
        if features is None or tuple(features.shape) != (n_atoms, self.descriptor_dim):
            got = None if features is None else tuple(features.shape)
            raise RuntimeError(
                f"model output '{LATENT_FIELD}' has shape {got}; expected ({n_atoms}, {self.descriptor_dim})"
            )
        self.results[DESCRIPTORS_KEY] = np.ascontiguousarray(
            features.detach().cpu().numpy(), dtype=np.float32
        )
