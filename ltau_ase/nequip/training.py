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

import copy
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
from ase.data import chemical_symbols

from ltau_ase.core.atom_ids import FRAME_ID_KEY
from ltau_ase.core.checks import check_int
from ltau_ase.core.trainingset import (  # noqa: F401  (assign_frame_ids, write_training_file: their old home)
    as_paths,
    assign_frame_ids,
    read_training_frames,
    write_training_file,
)

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


#: the packaged nequip config template (package data): a plain nequip 0.19 config with the error logger
CONFIG_TEMPLATE = "nequip_ltau.yaml"


def config_template_path() -> Path:
    """Path of the packaged template ``ltau_ase/nequip/templates/nequip_ltau.yaml`` (read it as a nequip config)."""
    from importlib.resources import files

    return Path(str(files("ltau_ase.nequip").joinpath("templates", CONFIG_TEMPLATE)))


def load_config_template() -> dict:
    """The template as a dict (a fresh copy each call)."""
    with open(config_template_path(), encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _ase_dataset(prototype: dict, file_path: str | os.PathLike, include_keys: list[str]) -> dict:
    ds = copy.deepcopy(prototype)
    ds["file_path"] = str(Path(file_path).resolve())
    ds["include_keys"] = list(include_keys)
    return ds


def _count_frames(files: Sequence[Path]) -> int:
    import ase.io

    return sum(sum(1 for _ in ase.io.iread(str(f), format="extxyz")) for f in files)


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
    error_logger: bool | dict = False,
) -> Path:
    """Write an ordinary nequip 0.19 training config (YAML): the packaged template with these values.

    The template (:func:`config_template_path`, ``ltau_ase/nequip/templates/nequip_ltau.yaml``) is a
    plain nequip config whose top-level knobs (``seed``, ``data_seed``, ``type_names``, ``r_max``,
    ``num_layers``, ``num_features``, ``l_max``, ``batch_size``, ``lr``, ``max_epochs``,
    ``model_dtype``, ``accelerator``) the sections refer to as ``${...}``; this function sets them and
    the dataset list, and returns the written path.

    Args:
        path: YAML file to write.
        train_files: one or more extxyz files (concatenated into the single training dataset); every
            frame needs ``atoms.info["frame_id"]``.
        type_names: chemical symbols, used as nequip type names (identity species→type map).
        val_file: validation extxyz file. If None, ``n_val`` frames are split off the
            concatenated training files at random (nequip's ``split_dataset`` with ``data_seed``).
        callbacks: extra Lightning callback configs (dicts with ``_target_``) appended to
            ``trainer.callbacks``.
        seed: model seed (also the data seed unless ``data_seed`` is given).
        data_seed: seed of the data module (train/val split, shuffling); keep it fixed across the
            M runs of an ensemble so they share the same training atoms.
        training_module: ``nequip.train.NequIPLightningModule`` or ``nequip.train.EMALightningModule``.
        loss: a ``training_module.loss`` config; default: per-atom energy MSE + force MSE (1:1).
        accelerator: Lightning accelerator (``"cpu"``, ``"gpu"``, ``"auto"``); one device.
        save_every_epoch: also keep one checkpoint per epoch in ``<run dir>/epochs/epochNNNN.ckpt``
            (for :func:`ltau_ase.nequip.fit.error_logs_from_checkpoints`).
        error_logger: keep the template's ``LTAUErrorLogger`` (free mode, ``<run dir>/ltau_errors``);
            a dict updates its arguments (e.g. ``{"mode": "exact"}``); False drops it (pass your own
            in ``callbacks``).
    Outputs of the run (in the Hydra run dir): ``best.ckpt`` (lowest validation loss),
    ``last.ckpt`` (final epoch) and, with the logger, ``ltau_errors/``.
    """
    train_files = as_paths(train_files)
    if not train_files:
        raise ValueError("train_files is empty; expected at least one extxyz file")
    for f in train_files + ([Path(val_file)] if val_file is not None else []):
        if not f.is_file():
            raise FileNotFoundError(f"training data file {f} does not exist")
    config = load_config_template()
    type_names = list(type_names)
    config.update(seed=int(seed), data_seed=int(seed if data_seed is None else data_seed), type_names=type_names,
                  r_max=float(r_max), num_layers=int(num_layers), num_features=int(num_features),
                  radial_mlp_width=max(8, int(num_features)), l_max=int(l_max), batch_size=int(batch_size),
                  lr=float(lr), max_epochs=int(max_epochs), model_dtype=model_dtype, accelerator=accelerator)
    prototype = config.pop("_dataset")
    include_keys = list(include_keys)
    data = config["data"]
    split = data.pop("split_dataset")
    train_ds = split["dataset"]
    train_ds["datasets"] = [_ase_dataset(prototype, f, include_keys) for f in train_files]
    data["train_dataloader"]["shuffle"] = bool(shuffle)
    if val_file is not None:
        data["train_dataset"] = train_ds
        data["val_dataset"] = _ase_dataset(prototype, val_file, include_keys)
    else:
        if n_val is None or n_val < 1:
            raise ValueError("without val_file, give n_val >= 1 frames to split off the training files")
        n_total = _count_frames(train_files)
        if n_val >= n_total:
            raise ValueError(f"n_val={n_val} leaves no training frames out of {n_total}")
        data["split_dataset"] = {"dataset": train_ds, "train": n_total - int(n_val), "val": int(n_val)}
    # keep the data module's keys in nequip's usual order: datasets first
    config["data"] = {k: data[k] for k in ("_target_", "seed", "train_dataset", "val_dataset", "split_dataset",
                                           "train_dataloader", "val_dataloader", "stats_manager") if k in data}

    trainer_callbacks = config["trainer"]["callbacks"]
    logger = next(c for c in trainer_callbacks if c["_target_"] == ERROR_LOGGER_TARGET)
    trainer_callbacks.remove(logger)
    if save_every_epoch:
        trainer_callbacks.append({
            "_target_": "lightning.pytorch.callbacks.ModelCheckpoint",
            "dirpath": "${hydra:runtime.output_dir}/epochs",
            "filename": "epoch{epoch:04d}",
            "auto_insert_metric_name": False,
            "every_n_epochs": 1,
            "save_top_k": -1,
            # unused without a monitor; makes Lightning's callback state key differ from "latest"
            "mode": "max",
        })
    if error_logger:
        trainer_callbacks.append({**logger, **(error_logger if isinstance(error_logger, dict) else {})})
    trainer_callbacks.extend(copy.deepcopy(dict(c)) for c in callbacks)

    module = config["training_module"]
    module["_target_"] = training_module
    if loss is not None:
        module["loss"] = copy.deepcopy(loss)
    if training_module.endswith("EMALightningModule"):
        module["ema_decay"] = float(ema_decay)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config, fh, sort_keys=False)
    return path


def write_ensemble_configs(
    directory: str | os.PathLike,
    train_files: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    type_names: Sequence[str] | None = None,
    n_members: int = 3,
    val_file: str | os.PathLike | None = None,
    n_val: int | None = None,
    data_seed: int = 0,
    first_seed: int = 1,
    **config: Any,
) -> list[Path]:
    """The nequip configs of an LTAU ensemble: ``member1.yaml`` ... ``memberM.yaml`` in ``directory``.

    The members differ only in the model ``seed`` (``first_seed``, ``first_seed + 1``, ...); they share
    ``data_seed`` and therefore one train/validation split, so their error logs hold the same
    training atoms (``ltau fit`` refuses runs that do not). The training files are checked first:
    every frame needs a unique integer ``atoms.info["frame_id"]`` and the type names (default: the
    chemical symbols found in the files, by atomic number) must cover their elements. Other keywords go to :func:`write_nequip_config` (``max_epochs``, ``r_max``,
    ...); the error logger is on (free mode, ``<run dir>/ltau_errors``) unless ``error_logger=False``.
    Returns the config paths; train each with ``nequip-train -cp <directory> -cn memberI.yaml
    hydra.run.dir=runs/seedI``.
    """
    n_members = check_int(n_members, "n_members")
    train_files = as_paths(train_files)
    frames = read_training_frames(train_files + ([Path(val_file)] if val_file is not None else []))
    numbers = sorted({int(z) for a in frames for z in a.numbers})
    elements = [chemical_symbols[z] for z in numbers]
    if type_names is None:
        type_names = elements
    missing = sorted(set(elements) - set(type_names))
    if missing:
        raise ValueError(f"the training data hold elements {missing} that type_names {list(type_names)} lacks")
    config.setdefault("error_logger", True)
    directory = Path(directory)
    paths = [write_nequip_config(directory / f"member{i + 1}.yaml", train_files, type_names=type_names,
                                 val_file=val_file, n_val=n_val, seed=first_seed + i, data_seed=data_seed, **config)
             for i in range(n_members)]
    check_shared_split(paths)
    return paths


def check_shared_split(config_paths: Sequence[str | os.PathLike]) -> None:
    """Raise ValueError unless the nequip configs share their data section (files, split, data seed).

    The check ``ltau fit`` would otherwise make only after every member has trained: the members of
    an ensemble must log the same training atoms.
    """
    datas = []
    for p in config_paths:
        with open(p, encoding="utf-8") as fh:
            cfg = yaml.safe_load(fh)
        data = dict(cfg.get("data") or {})
        if isinstance(data.get("seed"), str) and data["seed"].strip() == "${data_seed}":
            data["seed"] = cfg.get("data_seed")
        datas.append((Path(p), data))
    ref_path, ref = datas[0]
    for path, data in datas[1:]:
        if data != ref:
            keys = sorted(k for k in set(ref) | set(data) if ref.get(k) != data.get(k))
            raise ValueError(f"{path} and {ref_path} differ in data.{keys}: the members of an ensemble must share "
                             "their training files, train/validation split and data seed (vary only the model seed)")


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
