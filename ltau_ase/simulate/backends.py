"""Model backends: how a model file becomes an ASE calculator with descriptors, found by the file.

The simulation layer is model-agnostic: it names no model family. A *backend* (``ltau_ase.nequip``
today; a compiled model, MACE, ... later) plugs in by registering a :class:`ModelBackend` that

- ``claims(path)``: says which model files it understands (e.g. by suffix; without importing torch);
- ``calculator(path, device=..., **kw)``: loads one as an ASE calculator that fills
  ``results["descriptors"]`` ((N, D) float32) in the same call that computes energy and forces;
- ``fingerprint(path)``: a string identifying the model's weights (default the file's SHA-256), which
  ``ltau fit`` stores in the estimator as ``metadata["model_sha256"]`` and
  :meth:`LTAUCalculator.from_model` checks (:func:`ltau_ase.core.fileformat.check_model_fingerprint`);
- ``ltau_factory(...)`` / ``committee_factory(...)``: picklable, hashable recipes for batch runs
  (:func:`ltau_ase.simulate.batch.relax_batch` builds one calculator per worker from them).

Backends are found in two places, both read lazily on the first lookup:

- the built-in ones listed in :data:`ltau_ase.BUILTIN_BACKENDS` (``name -> "module:attribute"``);
- entry points of the group ``ltau_ase.backends`` declared by installed packages, e.g. in a plug-in's
  ``setup.cfg``::

      [options.entry_points]
      ltau_ase.backends =
          mymodel = my_package.ltau_backend:backend

  (like nequip's own ``nequip.extension`` group). The attribute is a :class:`ModelBackend` instance,
  or a class / zero-argument callable returning one.

:func:`register_backend` adds one at run time (tests, notebooks). Lookup order: registered at run
time, then built-in, then entry points; the first backend that claims a file wins.
"""
from __future__ import annotations

import importlib
import threading
from collections.abc import Hashable, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

from ltau_ase.core.fileformat import sha256_file

ENTRY_POINT_GROUP = "ltau_ase.backends"


class ModelBackend:
    """Base class of a model backend; subclasses override the hooks they support.

    Attributes:
        name: short unique name (e.g. ``"nequip"``), shown in messages.
        suffixes: file-name endings this backend claims (``claims`` matches them by default).
    """

    name: str = ""
    suffixes: tuple[str, ...] = ()

    def claims(self, path: str | PathLike) -> bool:
        """True when this backend understands the model file ``path`` (cheap: no model loading)."""
        return Path(path).name.endswith(tuple(self.suffixes)) if self.suffixes else False

    def calculator(self, path: str | PathLike, device: str = "cpu", **kwargs: Any) -> Any:
        """An ASE calculator for the model in ``path`` that fills ``results["descriptors"]`` (N, D)."""
        raise NotImplementedError(f"backend {self.name!r} cannot load model files")

    def fingerprint(self, path: str | PathLike) -> str:
        """Identifies the model's weights; stored by ``ltau fit`` as ``metadata["model_sha256"]``."""
        return sha256_file(path)

    def ltau_factory(self, model_path: str, estimator_path: str, **kwargs: Any) -> Hashable:
        """Picklable, hashable ``() -> LTAUCalculator`` for batch runs."""
        raise NotImplementedError(f"backend {self.name!r} provides no batch factory")

    def committee_factory(self, model_paths: Sequence[str], **kwargs: Any) -> Hashable:
        """Picklable, hashable ``() -> CommitteeCalculator`` of the member models, for batch runs."""
        raise NotImplementedError(f"backend {self.name!r} provides no committee factory")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, suffixes={tuple(self.suffixes)!r})"


_REGISTERED: dict[str, ModelBackend] = {}  # register_backend(), looked up first
_DISCOVERED: dict[str, ModelBackend] | None = None  # built-in + entry points, loaded once
_LOCK = threading.Lock()


def _instantiate(obj: Any, origin: str) -> ModelBackend:
    backend = obj() if isinstance(obj, type) or (callable(obj) and not isinstance(obj, ModelBackend)) else obj
    if not isinstance(backend, ModelBackend):
        raise TypeError(f"backend {origin} is a {type(backend).__name__}; expected a ltau_ase.simulate.backends."
                        "ModelBackend (or a class / callable returning one)")
    return backend


def _load_spec(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


def _discover() -> dict[str, ModelBackend]:
    global _DISCOVERED
    with _LOCK:
        if _DISCOVERED is not None:
            return _DISCOVERED
        import ltau_ase

        found: dict[str, ModelBackend] = {}
        for name, spec in getattr(ltau_ase, "BUILTIN_BACKENDS", {}).items():
            found[name] = _instantiate(_load_spec(spec), f"{name} = {spec}")
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name not in found:  # an installed copy of a built-in one declares the same name
                found[ep.name] = _instantiate(ep.load(), f"{ep.name} = {ep.value} (entry point)")
        _DISCOVERED = found
        return found


def register_backend(backend: ModelBackend, replace: bool = False) -> ModelBackend:
    """Register ``backend`` (looked up before the built-in and entry-point ones); returns it.

    Raises ValueError when a backend of the same name is registered already and ``replace`` is False.
    """
    backend = _instantiate(backend, repr(backend))
    if not backend.name:
        raise ValueError(f"{backend!r} has no name; set the class attribute name")
    with _LOCK:
        if backend.name in _REGISTERED and not replace:
            raise ValueError(f"a backend named {backend.name!r} is registered already; pass replace=True")
        _REGISTERED[backend.name] = backend
    return backend


def unregister_backend(name: str) -> None:
    """Remove a backend added by :func:`register_backend` (no error when absent)."""
    with _LOCK:
        _REGISTERED.pop(name, None)


def registered_backends() -> list[ModelBackend]:
    """Every known backend, in lookup order."""
    discovered = _discover()
    with _LOCK:
        own = list(_REGISTERED.values())
    return own + [b for name, b in discovered.items() if name not in _REGISTERED]


def get_backend(name: str) -> ModelBackend:
    """The backend called ``name``; ValueError listing the known ones otherwise."""
    for backend in registered_backends():
        if backend.name == name:
            return backend
    raise ValueError(f"no model backend named {name!r}; known: {[b.name for b in registered_backends()]}")


def backend_for(path: str | PathLike) -> ModelBackend:
    """The first backend that claims the model file ``path``.

    Raises:
        ValueError: no backend claims it (the message lists the backends and their file types).
    """
    backends = registered_backends()
    for backend in backends:
        if backend.claims(path):
            return backend
    known = ", ".join(f"{b.name} ({' '.join(b.suffixes) or 'custom'})" for b in backends) or "none"
    raise ValueError(f"no model backend claims {str(path)!r}; known backends: {known}. Install the extra of the "
                     f"backend (e.g. pip install 'ltau-ase[nequip]') or register one "
                     f"(ltau_ase.simulate.backends.register_backend, entry point group {ENTRY_POINT_GROUP!r})")


__all__ = ["ENTRY_POINT_GROUP", "ModelBackend", "backend_for", "get_backend", "register_backend",
           "registered_backends", "unregister_backend"]
