"""Per-atom error distributions against brute-force numpy references."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ltau_ase.core.distributions import (
    CompactDistributions,
    ExactDistributions,
    as_runs,
    default_atol,
    make_edges,
)
from ltau_ase.core.errorlog import EpochWindow, ErrorLog, ErrorLogWriter


# ---------------------------------------------------------------- brute-force references
def ref_fractions(runs, t):
    """(M, N) per-run fraction of logged epochs with error <= t, looping over atoms."""
    out = []
    for r in runs:
        n = r.shape[1]
        tt = np.broadcast_to(np.asarray(t, float), (n,))
        row = []
        for i in range(n):
            col = r[:, i][~np.isnan(r[:, i])]
            row.append(np.count_nonzero(col <= tt[i]) / col.size)
        out.append(row)
    return np.array(out)


def ref_bin_share(runs, edges, t):
    """(M, N) fraction of each atom's logged errors in the bin that holds threshold t (≤ semantics)."""
    ext = np.concatenate([[-np.inf], edges, [np.inf]])
    j = np.searchsorted(edges, t, side="left")
    lo, hi = ext[j], ext[j + 1]
    out = []
    for r in runs:
        logged = ~np.isnan(r)
        inb = logged & (r > lo) & (r <= hi)
        out.append(inb.sum(0) / logged.sum(0))
    return np.array(out)


def random_runs(rng, n_atoms=40, epochs=(12, 20), nan_frac=0.1, zeros=True):
    runs = []
    for e in epochs:
        r = (rng.lognormal(-1.0, 1.0, size=(e, n_atoms))).astype(np.float32)
        if zeros:
            r[rng.random(r.shape) < 0.05] = 0.0
        r[rng.random(r.shape) < nan_frac] = np.nan
        r[0] = np.where(np.isnan(r[0]), 0.3, r[0])  # every atom logged at least once
        runs.append(r)
    return runs


# ---------------------------------------------------------------- exact
def test_exact_matches_reference_and_is_not_pooled():
    rng = np.random.default_rng(0)
    runs = random_runs(rng)
    atol = default_atol(as_runs(runs))
    ref_atol = np.mean([np.nanmean(r[-1].astype(np.float64)) for r in runs])
    assert atol == pytest.approx(ref_atol, rel=1e-12)
    d = ExactDistributions.from_runs(as_runs(runs), atol)
    for t in (0.0, 0.05, atol, 0.7, 5.0, 1e3):
        per_run = ref_fractions(runs, t)
        np.testing.assert_allclose(d.confidence_per_run(t), per_run, rtol=0, atol=1e-12)
        np.testing.assert_allclose(d.confidence(t), per_run.mean(0), rtol=0, atol=1e-12)
        np.testing.assert_allclose(d.std(t), per_run.std(0), rtol=0, atol=1e-12)
    per_atom = rng.random(40) * 2
    np.testing.assert_allclose(d.confidence(per_atom), ref_fractions(runs, per_atom).mean(0), atol=1e-12)
    means = np.mean([np.nanmean(r.astype(np.float64), axis=0) for r in runs], axis=0)
    np.testing.assert_allclose(d.mean_error(), means, rtol=1e-6)
    # Runs with different epoch counts: µ_M is the mean of per-run fractions, not the pooled fraction.
    a = np.array([[0.1], [0.1], [0.1], [0.1]], np.float32)  # 4 epochs, all <= 0.5
    b = np.array([[0.9]], np.float32)  # 1 epoch, > 0.5
    dd = ExactDistributions.from_runs(as_runs([a, b]), 0.5)
    assert dd.confidence(0.5)[0] == pytest.approx(0.5)  # pooled would give 0.8
    assert dd.std(0.5)[0] == pytest.approx(0.5)


def test_exact_quantile_reference():
    rng = np.random.default_rng(1)
    runs = random_runs(rng, n_atoms=15)
    d = ExactDistributions.from_runs(as_runs(runs), 0.3)
    for q in (0.0, 0.1, 0.5, 0.9, 1.0):
        got = d.quantile(q)
        for i in range(15):
            vals = np.sort(np.concatenate([r[:, i][~np.isnan(r[:, i])] for r in runs]))
            cdf = np.array([ref_fractions([r[:, [i]] for r in runs], v).mean() for v in vals])
            expected = vals[np.argmax(cdf >= q - 1e-12)]
            assert got[i] == pytest.approx(expected), (q, i)


# ---------------------------------------------------------------- compact
def test_compact_exact_at_fitted_threshold_and_edges():
    rng = np.random.default_rng(2)
    runs = random_runs(rng)
    atol = default_atol(as_runs(runs))
    c = CompactDistributions.from_runs(as_runs(runs), atol, bins=16, chunk_size=7)
    np.testing.assert_allclose(c.confidence(atol), ref_fractions(runs, atol).mean(0), atol=1e-12)
    np.testing.assert_allclose(c.std(atol), ref_fractions(runs, atol).std(0), atol=1e-12)
    for t in c.edges[::3]:  # exact at every bin edge
        np.testing.assert_allclose(c.confidence(t), ref_fractions(runs, t).mean(0), atol=1e-12)
    # Nothing dropped: every logged value (zeros and the maximum included) is counted.
    n_logged = np.array([(~np.isnan(r)).sum(0) for r in runs])
    np.testing.assert_array_equal(c.counts.sum(2), n_logged)
    assert c.edges[-1] == pytest.approx(max(np.nanmax(r) for r in runs))
    zeros = np.array([(r == 0).sum(0) for r in runs])
    assert np.all(c.counts[:, :, 0] >= zeros)
    np.testing.assert_allclose(c.confidence(c.edges[-1]), 1.0)
    means = np.mean([np.nanmean(r.astype(np.float64), axis=0) for r in runs], axis=0)
    np.testing.assert_allclose(c.mean_error(), means, rtol=1e-6)  # exact mean, not from bins


def test_compact_out_of_range_values_go_to_overflow():
    runs = [np.array([[0.0, 0.5], [2.0, 7.0], [np.nan, 0.5]], np.float32)]
    c = CompactDistributions.from_runs(as_runs(runs), 0.5, bins=[0.1, 1.0])
    # atom 0: 0.0 in [0, 0.1], 2.0 overflow; atom 1: 0.5, 0.5 in (0.1, 1], 7.0 overflow.
    np.testing.assert_array_equal(c.counts[0], [[1, 0, 1], [0, 2, 1]])
    np.testing.assert_allclose(c.confidence(1.0), [0.5, 2 / 3])
    np.testing.assert_allclose(c.confidence(7.0), [1.0, 1.0])  # at/above each atom's max: exact 1
    np.testing.assert_allclose(c.confidence(3.0), [1.0, 2 / 3])  # atom 0's max is 2.0
    assert c.n_logged.tolist() == [[2, 3]]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_edges=st.integers(1, 20),
    spacing=st.sampled_from(["log", "linear"]),
    t=st.floats(0.0, 20.0, allow_nan=False),
)
def test_compact_within_one_bin_of_exact(seed, n_edges, spacing, t):
    rng = np.random.default_rng(seed)
    runs = random_runs(rng, n_atoms=12, epochs=(int(rng.integers(1, 15)), int(rng.integers(1, 15))))
    r = as_runs(runs)
    exact = ExactDistributions.from_runs(r, 0.2)
    compact = CompactDistributions.from_runs(r, 0.2, bins=(spacing, n_edges))
    per_run_exact = exact.confidence_per_run(t)
    per_run_compact = compact.confidence_per_run(t)
    np.testing.assert_allclose(per_run_exact, ref_fractions(runs, t), atol=1e-12)
    share = ref_bin_share(runs, compact.edges, t)
    assert np.all(np.abs(per_run_compact - per_run_exact) <= share + 1e-12)
    assert np.all((per_run_compact >= 0) & (per_run_compact <= 1))
    # Quantiles: the compact one bounds the exact one from above, within the bin holding it.
    for q in (0.25, 0.5, 0.9):
        qe, qc = exact.quantile(q), compact.quantile(q)
        assert np.all(qc >= qe - 1e-6)
        j = np.searchsorted(compact.edges, qe, side="left")
        upper = np.concatenate([compact.edges, [np.inf]])[j]
        assert np.all(qc <= np.minimum(upper, compact.max_error) + 1e-6)


def test_same_result_from_error_logs_and_arrays(tmp_path):
    rng = np.random.default_rng(3)
    runs = random_runs(rng, n_atoms=30, epochs=(6, 9))
    ids = np.arange(30) * 11
    logs = []
    for m, r in enumerate(runs):
        with ErrorLogWriter(tmp_path / f"run{m}", ids) as w:
            for row in r:
                keep = ~np.isnan(row)
                w.append_epoch(ids[keep], row[keep])
        logs.append(ErrorLog(tmp_path / f"run{m}"))
    win = EpochWindow(skip=1)
    a = CompactDistributions.from_runs(as_runs(runs, win), 0.4, chunk_size=8)
    b = CompactDistributions.from_runs(as_runs(logs, win), 0.4, chunk_size=8)
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.edges, b.edges)
    assert b.counts.sum(2)[0].max() <= 5  # the window dropped the first epoch
    assert default_atol(as_runs(logs)) == pytest.approx(np.mean([np.nanmean(r[-1]) for r in runs]))


def test_missing_and_invalid_errors_raise():
    r = np.ones((3, 4), np.float32)
    r[:, 2] = np.nan
    with pytest.raises(ValueError, match="no logged epoch"):
        CompactDistributions.from_runs(as_runs(r), 0.5)
    with pytest.raises(ValueError, match="no logged epoch"):
        ExactDistributions.from_runs(as_runs(r), 0.5)
    with pytest.raises(ValueError, match="negative"):
        CompactDistributions.from_runs(as_runs(-np.ones((2, 2))), 0.5)
    with pytest.raises(ValueError, match="inf"):
        ExactDistributions.from_runs(as_runs(np.full((2, 2), np.inf)), 0.5)
    with pytest.raises(ValueError, match="same N"):
        as_runs([np.ones((2, 3)), np.ones((2, 4))])
    with pytest.raises(ValueError, match="expected"):
        as_runs(np.ones((2, 2, 2, 2)))
    with pytest.raises(ValueError, match="empty"):
        as_runs(np.ones((0, 3)))
    d = ExactDistributions.from_runs(as_runs(np.ones((2, 3))), 0.5)
    with pytest.raises(ValueError, match="threshold"):
        d.confidence(-1.0)
    with pytest.raises(ValueError, match="threshold"):
        d.confidence(np.ones(5))
    with pytest.raises(ValueError, match="quantile"):
        d.quantile(1.5)


def test_make_edges():
    e = make_edges(None, 1e-3, 2.0)
    assert e.size == 64 and e[-1] == 2.0 and e[0] == pytest.approx(1e-3)
    assert np.all(np.diff(np.log(e)) == pytest.approx(np.log(2.0 / 1e-3) / 63))
    np.testing.assert_allclose(make_edges(("linear", 4), 0.1, 2.0), [0.5, 1.0, 1.5, 2.0])
    assert make_edges(8, 1e-30, 1.0)[0] == pytest.approx(1e-6)  # floor of the log range
    np.testing.assert_array_equal(make_edges(None, np.inf, 0.0), [0.0])  # all-zero errors
    for bad in ([1.0, 0.5], [-1.0, 1.0], [0.1, np.nan], 0, ("cubic", 4)):
        with pytest.raises(ValueError):
            make_edges(bad, 0.1, 1.0)


def test_threshold_compared_in_float64():
    # 0.3 in float32 is 0.30000001192...; a float64 threshold just below it must not count it.
    runs = [np.array([[0.3], [0.1]], np.float32)]
    t = 0.30000000999
    assert ExactDistributions.from_runs(as_runs(runs), 0.2).confidence(t)[0] == 0.5
    for cls in (ExactDistributions, CompactDistributions):
        assert cls.from_runs(as_runs(runs), 0.2).confidence(float(np.float32(0.3)))[0] == 1.0
    assert ExactDistributions.from_runs(as_runs(runs), t).confidence(t)[0] == 0.5
    assert CompactDistributions.from_runs(as_runs(runs), t).confidence(t)[0] == 0.5  # exact at fitted
