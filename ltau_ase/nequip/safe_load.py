"""Checks that a nequip checkpoint can be loaded without running code from the file.

nequip's loaders unpickle checkpoints with ``torch.load(weights_only=False)`` and build the model by
instantiating the Hydra ``_target_`` strings stored in them: a crafted file could run arbitrary code
either way. Before handing a user-supplied ``.ckpt`` to nequip, :func:`verify_checkpoint`

1. unpickles it with ``torch.load(weights_only=True)``, which only admits tensors and plain
   containers. When that succeeds, the full unpickler nequip uses afterwards reads the same bytes
   and can call nothing else;
2. checks every ``_target_`` in the stored configuration against an allow-list of nequip, torch and
   Lightning namespaces (extendable for model plugins such as Allegro), and refuses targets that
   load further files (``ModelFromPackage`` / ``ModelFromCheckpoint``).

``nequip-package`` files (``.nequip.zip``) are ``torch.package`` archives whose unpickling imports
code stored in the archive; they cannot be verified and are loaded only with ``trusted=True``.
"""
from __future__ import annotations

import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

#: namespaces whose classes a checkpoint may name as Hydra ``_target_``
TRUSTED_TARGET_PREFIXES: tuple[str, ...] = (
    "nequip.model.",
    "nequip.nn.",
    "nequip.train.",
    "nequip.data.",
    "torch.optim.",
    "torch.utils.data.",
    "lightning.Trainer",
    "lightning.pytorch.Trainer",
    "lightning.pytorch.callbacks.",
    "lightning.pytorch.loggers.",
    "ltau_ase.nequip.",
)
#: targets that would load another (unverified) model file
_FILE_LOADING_TARGETS = ("nequip.model.ModelFromPackage", "nequip.model.ModelFromCheckpoint",
                         "nequip.model.saved_models.")


def _targets(obj: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "_target_":
                yield path or "<root>", str(value)
            else:
                yield from _targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _targets(value, f"{path}[{i}]")


def verify_checkpoint(path: str | Path, trusted_targets: Iterable[str] = ()) -> dict[str, Any]:
    """Verify that nequip can load the checkpoint at ``path`` without executing code from it.

    Args:
        path: a nequip training checkpoint (``.ckpt``).
        trusted_targets: extra allowed ``_target_`` prefixes (e.g. ``"allegro.model."``).
    Returns:
        The checkpoint's ``hyper_parameters`` dict (loaded safely).
    Raises:
        ValueError: the file holds objects other than tensors and plain containers, is not a nequip
            checkpoint, or names a ``_target_`` outside the allow-list.
    """
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as exc:
        raise ValueError(
            f"{path} cannot be loaded safely (torch.load(weights_only=True) refused it: {exc}); a nequip "
            "training checkpoint holds only tensors and plain containers. If you trust this file, pass "
            "trusted=True to load it with nequip's own unpickler"
        ) from exc
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "info_dict" not in hparams:
        raise ValueError(f"{path} is not a nequip checkpoint: it has no 'hyper_parameters.info_dict'")
    allowed = TRUSTED_TARGET_PREFIXES + tuple(trusted_targets)
    for where, target in _targets(hparams):
        if target.startswith(_FILE_LOADING_TARGETS) or not target.startswith(allowed):
            raise ValueError(
                f"{path} names _target_ {target!r} at {where}, outside the trusted namespaces {allowed} "
                "(or one that loads further model files); pass trusted_targets=(prefix,) for a model "
                "plugin you trust, or trusted=True to skip this check"
            )
    return hparams
