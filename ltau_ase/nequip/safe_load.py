"""Builds the model of a nequip training checkpoint without running code named by the file.

nequip's own loader (``ModelFromCheckpoint``) unpickles a ``.ckpt`` with ``torch.load(weights_only=False)``
and resolves the Hydra ``_target_`` strings stored in it attribute by attribute, so a crafted file can run
arbitrary code twice over: through the pickle, and through a target such as
``nequip.nn.compile.os.system`` (which *resolves* to ``os.system``). :func:`load_checkpoint_model` never
hands the file to nequip. It

1. reads the file ONCE into memory (a regular file only: FIFOs and devices are refused without
   blocking) and hashes those bytes (:attr:`CheckpointModel.sha256`);
2. unpickles the bytes with ``torch.load(weights_only=True)``, which only admits tensors and plain
   containers;
3. looks every ``_target_`` of the stored model configuration up in a table of the exact classes and
   functions a checkpoint may name (:func:`allowed_targets`): the table maps each spelling under which
   nequip exposes an allowed object (``nequip.model.NequIPGNNModel`` and
   ``nequip.model.nequip_models.NequIPGNNModel``) to the object itself, checked by identity when the
   table is built. A string not in the table is refused; no string from the file is ever resolved,
   imported or handed to Hydra (the verified configuration carries the objects themselves);
4. builds the model from that verified configuration, loads the checkpoint's weights into it
   (strictly: every tensor must match by name and shape, every weight must be finite) and selects the
   evaluation weights the way the checkpoint's training module does (EMA weights for
   ``EMALightningModule``).

Only the model section (``hyper_parameters["model"]``) and the training-module class are ever acted
on: the other sections (data, trainer, callbacks, optimizer, loss) are a record of the training run and
are never resolved or instantiated, so the names they hold do not matter here.

Model plugins (e.g. Allegro) add their builder objects with :func:`allow_checkpoint_targets` or the
``trusted_targets`` argument; both take the objects, never strings.

``nequip-package`` files (``.nequip.zip``) are ``torch.package`` archives whose unpickling imports code
stored in the archive; they cannot be verified and are loaded only with ``trusted=True`` (by
:func:`load_eager_model`, which then uses nequip's own loader).
"""
from __future__ import annotations

import hashlib
import io
import os
import stat
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: Hydra keys that change how a target is called; a checkpoint's model configuration holds keyword
#: arguments only, so these are refused wherever they appear
_HYDRA_CALL_KEYS = frozenset({"_args_", "_partial_", "_recursive_", "_convert_"})
#: nequip targets that would load another, unverified, model file (named in the refusal message)
_FILE_LOADING_NAMES = ("ModelFromCheckpoint", "ModelFromPackage", "ModelTypeNamesFromPackage")
#: checkpoint key prefixes of the training module's model and EMA weights
_MODEL_PREFIX = "model."
_EMA_PREFIX = "ema."

_plugin_targets: list[Callable[..., Any]] = []


def allow_checkpoint_targets(*objects: Callable[..., Any]) -> None:
    """Allow checkpoints to name these exact classes or functions (model plugins such as Allegro).

    Call once, e.g. at import of the plugin's integration::

        from allegro.model import AllegroModel
        allow_checkpoint_targets(AllegroModel)

    Raises:
        TypeError: an argument is a string (names are never trusted, objects are) or not callable.
    """
    for obj in objects:
        _check_target_object(obj)
        if not any(obj is known for known in _plugin_targets):
            _plugin_targets.append(obj)


def _check_target_object(obj: Any) -> None:
    if isinstance(obj, str) or not callable(obj):
        raise TypeError(
            f"trusted checkpoint targets must be the class or function objects themselves, got {obj!r}; "
            "import the object and pass it (strings are never resolved, so a prefix cannot be trusted)"
        )


def nequip_model_targets() -> tuple[Callable[..., Any], ...]:
    """The nequip 0.19 objects a training checkpoint's model configuration may name.

    Model builders (``NequIPGNNModel`` and its preset/full variants, ``ZBLPairPotential``, ``modify``
    for persistent model modifiers) and the pair-potential modules a builder instantiates from a nested
    ``pair_potential`` configuration. Deliberately absent: ``ModelFromCheckpoint``,
    ``ModelFromPackage`` and ``ModelTypeNamesFromPackage`` (they load further files).
    """
    from nequip.model import (
        FullNequIPGNNModel,
        NequIPGNNModel,
        PresetNequIPGNNModel,
        ZBLPairPotential,
        modify,
    )
    from nequip.nn.pair_potential import ZBL, LennardJones, SimpleLennardJones

    return (NequIPGNNModel, PresetNequIPGNNModel, FullNequIPGNNModel, ZBLPairPotential, modify,
            ZBL, LennardJones, SimpleLennardJones)


def nequip_training_modules() -> dict[type, bool]:
    """Training-module classes a checkpoint may name, mapped to whether its evaluation weights are EMA.

    ``ScheduleFreeLightningModule`` is absent: its evaluation weights are derived from the optimizer
    state, which this loader does not rebuild (load such checkpoints with ``trusted=True``).
    """
    from nequip.train import (
        ConFIGLightningModule,
        EMAConFIGLightningModule,
        EMALightningModule,
        NequIPLightningModule,
    )

    return {NequIPLightningModule: False, ConFIGLightningModule: False,
            EMALightningModule: True, EMAConFIGLightningModule: True}


def _spellings(obj: Any) -> list[str]:
    """Dotted names under which ``obj`` is importable: its defining module and every parent package
    that re-exports the very same object (identity, not name equality)."""
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not name or "<" in name:
        raise TypeError(f"{obj!r} has no importable dotted name; a checkpoint cannot name it")
    parts = module.split(".")
    names = [f"{module}.{name}"]
    for i in range(1, len(parts)):
        package = sys.modules.get(".".join(parts[:i]))
        if package is not None and getattr(package, name, None) is obj:
            names.append(f"{'.'.join(parts[:i])}.{name}")
    return names


def allowed_targets(trusted_targets: Iterable[Callable[..., Any]] = ()) -> dict[str, Callable[..., Any]]:
    """Table of the ``_target_`` strings a checkpoint's model configuration may use, each mapped to the
    exact object it names (nequip's, those registered by :func:`allow_checkpoint_targets`, and
    ``trusted_targets``)."""
    objects = [*nequip_model_targets(), *_plugin_targets]
    for obj in trusted_targets:
        _check_target_object(obj)
        objects.append(obj)
    table: dict[str, Callable[..., Any]] = {}
    for obj in objects:
        for spelling in _spellings(obj):
            table[spelling] = obj
    return table


@dataclass(frozen=True)
class CheckpointModel:
    """An eager nequip model built from a checkpoint, with the identity of the bytes it came from.

    Attributes:
        model: the ``GraphModel`` in ``.eval()`` mode (weights: the training module's evaluation ones).
        sha256: hex SHA-256 of the file's bytes as read (the bytes the model was built from).
        hyper_parameters: the checkpoint's ``hyper_parameters`` as plain data (``None`` for a trusted
            ``.nequip.zip`` package).
    """

    model: torch.nn.Module
    sha256: str
    hyper_parameters: dict[str, Any] | None


def read_model_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a model file, read once. Only regular files: a FIFO or device would block or never
    end, so it is refused (opened non-blocking, checked with ``fstat`` on the open descriptor).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a regular file.
    """
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileNotFoundError(f"model file {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"model file {path} is a directory; expected a regular file") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise ValueError(f"model file {path} is not a regular file (a FIFO, device or socket); expected a "
                             "nequip checkpoint file")
        return fh.read()


def _unpickle_weights_only(data: bytes, source: str) -> dict[str, Any]:
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise ValueError(
            f"{source} cannot be loaded safely (torch.load(weights_only=True) refused it: "
            f"{type(exc).__name__}: {exc}); a nequip training checkpoint holds only tensors and plain "
            "containers. If you trust this file, pass trusted=True to load it with nequip's own unpickler"
        ) from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or not isinstance(hparams.get("info_dict"), dict):
        raise ValueError(f"{source} is not a nequip checkpoint: it has no 'hyper_parameters.info_dict'")
    return checkpoint


#: deepest nesting a model configuration may have (nequip's are a few levels deep)
_MAX_CONFIG_DEPTH = 32

#: Bounds on the size settings of a model configuration, checked before the model is built: building
#: allocates what the file declares (num_features 10^9 would allocate before the weights are compared),
#: so each size is capped far above any real model (paper-size NequIP: l_max 2, 4 layers, 32-256
#: features). Keys are matched by name fragment; values may be ints or lists of ints (per layer).
_SIZE_LIMITS: tuple[tuple[str, int], ...] = (
    ("l_max", 16),
    ("num_layers", 128),
    ("depth", 128),
    ("features", 8192),
    ("width", 8192),
    ("neurons", 8192),
    ("channels", 8192),
    ("bessels", 1024),
    ("basis", 1024),
    ("type_names", 256),
)


def _check_size_setting(key: str, value: Any, where: str, source: str) -> None:
    """Refuse a size-like setting above its bound (see :data:`_SIZE_LIMITS`)."""
    limit = next((cap for fragment, cap in _SIZE_LIMITS if fragment in key), None)
    if limit is None:
        return
    if key == "type_names":
        count = len(value) if isinstance(value, (list, tuple, dict)) else 0
        if count > limit:
            raise ValueError(f"{source}: {where} lists {count} types; at most {limit} are plausible")
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            continue  # not a size (e.g. a float setting whose name shares a fragment); the builder checks it
        if not 0 <= v <= limit:
            raise ValueError(f"{source}: {where} = {v} is outside [0, {limit}], the size a model configuration "
                             "may declare; the file is corrupt or hostile")


def _verified_config(node: Any, table: Mapping[str, Callable[..., Any]], where: str, source: str,
                     depth: int = 0) -> Any:
    """A copy of ``node`` with every ``_target_`` string replaced by the allowed object it names."""
    if depth > _MAX_CONFIG_DEPTH:
        raise ValueError(f"{source}: {where} is nested more than {_MAX_CONFIG_DEPTH} levels deep; a model "
                         "configuration is a few levels deep")
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            here = f"{where}.{key}"
            if not isinstance(key, str):
                raise ValueError(f"{source}: {where} has a non-string key {key!r}; expected keyword names")
            if key in _HYDRA_CALL_KEYS:
                raise ValueError(f"{source}: {here} is a Hydra call option; a checkpoint's model configuration "
                                 "may hold keyword arguments only")
            if key == "_target_":
                out[key] = _allowed_object(value, table, here, source)
            else:
                _check_size_setting(key, value, here, source)
                out[key] = _verified_config(value, table, here, source, depth + 1)
        return out
    if isinstance(node, (list, tuple)):
        return type(node)(_verified_config(v, table, f"{where}[{i}]", source, depth + 1) for i, v in enumerate(node))
    if isinstance(node, str) and "${" in node:
        raise ValueError(f"{source}: {where} holds the interpolation {node!r}; a saved model configuration "
                         "holds resolved values only")
    return node


def _allowed_object(target: Any, table: Mapping[str, Callable[..., Any]], where: str, source: str) -> Any:
    if not isinstance(target, str):
        raise ValueError(f"{source}: {where} is {target!r} ({type(target).__name__}); expected the dotted name "
                         "of an allowed nequip class or function")
    obj = table.get(target)
    if obj is None:
        loads_files = target.rsplit(".", 1)[-1] in _FILE_LOADING_NAMES
        raise ValueError(
            f"{source} names _target_ {target!r} at {where}, which is not an allowed model class or function"
            + (" (it loads a further model file that cannot be verified)" if loads_files else "")
            + f"; allowed: {sorted(table)}. For a model plugin you trust, pass its builder object as "
            "trusted_targets=(obj,) or register it with ltau_ase.nequip.safe_load.allow_checkpoint_targets; "
            "pass trusted=True only for a file you trust completely"
        )
    return obj


def verify_checkpoint(path: str | os.PathLike,
                      trusted_targets: Iterable[Callable[..., Any]] = ()) -> dict[str, Any]:
    """Check a checkpoint as :func:`load_checkpoint_model` does, without building the model.

    Returns:
        The checkpoint's ``hyper_parameters`` (plain data).
    Raises:
        ValueError: the file holds objects other than tensors and plain containers, is not a nequip
            checkpoint, or its model configuration names something outside the allow-list.
    """
    checkpoint = _unpickle_weights_only(read_model_bytes(path), str(path))
    hparams = checkpoint["hyper_parameters"]
    _verified_config(hparams.get("model"), allowed_targets(trusted_targets), "model", str(path))
    _training_module_uses_ema(hparams, str(path))
    return hparams


def _training_module_uses_ema(hparams: Mapping[str, Any], source: str) -> bool:
    module_cfg = hparams["info_dict"].get("training_module")
    target = module_cfg.get("_target_") if isinstance(module_cfg, dict) else None
    modules = nequip_training_modules()
    table = {spelling: cls for cls in modules for spelling in _spellings(cls)}
    cls = table.get(target) if isinstance(target, str) else None
    if cls is None:
        raise ValueError(
            f"{source} was trained with training module {target!r}, which this loader does not support "
            f"(supported: {sorted(table)}); pass trusted=True to load a file you trust with nequip's own loader"
        )
    return modules[cls]


def build_checkpoint_model(checkpoint: Mapping[str, Any], source: str = "checkpoint",
                           trusted_targets: Iterable[Callable[..., Any]] = ()) -> torch.nn.Module:
    """Build the evaluation model of an already unpickled (``weights_only=True``) nequip checkpoint.

    Returns:
        The ``GraphModel`` (``model["sole_model"]`` of the training module) in ``.eval()`` mode.
    Raises:
        ValueError: a target outside the allow-list, a configuration the builder refuses, weights that
            do not match the built model by name and shape, or non-finite weights.
    """
    from nequip.model import modify
    from nequip.model.modify_utils import only_apply_persistent_modifiers
    from nequip.model.utils import _EAGER_MODEL_KEY, override_model_compile_mode
    from nequip.train.lightning import _SOLE_MODEL_KEY
    from nequip.utils.global_state import global_state_initialized, set_global_state

    hparams = checkpoint["hyper_parameters"]
    config = _verified_config(hparams.get("model"), allowed_targets(trusted_targets), "model", source)
    if not isinstance(config, dict) or "_target_" not in config:
        raise ValueError(f"{source}: hyper_parameters['model'] is not a model configuration with a _target_")
    uses_ema = _training_module_uses_ema(hparams, source)
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise ValueError(f"{source} has no 'state_dict' of weights")
    if not global_state_initialized():
        set_global_state()

    builder = config.pop("_target_")
    try:
        # as nequip's ModelFromCheckpoint: eager mode, persistent modifiers only
        with override_model_compile_mode(_EAGER_MODEL_KEY), only_apply_persistent_modifiers(persistent_only=True):
            if builder is modify and isinstance(config.get("model"), dict):
                inner = dict(config.pop("model"))
                inner_builder = inner.pop("_target_", None)
                if inner_builder is None or inner_builder is modify:
                    raise ValueError("modify() needs an inner model configuration with a model builder _target_")
                config["model"] = inner_builder(**inner)
            built = builder(**config)
    except ValueError as exc:
        raise ValueError(f"{source}: cannot build the model from its configuration: {exc}") from None
    except Exception as exc:  # the builder's own checks raise assorted types (AssertionError, TypeError, ...)
        raise ValueError(f"{source}: cannot build the model from its configuration: "
                         f"{type(exc).__name__}: {exc}") from None
    modules = built if isinstance(built, torch.nn.ModuleDict) else torch.nn.ModuleDict({_SOLE_MODEL_KEY: built})
    if _SOLE_MODEL_KEY not in modules or not getattr(modules[_SOLE_MODEL_KEY], "is_graph_model", False):
        raise ValueError(f"{source}: the model configuration does not build a nequip GraphModel "
                         f"(got {type(built).__name__})")

    weights = {k[len(_MODEL_PREFIX):]: v for k, v in state.items() if isinstance(k, str) and k.startswith(_MODEL_PREFIX)}
    _check_tensors(weights, source)
    try:
        modules.load_state_dict(weights, strict=True)
    except Exception as exc:
        raise ValueError(f"{source}: its weights do not match the model its configuration builds: "
                         f"{type(exc).__name__}: {exc}") from None
    if uses_ema:
        _load_ema_weights(modules, state, source)
    model = modules[_SOLE_MODEL_KEY]
    model.eval()
    return model


def _check_tensors(weights: Mapping[str, Any], source: str) -> None:
    for name, value in weights.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{source}: weight {name!r} holds NaN or infinite values")


def _load_ema_weights(modules: torch.nn.Module, state: Mapping[str, Any], source: str) -> None:
    """Put the EMA weights into the model, as ``EMALightningModule.evaluation_model`` does.

    ``EMAWeights`` stores one buffer ``ema_weight_{i}`` per parameter of the training module's
    ``ModuleDict``, in ``parameters()`` order, and must hold the EMA (not the raw) weights.
    """
    params = list(modules.parameters())
    extra = state.get(_EMA_PREFIX + "_extra_state")
    if not isinstance(extra, dict) or extra.get("is_holding_ema_weights") is not True:
        raise ValueError(f"{source}: an EMA training checkpoint whose EMA state does not hold the EMA weights "
                         "(missing 'ema._extra_state' or is_holding_ema_weights is not True)")
    ema = {k: v for k, v in state.items() if isinstance(k, str) and k.startswith(_EMA_PREFIX + "ema_weight_")}
    expected = {f"{_EMA_PREFIX}ema_weight_{i}" for i in range(len(params))}
    if set(ema) != expected:
        raise ValueError(f"{source}: expected EMA weights {_EMA_PREFIX}ema_weight_0..{len(params) - 1} for the "
                         f"model's {len(params)} parameters, found {len(ema)}")
    _check_tensors(ema, source)
    with torch.no_grad():
        for i, param in enumerate(params):
            value = ema[f"{_EMA_PREFIX}ema_weight_{i}"]
            if not isinstance(value, torch.Tensor) or value.shape != param.shape:
                got = getattr(value, "shape", type(value).__name__)
                raise ValueError(f"{source}: EMA weight {i} has shape {got}, the parameter has {tuple(param.shape)}")
            param.copy_(value)


def load_checkpoint_model(path: str | os.PathLike,
                          trusted_targets: Iterable[Callable[..., Any]] = ()) -> CheckpointModel:
    """Read a nequip ``.ckpt`` once and build its evaluation model from that one in-memory copy.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a regular file, not loadable with ``weights_only=True``, not a nequip checkpoint,
            a target outside the allow-list, or weights that do not fit the model.
    """
    data = read_model_bytes(path)
    checkpoint = _unpickle_weights_only(data, str(path))
    model = build_checkpoint_model(checkpoint, str(path), trusted_targets)
    return CheckpointModel(model=model, sha256=hashlib.sha256(data).hexdigest(),
                           hyper_parameters=checkpoint["hyper_parameters"])


def load_eager_model(path: str | os.PathLike, trusted: bool = False,
                     trusted_targets: Iterable[Callable[..., Any]] = ()) -> CheckpointModel:
    """The one entry point that turns an eager nequip model file into a model.

    ``.ckpt`` files are loaded by :func:`load_checkpoint_model` unless ``trusted=True``, which hands the
    file to nequip's own loader (full unpickling; also reads ``.nequip.zip`` packages, which are refused
    otherwise). The SHA-256 of a trusted load comes from a separate read of the file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: an untrusted ``.nequip.zip``, or a checkpoint that fails verification.
    """
    path = Path(path)
    if not trusted:
        if path.name.endswith(".nequip.zip"):
            raise ValueError(
                f"{path} is a nequip-package archive: loading it imports code stored in the file, which cannot "
                "be verified. Load the training checkpoint (.ckpt) instead, or pass trusted=True if you trust "
                "the file's origin"
            )
        return load_checkpoint_model(path, trusted_targets)
    from nequip.model.saved_models.load_utils import load_saved_model
    from nequip.model.utils import _EAGER_MODEL_KEY
    from nequip.utils.global_state import set_global_state

    digest = hashlib.sha256(read_model_bytes(path)).hexdigest()
    set_global_state()
    model = load_saved_model(str(path), compile_mode=_EAGER_MODEL_KEY)
    model.eval()
    return CheckpointModel(model=model, sha256=digest, hyper_parameters=None)
