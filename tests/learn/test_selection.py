"""Selection rules of ltau_ase.learn against brute force and hand-made cases (numpy only, < 1 s)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from ltau_ase.core.atom_ids import assign_new_frame_ids, frame_ids_of
from ltau_ase.learn.selection import (
    farthest_point_sampling,
    select_committee,
    select_ltau,
    select_random,
    structure_feature,
)


def brute_force_fps(x: np.ndarray, k: int, first: int) -> list[int]:
    chosen = [first]
    while len(chosen) < k:
        best, best_d = None, -1.0
        for j in range(len(x)):  # lowest index wins ties: strict >
            if j in chosen:
                continue
            d = min(float(np.sqrt(((x[j] - x[c]) ** 2).sum())) for c in chosen)
            if d > best_d:
                best, best_d = j, d
        chosen.append(best)
    return chosen


def test_fps_matches_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(20):
        x = rng.normal(size=(15, 3))
        k, first = int(rng.integers(1, 16)), int(rng.integers(15))
        assert farthest_point_sampling(x, k, first).tolist() == brute_force_fps(x, k, first)


def test_fps_never_repeats_coinciding_points():
    # the same seed structure explored at two temperatures gives identical step-0 features
    x = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    picked = farthest_point_sampling(x, 4, 0)
    assert picked.tolist() == [0, 3, 1, 2] and len(set(picked.tolist())) == 4
    rng = np.random.default_rng(2)
    for trial in range(10):
        y = rng.integers(0, 2, size=(8, 2)).astype(float)  # many coinciding points
        k = int(rng.integers(1, 9))
        assert farthest_point_sampling(y, k, 0).tolist() == brute_force_fps(y, k, 0)
    stat = np.array([0.9, 0.9, 0.5])
    assert sorted(select_ltau(stat, np.ones(3, bool), x[:3], budget=3).tolist()) == [0, 1, 2]


def test_fps_hand_case_and_bounds():
    x = np.array([[0.0], [1.0], [10.0], [4.0]])
    # from 0: farthest is 10 (index 2); then min distances 0:-, 1:1, 3:4 -> index 3; then index 1
    assert farthest_point_sampling(x, 4, 0).tolist() == [0, 2, 3, 1]
    assert farthest_point_sampling(x, 10, 0).size == 4
    with pytest.raises(ValueError, match="first"):
        farthest_point_sampling(x, 2, 7)


def test_structure_feature_uses_uncertain_atoms():
    desc = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 5.0]])
    u = np.array([0.9, 0.7, 0.1])
    assert np.allclose(structure_feature(desc, u, 0.5), [2.0, 0.0])
    # nothing above the bound: the single most uncertain atom
    assert np.allclose(structure_feature(desc, u, 0.95), [1.0, 0.0])


def test_select_ltau_prefers_diverse_over_near_duplicates():
    # ten near-identical frames of one event (high uncertainty) and two other events
    rng = np.random.default_rng(1)
    event = np.array([5.0, 5.0]) + rng.normal(scale=1e-3, size=(10, 2))
    feats = np.vstack([event, [[0.0, 0.0], [-5.0, 5.0]]])
    stat = np.r_[np.full(10, 0.9) + np.arange(10) * 1e-3, 0.6, 0.55]
    flagged = np.ones(12, dtype=bool)
    picked = select_ltau(stat, flagged, feats, budget=3, pool_factor=4)
    assert picked[0] == 9  # the most uncertain first
    assert sorted(picked.tolist())[-2:] == [10, 11]  # one label for the event, not three
    # a pool of only the top 1 x budget: uncertainty alone decides
    assert sorted(select_ltau(stat, flagged, feats, budget=3, pool_factor=1).tolist()) == [7, 8, 9]


def test_select_ltau_only_flagged_and_never_pads():
    stat = np.array([0.1, 0.9, 0.2, 0.8])
    flagged = np.array([False, True, False, True])
    feats = np.eye(4)
    assert sorted(select_ltau(stat, flagged, feats, budget=5).tolist()) == [1, 3]
    assert select_ltau(stat, np.zeros(4, bool), feats, budget=2).size == 0
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="budget"):
            select_ltau(stat, flagged, feats, budget=bad)


def test_select_random_and_committee():
    rng = np.random.default_rng(0)
    picked = select_random(10, 4, rng)
    assert picked.size == 4 and len(set(picked.tolist())) == 4 and picked.max() < 10
    assert select_random(3, 5, rng).tolist() == [0, 1, 2]
    dev = np.array([0.01, 0.06, 0.10, 0.15, 0.2, 0.07])
    # trust window (0.05, 0.15]: indices 1, 2, 3, 5
    assert select_committee(dev, 10, 0.05, 0.15, rng).tolist() == [1, 2, 3, 5]
    sub = select_committee(dev, 2, 0.05, 0.15, rng)
    assert sub.size == 2 and set(sub.tolist()) <= {1, 2, 3, 5}
    with pytest.raises(ValueError, match="trust levels"):
        select_committee(dev, 2, 0.2, 0.1, rng)
    with pytest.raises(ValueError, match="budget"):
        select_committee(dev, 0, 0.05, 0.15, rng)


class _Frame:
    def __init__(self, info):
        self.info = info


def test_assign_new_frame_ids_resolves_collisions():
    # frames saved by UncertaintyStop / ltau md keep their start frame's id: 3, 3, and one without
    frames = [_Frame({"frame_id": 3}), _Frame({"frame_id": 3}), _Frame({})]
    with pytest.raises(ValueError, match="repeat"):
        frame_ids_of(frames[:2])
    new = assign_new_frame_ids(frames, taken=[0, 1, 2, 3, 7])
    assert new.tolist() == [8, 9, 10]
    assert [f.info["frame_id"] for f in frames] == [8, 9, 10]
    assert [f.info.get("source_frame_id") for f in frames] == [3, 3, None]
    ids = np.r_[[0, 1, 2, 3, 7], frame_ids_of(frames)]
    assert len(set(ids.tolist())) == ids.size
    assert assign_new_frame_ids([_Frame({})], taken=[]).tolist() == [0]


def test_fill_budget_from_unflagged():
    stat = np.array([0.1, 0.9, 0.2, 0.8, 0.5])
    flagged = np.array([False, True, False, False, False])
    feats = np.eye(5)
    picked = select_ltau(stat, flagged, feats, budget=3, pool_factor=1, fill=True)
    assert picked.tolist()[0] == 1 and sorted(picked.tolist()) == [1, 3, 4]  # flagged first, then most uncertain
    rng = np.random.default_rng(0)
    dev = np.array([0.01, 0.06, 0.04, 0.3, 0.03])
    # window (0.05, 0.15] holds index 1; fill from below lo by deviation: 2 then 4; never index 3 (> hi)
    assert select_committee(dev, 3, 0.05, 0.15, rng, fill=True).tolist() == [1, 2, 4]
    assert select_committee(dev, 3, 0.05, 0.15, rng, fill=False).tolist() == [1]
