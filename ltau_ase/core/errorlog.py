"""Per-atom error trajectories on disk (input of the paper's Algorithm 1).

One training run (one ensemble member) is one directory::

    meta.json        {"format": "ltau-ase-errorlog", "version": 1, "n_atoms": N, "n_epochs": E,
                      "epochs": [...], "components": bool, "metadata": {...}}
    atom_ids.npy     (N,) int64, sorted and unique
    errors.f32       raw float32, row-major (E, N): row e holds every atom's force-error norm (eV/Å)
                     after epoch e; NaN = the atom was not evaluated in that epoch
    components.f32   optional raw float32 (E, N, 3): per-Cartesian-component errors (eV/Å)

Durability: :meth:`ErrorLogWriter.append_epoch` writes the row, flushes and fsyncs it, and only then
atomically replaces ``meta.json`` (temporary file + ``os.replace``) with the new epoch count. The
committed epoch count in ``meta.json`` is the truth: an interrupted run loses no committed epoch, and
a torn partial row at the end of ``errors.f32`` is ignored by readers (and truncated by a resuming
writer).

Sizing: the writer holds one row, N float32 (14.6 M atoms of OC20's 200k split: 58 MB; plus an int64
id-to-row lookup during :meth:`append_epoch` of the same order). A 14.6 M atoms × 100 epochs log is
5.8 GB float32 per run and is never loaded whole: :meth:`ErrorLog.errors` returns a read-only memory
map for random access, and :meth:`ErrorLog.iter_atom_chunks` streams (E, chunk) blocks with
positioned reads, E × chunk × 4 bytes each (100 epochs × 65 536 atoms: 26 MB), so the resident
memory of a streaming pass is one block, whatever N.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ltau_ase.core.checks import check_int

FORMAT_NAME = "ltau-ase-errorlog"
#: the log directory LTAUErrorLogger writes inside a training run directory by default
DEFAULT_LOG_SUBDIR = "ltau_errors"
FORMAT_VERSION = 1
_META = "meta.json"
_IDS = "atom_ids.npy"
_ERRORS = "errors.f32"
_COMPONENTS = "components.f32"


@dataclass(frozen=True)
class EpochWindow:
    """Selects the epochs used for the error distributions (paper Fig. C2).

    Args:
        skip: drop the first ``skip`` logged epochs (early, untrained-model epochs).
        last: then keep only the last ``last`` epochs (None keeps all remaining).
    """

    skip: int = 0
    last: int | None = None

    def __post_init__(self) -> None:
        check_int(self.skip, "EpochWindow.skip", minimum=0)
        check_int(self.last, "EpochWindow.last", allow_none=True)

    def select(self, n_epochs: int) -> slice:
        """Row slice of the selected epochs among ``n_epochs`` logged ones; raises if none is left."""
        start = self.skip
        if self.last is not None:
            start = max(start, n_epochs - self.last)
        if start >= n_epochs:
            raise ValueError(
                f"epoch window {self} leaves no epoch of the {n_epochs} logged; expected skip < number of epochs"
            )
        return slice(start, n_epochs)

    def to_dict(self) -> dict[str, int | None]:
        return {"skip": int(self.skip), "last": None if self.last is None else int(self.last)}

    @classmethod
    def coerce(cls, window: "EpochWindow | dict | tuple | None") -> "EpochWindow":
        """Accept an EpochWindow, a dict ``{"skip":, "last":}``, a tuple ``(skip, last)`` or None (all)."""
        if window is None:
            return cls()
        if isinstance(window, cls):
            return window
        if isinstance(window, dict):
            unknown = set(window) - {"skip", "last"}
            if unknown:
                raise ValueError(f"unknown epoch window keys {sorted(unknown)}; expected 'skip' and 'last'")
            return cls(**window)
        if isinstance(window, tuple) and len(window) == 2:
            return cls(*window)
        raise TypeError(f"window must be an EpochWindow, a dict, a (skip, last) tuple or None; got {window!r}")


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _check_atom_ids(atom_ids: Any) -> np.ndarray:
    ids = np.asarray(atom_ids)
    if ids.ndim != 1:
        raise ValueError(f"atom_ids must be a 1-d array; got shape {ids.shape}")
    if ids.size == 0:
        raise ValueError("atom_ids is empty; expected at least one atom id")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"atom_ids must be integers; got dtype {ids.dtype}")
    return ids.astype(np.int64, copy=False)


class ErrorLogWriter:
    """Appends one epoch of per-atom errors at a time to a run directory.

    Args:
        path: run directory (created; must not already hold a log unless ``resume=True``).
        atom_ids: (N,) integer ids of every atom that may ever be logged (any order, unique).
        components: also store (N, 3) per-component errors per epoch.
        metadata: free-form JSON-able dict kept in ``meta.json`` (e.g. model config, seed).
        resume: continue an existing log (same atom ids required); a torn last row is truncated.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        atom_ids: Sequence[int] | np.ndarray,
        *,
        components: bool = False,
        metadata: dict[str, Any] | None = None,
        resume: bool = False,
    ) -> None:
        ids = _check_atom_ids(atom_ids)
        sorted_ids = np.sort(ids)
        if np.any(sorted_ids[1:] == sorted_ids[:-1]):
            dup = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
            raise ValueError(f"atom_ids must be unique; {dup.size} duplicates, e.g. {dup[:5].tolist()}")
        self.path = Path(path)
        self.atom_ids = sorted_ids
        self.components = bool(components)
        self.metadata = dict(metadata or {})
        json.dumps(self.metadata)  # fail early (TypeError) on a non-JSON-able metadata dict
        self.n_atoms = int(sorted_ids.size)
        self._epochs: list[int | None] = []
        self._closed = False
        meta_path = self.path / _META
        if meta_path.exists():
            if not resume:
                raise FileExistsError(f"{self.path} already holds an error log; pass resume=True to append to it")
            self._resume()
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            np.save(self.path / _IDS, self.atom_ids)
            for name in (_ERRORS, _COMPONENTS if self.components else None):
                if name is not None:
                    open(self.path / name, "wb").close()
            self._commit_meta()
        self._err_fh = open(self.path / _ERRORS, "r+b")
        self._err_fh.seek(len(self._epochs) * self.n_atoms * 4)
        self._comp_fh = None
        if self.components:
            self._comp_fh = open(self.path / _COMPONENTS, "r+b")
            self._comp_fh.seek(len(self._epochs) * self.n_atoms * 12)

    def _resume(self) -> None:
        log = ErrorLog(self.path)
        if not np.array_equal(log.atom_ids, self.atom_ids):
            raise ValueError(f"cannot resume {self.path}: its atom ids differ from the ones given")
        if log.has_components != self.components:
            raise ValueError(f"cannot resume {self.path}: components={log.has_components} on disk")
        self._epochs = list(log.epochs)
        self.metadata = {**log.metadata, **self.metadata}
        # Drop a torn partial row written after the last commit.
        os.truncate(self.path / _ERRORS, len(self._epochs) * self.n_atoms * 4)
        if self.components:
            os.truncate(self.path / _COMPONENTS, len(self._epochs) * self.n_atoms * 12)

    def _commit_meta(self) -> None:
        _write_json_atomic(
            self.path / _META,
            {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "n_atoms": self.n_atoms,
                "n_epochs": len(self._epochs),
                "epochs": self._epochs,
                "components": self.components,
                "metadata": self.metadata,
            },
        )

    @property
    def n_epochs(self) -> int:
        """Number of committed epochs."""
        return len(self._epochs)

    def append_epoch(
        self,
        atom_ids: Sequence[int] | np.ndarray,
        errors: Sequence[float] | np.ndarray,
        epoch: int | None = None,
        components: np.ndarray | None = None,
    ) -> None:
        """Commit one epoch.

        Args:
            atom_ids: (n,) ids evaluated in this epoch, any order, unique, all known to the writer.
            errors: (n,) non-negative force-error norms (eV/Å); NaN marks an explicitly missing value.
            epoch: optional epoch number recorded in ``meta.json``.
            components: (n, 3) per-component errors (eV/Å), required iff the writer has components.
        """
        if self._closed:
            raise ValueError("this ErrorLogWriter is closed")
        ids = _check_atom_ids(atom_ids)
        err = np.asarray(errors, dtype=np.float32)
        if err.shape != ids.shape:
            raise ValueError(f"errors has shape {err.shape}; expected {ids.shape}, one value per atom id")
        if np.any(np.isinf(err)):
            raise ValueError("errors contain inf; expected finite values (NaN marks a missing atom)")
        if np.any(err < 0):
            raise ValueError(f"errors contain negative values (min {np.nanmin(err)}); expected error norms >= 0")
        if ids.size == self.n_atoms and np.array_equal(ids, self.atom_ids):
            # every atom, in the log's order: the row is the errors themselves (no lookup, no sort)
            rows = slice(None)
            row = np.array(err, dtype=np.float32)
        else:
            rows = np.searchsorted(self.atom_ids, ids)
            rows_clipped = np.minimum(rows, self.n_atoms - 1)
            unknown = self.atom_ids[rows_clipped] != ids
            if np.any(unknown):
                raise ValueError(
                    f"{int(unknown.sum())} atom ids are not known to this log, e.g. {ids[unknown][:5].tolist()}; "
                    "expected ids given to ErrorLogWriter"
                )
            order = np.sort(rows)
            if np.any(order[1:] == order[:-1]):
                raise ValueError("atom ids repeat within one epoch; expected each atom at most once per epoch")
            row = np.full(self.n_atoms, np.nan, dtype=np.float32)
            row[rows] = err
        comp_row = None
        if self.components:
            if components is None:
                raise ValueError("this log stores components; expected components of shape (n, 3)")
            comp = np.asarray(components, dtype=np.float32)
            if comp.shape != (ids.size, 3):
                raise ValueError(f"components has shape {comp.shape}; expected ({ids.size}, 3)")
            comp_row = np.full((self.n_atoms, 3), np.nan, dtype=np.float32)
            comp_row[rows] = comp
        elif components is not None:
            raise ValueError("components given but the log was created with components=False")
        if epoch is not None:
            epoch = int(epoch)
        # Data first, durable, then the meta commit: a crash in between leaves a torn row that is ignored.
        self._err_fh.write(row.tobytes())
        self._err_fh.flush()
        os.fsync(self._err_fh.fileno())
        if comp_row is not None:
            self._comp_fh.write(comp_row.tobytes())
            self._comp_fh.flush()
            os.fsync(self._comp_fh.fileno())
        self._epochs.append(epoch)
        self._commit_meta()

    def close(self) -> None:
        if not self._closed:
            self._err_fh.close()
            if self._comp_fh is not None:
                self._comp_fh.close()
            self._closed = True

    def __enter__(self) -> "ErrorLogWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ErrorLog:
    """Read-only view of one run's error log (memory-mapped).

    Args:
        path: run directory written by :class:`ErrorLogWriter`.
        window: default epoch window for :meth:`errors` and :meth:`iter_atom_chunks`.
    """

    def __init__(self, path: str | os.PathLike, window: EpochWindow | dict | tuple | None = None) -> None:
        self.path = Path(path)
        meta_path = self.path / _META
        if not meta_path.is_file():
            raise FileNotFoundError(f"no error log at {self.path} (missing {_META})")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{meta_path} is not valid JSON: {exc}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise ValueError(f"{meta_path} is not an ltau-ase error log (format {FORMAT_NAME!r} expected)")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path} has error-log format version {meta.get('version')!r}; this reader reads {FORMAT_VERSION}"
            )
        self.window = EpochWindow.coerce(window)
        self.metadata: dict[str, Any] = dict(meta.get("metadata") or {})
        self.n_atoms = int(meta["n_atoms"])
        self.n_epochs = int(meta["n_epochs"])
        self.epochs: list[int | None] = list(meta.get("epochs", [None] * self.n_epochs))
        self.has_components = bool(meta.get("components", False))
        self.atom_ids = np.load(self.path / _IDS, allow_pickle=False)
        if self.atom_ids.shape != (self.n_atoms,) or self.atom_ids.dtype != np.int64:
            raise ValueError(f"{self.path / _IDS} does not hold ({self.n_atoms},) int64 atom ids")
        need = self.n_epochs * self.n_atoms * 4
        size = os.path.getsize(self.path / _ERRORS)
        if size < need:
            raise ValueError(
                f"{self.path / _ERRORS} holds {size} bytes but {self.n_epochs} committed epochs need {need}; "
                "the log is truncated"
            )

    def __repr__(self) -> str:
        return f"ErrorLog({str(self.path)!r}, n_atoms={self.n_atoms}, n_epochs={self.n_epochs}, window={self.window})"

    def _rows(self, window: EpochWindow | dict | tuple | None) -> slice:
        win = self.window if window is None else EpochWindow.coerce(window)
        if self.n_epochs == 0:
            raise ValueError(f"error log {self.path} has no committed epoch")
        return win.select(self.n_epochs)

    def n_selected_epochs(self, window: EpochWindow | dict | tuple | None = None) -> int:
        rows = self._rows(window)
        return rows.stop - rows.start

    def errors(self, window: EpochWindow | dict | tuple | None = None) -> np.ndarray:
        """(E_window, N) float32 read-only memmap of the committed errors (eV/Å), NaN = missing."""
        rows = self._rows(window)
        mm = np.memmap(self.path / _ERRORS, dtype=np.float32, mode="r", shape=(self.n_epochs, self.n_atoms))
        return mm[rows]

    def components(self, window: EpochWindow | dict | tuple | None = None) -> np.ndarray:
        """(E_window, N, 3) float32 read-only memmap of per-component errors (eV/Å)."""
        if not self.has_components:
            raise ValueError(f"error log {self.path} was written without components")
        rows = self._rows(window)
        mm = np.memmap(
            self.path / _COMPONENTS, dtype=np.float32, mode="r", shape=(self.n_epochs, self.n_atoms, 3)
        )
        return mm[rows]

    def read_block(self, rows: slice, atoms: slice) -> np.ndarray:
        """(len(rows), len(atoms)) float32 copy read with positioned reads (no memory map).

        Reading through ``pread`` keeps the resident memory at the size of the block: pages of a
        memory map would stay mapped (and counted in RSS) after a streaming pass over a 5.8 GB log.
        """
        n_rows, n_cols = rows.stop - rows.start, atoms.stop - atoms.start
        out = np.empty((n_rows, n_cols), dtype=np.float32)
        nbytes = n_cols * 4
        fd = os.open(self.path / _ERRORS, os.O_RDONLY)
        try:
            for i, e in enumerate(range(rows.start, rows.stop)):
                buf = os.pread(fd, nbytes, (e * self.n_atoms + atoms.start) * 4)
                if len(buf) != nbytes:
                    raise ValueError(f"{self.path / _ERRORS} is truncated (short read at epoch row {e})")
                out[i] = np.frombuffer(buf, dtype=np.float32)
        finally:
            os.close(fd)
        return out

    def iter_atom_chunks(
        self, chunk_size: int, window: EpochWindow | dict | tuple | None = None
    ) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield ``(atom_slice, block)`` with block an in-memory (E_window, chunk) float32 copy.

        Memory: one block, E_window × chunk × 4 bytes (100 epochs × 65 536 atoms: 26 MB).
        """
        check_int(chunk_size, "chunk_size")
        rows = self._rows(window)
        for start in range(0, self.n_atoms, int(chunk_size)):
            sl = slice(start, min(start + int(chunk_size), self.n_atoms))
            yield sl, self.read_block(rows, sl)

    def last_row(self, window: EpochWindow | dict | tuple | None = None) -> np.ndarray:
        """(N,) float32 errors of the last selected epoch."""
        rows = self._rows(window)
        return self.read_block(slice(rows.stop - 1, rows.stop), slice(0, self.n_atoms))[0]


# ---------------------------------------------------------------- multi-process (DDP) logging
# A DDP run's ranks each see a shard of the training set; these helpers let the ranks agree on what
# they log and merge their shards into one epoch row (used by ltau_ase.nequip.callback).


def universe_digest(atom_ids: np.ndarray) -> dict[str, Any]:
    """Small summary of an atom-id universe that ranks compare: count, first/last id and SHA-256."""
    ids = np.ascontiguousarray(np.sort(np.asarray(atom_ids, dtype=np.int64)))
    return {
        "n_atoms": int(ids.size),
        "first": int(ids[0]) if ids.size else None,
        "last": int(ids[-1]) if ids.size else None,
        "sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
    }


def check_rank_universes(digests: list[dict[str, Any]]) -> None:
    """Raise ValueError unless every rank's :func:`universe_digest` is the same."""
    if any(d != digests[0] for d in digests[1:]):
        lines = "; ".join(
            f"rank {r}: {d['n_atoms']} atoms, ids {d['first']}..{d['last']}, sha256 {d['sha256'][:12]}"
            for r, d in enumerate(digests)
        )
        raise ValueError(
            f"the DDP ranks disagree on the training-atom ids ({lines}); expected every rank to read the same "
            "training set (same files, frame ids, split seed)"
        )


def check_rank_epochs(headers: list[dict[str, Any]]) -> None:
    """Raise ValueError unless every rank reports the same logged epoch and mode, with atoms.

    ``headers[r]`` is rank r's ``{"epoch": int | None, "mode": str, "n_atoms": int, "error": str | None}``
    (``epoch`` None: the rank has no errors for this epoch; ``error``: rank 0's failed log write).
    """
    errors = [f"rank {r}: {h['error']}" for r, h in enumerate(headers) if h.get("error")]
    if errors:
        raise RuntimeError("writing the error log failed on " + "; ".join(errors))
    epochs = [h["epoch"] for h in headers]
    modes = [h["mode"] for h in headers]
    if all(e is None for e in epochs):
        raise RuntimeError("LTAUErrorLogger collected no training atoms in this epoch on any rank")
    if len(set(epochs)) != 1 or len(set(modes)) != 1:
        desc = ", ".join(
            f"rank {r}: " + ("no errors" if e is None else f"epoch {e}") + f" ({m})"
            for r, (e, m) in enumerate(zip(epochs, modes))
        )
        raise ValueError(
            f"the DDP ranks disagree on the epoch being logged ({desc}); expected every rank to log the same "
            "epoch with the same LTAUErrorLogger settings; nothing of this epoch was committed"
        )


def merge_rank_parts(parts: list[dict[str, np.ndarray]], dedupe: bool = True) -> dict[str, np.ndarray]:
    """Concatenate per-rank (or per-batch) error parts in order; with ``dedupe`` keep each atom id once.

    A repeated id (a sample the DistributedSampler repeated to pad the epoch) keeps its first
    occurrence in the given order. Returns the same keys as the parts (``ids``, ``errors``, optional
    ``components`` and ``energy``) with ``n_repeated``: the number of dropped repeats. Without
    ``dedupe`` repeats are kept (and refused by the log writer).
    """
    parts = [p for p in parts if p["ids"].size]
    if not parts:
        raise ValueError("no atoms to merge: every part is empty")
    merged = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    n_repeated = 0
    if dedupe:
        _, first = np.unique(merged["ids"], return_index=True)
        n_repeated = merged["ids"].size - first.size
        if n_repeated:
            keep = np.sort(first)
            merged = {key: value[keep] for key, value in merged.items()}
    merged["n_repeated"] = np.int64(n_repeated)
    return merged



def load_error_logs(
    paths: str | os.PathLike | Sequence[str | os.PathLike], window: EpochWindow | dict | tuple | None = None
) -> list[ErrorLog]:
    """Open the M runs of an ensemble; they may have different epoch counts but must share atom ids."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ValueError("no error-log paths given; expected at least one run directory")
    logs = [ErrorLog(p, window=window) for p in paths]
    ref = logs[0]
    for log in logs[1:]:
        if log.n_atoms != ref.n_atoms or not np.array_equal(log.atom_ids, ref.atom_ids):
            raise ValueError(
                f"error logs {ref.path} and {log.path} hold different atom ids ({ref.n_atoms} vs {log.n_atoms} atoms); "
                "expected every run of an ensemble to log the same training atoms"
            )
    return logs


def _is_error_log(path: Path) -> bool:
    meta = path / "meta.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("format") == FORMAT_NAME
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False


def find_error_log(run_dir: str | os.PathLike) -> Path:
    """The error-log directory of a run.

    ``run_dir`` may be an error-log directory itself; otherwise ``run_dir/ltau_errors`` is used
    when it exists, else the single error log found directly below ``run_dir``.

    Raises:
        FileNotFoundError: no log found.
        ValueError: several logs found and none is ``ltau_errors`` (pass the log directory).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    if _is_error_log(run_dir):
        return run_dir
    if _is_error_log(run_dir / DEFAULT_LOG_SUBDIR):
        return run_dir / DEFAULT_LOG_SUBDIR
    found = sorted(p for p in run_dir.iterdir() if p.is_dir() and _is_error_log(p))
    if not found:
        raise FileNotFoundError(
            f"no LTAU error log in {run_dir}; expected a '{DEFAULT_LOG_SUBDIR}' directory written by "
            "LTAUErrorLogger (or build one from per-epoch checkpoints with error_logs_from_checkpoints)"
        )
    if len(found) > 1:
        raise ValueError(
            f"{run_dir} holds several error logs {[p.name for p in found]}; pass the wanted log directory instead"
        )
    return found[0]
