"""Small helpers to produce EMT-labelled training data, write ordinary nequip 0.19 YAML configs and
run ``nequip-train``: used by the tests, the demo and the benchmarks.

Nothing here is needed to *use* LTAU with your own nequip runs: add
``ltau_ase.nequip.callback.LTAUErrorLogger`` under ``trainer.callbacks`` of your config, put
``atoms.info["frame_id"]`` in your training files and list ``frame_id`` in ``include_keys``.

Several training files: nequip 0.19's ``NequIPLightningModule`` accepts exactly one training
dataset, and ``ASEDataModule(train_file_path=[a, b])`` would make two. The configs written here
therefore use ``NequIPDataModule`` with one ``torch.utils.data.ConcatDataset`` of
``nequip.data.dataset.ASEDataset`` entries (the same datasets ``ASEDataModule`` builds).
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from ase import Atoms
from ase.build import add_adsorbate, fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from ltau_ase.core.atom_ids import FRAME_ID_KEY
from ltau_ase.core.trainingset import assign_frame_ids, write_training_file  # noqa: F401  (their old home)

ERROR_LOGGER_TARGET = "ltau_ase.nequip.callback.LTAUErrorLogger"
# a tiny model for tests and quick demos: ~1 s per epoch on 1k atoms on 2 CPU cores
TINY_MODEL = {"num_layers": 2, "num_features": 8, "l_max": 1, "r_max": 4.0, "batch_size": 5, "lr": 0.01}


def emt_slab_frames(
    n_frames: int,
    *,
    seed: int = 0,
    metals: Sequence[str] = ("Cu", "Pt"),
    adsorbates: Sequence[str] = ("O", "H"),
    size: tuple[int, int, int] = (2, 2, 3),
    rattle: float = 0.15,
    vacuum: float = 6.0,
) -> list[Atoms]:
    """Rattled fcc(111) slabs with one adsorbate each, labelled with ASE's EMT.

    Frames cycle through ``metals`` and ``adsorbates``; positions are rattled with a Gaussian of
    standard deviation ``rattle`` (Å). Each frame carries a SinglePointCalculator holding the EMT
    ``energy`` (eV) and ``forces`` (N, 3) (eV/Å). No ``frame_id`` is set (see
    :func:`assign_frame_ids`).
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1; got {n_frames}")
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n_frames):
        slab = fcc111(metals[i % len(metals)], size=size, vacuum=vacuum)
        site = ("fcc", "hcp", "ontop")[(i // len(metals)) % 3]
        add_adsorbate(slab, adsorbates[(i // (3 * len(metals))) % len(adsorbates)], 1.8, site)
        slab.center(vacuum=vacuum, axis=2)
        slab.positions += rng.normal(scale=rattle, size=slab.positions.shape)
        slab.calc = EMT()
        energy = slab.get_potential_energy()
        forces = slab.get_forces()
        slab.calc = SinglePointCalculator(slab, energy=energy, forces=forces)
        slab.info.pop("adsorbate_info", None)  # a dict extxyz cannot store
        frames.append(slab)
    return frames


def _ase_dataset(file_path: str | os.PathLike, transforms: list, include_keys: list[str]) -> dict:
    return {
        "_target_": "nequip.data.dataset.ASEDataset",
        "file_path": str(Path(file_path).resolve()),
        "transforms": transforms,
        "include_keys": list(include_keys),
    }


def write_nequip_config(
    path: str | os.PathLike,
    train_files: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    type_names: Sequence[str],
    val_file: str | os.PathLike | None = None,
    n_val: int | None = None,
    callbacks: Iterable[dict] = (),
    seed: int = 1,
    data_seed: int | None = None,
    max_epochs: int = 5,
    num_layers: int = 2,
    num_features: int = 8,
    l_max: int = 1,
    r_max: float = 4.0,
    batch_size: int = 5,
    lr: float = 0.01,
    training_module: str = "nequip.train.NequIPLightningModule",
    ema_decay: float = 0.99,
    loss: dict | None = None,
    include_keys: Sequence[str] = (FRAME_ID_KEY,),
    shuffle: bool = True,
    save_every_epoch: bool = False,
    model_dtype: str = "float32",
    accelerator: str = "cpu",
) -> Path:
    """Write an ordinary nequip 0.19 training config (YAML) and return its path.

    Args:
        path: YAML file to write.
        train_files: one or more extxyz files (concatenated into the single training dataset).
        type_names: chemical symbols, used as nequip type names (identity species→type map).
        val_file: validation extxyz file. If None, ``n_val`` frames are split off the
            concatenated training files at random (nequip's ``split_dataset`` with ``seed``).
        callbacks: extra Lightning callback configs (dicts with ``_target_``) appended to
            ``trainer.callbacks``, e.g. ``{"_target_": "ltau_ase.nequip.callback.LTAUErrorLogger",
            "log_dir": ...}``.
        seed: model seed (also the data seed unless ``data_seed`` is given).
        data_seed: seed of the data module (train/val split, shuffling); keep it fixed across the
            M runs of an ensemble so they share the same training atoms.
        training_module: ``nequip.train.NequIPLightningModule`` or ``nequip.train.EMALightningModule``.
        loss: a ``training_module.loss`` config; default: per-atom energy MSE + force MSE (1:1).
        accelerator: Lightning accelerator (``"cpu"``, ``"gpu"``, ``"auto"``); one device.
        save_every_epoch: also keep one checkpoint per epoch in ``<run dir>/epochs/epochNNNN.ckpt``
            (for :func:`ltau_ase.nequip.fit.error_logs_from_checkpoints`).
    Outputs of the run (in the Hydra run dir): ``best.ckpt`` (lowest validation loss) and
    ``last.ckpt`` (final epoch).
    """
    if isinstance(train_files, (str, os.PathLike)):
        train_files = [train_files]
    train_files = [Path(f) for f in train_files]
    if not train_files:
        raise ValueError("train_files is empty; expected at least one extxyz file")
    for f in train_files + ([Path(val_file)] if val_file is not None else []):
        if not f.is_file():
            raise FileNotFoundError(f"training data file {f} does not exist")
    type_names = list(type_names)
    transforms = [
        {
            "_target_": "nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper",
            "model_type_names": type_names,
            "chemical_species_to_atom_type_map": {t: t for t in type_names},
        },
        {"_target_": "nequip.data.transforms.NeighborListTransform", "r_max": float(r_max)},
    ]
    include_keys = list(include_keys)
    train_ds = {
        "_target_": "torch.utils.data.ConcatDataset",
        "datasets": [_ase_dataset(f, transforms, include_keys) for f in train_files],
    }
    dataloader = {"_target_": "torch.utils.data.DataLoader", "batch_size": int(batch_size)}
    data: dict[str, Any] = {
        "_target_": "nequip.data.datamodule.NequIPDataModule",
        "seed": int(seed if data_seed is None else data_seed),
        "train_dataloader": dict(dataloader, shuffle=bool(shuffle)),
        "val_dataloader": dataloader,
        "stats_manager": {"_target_": "nequip.data.CommonDataStatisticsManager", "type_names": type_names},
    }
    if val_file is not None:
        data["train_dataset"] = train_ds
        data["val_dataset"] = _ase_dataset(val_file, transforms, include_keys)
    else:
        if n_val is None or n_val < 1:
            raise ValueError("without val_file, give n_val >= 1 frames to split off the training files")
        import ase.io

        n_total = sum(sum(1 for _ in ase.io.iread(str(f), format="extxyz")) for f in train_files)
        if n_val >= n_total:
            raise ValueError(f"n_val={n_val} leaves no training frames out of {n_total}")
        data["split_dataset"] = {"dataset": train_ds, "train": n_total - int(n_val), "val": int(n_val)}

    run_dir = "${hydra:runtime.output_dir}"
    trainer_callbacks: list[dict] = [
        {
            "_target_": "lightning.pytorch.callbacks.ModelCheckpoint",
            "monitor": "val0_epoch/weighted_sum",
            "dirpath": run_dir,
            "filename": "best",
            "save_top_k": 1,
            "save_last": False,
        },
        # unmonitored, so last.ckpt always holds the final epoch (a monitored checkpoint's
        # save_last only refreshes last.ckpt when the monitored value improves)
        {
            "_target_": "lightning.pytorch.callbacks.ModelCheckpoint",
            "dirpath": run_dir,
            "filename": "latest",
            "save_top_k": 1,
            "save_last": True,
        },
    ]
    if save_every_epoch:
        trainer_callbacks.append(
            {
                "_target_": "lightning.pytorch.callbacks.ModelCheckpoint",
                "dirpath": run_dir + "/epochs",
                "filename": "epoch{epoch:04d}",
                "auto_insert_metric_name": False,
                "every_n_epochs": 1,
                "save_top_k": -1,
                # unused without a monitor; makes Lightning's callback state key differ from "latest"
                "mode": "max",
            }
        )
    trainer_callbacks.extend(dict(c) for c in callbacks)

    module: dict[str, Any] = {
        "_target_": training_module,
        "loss": loss
        or {
            "_target_": "nequip.train.EnergyForceLoss",
            "per_atom_energy": True,
            "coeffs": {"total_energy": 1.0, "forces": 1.0},
        },
        "val_metrics": {
            "_target_": "nequip.train.EnergyForceMetrics",
            "coeffs": {"total_energy_mae": 1.0, "forces_mae": 1.0},
        },
        "optimizer": {"_target_": "torch.optim.Adam", "lr": float(lr)},
        "model": {
            "_target_": "nequip.model.NequIPGNNModel",
            "seed": int(seed),
            "model_dtype": model_dtype,
            "type_names": type_names,
            "r_max": float(r_max),
            "l_max": int(l_max),
            "parity": True,
            "num_layers": int(num_layers),
            "num_features": int(num_features),
            "radial_mlp_depth": 1,
            "radial_mlp_width": max(8, int(num_features)),
            "avg_num_neighbors": "${training_data_stats:num_neighbors_mean}",
            "per_type_energy_shifts": "${training_data_stats:per_atom_energy_mean}",
            "per_type_energy_scales": "${training_data_stats:forces_rms}",
        },
    }
    if training_module.endswith("EMALightningModule"):
        module["ema_decay"] = float(ema_decay)

    config = {
        "run": ["train"],
        "seed": int(seed),
        "data": data,
        "trainer": {
            "_target_": "lightning.Trainer",
            "accelerator": accelerator,
            "devices": 1,
            "max_epochs": int(max_epochs),
            "check_val_every_n_epoch": 1,
            "log_every_n_steps": 1000,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "callbacks": trainer_callbacks,
        },
        "training_module": module,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        yaml.safe_dump(config, fh, sort_keys=False)
    return path


def train_nequip(
    config_path: str | os.PathLike,
    run_dir: str | os.PathLike,
    overrides: Sequence[str] = (),
    timeout: float | None = 600.0,
    env: dict[str, str] | None = None,
    threads: int | None = None,
) -> Path:
    """Run ``nequip-train -cp <abs dir> -cn <name> hydra.run.dir=<run_dir> [overrides]`` in a
    subprocess and return the run directory (holding ``best.ckpt`` and ``last.ckpt``).

    ``threads`` sets OMP_NUM_THREADS / MKL_NUM_THREADS for the run; ``env`` adds variables.

    Raises RuntimeError with the tail of the output when training fails.
    """
    config_path = Path(config_path).resolve()
    if not config_path.is_file():
        raise FileNotFoundError(f"nequip config {config_path} does not exist")
    run_dir = Path(run_dir).resolve()
    exe = Path(sys.executable).with_name("nequip-train")
    cmd = [str(exe) if exe.exists() else "nequip-train", "-cp", str(config_path.parent), "-cn", config_path.name]
    cmd += [f"hydra.run.dir={run_dir}", *overrides]
    proc_env = dict(os.environ)
    if threads is not None:
        # one torch/OpenMP thread per run: small models on a shared machine train much faster
        # than with oversubscribed thread pools
        proc_env.update(OMP_NUM_THREADS=str(int(threads)), MKL_NUM_THREADS=str(int(threads)))
    proc_env.update(env or {})
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=proc_env)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"nequip-train failed (exit {proc.returncode}) for {config_path}:\n{tail}")
    if not (run_dir / "last.ckpt").is_file():
        raise RuntimeError(f"nequip-train finished but {run_dir / 'last.ckpt'} is missing")
    return run_dir
