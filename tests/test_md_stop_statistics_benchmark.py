"""Pure helpers of benchmarks/md_stop_statistics.py against hand-computed traces (no MD, no model; < 2 s)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "md_stop_statistics.py"


@pytest.fixture(scope="module")
def ms():
    spec = importlib.util.spec_from_file_location("md_stop_statistics_benchmark", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _run(ee, r=None, z=(29, 8), err=None):
    ee = np.asarray(ee, dtype=np.float64)
    return {"expected_error": ee, "distance_ratio": ee * 10 if r is None else np.asarray(r, dtype=np.float64),
            "numbers": np.asarray(z), "true_max_error": np.zeros(len(ee)) if err is None else np.asarray(err)}


def test_trace_statistics_by_hand(ms):
    run = _run([[1.0, 0.2], [3.0, 0.1], [2.0, 0.9], [0.0, 0.3]])
    stats = ms.statistics(bound=1.0, quantile=1.0)
    refs = [run]
    np.testing.assert_allclose(stats["EE"](refs)(run), [1.0, 3.0, 2.0, 0.3])
    # moving mean over 10 steps of the max-atom EE: running means while fewer than 10 steps exist
    np.testing.assert_allclose(stats["mean10(EE)"](refs)(run), [1.0, 2.0, 2.0, 6.3 / 4])
    # per element (quantile 1 of the reference): Cu 3.0, O 0.9 -> max(EE_Cu / 3, EE_O / 0.9)
    np.testing.assert_allclose(stats["EE / element q1"](refs)(run), [1 / 3, 1.0, 1.0, 1 / 3])
    # CUSUM with k = the 0.9 quantile of the reference trace (1, 3, 2, 0.3) = 2.7
    np.testing.assert_allclose(stats["CUSUM(EE)"](refs)(run), [0.0, 0.3, 0.0, 0.0])
    # jump over the median of the earlier (up to 20) values
    np.testing.assert_allclose(stats["jump20(EE)"](refs)(run), [0.0, 2.0, 0.0, 0.3 - 2.0])


def test_evaluate_leaves_one_in_domain_run_out_and_scores_hot_runs(ms):
    rng = np.random.default_rng(0)
    in_domain = [_run(rng.uniform(0, 1, size=(30, 2))) for _ in range(12)]
    hot_ee = rng.uniform(0, 1, size=(30, 2))
    hot_ee[15:, 0] = 5.0  # far above every in-domain value from step 15, breakdown at step 14
    hot = [_run(hot_ee, err=np.r_[np.zeros(14), np.full(16, 2.0)])]
    stats = ms.statistics(bound=1.0)
    o = ms.evaluate(stats["EE"], in_domain, hot, 1.0, "conformal", 0.1)
    # conformal rank ceil(13 * 0.9) = 12 of 12 in-domain peaks: the largest
    assert o["threshold"] == pytest.approx(max(r["expected_error"].max() for r in in_domain))
    assert o["hot_stop"] == [15] and o["hot_breakdown"] == [14] and o["hot_on_time"] == 1 and o["hot_within"] == 1
    # every in-domain run is judged by the others' highest peak: only the single highest run can fire
    peaks = sorted(r["expected_error"].max() for r in in_domain)
    assert o["in_domain_false_alarms"] == (1 if peaks[-1] > peaks[-2] else 0)


def test_evaluate_held_out_fits_on_the_reference_runs_only(ms):
    rng = np.random.default_rng(1)
    reference = [_run(rng.uniform(0, 1, size=(30, 2))) for _ in range(12)]
    new_in = [_run(rng.uniform(0, 0.5, size=(30, 2))), _run(np.full((30, 2), 2.0))]  # the second exceeds
    hot_ee = rng.uniform(0, 0.5, size=(30, 2))
    hot_ee[20:, 1] = 9.0
    hot = [_run(hot_ee, err=np.r_[np.zeros(25), np.full(5, 2.0)])]  # stop at 20, breakdown at 25: before
    o = ms.evaluate_held_out(ms.statistics(1.0)["EE"], reference, new_in, hot, 1.0, "conformal", 0.1)
    assert o["threshold"] == pytest.approx(max(r["expected_error"].max() for r in reference))
    assert o["in_domain_stop"] == [None, 0] and o["in_domain_false_alarms"] == 1
    assert (o["hot_on_time"], o["hot_before"], o["hot_within"], o["hot_never"]) == (1, 1, 0, 0)
