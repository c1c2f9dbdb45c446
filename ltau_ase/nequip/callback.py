"""Per-atom force-error logging while nequip trains (the paper's Algorithm 1).

Add the callback to an ordinary nequip 0.19 config::

    trainer:
      callbacks:
        - _target_: ltau_ase.nequip.callback.LTAUErrorLogger
          log_dir: ${hydra:runtime.output_dir}/ltau_errors
          mode: free            # or exact

and give every training frame an integer ``atoms.info["frame_id"]`` (unique across all training
files) listed in the data ``include_keys``. Atom ``a`` of frame ``f`` is logged under the global id
``f * 2**20 + a`` (:mod:`ltau_ase.core.atom_ids`), so the log does not depend on file order,
shuffling or the train/validation split.

Modes:
    ``free``: the errors are taken from the training forward passes themselves (a forward hook on
        ``pl_module.model["sole_model"]``, active only while the module is in training mode). No
        extra model evaluation; the error of a frame is that of the model *during* the epoch, i.e.
        of the weights before the optimizer step of the frame's batch, not of the weights at the
        end of the epoch.
    ``exact``: at the end of each training epoch the model is evaluated on the whole training set
        (model in eval mode, gradients enabled for the forces, no parameter change): the errors of
        the end-of-epoch weights, at the cost of one extra inference pass over the training set.
        With ``EMALightningModule`` the EMA weights are evaluated (the weights a checkpoint gives
        for inference), so the last logged epoch equals the errors of ``last.ckpt``.

Atom-id universe: at ``on_train_start`` the callback iterates the training dataset once (in order,
no shuffle, same collate function and batch size as the training dataloader) to collect every
``frame_id`` and frame size; repeated frame ids raise ValueError. Atoms absent from an epoch (e.g.
dropped by ``drop_last``) are NaN in that epoch's row.

Restarts (``nequip-train ... ckpt_path=...``) append to the existing log when it holds no epoch at
or after the restart epoch; otherwise they raise. A fresh run refuses an existing log
(FileExistsError from the writer).

Multi-process (DDP) training (``trainer.strategy: ddp``, Lightning's or nequip's DDP strategy, any
number of ranks): every rank collects the errors of its own shard; at each logged epoch end the
ranks' errors are gathered to rank 0 (``torch.distributed``), which alone writes the log. The log
holds the same atom ids as a single-process run, each atom once per epoch:

* free mode: Lightning's ``DistributedSampler`` pads the epoch by repeating up to world_size − 1
  frames (its ``drop_last=False``); a repeated atom keeps the error of its first occurrence in
  rank order (the original sample: the padding copies go to higher ranks), never both;
* exact mode: rank r evaluates frames r, r + world_size, … of the in-order training set, so
  every frame is evaluated exactly once.

Before anything is written the ranks compare their atom-id universes, and at every epoch end their
epoch numbers, modes and atom counts; a disagreement raises the same ValueError on every rank (no
rank is left waiting). An epoch is committed only after every rank's errors have arrived, so a rank
killed mid-epoch leaves no committed partial epoch; the committed epochs stay readable and a
restart from a checkpoint appends to them as in a single-process run.

Outputs in ``log_dir`` (an :class:`ltau_ase.core.errorlog.ErrorLog` directory):
    force-error norms |F_pred − F_ref|₂ (eV/Å), one row per logged epoch; with ``components=True``
    also the absolute per-component errors |F_pred − F_ref|_α (eV/Å); with ``energy=True`` a
    second log in ``log_dir/energy_per_atom`` where each atom holds its frame's
    |E_pred − E_ref| / n_atoms (eV/atom).
"""
from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from lightning.pytorch.utilities import move_data_to_device

from ltau_ase.core.atom_ids import ATOMS_PER_FRAME_BITS, global_atom_ids
from ltau_ase.core.errorlog import (
    DEFAULT_LOG_SUBDIR,
    ErrorLogWriter,
    check_rank_epochs,
    check_rank_universes,
    merge_rank_parts,
    universe_digest,
)
from ltau_ase.nequip.fields import FRAME_ID_KEY

_MODES = ("free", "exact")
ENERGY_SUBDIR = "energy_per_atom"
_MISSING_FRAME_ID = (
    "the training batch has no '" + FRAME_ID_KEY + "' field: LTAUErrorLogger keys atoms by frame id. "
    "Set an integer atoms.info['" + FRAME_ID_KEY + "'] (unique across all training files) on every training frame "
    "and add '" + FRAME_ID_KEY + "' to the dataset's include_keys in the nequip config."
)


def batch_atom_ids(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(n_atoms_in_batch,) int64 global atom ids of a collated nequip batch (needs ``frame_id``)."""
    if FRAME_ID_KEY not in batch:
        raise ValueError(_MISSING_FRAME_ID)
    frame_id = batch[FRAME_ID_KEY].reshape(-1).to(torch.int64)
    num_atoms = batch["num_atoms"].reshape(-1).to(torch.int64)
    frame_of_atom = batch["batch"].reshape(-1)
    first_atom = torch.cumsum(num_atoms, 0) - num_atoms
    local = torch.arange(frame_of_atom.numel(), device=frame_of_atom.device) - first_atom[frame_of_atom]
    return (frame_id[frame_of_atom] << ATOMS_PER_FRAME_BITS) + local


def _batch_errors(
    pred: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], components: bool, energy: bool
) -> dict[str, np.ndarray]:
    """Per-atom errors of one batch as numpy: ids (n,), errors (n,), optional components (n, 3)
    and per-atom energy errors (n,)."""
    with torch.no_grad():
        diff = pred["forces"].detach() - ref["forces"]
        out = {
            "ids": batch_atom_ids(ref).cpu().numpy(),
            "errors": torch.linalg.vector_norm(diff, dim=-1).cpu().numpy(),
        }
        if components:
            out["components"] = diff.abs().cpu().numpy()
        if energy:
            num_atoms = ref["num_atoms"].reshape(-1)
            de = (pred["total_energy"].detach().reshape(-1) - ref["total_energy"].reshape(-1)).abs() / num_atoms
            out["energy"] = de[ref["batch"].reshape(-1)].cpu().numpy()
    return out


def _distributed(trainer: lightning.Trainer) -> bool:
    """True when the run has several ranks sharing an initialised torch.distributed process group."""
    return (
        int(getattr(trainer, "world_size", 1)) > 1
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    )


def _all_gather_object(obj: Any) -> list[Any]:
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _find_file_paths(config: Any) -> list[str]:
    """All ``file_path`` values in a (nested) dataset config, in order."""
    found: list[str] = []
    if isinstance(config, dict):
        for key, value in config.items():
            if key == "file_path" and isinstance(value, str):
                found.append(value)
            else:
                found.extend(_find_file_paths(value))
    elif isinstance(config, (list, tuple)):
        for value in config:
            found.extend(_find_file_paths(value))
    return found


class LTAUErrorLogger(lightning.Callback):
    """Logs every training atom's force error at every (n-th) epoch into an error log.

    Args:
        log_dir: output directory of the error log. A relative path is taken relative to the
            Hydra run directory when running under ``nequip-train``, else to
            ``trainer.default_root_dir``. Default: ``ltau_errors``.
        mode: ``"free"`` (errors of the training forward passes) or ``"exact"`` (an evaluation pass
            over the training set at each epoch end); see the module docstring.
        components: also log absolute per-component force errors (N, 3) (eV/Å).
        energy: also log per-frame energy errors per atom, |ΔE| / n_atoms (eV/atom).
        every_n_epochs: log epochs ``e`` with ``(e + 1) % every_n_epochs == 0``.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike = DEFAULT_LOG_SUBDIR,
        mode: str = "free",
        components: bool = False,
        energy: bool = False,
        every_n_epochs: int = 1,
    ) -> None:
        super().__init__()
        self.log_dir = log_dir
        self.mode = mode
        self.components = components
        self.energy = energy
        self.every_n_epochs = every_n_epochs

    # ---------------------------------------------------------------- setup
    def setup(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.mode not in _MODES:
            raise ValueError(f"LTAUErrorLogger mode must be one of {_MODES}; got {self.mode!r}")
        if int(self.every_n_epochs) < 1:
            raise ValueError(f"every_n_epochs must be >= 1; got {self.every_n_epochs!r}")
        if trainer.world_size > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError(
                f"LTAUErrorLogger runs with world_size={trainer.world_size} but no torch.distributed process group "
                "is initialised; multi-process training is supported with a DDP strategy (trainer.strategy: ddp)"
            )

    def _resolve_log_dir(self, trainer: lightning.Trainer) -> Path:
        path = Path(self.log_dir)
        if path.is_absolute():
            return path
        return self._run_dir(trainer) / path

    @staticmethod
    def _run_dir(trainer: lightning.Trainer) -> Path:
        try:
            from hydra.core.hydra_config import HydraConfig

            return Path(HydraConfig.get().runtime.output_dir)
        except (ImportError, ValueError):  # not running under Hydra
            return Path(trainer.default_root_dir)

    def _training_dataloader(self, trainer: lightning.Trainer) -> torch.utils.data.DataLoader:
        loader = trainer.train_dataloader
        if not isinstance(loader, torch.utils.data.DataLoader):
            raise TypeError(
                f"LTAUErrorLogger expects one torch DataLoader for training; got {type(loader).__name__}"
            )
        return loader

    def _collect_atom_ids(self, loader: torch.utils.data.DataLoader) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Iterate the evaluation loader once: (frame_ids (F,), n_atoms (F,), atom ids (N,))."""
        frame_ids, n_atoms = [], []
        for batch in loader:
            if FRAME_ID_KEY not in batch:
                raise ValueError(_MISSING_FRAME_ID)
            frame_ids.append(batch[FRAME_ID_KEY].reshape(-1).cpu().numpy())
            n_atoms.append(batch["num_atoms"].reshape(-1).cpu().numpy())
        frame_ids = np.concatenate(frame_ids).astype(np.int64)
        n_atoms = np.concatenate(n_atoms).astype(np.int64)
        uniq, counts = np.unique(frame_ids, return_counts=True)
        if np.any(counts > 1):
            dup = uniq[counts > 1]
            raise ValueError(
                f"{dup.size} frame ids occur more than once in the training set (e.g. {dup[:5].tolist()}); "
                "atoms.info['frame_id'] must be unique across all training files"
            )
        return frame_ids, n_atoms, global_atom_ids(frame_ids, n_atoms)

    def _metadata(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, n_frames: int) -> dict:
        hparams = dict(getattr(pl_module, "hparams", {}) or {})
        model_cfg = hparams.get("model") or {}
        datamodule = getattr(trainer, "datamodule", None)
        train_cfg = getattr(datamodule, "train_dataset_config", None)
        return {
            "producer": "ltau_ase.nequip.callback.LTAUErrorLogger",
            "mode": self.mode,
            "every_n_epochs": int(self.every_n_epochs),
            "run_dir": str(self._run_dir(trainer).resolve()),
            "seed": model_cfg.get("seed") if isinstance(model_cfg, dict) else None,
            "data_seed": getattr(datamodule, "seed", None),
            "max_epochs": trainer.max_epochs,
            "train_files": [str(p) for p in _find_file_paths(train_cfg)] if train_cfg is not None else [],
            "n_train_frames": int(n_frames),
            "training_module": type(pl_module).__module__ + "." + type(pl_module).__qualname__,
            "world_size": int(trainer.world_size),
            "units": "eV/Angstrom",
        }

    @staticmethod
    def _check_resume(trainer: lightning.Trainer, log_dir: Path) -> bool:
        """Append to an existing log only when training restarts from a checkpoint, and only if the
        log holds no epoch at or after the restart epoch (which would then be logged twice)."""
        if getattr(trainer, "ckpt_path", None) is None or not (log_dir / "meta.json").exists():
            return False
        from ltau_ase.core.errorlog import ErrorLog

        logged = [e for e in ErrorLog(log_dir).epochs if e is not None]
        if logged and max(logged) >= trainer.current_epoch:
            raise ValueError(
                f"{log_dir} already logs epochs up to {max(logged)} but training restarts at epoch "
                f"{trainer.current_epoch} from {trainer.ckpt_path}; restart from the last checkpoint or use a new log_dir"
            )
        return True

    def on_train_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        t0 = time.perf_counter()
        train_loader = self._training_dataloader(trainer)
        self._ddp = _distributed(trainer)
        self._rank = int(trainer.global_rank) if self._ddp else 0
        world = int(trainer.world_size) if self._ddp else 1
        # In-order copy of the training loader: same dataset, collate function and batch size.
        universe_loader = torch.utils.data.DataLoader(
            train_loader.dataset,
            batch_size=train_loader.batch_size or 1,
            shuffle=False,
            collate_fn=train_loader.collate_fn,
            num_workers=0,
        )
        frame_ids, n_atoms, atom_ids = self._collect_atom_ids(universe_loader)
        # The exact pass of rank r evaluates frames r, r + world, ...: every frame once over the ranks.
        self._eval_loader = universe_loader
        if world > 1:
            shard = torch.utils.data.Subset(train_loader.dataset, range(self._rank, len(train_loader.dataset), world))
            self._eval_loader = torch.utils.data.DataLoader(
                shard,
                batch_size=train_loader.batch_size or 1,
                shuffle=False,
                collate_fn=train_loader.collate_fn,
                num_workers=0,
            )
        log_dir = self._resolve_log_dir(trainer)
        self.log_dir_ = log_dir
        self._writer = None
        self._energy_writer = None
        problem = None
        if self._ddp:
            check_rank_universes(_all_gather_object(universe_digest(atom_ids)))
        if self._rank == 0:
            try:
                metadata = self._metadata(trainer, pl_module, frame_ids.size)
                resume = self._check_resume(trainer, log_dir)
                self._writer = ErrorLogWriter(
                    log_dir, atom_ids, components=bool(self.components), metadata=metadata, resume=resume
                )
                if self.energy:
                    self._energy_writer = ErrorLogWriter(
                        log_dir / ENERGY_SUBDIR,
                        atom_ids,
                        metadata={**metadata, "quantity": "|E_pred - E_ref| / n_atoms (eV/atom)"},
                        resume=resume,
                    )
            except Exception as exc:  # re-raised below on every rank, so that no rank waits forever
                problem = exc
        if self._ddp:
            msg = _all_gather_object(None if problem is None else f"{type(problem).__name__}: {problem}")[0]
            if msg is not None and problem is None:
                raise RuntimeError(f"LTAUErrorLogger could not open the error log on rank 0: {msg}")
        if problem is not None:
            raise problem
        # Rows are written (and fsync'ed) by one background thread on rank 0, so the disk latency of
        # the durable write overlaps with the next epoch; writes stay in epoch order, and a failed
        # write raises at the next epoch end (on every rank) or at train end.
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ltau-errorlog") if self._rank == 0 else None
        self._pending_write: Future | None = None
        #: per logged epoch, the wall time (s) spent inside this callback (hooks + log write)
        self.hook_seconds_: list[float] = []
        #: per logged epoch, the part of hook_seconds_ spent at epoch end (exact pass, gather, log write)
        self.epoch_end_seconds_: list[float] = []
        #: per logged epoch, atoms seen twice (DistributedSampler padding) and logged once
        self.repeated_atoms_: list[int] = []
        self._reset_epoch()
        self._hook = None
        if self.mode == "free":
            self._hook = pl_module.model["sole_model"].register_forward_hook(self._capture)
        self._pl_module = pl_module
        #: one-time cost (s) of on_train_start: reading the atom-id universe, creating the log
        self.setup_seconds_ = time.perf_counter() - t0

    def _reset_epoch(self) -> None:
        self._hook_s = 0.0  # seconds spent inside this callback during the current epoch
        self._parts: list[dict[str, np.ndarray]] = []
        self._pending_batch: dict[str, torch.Tensor] | None = None
        self._pending_pred: dict[str, torch.Tensor] | None = None

    def _logs_epoch(self, epoch: int) -> bool:
        return (epoch + 1) % int(self.every_n_epochs) == 0

    # ----------------------------------------------------------- free mode
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.mode == "free" and self._logs_epoch(trainer.current_epoch):
            t0 = time.perf_counter()
            if FRAME_ID_KEY not in batch:
                raise ValueError(_MISSING_FRAME_ID)
            # keep references to the reference tensors before the model sees the batch
            keys = ["forces", "batch", "num_atoms", FRAME_ID_KEY] + (["total_energy"] if self.energy else [])
            self._pending_batch = {k: batch[k] for k in keys}
            self._pending_pred = None
            self._hook_s += time.perf_counter() - t0

    def _capture(self, module: torch.nn.Module, inputs: Any, output: dict[str, torch.Tensor]) -> None:
        # Active only for training forward passes of a batch announced by on_train_batch_start.
        if self._pending_batch is None or not self._pl_module.training:
            return
        t0 = time.perf_counter()
        keys = ("forces", "total_energy") if self.energy else ("forces",)
        self._pending_pred = {k: output[k].detach() for k in keys}
        self._hook_s += time.perf_counter() - t0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._pending_batch is None:
            return
        t0 = time.perf_counter()
        if self._pending_pred is None:
            raise RuntimeError(
                "LTAUErrorLogger (free mode) saw no training forward pass of pl_module.model['sole_model'] "
                "for this batch; this training module is not supported in free mode, use mode='exact'"
            )
        self._parts.append(_batch_errors(self._pending_pred, self._pending_batch, self.components, self.energy))
        self._pending_batch = None
        self._pending_pred = None
        self._hook_s += time.perf_counter() - t0

    # ---------------------------------------------------------- exact mode
    def _exact_pass(self, pl_module: lightning.LightningModule) -> None:
        ema = getattr(pl_module, "ema", None)
        swap = ema is not None and getattr(ema, "is_holding_ema_weights", False)
        was_training = pl_module.training
        model = pl_module.model["sole_model"]
        if swap:
            ema.swap_parameters(pl_module.model)  # evaluate the EMA (inference) weights
        try:
            pl_module.eval()
            for batch in self._eval_loader:
                batch = move_data_to_device(batch, pl_module.device)
                with torch.enable_grad():  # forces are autograd derivatives
                    pred = model(batch.copy())
                self._parts.append(_batch_errors(pred, batch, self.components, self.energy))
        finally:
            if swap:
                ema.swap_parameters(pl_module.model)
            pl_module.train(was_training)

    # ------------------------------------------------------------ epoch end
    def on_train_epoch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        epoch = trainer.current_epoch
        if not self._logs_epoch(epoch):
            self._reset_epoch()
            return
        t0 = time.perf_counter()
        if self.mode == "exact":
            self._parts = []
            self._exact_pass(pl_module)
        if self._ddp:
            merged = self._gather_epoch(epoch)
        else:
            if not self._parts:
                raise RuntimeError(f"LTAUErrorLogger collected no training atoms in epoch {epoch}")
            merged = merge_rank_parts(self._parts, dedupe=False)  # one process: a repeat is a bug, refused
            self._wait_for_write()
        if merged is not None:  # rank 0: commit in the background
            self.repeated_atoms_.append(int(merged.pop("n_repeated")))
            self._pending_write = self._io.submit(
                self._write_epoch, epoch, merged["ids"], merged["errors"], merged.get("components"), merged.get("energy")
            )
        self.epoch_end_seconds_.append(time.perf_counter() - t0)
        self.hook_seconds_.append(self._hook_s + self.epoch_end_seconds_[-1])
        self._reset_epoch()

    def _gather_epoch(self, epoch: int) -> dict[str, np.ndarray] | None:
        """Gather every rank's errors of this epoch to rank 0; the merged epoch there, None elsewhere.

        First every rank learns every rank's header (epoch, mode, atom count, rank 0's last write
        error) and checks it identically, so a disagreement raises on all ranks at once.
        """
        local = merge_rank_parts(self._parts) if self._parts else None
        write_error = None
        if self._rank == 0:
            try:
                self._wait_for_write()
            except Exception as exc:
                write_error = f"{type(exc).__name__}: {exc}"
        header = {
            "epoch": int(epoch) if local is not None else None,
            "mode": self.mode,
            "n_atoms": 0 if local is None else int(local["ids"].size),
            "error": write_error,
        }
        check_rank_epochs(_all_gather_object(header))
        local.pop("n_repeated")
        gathered: list[Any] | None = [None] * torch.distributed.get_world_size() if self._rank == 0 else None
        torch.distributed.gather_object(local, gathered, dst=0)
        if self._rank != 0:
            return None
        return merge_rank_parts(gathered)  # rank order: a padded repeat keeps its original (lower-rank) copy

    def _write_epoch(self, epoch, ids, errors, comps, energy) -> None:
        self._writer.append_epoch(ids, errors, epoch=epoch, components=comps)
        if self._energy_writer is not None:
            self._energy_writer.append_epoch(ids, energy, epoch=epoch)

    def _wait_for_write(self) -> None:  # rank 0 (or single process) only
        pending, self._pending_write = getattr(self, "_pending_write", None), None
        if pending is not None:
            pending.result()  # re-raises an exception of the write

    def _close(self, raise_errors: bool = True) -> None:
        try:
            self._wait_for_write()
        except Exception:
            if raise_errors:
                raise
        finally:
            self._release()

    def _release(self) -> None:
        io = getattr(self, "_io", None)  # None on ranks > 0
        if io is not None:
            io.shutdown(wait=True)
            self._io = None
        hook = getattr(self, "_hook", None)
        if hook is not None:
            hook.remove()
            self._hook = None
        for name in ("_writer", "_energy_writer"):
            writer = getattr(self, name, None)
            if writer is not None:
                writer.close()
                setattr(self, name, None)
        self._eval_loader = None

    def on_train_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._close(raise_errors=False)  # keep the original exception
