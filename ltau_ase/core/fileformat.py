"""The single-file estimator container (``.ltau``), format version 2: pickle-free, checked, memory-mappable.

Layout (all integers little-endian)::

    offset 0   8 bytes   magic b"LTAU\\x00ASE"
           8   uint32    format_version (2)
          12   uint32    reserved (0)
          16   uint64    header length H (bytes, <= 16 MiB)
          24   32 bytes  SHA-256 of the header bytes
          56   H bytes   UTF-8 JSON header
                         {"magic": "ltau-ase-estimator", "format_version": 2,
                          "arrays": {name: {"dtype": "<f8", "shape": [...], "offset": int, "sha256": hex}},
                          ... caller's fields (settings, metadata, learned state) ...}
         D = 56 + H rounded up to 64: the data section; array ``name`` occupies
             [D + offset, D + offset + nbytes), offsets 64-byte aligned, in order, no gaps beyond the
             alignment padding, and the file ends exactly at the end of the last array.

Reading (:func:`read_container`) never unpickles or executes anything and never allocates more than
the file holds: the header is capped (16 MiB) and digest-checked before it is parsed; every array's
dtype must be a plain little-endian number type; its extent is computed from dtype and shape with
Python integers and must lie inside the file; arrays may not overlap; the file size must equal the end
of the last array (truncation or trailing junk is refused). Callers pass ``schema(header)`` giving the
exact array names, dtypes and shapes they expect (computed from the header's N, D, ... before any
array is read): unknown, missing or misshapen members are refused.

Digests and laziness (``verify``):

* arrays of at most ``eager_bytes`` (default 64 MiB) are read into (writable) memory and their SHA-256
  is checked at open (a flipped byte raises ``ValueError``);
* larger arrays are returned as read-only ``np.memmap`` views and are NOT digest-checked at open, so
  that opening a 10⁷-atom estimator (GBs of arrays) costs only the header; pass ``verify=True`` (or run
  ``ltau convert --verify FILE``) to stream every array's digest in 16 MiB blocks (constant memory);
  ``verify=False`` skips even the eager digests.

Format-1 files (a NumPy ``.npz`` zip written by ltau-ase ≤ 0.1) are read by :func:`read_npz_container`
through the same schema (member allow-list, declared sizes checked against the schema before a byte is
decompressed, npy headers checked before allocating); the estimator loads them and
``ltau convert OLD NEW`` rewrites them in this format.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = "ltau-ase-estimator"
MAGIC_BYTES = b"LTAU\x00ASE"
FORMAT_VERSION = 2
LEGACY_NPZ_VERSION = 1
HEADER_KEY = "__header__"  # format 1: the npz member holding the JSON header
ALIGN = 64
MAX_HEADER_BYTES = 16 << 20
EAGER_BYTES = 64 << 20
_PREAMBLE = struct.Struct("<8sIIQ32s")
_ZIP_MAGIC = b"PK\x03\x04"
_BLOCK = 16 << 20
#: format 1: the uncompressed members may total at most this many times the file size (+ 64 MiB)
MAX_NPZ_EXPANSION = 128
#: dtypes an array may have (plain little-endian numbers; never object, structured or big-endian)
ALLOWED_DTYPES = ("<f8", "<f4", "<i8", "<i4", "<u8", "<u4", "<u2", "|u1", "|i1", "|b1")

#: ``schema(header, declared)`` -> {name: (dtype str or tuple of allowed dtype strs, shape tuple)}, where
#: ``declared`` is {name: (dtype str, shape)} as the file declares them (for sizes the header omits)
Schema = Callable[[dict[str, Any], dict[str, tuple[str, tuple[int, ...]]]], dict[str, tuple[Any, tuple[int, ...]]]]


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


def _le(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype == object or arr.dtype.fields is not None:
        raise ValueError(f"dtype {arr.dtype} cannot be stored without pickle")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if arr.dtype.str not in ALLOWED_DTYPES:
        raise ValueError(f"dtype {arr.dtype} is not storable; expected one of {ALLOWED_DTYPES}")
    return arr if arr.flags.c_contiguous else arr.copy(order="C")  # (ascontiguousarray makes 0-d arrays 1-d)


def _digest(arr: np.ndarray) -> str:
    h = hashlib.sha256()
    flat = arr.reshape(-1)
    step = max(1, _BLOCK // max(1, arr.itemsize))
    for start in range(0, flat.size, step):
        h.update(np.ascontiguousarray(flat[start : start + step]).data)
    return h.hexdigest()


class StreamedBytes:
    """An array (default: (B,) uint8) given to :func:`write_container` as a producer instead of memory.

    ``produce(write)`` must call ``write(chunk: bytes)`` with the array's bytes in order, the same
    bytes each time: it runs once here (size and digest) and once more while the file is written, where
    a difference raises ValueError (nothing is renamed into place). Used for the FAISS index, whose
    serialised form would otherwise be held in RAM twice during a save (170 MB each at 10⁷ atoms).
    """

    def __init__(self, produce: Any, dtype: Any = np.uint8, shape: tuple[int, ...] | None = None) -> None:
        self._produce = produce
        self.dtype = np.dtype(dtype)
        h, size = hashlib.sha256(), 0

        def measure(chunk: bytes) -> int:
            nonlocal size
            h.update(chunk)
            size += len(chunk)
            return len(chunk)

        produce(measure)
        self.nbytes, self.sha256 = size, h.hexdigest()
        if shape is None:
            if size % self.dtype.itemsize:
                raise ValueError(f"a streamed array gave {size} bytes, not a whole number of {self.dtype} items")
            shape = (size // self.dtype.itemsize,)
        self.shape = tuple(int(v) for v in shape)
        if int(np.prod(self.shape)) * self.dtype.itemsize != size:
            raise ValueError(f"a streamed array gave {size} bytes; expected {self.dtype} {self.shape}")

    def write_to(self, fh: Any) -> None:
        h, size = hashlib.sha256(), 0

        def write(chunk: bytes) -> int:
            nonlocal size
            h.update(chunk)
            size += len(chunk)
            fh.write(chunk)
            return len(chunk)

        self._produce(write)
        if size != self.nbytes or h.hexdigest() != self.sha256:
            raise ValueError("a streamed array gave different bytes on its second pass; nothing was saved")


def streamed_as(arr: np.ndarray, dtype: Any, block: int = 1 << 16) -> StreamedBytes:
    """``arr`` written as ``dtype`` (little-endian) in row blocks: a widening conversion at save time
    without a converted copy of the whole array in memory."""
    out = np.dtype(dtype).newbyteorder("<")
    flat = arr.reshape(-1) if arr.flags.c_contiguous else np.ascontiguousarray(arr).reshape(-1)

    def produce(write: Any) -> None:
        for start in range(0, flat.size, block):
            write(flat[start : start + block].astype(out).tobytes())

    return StreamedBytes(produce, out, arr.shape)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def write_container(path: str | os.PathLike, header: dict[str, Any], arrays: dict[str, Any]) -> None:
    """Write ``header`` (JSON-able; magic, format_version and the array table are added) and ``arrays``
    (numpy arrays, or :class:`StreamedBytes` written without being held in memory).

    Atomic: written to ``path.tmp``, fsynced, then renamed over ``path``.
    """
    if "arrays" in header:
        raise ValueError("header key 'arrays' is reserved for the array table")
    table: dict[str, dict[str, Any]] = {}
    data: list[tuple[int, np.ndarray]] = []
    offset = 0
    for name, arr in arrays.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"array names must be non-empty strings; got {name!r}")
        if isinstance(arr, StreamedBytes):
            a = arr
            digest = arr.sha256
        else:
            try:
                a = _le(arr)
            except ValueError as exc:
                raise ValueError(f"array {name!r}: {exc}") from None
            digest = _digest(a)
        offset = _align(offset)
        table[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset, "sha256": digest}
        data.append((offset, a))
        offset += a.nbytes
    full = {"magic": MAGIC, "format_version": FORMAT_VERSION, **header, "arrays": table}
    try:
        text = json.dumps(full, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"estimator header/metadata is not JSON-serialisable: {exc}") from None
    if len(text) > MAX_HEADER_BYTES:
        raise ValueError(f"the header is {len(text)} bytes; at most {MAX_HEADER_BYTES} are allowed (metadata too large?)")
    start = _align(_PREAMBLE.size + len(text))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(_PREAMBLE.pack(MAGIC_BYTES, FORMAT_VERSION, 0, len(text), hashlib.sha256(text).digest()))
            fh.write(text)
            fh.write(b"\0" * (start - _PREAMBLE.size - len(text)))
            pos = start
            for off, a in data:
                fh.write(b"\0" * (start + off - pos))
                if isinstance(a, StreamedBytes):
                    a.write_to(fh)
                else:
                    flat = a.reshape(-1)
                    step = max(1, _BLOCK // max(1, a.itemsize))
                    for s in range(0, flat.size, step):
                        fh.write(np.ascontiguousarray(flat[s : s + step]).data)
                pos = start + off + a.nbytes
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset
    nbytes: int
    sha256: str


def _check_schema(path: Path, entries: dict[str, tuple[str, tuple[int, ...]]], schema: Schema | None, header: dict) -> None:
    """``entries``: {name: (dtype str, shape)} as declared by the file."""
    if schema is None:
        return
    expected = schema(header, entries)
    unknown = sorted(set(entries) - set(expected))
    if unknown:
        raise ValueError(f"{path} holds unknown arrays {unknown[:5]}; refusing a file with members this reader does not expect")
    missing = sorted(set(expected) - set(entries))
    if missing:
        raise ValueError(f"{path} is an ltau-ase estimator file with missing arrays {missing[:5]}")
    for name, (dtypes, shape) in expected.items():
        dt, sh = entries[name]
        allowed = (dtypes,) if isinstance(dtypes, str) else tuple(dtypes)
        if dt not in allowed or tuple(sh) != tuple(shape):
            raise ValueError(
                f"{path}: array {name!r} is declared as {dt} {tuple(sh)}; expected {'/'.join(allowed)} {tuple(shape)} "
                "from the header's sizes"
            )


def _read_preamble(path: Path) -> tuple[int, bytes, int]:
    """(format version, header bytes, file size) of a format-2 file; ValueError for anything else."""
    if not path.is_file():
        raise FileNotFoundError(f"no estimator file at {path}")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        pre = fh.read(_PREAMBLE.size)
        if pre[:4] == _ZIP_MAGIC:
            return LEGACY_NPZ_VERSION, b"", size
        if pre[:1] == b"\x80" or pre[:1] in (b"(", b"c", b"]", b"}"):
            raise ValueError(f"{path} looks like a Python pickle, not an ltau-ase estimator file; pickles are never loaded")
        if pre[:8] != MAGIC_BYTES:
            raise ValueError(f"{path} is not an ltau-ase estimator file (no .ltau magic bytes)")
        if len(pre) < _PREAMBLE.size:
            raise ValueError(f"{path} is truncated ({size} bytes, shorter than the {_PREAMBLE.size}-byte preamble)")
        _, version, _, hlen, hsha = _PREAMBLE.unpack(pre)
        if version != FORMAT_VERSION:
            raise ValueError(f"{path} has estimator format version {version}; this ltau-ase reads versions 1 and {FORMAT_VERSION}")
        if hlen > MAX_HEADER_BYTES:
            raise ValueError(f"{path} declares a {hlen}-byte header; at most {MAX_HEADER_BYTES} are allowed (corrupt file)")
        if _PREAMBLE.size + hlen > size:
            raise ValueError(f"{path} is truncated: its header needs {hlen} bytes but the file has {size - _PREAMBLE.size} after the preamble")
        text = fh.read(hlen)
    if hashlib.sha256(text).digest() != hsha:
        raise ValueError(f"{path} is corrupt: the header's SHA-256 does not match (a flipped or edited byte)")
    return version, text, size


def _parse_header(path: Path, text: bytes) -> dict[str, Any]:
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{path} has a corrupt JSON header: {exc}") from None
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        raise ValueError(f"{path} is not an ltau-ase estimator file (header magic {MAGIC!r} missing)")
    return header


def _entries(path: Path, header: dict[str, Any], data_start: int, size: int) -> dict[str, _Entry]:
    table = header.get("arrays")
    if not isinstance(table, dict):
        raise ValueError(f"{path} has no array table in its header; corrupt file")
    out: dict[str, _Entry] = {}
    for name, spec in table.items():
        try:
            dt, shape, offset, digest = spec["dtype"], spec["shape"], spec["offset"], spec["sha256"]
        except (TypeError, KeyError):
            raise ValueError(f"{path}: malformed entry for array {name!r} in the header") from None
        if dt not in ALLOWED_DTYPES:
            raise ValueError(f"{path}: array {name!r} has dtype {dt!r}; expected one of {ALLOWED_DTYPES} (no pickled objects)")
        if not isinstance(shape, list) or len(shape) > 8 or not all(type(s) is int and s >= 0 for s in shape):
            raise ValueError(f"{path}: array {name!r} has an invalid shape {shape!r}")
        if type(offset) is not int or offset < 0 or offset % ALIGN:
            raise ValueError(f"{path}: array {name!r} has an invalid offset {offset!r}")
        if not isinstance(digest, str) or len(digest) != 64:
            raise ValueError(f"{path}: array {name!r} has an invalid sha256 {digest!r}")
        dtype = np.dtype(dt)
        nbytes = dtype.itemsize
        for s in shape:
            nbytes *= s  # Python ints: no overflow
        out[name] = _Entry(name, dtype, tuple(shape), data_start + offset, nbytes, digest)
    end = data_start
    for e in sorted(out.values(), key=lambda e: e.start):
        if e.start < end:
            raise ValueError(f"{path}: array {e.name!r} overlaps the previous array or the header; corrupt file")
        if e.start - end >= ALIGN:
            raise ValueError(f"{path}: unexplained gap before array {e.name!r}; corrupt file")
        end = e.start + e.nbytes
    if end > size:
        raise ValueError(f"{path} is truncated: its arrays need {end} bytes but the file has {size}")
    if end < size:
        raise ValueError(f"{path} has {size - end} unexpected trailing bytes after its last array; corrupt file")
    return out


def _check_digest(path: Path, e: _Entry, arr: np.ndarray) -> None:
    if _digest(arr) != e.sha256:
        raise ValueError(f"{path} is corrupt: array {e.name!r} does not match its SHA-256 digest (a flipped or edited byte)")


def read_container(
    path: str | os.PathLike,
    schema: Schema | None = None,
    verify: bool | None = None,
    eager_bytes: int = EAGER_BYTES,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Open a ``.ltau`` file: (header dict, {name: array}).

    Args:
        schema: ``schema(header)`` -> {name: (dtype(s), shape)} the caller expects; checked before any
            array is read (unknown, missing, misshapen members raise ValueError).
        verify: None = digest-check arrays ≤ ``eager_bytes`` (read into memory), memory-map larger ones
            unchecked; True = also stream-check the memory-mapped ones; False = check no array digest.
        eager_bytes: arrays up to this size are read into memory, larger ones memory-mapped read-only.
    Format-1 (npz) files are delegated to :func:`read_npz_container`.
    """
    path = Path(path)
    version, text, size = _read_preamble(path)
    if version == LEGACY_NPZ_VERSION:
        return read_npz_container(path, schema)
    header = _parse_header(path, text)
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: header format_version {header.get('format_version')!r} disagrees with the preamble's {FORMAT_VERSION}")
    entries = _entries(path, header, _align(_PREAMBLE.size + len(text)), size)
    _check_schema(path, {n: (e.dtype.str, e.shape) for n, e in entries.items()}, schema, header)
    arrays: dict[str, np.ndarray] = {}
    with open(path, "rb") as fh:
        for name, e in entries.items():
            if e.nbytes <= eager_bytes:
                fh.seek(e.start)
                buf = bytearray(e.nbytes)  # writable arrays, one copy
                if fh.readinto(buf) != e.nbytes:
                    raise ValueError(f"{path} is truncated inside array {name!r}")
                arr = np.frombuffer(buf, dtype=e.dtype).reshape(e.shape)
                if verify is not False:
                    _check_digest(path, e, arr)
            else:
                arr = np.memmap(path, dtype=e.dtype, mode="r", offset=e.start, shape=e.shape)
                if verify:
                    _check_digest(path, e, arr)
            arrays[name] = arr
    return header, arrays


def verify_container(path: str | os.PathLike) -> dict[str, Any]:
    """Stream every array's SHA-256 (constant memory); raises ValueError on the first mismatch. Returns the header."""
    header, _ = read_container(path, verify=True, eager_bytes=0)
    return header


# ---------------------------------------------------------------------------------------- format 1


def _npz_member_header(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[str, tuple[int, ...], int]:
    """(dtype str, shape, npy header length) of one npz member, reading only its npy header."""
    with zf.open(info) as fh:
        try:
            major, minor = np.lib.format.read_magic(fh)
            if (major, minor) == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh, max_header_size=10000)
            elif (major, minor) in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh, max_header_size=10000)
            else:
                raise ValueError(f"npy version {(major, minor)}")
        except ValueError as exc:
            msg = str(exc)
            raise ValueError(f"{path}: member {info.filename!r} has a corrupt npy header ({msg})") from None
        hlen = fh.tell()
    if dtype.hasobject:
        raise ValueError(f"{path} contains a pickled (object) array {info.filename!r}; refusing to load it")
    if fortran and len(shape) > 1:
        raise ValueError(f"{path}: member {info.filename!r} is Fortran-ordered; ltau-ase never writes that")
    return dtype.str, tuple(int(s) for s in shape), hlen


def read_npz_container(path: str | os.PathLike, schema: Schema | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a format-1 (npz) estimator file through the hardened path.

    The header member is read first (capped at 16 MiB); the members' declared uncompressed sizes may
    total at most 128 × the file size + 64 MiB (a decompression bomb is refused before inflating);
    ``schema(header, declared)`` then fixes every member's dtype and shape; each member's declared
    size and npy header are checked against it before its data is decompressed. Unknown members, pickled (object) arrays and truncated or corrupt archives raise
    ValueError.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            infos = {}
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    raise ValueError(f"{path} holds an unexpected member {info.filename!r}; not an ltau-ase estimator file")
                infos[info.filename[:-4]] = info
            if HEADER_KEY not in infos:
                raise ValueError(f"{path} is a zip/npz archive but not an ltau-ase estimator file (no header)")
            hinfo = infos.pop(HEADER_KEY)
            if hinfo.file_size > MAX_HEADER_BYTES:
                raise ValueError(f"{path} declares a {hinfo.file_size}-byte header; at most {MAX_HEADER_BYTES} are allowed")
            dt, shape, _ = _npz_member_header(path, zf, hinfo)
            if dt != "|u1" or len(shape) != 1:
                raise ValueError(f"{path} has a malformed header array; not an ltau-ase estimator file")
            raw = np.lib.format.read_array(zf.open(hinfo), allow_pickle=False)
            header = _parse_header(path, raw.tobytes())
            version = header.get("format_version")
            if version != LEGACY_NPZ_VERSION:
                raise ValueError(
                    f"{path} has estimator format version {version!r}; this ltau-ase reads versions 1 and {FORMAT_VERSION}"
                )
            total = sum(info.file_size for info in infos.values())
            limit = MAX_NPZ_EXPANSION * path.stat().st_size + (64 << 20)
            if total > limit:
                raise ValueError(
                    f"{path} declares {total} bytes of uncompressed arrays in a {path.stat().st_size}-byte file; "
                    f"more than {MAX_NPZ_EXPANSION}x expansion is refused (decompression bomb?)"
                )
            declared = {}
            for name, info in infos.items():
                declared[name] = _npz_member_header(path, zf, info)
            _check_schema(path, {n: (d[0], d[1]) for n, d in declared.items()}, schema, header)
            arrays = {}
            for name, info in infos.items():
                dt, shape, hlen = declared[name]
                nbytes = np.dtype(dt).itemsize * int(np.prod(shape, dtype=object))
                if info.file_size != hlen + nbytes:
                    raise ValueError(f"{path}: member {name!r} declares {info.file_size} bytes; its npy header implies {hlen + nbytes}")
                with zf.open(info) as fh:
                    arrays[name] = np.lib.format.read_array(fh, allow_pickle=False)
    except ValueError as exc:
        msg = str(exc)
        if "pickle" in msg.lower() and "ltau-ase" not in msg and str(path) not in msg:
            raise ValueError(f"{path} contains a pickled (object) array; refusing to load it") from None
        if str(path) in msg:
            raise
        raise ValueError(f"{path} is corrupt: {msg}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError, zipfile.LargeZipFile, NotImplementedError) as exc:
        raise ValueError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    return header, arrays
