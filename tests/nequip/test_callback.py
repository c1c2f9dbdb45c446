"""LTAUErrorLogger: logs checked against frames and against errors recomputed independently with
nequip's ASE calculator from the saved checkpoints."""
from __future__ import annotations

from types import SimpleNamespace

import ase.io
import numpy as np
import pytest
import torch

from ltau_ase.core.atom_ids import global_atom_ids
from ltau_ase.core.errorlog import ErrorLog
from ltau_ase.nequip.callback import ENERGY_SUBDIR, LTAUErrorLogger, batch_atom_ids
from ltau_ase.nequip.training import (
    ERROR_LOGGER_TARGET as LOGGER,
    TINY_MODEL as TINY,
    assign_frame_ids,
    emt_slab_frames,
    train_nequip,
    write_nequip_config,
    write_training_file,
)

TYPE_NAMES = ["Cu", "Pt", "O", "H"]

pytestmark = pytest.mark.slow

# float32 models: forces agree to ~1e-5 eV/Å between batched training and single-frame ASE evaluation
ATOL = 2e-4


def _ids_of(frames) -> np.ndarray:
    return global_atom_ids([a.info["frame_id"] for a in frames], [len(a) for a in frames])


def _read(files):
    return [atoms for f in files for atoms in ase.io.read(f, index=":")]


def reference_errors(checkpoint, frames):
    """Per-atom errors of a checkpoint via nequip's NequIPCalculator, one frame at a time.

    Returns ids (N,), |ΔF| (N,), |ΔF_α| (N, 3), |ΔE|/n per atom (N,), atoms in frame order.
    """
    from nequip.integrations.ase import NequIPCalculator

    calc = NequIPCalculator._from_saved_model(str(checkpoint), device="cpu")
    norms, comps, energies = [], [], []
    for atoms in frames:
        ref_f, ref_e = atoms.get_forces(), atoms.get_potential_energy()
        probe = atoms.copy()
        probe.calc = calc
        diff = probe.get_forces() - ref_f
        norms.append(np.linalg.norm(diff, axis=1))
        comps.append(np.abs(diff))
        energies.append(np.full(len(atoms), abs(probe.get_potential_energy() - ref_e) / len(atoms)))
    return _ids_of(frames), np.concatenate(norms), np.concatenate(comps), np.concatenate(energies)


def _row_for(log: ErrorLog, row: int, ids: np.ndarray, components: bool = False) -> np.ndarray:
    pos = np.searchsorted(log.atom_ids, ids)
    assert np.array_equal(log.atom_ids[pos], ids)
    data = log.components() if components else log.errors()
    return np.asarray(data[row])[pos]


# ------------------------------------------------------------------ the main fixture run
def test_log_holds_one_error_per_training_atom_per_epoch(tiny_nequip_run):
    run = tiny_nequip_run
    frames = _read(run.train_files)
    expected = np.sort(_ids_of(frames))
    # two files with frame ids 0.. and 1000..: ids are not positions in a concatenated list
    assert {a.info["frame_id"] for a in frames} == set(range(30)) | set(range(1000, 1030))
    for log_dir, mode in [(run.error_log_dir, "free"), (run.exact_log_dir, "exact")]:
        log = ErrorLog(log_dir)
        assert np.array_equal(log.atom_ids, expected)
        assert log.n_epochs == run.max_epochs and log.epochs == list(range(run.max_epochs))
        errors = np.asarray(log.errors())
        assert errors.shape == (run.max_epochs, expected.size)
        assert np.isfinite(errors).all() and (errors >= 0).all()
        meta = log.metadata
        assert meta["mode"] == mode
        assert meta["seed"] == 1 and meta["max_epochs"] == run.max_epochs
        assert meta["train_files"] == [str(f.resolve()) for f in run.train_files]
        assert meta["run_dir"] == str(run.run_dir.resolve())
    # the model learns: mean error falls from the first to the last epoch
    exact = np.asarray(ErrorLog(run.exact_log_dir).errors())
    assert exact[-1].mean() < exact[0].mean()


def test_exact_log_matches_checkpoints_recomputed_with_ase(tiny_nequip_run):
    run = tiny_nequip_run
    frames = _read(run.train_files)
    log = ErrorLog(run.exact_log_dir)
    energy_log = ErrorLog(run.exact_log_dir / ENERGY_SUBDIR)
    assert np.array_equal(energy_log.atom_ids, log.atom_ids)
    # per-epoch checkpoints hold the end-of-epoch weights, last.ckpt those of the last epoch
    # (every atom of the last epoch; a third of the frames for epoch 0, to keep the test quick)
    for epoch, ckpt, subset in [
        (0, run.run_dir / "epochs" / "epoch0000.ckpt", frames[::3]),
        (run.max_epochs - 1, run.checkpoint, frames),
    ]:
        ids, norms, comps, energies = reference_errors(ckpt, subset)
        np.testing.assert_allclose(_row_for(log, epoch, ids), norms, rtol=1e-4, atol=ATOL)
        np.testing.assert_allclose(_row_for(log, epoch, ids, components=True), comps, rtol=1e-4, atol=ATOL)
        np.testing.assert_allclose(_row_for(energy_log, epoch, ids), energies, rtol=1e-4, atol=ATOL)
    # the free log differs (errors of the weights during the epoch), but is of the same size
    free = np.asarray(ErrorLog(run.error_log_dir).errors())
    assert not np.allclose(free[-1], np.asarray(log.errors())[-1])
    assert 0.2 < free[-1].mean() / np.asarray(log.errors())[-1].mean() < 5.0


# ------------------------------------------------------------------ extra small runs
def _small_run(tmp_path, name, *, frames, callbacks, **kwargs):
    train = write_training_file(tmp_path / f"{name}_train.xyz", frames[:-4])
    val = write_training_file(tmp_path / f"{name}_val.xyz", frames[-4:])
    params = dict(TINY, type_names=TYPE_NAMES, seed=3, max_epochs=2)
    params.update(kwargs)
    config = write_nequip_config(tmp_path / "config" / f"{name}.yaml", [train], val_file=val, callbacks=callbacks, **params)
    return train, config


def test_free_mode_equals_exact_mode_when_weights_do_not_change(tmp_path):
    """With lr = 0 the weights never change, so the training forward passes (free mode) see the
    same model as the end-of-epoch evaluation (exact mode): the two logs must agree atom by atom,
    whatever the shuffled batch order."""
    frames = assign_frame_ids(emt_slab_frames(24, seed=5), 70)
    run_dir = tmp_path / "run"
    callbacks = [
        {"_target_": LOGGER, "log_dir": "free", "mode": "free", "components": True, "energy": True},
        {"_target_": LOGGER, "log_dir": "exact", "mode": "exact", "components": True, "energy": True},
    ]
    train, config = _small_run(tmp_path, "lr0", frames=frames, callbacks=callbacks, lr=0.0)
    train_nequip(config, run_dir, threads=1)
    free, exact = ErrorLog(run_dir / "free"), ErrorLog(run_dir / "exact")
    assert np.array_equal(free.atom_ids, np.sort(_ids_of(frames[:-4])))
    np.testing.assert_allclose(np.asarray(free.errors()), np.asarray(exact.errors()), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(free.components()), np.asarray(exact.components()), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(ErrorLog(run_dir / "free" / ENERGY_SUBDIR).errors()),
        np.asarray(ErrorLog(run_dir / "exact" / ENERGY_SUBDIR).errors()),
        rtol=1e-5,
        atol=1e-6,
    )
    ids, norms, _, _ = reference_errors(run_dir / "last.ckpt", _read([train]))
    np.testing.assert_allclose(_row_for(free, 1, ids), norms, rtol=1e-4, atol=ATOL)
    # a restart from the last checkpoint appends the new epochs to the same logs
    restart = [f"+ckpt_path={run_dir / 'last.ckpt'}", "trainer.max_epochs=3"]
    train_nequip(config, run_dir, overrides=restart, threads=1)
    free, exact = ErrorLog(run_dir / "free"), ErrorLog(run_dir / "exact")
    assert free.epochs == exact.epochs == [0, 1, 2]
    np.testing.assert_allclose(np.asarray(free.errors()), np.asarray(exact.errors()), rtol=1e-5, atol=1e-5)


def test_ema_module_exact_log_uses_the_ema_weights_of_the_checkpoint(tmp_path):
    """EMALightningModule, trained (in passing) with the weighted per-atom force loss from a YAML
    config and an extxyz ``ltau_weight`` column."""
    frames = assign_frame_ids(emt_slab_frames(24, seed=6), 90)
    rng = np.random.default_rng(1)
    for atoms in frames:
        atoms.arrays["ltau_weight"] = rng.uniform(0.5, 1.5, len(atoms))
    run_dir = tmp_path / "run"
    callbacks = [
        {"_target_": LOGGER, "log_dir": "free", "mode": "free"},
        {"_target_": LOGGER, "log_dir": "exact", "mode": "exact"},
    ]
    loss = {
        "_target_": "ltau_ase.nequip.loss.WeightedEnergyForceLoss",
        "per_atom_energy": True,
        "coeffs": {"total_energy": 1.0, "forces": 1.0},
    }
    train, config = _small_run(
        tmp_path,
        "ema",
        frames=frames,
        callbacks=callbacks,
        training_module="nequip.train.EMALightningModule",
        ema_decay=0.5,
        loss=loss,
        include_keys=("frame_id", "ltau_weight"),
    )
    train_nequip(config, run_dir, threads=1)
    exact, free = ErrorLog(run_dir / "exact"), ErrorLog(run_dir / "free")
    assert exact.metadata["training_module"].endswith("EMALightningModule")
    assert free.n_epochs == exact.n_epochs == 2 and np.isfinite(np.asarray(free.errors())).all()
    # a checkpoint of an EMA module loads the EMA weights for inference
    ids, norms, _, _ = reference_errors(run_dir / "last.ckpt", _read([train]))
    np.testing.assert_allclose(_row_for(exact, 1, ids), norms, rtol=1e-4, atol=ATOL)


def test_missing_frame_id_gives_a_clear_error(tmp_path):
    frames = assign_frame_ids(emt_slab_frames(12, seed=7), 0)
    callbacks = [{"_target_": LOGGER, "log_dir": "log", "mode": "free"}]
    _, config = _small_run(tmp_path, "noid", frames=frames, callbacks=callbacks, include_keys=(), max_epochs=1)
    with pytest.raises(RuntimeError, match=r"(?s)no 'frame_id' field.*include_keys"):
        train_nequip(config, tmp_path / "run", threads=1)


# ------------------------------------------------------------------ split ensemble
def test_ids_survive_a_random_train_val_split(tiny_nequip_ensemble):
    ens = tiny_nequip_ensemble
    frames = _read(ens.train_files)
    # nequip's split: torch.utils.data.random_split with a generator seeded by the data seed
    n = len(frames)
    split = torch.utils.data.random_split(
        range(n), [n - ens.n_val, ens.n_val], generator=torch.Generator().manual_seed(ens.data_seed)
    )
    train_frames = [frames[i] for i in split[0].indices]
    val_frames = [frames[i] for i in split[1].indices]
    for run in ens.runs:
        log = ErrorLog(run.error_log_dir)
        assert np.array_equal(log.atom_ids, np.sort(_ids_of(train_frames)))
        assert not np.isin(_ids_of(val_frames), log.atom_ids).any()
        assert np.isfinite(np.asarray(log.errors())).all()
    a, b = (np.asarray(ErrorLog(r.error_log_dir).errors()) for r in ens.runs)
    assert not np.allclose(a, b)  # different model seeds give different trajectories


# ------------------------------------------------------------------ unit checks (no training)
def _batch(frame_ids, n_atoms):
    n_atoms = torch.tensor(n_atoms)
    return {
        "frame_id": torch.tensor(frame_ids),
        "num_atoms": n_atoms,
        "batch": torch.repeat_interleave(torch.arange(len(n_atoms)), n_atoms),
    }


def test_batch_atom_ids_follow_frame_ids():
    ids = batch_atom_ids(_batch([7, 3], [2, 3])).numpy()
    assert ids.tolist() == [7 * 2**20, 7 * 2**20 + 1, 3 * 2**20, 3 * 2**20 + 1, 3 * 2**20 + 2]
    with pytest.raises(ValueError, match="include_keys"):
        batch_atom_ids({"num_atoms": torch.tensor([1]), "batch": torch.tensor([0])})


def test_duplicate_frame_ids_across_files_are_refused():
    loader = [_batch([0, 1], [2, 2]), _batch([1, 2], [2, 2])]  # frame 1 in two files
    with pytest.raises(ValueError, match="unique across all training files"):
        LTAUErrorLogger()._collect_atom_ids(loader)


def test_multi_process_training_without_a_process_group_is_refused():
    trainer = SimpleNamespace(world_size=2)
    with pytest.raises(RuntimeError, match="no torch.distributed process group"):
        LTAUErrorLogger().setup(trainer, None, "fit")
    with pytest.raises(ValueError, match="mode"):
        LTAUErrorLogger(mode="sometimes").setup(SimpleNamespace(world_size=1), None, "fit")
