"""The fit's memory estimate against the sizes of the arrays a fit really holds, and the
``max_memory`` budget refusing a fit before any error is read."""
from __future__ import annotations

import numpy as np
import pytest

from ltau_ase.core.errorlog import ErrorLog, ErrorLogWriter
from ltau_ase.core.estimator import LTAUEstimator


def _fitted(n=3000, d=8, epochs=(20, 30), **params):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    errors = [rng.random((e, n)).astype(np.float32) for e in epochs]
    return x, errors, LTAUEstimator(**params).fit(x, errors)


@pytest.mark.parametrize("distribution", ["compact", "exact"])
def test_estimate_covers_the_arrays_a_fit_keeps(distribution):
    x, errors, est = _fitted(distribution=distribution, index="flat", k=5)
    epochs = est.fit_info_["n_epochs"]  # the selected epochs per run (default window: the last half)
    assert epochs == [10, 10]  # ceil(half) of the shortest run (20 epochs), for both runs
    part = est.estimate_fit_memory(x.shape[0], x.shape[1], epochs)
    dist = est.distributions_
    if distribution == "compact":
        kept = dist.counts.nbytes + dist.n_logged.nbytes + dist.fitted_counts.nbytes + dist.max_error.nbytes
        kept += dist.mean_error_.nbytes
    else:
        kept = sum(s.nbytes for s in dist.sorted_errors) + dist.n_logged.nbytes + dist.fitted_counts.nbytes
        kept += dist.mean_error_.nbytes
    # the estimate is an upper bound of what is kept, and not a loose one
    assert kept <= part["distributions"] <= 1.5 * kept
    assert part["index"] == 0 and np.shares_memory(est.index_.vectors, x)  # flat: the descriptors themselves
    learned = est.confidence_train_.nbytes + est.variability_train_.nbytes + est.mean_error_train_.nbytes
    assert part["learned"] >= learned
    assert part["peak"] >= part["descriptors"] + part["distributions"] + part["index"]
    flat = LTAUEstimator(index="flat").estimate_fit_memory(10**7, 32, [100, 100])
    codes = LTAUEstimator(index="ivfpq", index_params={"refine": 0}).estimate_fit_memory(10**7, 32, [100, 100])
    assert codes["index"] < flat["descriptors"] / 6  # compressed codes: m = D/4 bytes + an 8-byte id per atom
    refine = LTAUEstimator(index="ivfpq").estimate_fit_memory(10**7, 32, [100, 100])
    # re-ranking reads the fit's descriptors themselves: no second copy of the vectors
    assert refine["index"] < codes["index"] + 10**7 and refine["index_build"] < 10**8
    assert LTAUEstimator(index="auto").estimate_fit_memory(10**7, 32, [100, 100]) == refine  # auto: ivfpq


def test_max_memory_refuses_the_fit_before_reading_errors(tmp_path):
    n = 2000
    ids = np.arange(n)
    with ErrorLogWriter(tmp_path / "run", ids) as w:
        w.append_epoch(ids, np.full(n, 0.1, np.float32), epoch=0)
    log = ErrorLog(tmp_path / "run")
    x = np.zeros((n, 4), np.float32)
    est = LTAUEstimator(max_memory=10_000)
    need = est.estimate_fit_memory(n, 4, [1])["peak"]
    with pytest.raises(ValueError, match=r"needs about .* GB .* but max_memory is 0\.00 GB"):
        est.fit(x, log)
    assert not hasattr(est, "distributions_")
    est.set_params(max_memory=need)
    assert est.fit(x, log).n_train_atoms_ == n
    assert set(est.fit_info_["seconds"]) == {"distributions", "train_confidence", "index"}
    with pytest.raises(ValueError, match="max_memory must be None or a number of bytes > 0"):
        LTAUEstimator(max_memory=-1).fit(x, log)


def test_max_memory_survives_save_and_load(tmp_path):
    _, _, est = _fitted(n=500, max_memory=5e9)
    est.save(str(tmp_path / "e.ltau"))
    assert LTAUEstimator.load(str(tmp_path / "e.ltau")).max_memory == 5_000_000_000
