"""The single-file estimator container (``.ltau``).

A ``.ltau`` file is a NumPy ``.npz`` (zip) archive, read with ``np.load(allow_pickle=False)``, so
loading never unpickles or executes anything. It holds:

* ``__header__``: a uint8 array of UTF-8 JSON ``{"magic": "ltau-ase-estimator", "format_version": 1,
  "settings": {...}, "metadata": {...}, ...}``;
* any number of numeric arrays (distributions, per-atom confidences, the FAISS index as uint8 bytes).

:func:`read_container` raises ``ValueError`` naming the problem for a missing-magic (non-LTAU),
truncated, corrupt, wrong-version or pickle-bearing file.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = "ltau-ase-estimator"
FORMAT_VERSION = 1
HEADER_KEY = "__header__"
_ZIP_MAGIC = b"PK\x03\x04"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (e.g. the model file, stored as ``metadata["model_sha256"]``)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


#: metadata key holding the fingerprint (for file-based backends the SHA-256) of the model the estimator was fitted for
MODEL_FINGERPRINT_KEY = "model_sha256"


def check_model_fingerprint(
    metadata: dict[str, Any] | None,
    fingerprint: str,
    *,
    model: str | os.PathLike = "the model",
    estimator: str | os.PathLike = "the estimator",
    allow_mismatch: bool = False,
) -> bool:
    """Check that an estimator was fitted for the model whose fingerprint is ``fingerprint``.

    The estimator's ``metadata["model_sha256"]`` records the model its descriptors came from (any
    backend's fingerprint, by default the model file's SHA-256). A different model has a different
    latent space, so its uncertainties would be meaningless.

    Args:
        metadata: the estimator's ``metadata`` dict (None counts as "nothing recorded").
        fingerprint: the fingerprint of the model about to be used.
        model, estimator: names (paths) used in the message.
        allow_mismatch: warn instead of raising.
    Returns:
        True when the fingerprints agree, False for an allowed mismatch.
    Raises:
        ValueError: nothing recorded or a different model, unless ``allow_mismatch``.
    """
    import warnings

    recorded = (metadata or {}).get(MODEL_FINGERPRINT_KEY)
    if recorded == fingerprint:
        return True
    if recorded is None:
        msg = (f"estimator {str(estimator)!r} records no model hash (metadata[{MODEL_FINGERPRINT_KEY!r}]), so it "
               f"cannot be checked against model {str(model)!r}")
    else:
        fitted_on = (metadata or {}).get("model_path")
        msg = (f"estimator {str(estimator)!r} was fitted for a model with sha256 {recorded}"
               + (f" ({fitted_on})" if fitted_on else "")
               + f", but {str(model)!r} has sha256 {fingerprint}: its latent space differs, so the uncertainties "
               "would be meaningless (fit the estimator for this model, e.g. ltau fit --model)")
    if not allow_mismatch:
        raise ValueError(msg + "; pass allow_model_mismatch=True to use them together anyway")
    warnings.warn(msg + " (allowed by allow_model_mismatch=True)", stacklevel=3)
    return False


def write_container(
    path: str | os.PathLike, header: dict[str, Any], arrays: dict[str, np.ndarray], compress: bool = False
) -> None:
    """Write ``header`` (JSON-able; magic and format_version are added) and ``arrays`` atomically."""
    if HEADER_KEY in arrays:
        raise ValueError(f"array name {HEADER_KEY!r} is reserved")
    for name, arr in arrays.items():
        if np.asarray(arr).dtype == object:
            raise ValueError(f"array {name!r} has dtype object, which cannot be stored without pickle")
    full = {"magic": MAGIC, "format_version": FORMAT_VERSION, **header}
    try:
        text = json.dumps(full, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"estimator header/metadata is not JSON-serialisable: {exc}") from None
    payload = {HEADER_KEY: np.frombuffer(text.encode("utf-8"), dtype=np.uint8), **arrays}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        (np.savez_compressed if compress else np.savez)(fh, **payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_container(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a container written by :func:`write_container`: (header dict, {name: array})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no estimator file at {path}")
    with open(path, "rb") as fh:
        start = fh.read(4)
    if start[:1] == b"\x80" or start[:1] in (b"(", b"c", b"]", b"}"):
        raise ValueError(f"{path} looks like a Python pickle, not an ltau-ase estimator file; pickles are never loaded")
    if start != _ZIP_MAGIC:
        raise ValueError(f"{path} is not an ltau-ase estimator file (expected a .ltau zip archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if HEADER_KEY not in npz.files:
                raise ValueError(f"{path} is a zip/npz archive but not an ltau-ase estimator file (no header)")
            raw = npz[HEADER_KEY]
            arrays = {name: npz[name] for name in npz.files if name != HEADER_KEY}
    except ValueError as exc:
        msg = str(exc)
        if "pickle" in msg.lower():
            raise ValueError(f"{path} contains a pickled (object) array; refusing to load it") from None
        if "ltau-ase" in msg:
            raise
        raise ValueError(f"{path} is corrupt: {msg}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError, zipfile.LargeZipFile) as exc:
        raise ValueError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise ValueError(f"{path} has a malformed header array; not an ltau-ase estimator file")
    try:
        header = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} has a corrupt JSON header: {exc}") from None
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        raise ValueError(f"{path} is not an ltau-ase estimator file (header magic {MAGIC!r} missing)")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has estimator format version {version!r}; this ltau-ase reads version {FORMAT_VERSION}"
        )
    return header, arrays
