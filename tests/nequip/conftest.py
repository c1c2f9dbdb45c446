"""Session fixtures that train tiny real NequIP models on EMT data generated here.

``tiny_nequip_run``: one run (2 layers, 8 features, l_max 1, r_max 4 Å, 3 epochs) on 60 training
frames (13 atoms each) split across TWO extxyz files (frame ids 0..29 and 1000..1029) plus a separate validation
file, with two LTAUErrorLogger callbacks: free mode (``error_log_dir``) and exact mode with
components and energies (``exact_log_dir``); per-epoch checkpoints in ``run_dir/epochs``.

``tiny_nequip_ensemble``: M=2 runs (model seeds 1 and 2, one data seed) on one training file
(40 frames) with a random train/val split of 8 validation frames (nequip ``split_dataset``),
free-mode logs in ``<run dir>/ltau_errors``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ltau_ase.nequip.training import (
    ERROR_LOGGER_TARGET,
    TINY_MODEL,
    assign_frame_ids,
    emt_slab_frames,
    train_nequip,
    write_nequip_config,
    write_training_file,
)

TYPE_NAMES = ["Cu", "Pt", "O", "H"]
LOGGER = ERROR_LOGGER_TARGET
TINY = TINY_MODEL


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a busy 2-core machine spinning OpenMP threads slow tiny models ~50x."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def latent_calc(tiny_nequip_run):
    """The tiny run's checkpoint as a LatentNequIPCalculator (type names are chemical symbols)."""
    from ltau_ase.nequip.calculator import LatentNequIPCalculator

    return LatentNequIPCalculator.from_model_file(tiny_nequip_run.checkpoint, chemical_species_to_atom_type_map=True)


@dataclass
class TinyRun:
    run_dir: Path
    checkpoint: Path  # last.ckpt (weights at the end of the last epoch)
    train_files: list[Path]
    frames: list  # list[ase.Atoms] of all training files, in file order (all are training frames)
    error_log_dir: Path  # free-mode log
    config_path: Path
    exact_log_dir: Path | None = None  # exact-mode log (components + energy)
    val_file: Path | None = None
    type_names: list[str] = field(default_factory=lambda: list(TYPE_NAMES))
    max_epochs: int = 0


@dataclass
class TinyEnsemble:
    runs: list[TinyRun]
    train_files: list[Path]
    frames: list  # all frames of the training file (train split + val split)
    n_val: int
    data_seed: int


@pytest.fixture(scope="session")
def tiny_nequip_data(tmp_path_factory):
    """60 training frames in two files (ids 0.. and 1000..) and 6 validation frames (ids 5000..)."""
    root = tmp_path_factory.mktemp("tiny_nequip_data")
    frames = emt_slab_frames(66, seed=0)
    file_a = assign_frame_ids(frames[:30], 0)
    file_b = assign_frame_ids(frames[30:60], 1000)
    val = assign_frame_ids(frames[60:], 5000)
    train_files = [write_training_file(root / "train_a.xyz", file_a), write_training_file(root / "train_b.xyz", file_b)]
    val_file = write_training_file(root / "val.xyz", val)
    return train_files, file_a + file_b, val_file


@pytest.fixture(scope="session")
def tiny_nequip_run(tmp_path_factory, tiny_nequip_data) -> TinyRun:
    train_files, frames, val_file = tiny_nequip_data
    root = tmp_path_factory.mktemp("tiny_nequip_run")
    run_dir = root / "run"
    epochs = 3
    config = write_nequip_config(
        root / "config" / "tiny.yaml",
        train_files,
        val_file=val_file,
        type_names=TYPE_NAMES,
        seed=1,
        max_epochs=epochs,
        save_every_epoch=True,
        callbacks=[
            {"_target_": LOGGER, "log_dir": str(run_dir / "ltau_errors"), "mode": "free"},
            {
                "_target_": LOGGER,
                "log_dir": str(run_dir / "ltau_errors_exact"),
                "mode": "exact",
                "components": True,
                "energy": True,
            },
        ],
        **TINY,
    )
    train_nequip(config, run_dir, timeout=600, threads=1)
    return TinyRun(
        run_dir=run_dir,
        checkpoint=run_dir / "last.ckpt",
        train_files=list(train_files),
        frames=frames,
        error_log_dir=run_dir / "ltau_errors",
        exact_log_dir=run_dir / "ltau_errors_exact",
        config_path=config,
        val_file=val_file,
        max_epochs=epochs,
    )


@pytest.fixture(scope="session")
def tiny_nequip_ensemble(tmp_path_factory) -> TinyEnsemble:
    root = tmp_path_factory.mktemp("tiny_nequip_ensemble")
    frames = assign_frame_ids(emt_slab_frames(40, seed=3), 200)
    train_file = write_training_file(root / "train.xyz", frames)
    n_val, data_seed, epochs = 8, 7, 3
    runs = []
    for seed in (1, 2):
        run_dir = root / f"run_seed{seed}"
        config = write_nequip_config(
            root / "config" / f"seed{seed}.yaml",
            [train_file],
            n_val=n_val,
            type_names=TYPE_NAMES,
            seed=seed,
            data_seed=data_seed,
            max_epochs=epochs,
            callbacks=[{"_target_": LOGGER, "log_dir": "ltau_errors", "mode": "free"}],  # relative: in run dir
            **TINY,
        )
        train_nequip(config, run_dir, timeout=600, threads=1)
        runs.append(
            TinyRun(
                run_dir=run_dir,
                checkpoint=run_dir / "last.ckpt",
                train_files=[train_file],
                frames=frames,
                error_log_dir=run_dir / "ltau_errors",
                config_path=config,
                max_epochs=epochs,
            )
        )
    return TinyEnsemble(runs=runs, train_files=[train_file], frames=frames, n_val=n_val, data_seed=data_seed)
