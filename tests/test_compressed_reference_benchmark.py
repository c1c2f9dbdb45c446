"""Argument checks of benchmarks/compressed_reference.py (no model: they fail before one is loaded; < 2 s)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "compressed_reference.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("compressed_reference_benchmark", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_centroids_by_hand(bench):
    # N/64 .. N/4 of 6400 = 100, 200, 400, 800, 1600 (all >= 4k = 40)
    assert bench.default_centroids(6400, 10) == [100, 200, 400, 800, 1600]
    # of 640: 4k = 120 lifts N/64 .. N/8 (10 .. 80) to 120; N/4 = 160
    assert bench.default_centroids(640, 30) == [120, 160]
    # 4k beyond N: one centroid per training atom, never more than N
    assert bench.default_centroids(100, 30) == [100]


def test_out_of_range_k_and_centroids_exit_2_naming_the_range(bench, tmp_path, capsys):
    from ltau_ase.core.estimator import LTAUEstimator

    rng = np.random.default_rng(0)
    n = 40
    LTAUEstimator(k=4).fit(rng.normal(size=(n, 3)), list(np.abs(rng.normal(size=(2, 5, n))))).save(tmp_path / "e.ltau")
    base = ["--estimator", str(tmp_path / "e.ltau"), "--model", str(tmp_path / "absent.pt"),
            "--frames", str(tmp_path / "absent.xyz")]
    for extra, message in ((["--k", "0"], "--k must be >= 1; got 0"),
                           (["--k", str(n + 1)], f"--k {n + 1} exceeds the estimator's {n} training atoms"),
                           (["--centroids", "8", str(n + 1)], f"--centroids \\[{n + 1}\\] out of range.*N={n}"),
                           (["--centroids", "0"], "--centroids \\[0\\] out of range"),
                           (["--max-frames", "0"], "--max-frames must be >= 1"),
                           (["--rattle", "-0.1"], "--rattle >= 0 Å; got 200 and -0.1")):
        with pytest.raises(SystemExit) as exc:
            bench.main(base + extra)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert re.search(message, err), err
