"""Hostile estimator files, class 3 of issue 9: corrupt numbers must never load silently.

Two kinds of corruption: (a) a flipped byte anywhere (caught by the SHA-256 digests of header and
arrays), and (b) a deliberate edit with recomputed digests (caught by value and consistency checks).
Every case must raise ValueError with a message naming the problem.
"""
from __future__ import annotations

import numpy as np
import pytest
from ltau_file_tools import rewrite, save_v1, small_estimator

from ltau_ase.core.estimator import LTAUEstimator
from ltau_ase.core.fileformat import read_container


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile_numbers")
    out = {}
    for kind in ("compact", "exact"):
        est, q = small_estimator("flat", kind, n=80)
        est.save(tmp / f"{kind}.ltau")
        out[kind] = tmp / f"{kind}.ltau"
    est, _ = small_estimator("hnsw", "compact", n=80)
    est.save(tmp / "hnsw.ltau")
    out["hnsw"] = tmp / "hnsw.ltau"
    return tmp, out


def _arr(name, fn):
    def mutate(arrays):
        a = arrays[name].copy()
        fn(a)
        arrays[name] = a
    return mutate


def _set(i, value):
    def fn(a):
        a.reshape(-1)[i] = value
    return fn


def _hdr(section, key, value):
    return lambda h: h[section].__setitem__(key, value)


ARRAY_CASES = [
    ("compact", "confidence_train_", _set(3, 5.0), r"outside \[0, 1\]"),
    ("compact", "confidence_train_", _set(3, np.nan), r"outside \[0, 1\]"),
    ("compact", "confidence_train_", _set(3, -0.1), r"outside \[0, 1\]"),
    ("compact", "confidence_train_", lambda a: a.__setitem__(3, 1.0 - a[3] if a[3] != 0.5 else 0.25), "disagree"),
    ("compact", "variability_train_", _set(0, 0.7), r"\[0, 0.5\]"),
    ("compact", "variability_train_", _set(0, np.nan), r"\[0, 0.5\]"),
    ("compact", "variability_train_", lambda a: a.__setitem__(0, a[0] + 0.01), "disagree"),
    ("compact", "mean_error_train_", _set(1, -0.2), "negative or not finite"),
    ("compact", "mean_error_train_", _set(1, np.inf), "negative or not finite"),
    ("compact", "mean_error_train_", lambda a: a.__setitem__(1, a[1] * 1.5), "disagree"),
    ("compact", "dist_edges", lambda a: a.__setitem__(slice(None), a[::-1].copy()), "strictly increasing"),
    ("compact", "dist_edges", _set(2, np.nan), "strictly increasing"),
    ("compact", "dist_edges", _set(0, -1.0), "strictly increasing"),
    ("compact", "dist_counts", lambda a: a.__setitem__((0, 5), 0), "empty"),
    ("compact", "dist_counts", lambda a: a.__setitem__((1, 5, 0), a[1, 5, 0] + 3), "disagree"),
    ("compact", "dist_fitted_counts", _set(4, 10**6), "exceed"),
    ("compact", "dist_fitted_counts", _set(4, -1), "negative"),
    ("compact", "dist_max_error", _set(2, -1.0), "negative or not finite"),
    ("compact", "dist_max_error", _set(2, 1e-9), "exceed the maximum"),
    ("compact", "dist_mean_error", _set(2, np.nan), "negative or not finite"),
    ("compact", "dist_fitted_threshold", lambda a: a.fill(np.nan), "threshold"),
    ("compact", "dist_fitted_threshold", lambda a: a.fill(-0.5), "threshold"),
    ("compact", "atom_ids_", _set(1, 11), "not unique"),
    ("compact", "index_vectors", _set(5, np.nan), "NaN or inf"),
    ("compact", "index_vectors", _set(5, np.inf), "NaN or inf"),
    ("exact", "dist_sorted_errors_0", lambda a: a.__setitem__((slice(None), 2), a[::-1, 2].copy()), "not sorted"),
    ("exact", "dist_sorted_errors_0", _set(0, -1.0), "negative"),
    ("exact", "dist_sorted_errors_1", _set(0, np.nan), "NaN before"),
    ("exact", "dist_sorted_errors_1", lambda a: a.__setitem__((-1, 3), np.inf), "infinite"),
    ("exact", "dist_sorted_errors_1", lambda a: a.__setitem__((slice(None), 3), np.nan), "NaN before|no logged"),
]


@pytest.mark.parametrize("kind,name,fn,match", ARRAY_CASES)
def test_edited_arrays_refused(files, kind, name, fn, match):
    tmp, f = files
    path = rewrite(f[kind], tmp / "edit.ltau", arrays_fn=_arr(name, fn))
    with pytest.raises(ValueError, match=match):
        LTAUEstimator.load(path)


HEADER_CASES = [
    (_hdr("learned", "atol_", -0.1), "atol_"),
    (_hdr("learned", "atol_", "nan"), "atol_"),
    (_hdr("learned", "k_eff_", 2), "k_eff_"),
    (_hdr("learned", "species_", [1, 200]), "species_"),
    (_hdr("learned", "species_", [8, 1]), "species_"),
    (_hdr("learned", "index_kind_", "lsh"), "index kind"),
    (_hdr("learned", "n_train_atoms_", 81), r"atom count disagrees"),
    (_hdr("learned", "n_features_in_", 5), r"expected <f4 \(80, 5\)"),
    (_hdr("settings", "scale", -1.0), "scale"),
    (_hdr("settings", "k", 0), "k must be"),
    (_hdr("settings", "k", 2.5), "k must be"),
    (_hdr("settings", "weights", "bogus"), "weights"),
    (_hdr("settings", "rtol", -1.0), "rtol"),
    (_hdr("settings", "atol", -1.0), "atol"),
    (_hdr("settings", "unknown_species", "explode"), "unknown_species"),
    (_hdr("settings", "distribution", "gaussian"), "distribution"),
    (_hdr("settings", "chunk_size", 0), "chunk_size"),
    (_hdr("settings", "index", "lsh"), "index must be"),
    (_hdr("settings", "evil", 1), "unknown settings"),
    (_hdr("settings", "window", {"skip": -3}), "window|skip|malformed"),
    (_hdr("distributions", "kind", "gaussian"), "distribution kind"),
    (_hdr("distributions", "n_atoms", 79), "atom count"),
    (lambda h: h.__setitem__("metadata", [1, 2]), "metadata"),
    (lambda h: h.pop("learned"), "lacks"),
]


@pytest.mark.parametrize("mutate,match", HEADER_CASES)
def test_edited_header_refused(files, mutate, match):
    tmp, f = files
    path = rewrite(f["compact"], tmp / "hdr.ltau", header_fn=mutate)
    with pytest.raises(ValueError, match=match):
        LTAUEstimator.load(path)


def test_every_flipped_array_byte_is_caught(files):
    """One flipped bit inside each stored array (no digest recomputed) is refused by its digest."""
    tmp, f = files
    n_cases = 0
    for kind in ("compact", "exact", "hnsw"):
        header, arrays = read_container(f[kind])
        raw = f[kind].read_bytes()
        for name, spec in header["arrays"].items():
            if arrays[name].nbytes == 0:
                continue
            data = bytearray(raw)
            pos = _data_start(raw) + spec["offset"] + arrays[name].nbytes // 2
            data[pos] ^= 0x04
            (tmp / "flip.ltau").write_bytes(bytes(data))
            with pytest.raises(ValueError, match=f"'{name}' does not match its SHA-256"):
                LTAUEstimator.load(tmp / "flip.ltau")
            n_cases += 1
    assert n_cases >= 25


def _data_start(raw: bytes) -> int:
    import struct

    return -(-(56 + struct.unpack("<Q", raw[16:24])[0]) // 64) * 64


def test_format_1_files_get_the_same_value_checks(tmp_path):
    est, _ = small_estimator("flat", "compact", n=80)
    est.confidence_train_ = est.confidence_train_.copy()
    est.confidence_train_[0] = 5.0
    save_v1(est, tmp_path / "v1.ltau")
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        LTAUEstimator.load(tmp_path / "v1.ltau")
    est, _ = small_estimator("hnsw", "compact", n=80, index_params={"efSearch": 20})
    est.index_.params["efSearch"] = -4  # what a hand-edited format-1 header would hold
    save_v1(est, tmp_path / "v1b.ltau")
    with pytest.raises(ValueError, match="efSearch"):
        LTAUEstimator.load(tmp_path / "v1b.ltau")
