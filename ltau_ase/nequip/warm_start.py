"""Warm start of a nequip training run from an earlier checkpoint's weights, with a self-contained result.

nequip's own route (``training_module.model: {_target_: nequip.model.ModelFromCheckpoint, ...}``)
writes a checkpoint whose model section names the earlier file: loading the new model then means
loading the old file with nequip's unverified loader, a chain that grows with every retraining, and
:mod:`ltau_ase.nequip.safe_load` refuses it. This callback instead builds the ordinary model from
the run's own configuration and, at the start of the fit, copies into it the weights of the earlier
checkpoint (read and verified by :func:`~ltau_ase.nequip.safe_load.load_checkpoint_model`, loaded
strictly: same names and shapes, i.e. the same architecture and type names). The new checkpoint
names the plain model class and loads on its own::

    trainer:
      callbacks:
        - _target_: ltau_ase.nequip.warm_start.WarmStart
          checkpoint_path: /abs/path/previous/last.ckpt

The model section must be the earlier model's, numbers included: ``avg_num_neighbors`` and the
per-type energy shifts/scales are resolved from the training data when a model is built, and
``avg_num_neighbors`` is a constant of the built model, not a weight, so a section re-resolved on
the grown training set would give another function with the same weights.
:func:`configure_warm_start` writes both into a nequip config.
"""
from __future__ import annotations

import os
from pathlib import Path

import lightning

WARM_START_TARGET = "ltau_ase.nequip.warm_start.WarmStart"


def configure_warm_start(config_path: str | os.PathLike, checkpoint_path: str | os.PathLike) -> Path:
    """Make the nequip config at ``config_path`` continue from ``checkpoint_path``.

    The training module's model section becomes the checkpoint's verified model section (its resolved
    numbers, see the module docstring) and a :class:`WarmStart` callback loading its weights is added
    first. Returns ``config_path``.

    Raises:
        ValueError: the checkpoint fails verification (:func:`~ltau_ase.nequip.safe_load.load_checkpoint_model`).
    """
    import yaml

    from ltau_ase.core.jsonable import to_jsonable
    from ltau_ase.nequip.safe_load import load_checkpoint_model

    config_path, checkpoint_path = Path(config_path), Path(checkpoint_path).resolve()
    model_section = load_checkpoint_model(checkpoint_path).hyper_parameters["model"]  # verified targets only
    config = yaml.safe_load(config_path.read_text())
    config["training_module"]["model"] = to_jsonable(dict(model_section))
    callbacks = config["trainer"].setdefault("callbacks", [])
    callbacks.insert(0, {"_target_": WARM_START_TARGET, "checkpoint_path": str(checkpoint_path)})
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config_path


class WarmStart(lightning.Callback):
    """Copy an earlier checkpoint's (evaluation) weights into the model before training starts.

    Args:
        checkpoint_path: nequip ``.ckpt`` of a model with the same architecture and type names.
    Raises (at fit start):
        ValueError: the checkpoint fails verification or its weights do not fit the model; the
            training module keeps EMA weights (not supported: they would restart from the fresh model).
    """

    def __init__(self, checkpoint_path: str | os.PathLike) -> None:
        super().__init__()
        self.checkpoint_path = os.fspath(checkpoint_path)

    def on_fit_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        from nequip.train.lightning import _SOLE_MODEL_KEY

        from ltau_ase.nequip.safe_load import load_checkpoint_model

        if hasattr(pl_module, "ema"):
            raise ValueError("WarmStart supports nequip.train.NequIPLightningModule; an EMA training module "
                             "would restart its averaged weights from the fresh model")
        previous = load_checkpoint_model(self.checkpoint_path).model
        target = pl_module.model[_SOLE_MODEL_KEY]
        try:
            target.load_state_dict(previous.state_dict(), strict=True)
        except RuntimeError as exc:
            raise ValueError(f"warm start from {self.checkpoint_path}: its weights do not fit this run's model "
                             f"(same architecture and type names needed): {exc}") from None
