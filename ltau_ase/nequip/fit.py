"""From nequip training runs (+ their training data) to one LTAU estimator file.

:func:`fit_estimator_from_runs` is the Python function behind ``ltau fit``: it opens the error logs
of M runs (an ensemble, different seeds, same training atoms), extracts the latent descriptors of
every logged training atom from one checkpoint, verifies that descriptor rows and log columns hold
the same atom ids, fits an :class:`~ltau_ase.core.estimator.LTAUEstimator` and saves it.

:func:`error_logs_from_checkpoints` is the post-hoc "checkpoint ensemble" mode: it evaluates saved
per-epoch checkpoints on the training set and writes an error log, so finished runs trained
without :class:`~ltau_ase.nequip.callback.LTAUErrorLogger` can adopt LTAU.

Model files are loaded by :meth:`ltau_ase.nequip.calculator.LatentNequIPCalculator.from_model_file`:
a checkpoint is read once, unpickled with ``weights_only=True`` and built from an allow-list of exact
nequip classes (:mod:`ltau_ase.nequip.safe_load`), so no code named by the file runs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from ase import Atoms

from ltau_ase.core.atom_ids import frame_ids_of, global_atom_ids
from ltau_ase.core.checks import check_int
from ltau_ase.core.errorlog import (  # noqa: F401  (find_error_log, DEFAULT_LOG_SUBDIR: re-exported, old home)
    DEFAULT_LOG_SUBDIR,
    EpochWindow,
    ErrorLog,
    ErrorLogWriter,
    find_error_log,
    load_error_logs,
)
from ltau_ase.core.estimator import LTAUEstimator
from ltau_ase.core.fileformat import sha256_file
from ltau_ase.core.index import choose_index, describe_index
from ltau_ase.core.trainingset import as_paths, frames_for_atom_ids, read_training_frames

PathLike = str | os.PathLike


#: checkpoint names tried in order for a run's default model: last.ckpt first, the model that
#: ``LTAUCalculator.from_model("run/last.ckpt", ...)``, ``ltau relax`` and ``ltau md`` load in the README
#: (and the final model, whose training error the default atol is); a run's best.ckpt is another
#: model with another latent space, used only when it is the run's only checkpoint or passed explicitly
DEFAULT_CHECKPOINTS = ("last.ckpt", "best.ckpt")


def default_checkpoint(run_dir: PathLike) -> Path:
    """``last.ckpt`` of a run directory, else ``best.ckpt`` (see :data:`DEFAULT_CHECKPOINTS`)."""
    run_dir = Path(run_dir)
    for name in DEFAULT_CHECKPOINTS:
        if (run_dir / name).is_file():
            return run_dir / name
    raise FileNotFoundError(f"neither last.ckpt nor best.ckpt found in {run_dir}; pass model= explicitly")


def _default_model(log_dir: Path) -> Path:
    """Default descriptor model of a log: the last checkpoint of a checkpoint-ensemble log, else
    ``last.ckpt`` / ``best.ckpt`` of the run directory the log records (else its parent)."""
    meta = ErrorLog(log_dir).metadata
    if meta.get("checkpoints"):
        return Path(meta["checkpoints"][-1])
    recorded = meta.get("run_dir")
    run_dir = Path(recorded) if recorded and Path(recorded).is_dir() else log_dir.parent
    return default_checkpoint(run_dir)


def fit_estimator_from_runs(
    run_dirs: PathLike | Sequence[PathLike],
    train_files: PathLike | Sequence[PathLike],
    output: PathLike | None,
    k: int = 10,
    index: str = "auto",
    atol: float | None = None,
    window: EpochWindow | dict | tuple | str | None = "last_half",
    model: PathLike | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    progress: bool = True,
    record_species: bool = True,
    group_key: str | None = None,
    **estimator_params: Any,
) -> LTAUEstimator:
    """Fit an LTAU estimator from M nequip runs and save it.

    Args:
        run_dirs: nequip run directories (or their error-log directories); M ≥ 1 runs of one
            ensemble, logging the same training atoms.
        train_files: the training data files (extxyz with ``info["frame_id"]``). Frames not in
            the logs (e.g. split off for validation) are skipped; logged frames missing from the
            files raise ValueError.
        output: the ``.ltau`` file to write (None: do not save).
        k: neighbours averaged per test atom (paper default 10).
        index: ``"flat"``, ``"hnsw"``, ``"ivfpq"`` or ``"auto"``
            (:func:`ltau_ase.core.index.choose_index`: flat below 1e5 training atoms, HNSW below 1e6,
            IVF-PQ with exact re-ranking above; the choice is recorded as ``metadata["index_choice"]``).
        atol: error threshold (eV/Å); None: the final models' training MAE.
        window: epochs used (``EpochWindow(skip, last)``, dict or tuple); None: all; ``"last_half"``
            (default): the last half, see ``LTAUEstimator``'s ``window``.
        model: checkpoint / package file giving the descriptors; default the first run's
            ``last.ckpt`` (else ``best.ckpt``; for a checkpoint-ensemble log its last
            checkpoint), the file the README's ``from_model`` / ``ltau relax`` load. Its SHA-256
            is stored as ``model_sha256``; simulations must load this same file.
        record_species: record the training elements, so that structures with elements never seen
            in training are refused or flagged (``LTAUCalculator(unknown_species=...)``); False
            leaves such atoms to the latent-distance lookup alone.
        group_key: an ``atoms.info`` key naming each training frame's structure group (e.g.
            ``"system"``: the relaxation or MD run it comes from); the distance ratio's reference
            distance then leaves each group out (``LTAUEstimator.fit(groups=...)``), so near-duplicate
            frames of one run do not shrink it. None: leave one atom out.
        estimator_params: further :class:`LTAUEstimator` parameters (rtol, bins, ...).
    Returns:
        the fitted estimator (also saved to ``output``).
    Raises:
        ValueError: logs of different atoms, frames missing, or descriptors not aligned with the logs.
    """
    from ltau_ase.nequip.calculator import LatentNequIPCalculator
    from ltau_ase.nequip.descriptors import extract_descriptors

    run_dirs, train_files = as_paths(run_dirs), as_paths(train_files)
    if not run_dirs:
        raise ValueError("no run directories given; expected at least one nequip run")
    log_dirs = [find_error_log(r) for r in run_dirs]
    logs = load_error_logs(log_dirs)
    log_ids = logs[0].atom_ids
    model_path = Path(model) if model is not None else _default_model(log_dirs[0])
    if not model_path.is_file():
        raise FileNotFoundError(f"model file {model_path} does not exist")
    index_choice = f"index={index} given"
    if index == "auto":
        index, index_choice = choose_index(log_ids.size)

    frames = frames_for_atom_ids(read_training_frames(train_files), log_ids, train_files)
    frame_groups = None
    if group_key is not None:  # checked before the descriptor pass
        missing = [i for i, a in enumerate(frames) if group_key not in a.info]
        if missing:
            raise ValueError(f"training frame {missing[0]} (and {len(missing) - 1} more) has no info[{group_key!r}]; "
                             "--reference-groups needs that key on every training frame")
        labels = np.unique([str(a.info[group_key]) for a in frames], return_inverse=True)[1]
        frame_groups = np.repeat(labels, [len(a) for a in frames])
    # one read of the model file gives both the descriptors and the recorded hash
    calc = LatentNequIPCalculator.from_model_file(model_path, device=device)
    params = dict(estimator_params)
    params.setdefault("progress", progress)
    if params.get("max_memory") is not None:
        # Say so before the long descriptor pass: D from one frame, epochs and atoms from the logs.
        _, probe = extract_descriptors(calc, frames[:1], device=device, batch_size=1, progress=False)
        budget = LTAUEstimator(k=k, index=index, atol=atol, window=window, **params)
        win = budget.resolve_window(logs) or EpochWindow()  # "last_half" becomes the epochs it keeps
        budget.check_fit_memory(log_ids.size, probe.shape[1], [log.n_selected_epochs(win) for log in logs])
    desc_ids, descriptors = extract_descriptors(
        calc, frames, device=device, batch_size=batch_size, progress=progress
    )
    # Descriptors come in frame order; the logs in sorted-id order. Put the descriptor rows in the
    # logs' order and then verify id equality row by row (a frame of a different size, say, fails).
    order = np.argsort(desc_ids, kind="stable")
    if np.any(order != np.arange(order.size)):  # (already in order: no N x D copy, as at 10^7 atoms)
        desc_ids, descriptors = desc_ids[order], descriptors[order]
    if desc_ids.shape != log_ids.shape or not np.array_equal(desc_ids, log_ids):
        extra = np.setdiff1d(desc_ids, log_ids)
        lacking = np.setdiff1d(log_ids, desc_ids)
        raise ValueError(
            f"descriptor atom ids do not match the error logs: {lacking.size} logged atoms have no descriptor "
            f"(e.g. {lacking[:5].tolist()}), {extra.size} descriptors have no log entry (e.g. {extra[:5].tolist()}); "
            "the training files' frames must have the same atoms as when the runs were trained"
        )
    numbers = np.concatenate([a.numbers for a in frames]).astype(np.int64)[order]
    groups = None if frame_groups is None else frame_groups[order]
    ref_forces = np.concatenate([np.linalg.norm(a.get_forces(apply_constraint=False), axis=1) for a in frames])[order]

    metadata = {
        "model_path": str(model_path.resolve()),
        "model_sha256": calc.model_sha256,
        "k": int(k),
        "index": index,
        "index_choice": index_choice,
        "atol": None if atol is None else float(atol),
        "epoch_window": window if isinstance(window, str) else EpochWindow.coerce(window).to_dict(),
        "run_dirs": [str(r.resolve()) for r in run_dirs],
        "error_logs": [str(d.resolve()) for d in log_dirs],
        "train_files": [str(f.resolve()) for f in train_files],
        "n_runs": len(logs),
        "n_train_atoms": int(log_ids.size),
        "group_key": group_key,
        "log_metadata": [log.metadata for log in logs],
    }
    estimator = LTAUEstimator(k=k, index=index, atol=atol, window=window, metadata=metadata, **params)
    estimator.fit(descriptors, logs, reference_forces=ref_forces,
                  atomic_numbers=numbers if record_species else None, atom_ids=log_ids, groups=groups)
    estimator.metadata["atol_used"] = float(estimator.atol_)
    if index_choice.startswith("auto"):  # name the settings too (IVF-PQ's depend on N and D)
        estimator.metadata["index_choice"] = f"{index_choice}: {describe_index(estimator.index_.kind, estimator.index_.params)}"
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        estimator.save(str(output))
    return estimator


def error_logs_from_checkpoints(
    checkpoints: Sequence[PathLike],
    train_files: PathLike | Sequence[PathLike],
    log_dir: PathLike,
    device: str = "cpu",
    batch_size: int = 16,
    components: bool = False,
    progress: bool = True,
    trusted_targets: Sequence[Callable[..., Any]] = (),
) -> Path:
    """Checkpoint-ensemble mode: an error log from saved per-epoch checkpoints.

    Each checkpoint is evaluated (eager model, autograd forces) on every frame of the training
    files and gives one row of |F_pred − F_ref|₂ (eV/Å) per atom; the rows keep the order of
    ``checkpoints`` (give them in epoch order; nothing is sorted), with ``epoch`` = position.

    Args:
        checkpoints: ``.ckpt`` / ``.nequip.zip`` files of one run, in epoch order.
        train_files: training data (extxyz with ``info["frame_id"]`` and reference forces).
        log_dir: output error-log directory (must not hold a log already).
        components: also store absolute per-component errors (N, 3).
        trusted_targets: extra model-builder objects (not names) the checkpoints' model configuration
            may name, e.g. a plugin's builder; see :mod:`ltau_ase.nequip.safe_load`. Callbacks and the
            other training sections are never acted on when loading, so they need no trust.
    Returns:
        ``log_dir``.
    """
    import torch
    from nequip.data import AtomicDataDict
    from tqdm.auto import tqdm

    from ltau_ase.nequip.calculator import LatentNequIPCalculator

    checkpoints = [Path(c) for c in checkpoints]
    if not checkpoints:
        raise ValueError("no checkpoints given; expected the per-epoch checkpoints of a run")
    for c in checkpoints:
        if not c.is_file():
            raise FileNotFoundError(f"checkpoint {c} does not exist")
    train_files = as_paths(train_files)
    check_int(batch_size, "batch_size")
    frames = read_training_frames(train_files)
    n_atoms = np.array([len(a) for a in frames], dtype=np.int64)
    atom_ids = global_atom_ids(frame_ids_of(frames), n_atoms)
    ref = np.concatenate([a.get_forces(apply_constraint=False) for a in frames])
    geometry = [Atoms(numbers=a.numbers, positions=a.positions, cell=a.cell, pbc=a.pbc) for a in frames]
    metadata = {
        "producer": "ltau_ase.nequip.fit.error_logs_from_checkpoints",
        "mode": "checkpoints",
        "checkpoints": [str(c.resolve()) for c in checkpoints],
        "checkpoint_sha256": [sha256_file(c) for c in checkpoints],
        "train_files": [str(f.resolve()) for f in train_files],
        "run_dir": str(checkpoints[0].resolve().parent),
        "units": "eV/Angstrom",
    }
    starts = np.concatenate([[0], np.cumsum(n_atoms)])
    with ErrorLogWriter(log_dir, atom_ids, components=components, metadata=metadata) as writer:
        for epoch, ckpt in enumerate(tqdm(checkpoints, desc="checkpoints", unit="ckpt", disable=not progress)):
            calc = LatentNequIPCalculator.from_model_file(ckpt, device=device, trusted_targets=tuple(trusted_targets))
            pred = np.empty_like(ref)
            for first in range(0, len(frames), batch_size):
                last = min(first + batch_size, len(frames))
                data = AtomicDataDict.batched_from_list([calc.atoms_to_data(a) for a in geometry[first:last]])
                out = calc.model(data)  # autograd on: forces are energy gradients
                forces = out[AtomicDataDict.FORCE_KEY].detach().to(torch.float64).cpu().numpy()
                if forces.shape != (starts[last] - starts[first], 3):
                    raise ValueError(f"checkpoint {ckpt} returned forces of shape {forces.shape} for frames {first}..{last - 1}")
                pred[starts[first] : starts[last]] = forces
            diff = pred - ref
            writer.append_epoch(
                atom_ids,
                np.linalg.norm(diff, axis=1),
                epoch=epoch,
                components=np.abs(diff) if components else None,
            )
    return Path(log_dir)
