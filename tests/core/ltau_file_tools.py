"""Helpers shared by the estimator-file tests: small fitted estimators, format-1 writers, file surgery,
and a peak-RSS probe (not a test module)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ltau_ase.core.estimator import LTAUEstimator
from ltau_ase.core.fileformat import read_container, write_container


def small_estimator(index: str = "flat", distribution: str = "compact", n: int = 60, d: int = 4, seed: int = 0,
                    **params: Any) -> tuple[LTAUEstimator, np.ndarray]:
    """A fitted estimator on clustered descriptors plus 7 query rows."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) + 3 * rng.integers(0, 3, size=(n, 1))
    errs = np.abs(rng.normal(size=(2, 6, n))) * 0.1
    ids = np.arange(n, dtype=np.int64) * 7 + 11
    est = LTAUEstimator(k=3, index=index, distribution=distribution, **params).fit(
        x, list(errs), atomic_numbers=rng.choice([1, 8], size=n), atom_ids=ids
    )
    return est, rng.normal(size=(7, d)) + 3


def save_v1(est: LTAUEstimator, path: str | Path, compress: bool = False) -> None:
    """Write ``est`` in format 1 (the npz container of ltau-ase 0.1), for the legacy-reader tests."""
    params = dict(est.get_params())
    params.pop("metadata")
    params["window"] = None
    params["index_params"] = None if est.index_params is None else dict(est.index_params)
    dist_info, dist_arrays = est.distributions_.to_arrays()
    header = {
        "magic": "ltau-ase-estimator", "format_version": 1, "settings": params, "metadata": dict(est.metadata or {}),
        "learned": {
            "atol_": est.atol_, "n_features_in_": est.n_features_in_, "n_train_atoms_": est.n_train_atoms_,
            "k_eff_": est.k_eff_, "species_": None if est.species_ is None else est.species_.tolist(),
            "index_params_": {k: v for k, v in est.index_.params.items() if k != "refine"}, "fit_info_": est.fit_info_,
        },
        "distributions": dist_info,
    }
    arrays = {name: getattr(est, name) for name in ("confidence_train_", "variability_train_", "mean_error_train_")}
    arrays["faiss_index"] = est.index_.to_bytes()
    if est.atom_ids_ is not None:
        arrays["atom_ids_"] = est.atom_ids_
    arrays.update({f"dist_{k}": v for k, v in dist_arrays.items()})
    payload = {"__header__": np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays}
    with open(path, "wb") as fh:
        (np.savez_compressed if compress else np.savez)(fh, **payload)


def rewrite(src: str | Path, dst: str | Path, header_fn: Callable[[dict], None] | None = None,
            arrays_fn: Callable[[dict], None] | None = None,
            edit: Callable[[dict, dict], None] | None = None) -> Path:
    """Copy a format-2 file through in-place edits of its header / arrays (``edit(header, arrays)``
    for both at once), with valid digests (what a deliberate attacker, not a flipped bit, would produce)."""
    header, arrays = read_container(src, verify=False, eager_bytes=1 << 62)
    header = {k: v for k, v in header.items() if k not in ("magic", "format_version", "arrays")}
    arrays = {k: np.array(v) for k, v in arrays.items()}
    if header_fn is not None:
        header_fn(header)
    if arrays_fn is not None:
        arrays_fn(arrays)
    if edit is not None:
        edit(header, arrays)
    write_container(dst, header, arrays)
    return Path(dst)


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_rss_growth(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(peak resident-set growth in bytes while ``fn`` ran, its result or the exception it raised).

    Resets the kernel's high-water mark (``/proc/self/clear_refs`` = 5), so C/C++ allocations (FAISS)
    count too, not only Python/NumPy ones.
    """
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _status("VmRSS")
    try:
        out = fn()
    except Exception as exc:  # noqa: BLE001 - returned to the caller, which asserts on its type
        out = exc
    return _status("VmHWM") - base, out
