"""Memory-mapped estimator files (issue 13 §4): large arrays are mapped, not read; predictions equal
the fully read estimator's; opening does not grow the resident set by the arrays' size; streamed
verification catches corruption the lazy open skips."""
from __future__ import annotations

import os

import numpy as np
import pytest
from ltau_file_tools import peak_rss_growth

from ltau_ase.core.estimator import LTAUEstimator
from ltau_ase.core.fileformat import verify_container

MiB = 1 << 20


def _status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _is_mapped(a) -> bool:
    import mmap

    while a is not None:
        if isinstance(a, (np.memmap, mmap.mmap)):
            return True
        a = getattr(a, "base", None)
    return False


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """A 200k-atom, D=32 estimator with an IVF-PQ index that re-ranks against stored vectors (~70 MB)."""
    rng = np.random.default_rng(0)
    n, d = 200_000, 32
    x = (rng.normal(size=(n, d)) + 4 * rng.integers(0, 8, size=(n, 1))).astype(np.float32)
    errs = (np.abs(rng.normal(size=(2, 5, n))) * 0.1).astype(np.float32)
    est = LTAUEstimator(k=5, index="ivfpq", index_params={"nlist": 64, "m": 8, "nbits": 6, "nprobe": 8, "refine": 4})
    est.fit(x, list(errs), atom_ids=np.arange(n) * 3)
    path = tmp_path_factory.mktemp("mmap") / "big.ltau"
    est.save(path)
    q = x[rng.choice(n, 50, replace=False)] + rng.normal(scale=0.05, size=(50, d)).astype(np.float32)
    return path, est, q


def test_large_arrays_are_mapped_and_predictions_match(big_file):
    path, est, q = big_file
    lazy = LTAUEstimator.load(path, eager_bytes=1 * MiB)
    assert isinstance(lazy.index_.vectors, np.memmap)
    assert isinstance(lazy.confidence_train_, np.memmap) and isinstance(lazy.atom_ids_, np.memmap)
    assert lazy.__dict__.get("_distributions") is None  # the 13 MB of histograms are not even wrapped yet
    full = LTAUEstimator.load(path)  # default: everything below 64 MiB read and checked
    assert not isinstance(full.index_.vectors, np.memmap)
    for key, value in est.predict(q).items():
        np.testing.assert_array_equal(lazy.predict(q)[key], value)
        np.testing.assert_array_equal(full.predict(q)[key], value)
    # Other thresholds need the distributions: built on first use from the mapped arrays.
    np.testing.assert_array_equal(lazy.predict(q, threshold=0.05)["confidence"], est.predict(q, threshold=0.05)["confidence"])
    assert _is_mapped(lazy.distributions_.counts)  # a view of the map (np.asarray drops the subclass)
    # ... and the exact re-ranking really ranks by exact distance: compare with brute force in numpy.
    dist, ids, valid = lazy.index_.search(q, 5)
    exact = np.linalg.norm(q[:, None, :].astype(np.float64) - np.asarray(lazy.index_.vectors, np.float64)[ids], axis=2)
    np.testing.assert_allclose(dist, exact, rtol=1e-5)
    assert np.all(np.diff(dist, axis=1) >= -1e-6)


def test_open_does_not_read_the_arrays(big_file):
    path, _, q = big_file
    size = path.stat().st_size
    assert size > 60 * MiB
    growth, est = peak_rss_growth(lambda: LTAUEstimator.load(path, eager_bytes=1 * MiB))
    assert isinstance(est, LTAUEstimator)
    # The in-memory IVF-PQ codes and ids (200k x 14 B = 2.8 MB) plus tables; not the 70 MB of arrays.
    assert growth < 16 * MiB, f"opening grew RSS by {growth / MiB:.1f} MiB for a {size / MiB:.0f} MiB file"
    est.predict(q[:2])  # first use maps library code pages; measure after it
    # Evict the file from the page cache (it was just written), as after a reboot: otherwise the
    # kernel's fault-around maps neighbouring cached pages too and RssFile says nothing about reads.
    with open(path, "rb") as fh:
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    file_before, anon_before = _status("RssFile"), _status("RssAnon")
    est.predict(q)
    touched = _status("RssFile") - file_before
    # 50 queries re-rank 50 x 20 rows of the 25.6 MB vector map and gather 50 x 5 entries of the
    # 1.6 MB confidence / error maps: at most ~1100 pages (4.4 MB), far below the file's 70 MB.
    assert touched < 8 * MiB, f"predict touched {touched / MiB:.1f} MiB of mapped pages"
    assert _status("RssAnon") - anon_before < 8 * MiB


def test_verify_streams_digests_and_values(big_file, tmp_path):
    path, _, _ = big_file
    raw = bytearray(path.read_bytes())
    raw[-5000] ^= 0x20  # inside the last array (large, memory-mapped)
    bad = tmp_path / "bad.ltau"
    bad.write_bytes(bytes(raw))
    LTAUEstimator.load(bad, eager_bytes=1 * MiB)  # lazy open: not checked (documented)
    with pytest.raises(ValueError, match="SHA-256"):
        LTAUEstimator.load(bad, eager_bytes=1 * MiB, verify=True)
    with pytest.raises(ValueError, match="SHA-256"):
        verify_container(bad)
    with pytest.raises(ValueError, match="SHA-256"):
        LTAUEstimator.load(bad)  # default: arrays under 64 MiB are read and checked
    # A truncated memory-mapped array is refused at open, not at the first page fault.
    bad.write_bytes(path.read_bytes()[:-4096])
    with pytest.raises(ValueError, match="truncated"):
        LTAUEstimator.load(bad, eager_bytes=1 * MiB)
