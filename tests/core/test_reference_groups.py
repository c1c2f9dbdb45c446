"""Leave-one-group-out reference distance of the distance ratio (issue 11 item 5)."""
from __future__ import annotations

import numpy as np
import pytest

from ltau_ase.core.estimator import LTAUEstimator
from ltau_ase.core.fileformat import read_container, write_container
from ltau_ase.core.index import NeighbourIndex
from ltau_ase.core.shift import reference_distances
from ltau_file_tools import rewrite


def _trajectories(seed=0, n_groups=12, frames=15, atoms=6, jitter=0.01):
    """Groups of near-duplicate frames: each group is one structure (``atoms`` sites) jittered per frame."""
    rng = np.random.default_rng(seed)
    sites = rng.normal(size=(n_groups, atoms, 4))
    x = sites[:, None] + jitter * rng.normal(size=(n_groups, frames, atoms, 4))
    groups = np.repeat(np.arange(n_groups), frames * atoms)
    return x.reshape(-1, 4).astype(np.float32), groups


def _brute_force(x, groups, k):
    d = np.linalg.norm(x[:, None, :].astype(np.float64) - x[None, :, :], axis=2)
    d[groups[:, None] == groups[None, :]] = np.inf  # own group (the atom itself included) is left out
    return np.sort(np.sort(d, axis=1)[:, :k].mean(axis=1))


def test_leave_one_group_out_matches_brute_force():
    x, groups = _trajectories()
    # shuffled group labels (not contiguous, not 0..G-1) must not matter
    labels = np.random.default_rng(1).permutation(1000)[:12] * 7 - 50
    g = labels[groups]
    ref = reference_distances(NeighbourIndex.build(x), x, k=5, groups=g)
    np.testing.assert_allclose(ref, _brute_force(x, g, 5), rtol=1e-5, atol=1e-6)
    # the plain leave-one-out reference sees the near-duplicates: orders of magnitude smaller
    plain = reference_distances(NeighbourIndex.build(x), x, k=5)
    assert np.median(plain) < 0.05 * np.median(ref)


def test_leave_one_group_out_grows_the_search_past_big_groups(monkeypatch):
    import ltau_ase.core.shift as shift

    # every atom has 100 near-copies in its own group: its k = 3 other-group neighbours lie beyond
    # the first search lists of 16, 32 and 64 entries
    x, groups = _trajectories(n_groups=3, frames=100, atoms=3)
    ref = reference_distances(NeighbourIndex.build(x), x, k=3, groups=groups)
    np.testing.assert_allclose(ref, _brute_force(x, groups, 3), rtol=1e-5, atol=1e-6)
    # a cap below that: atoms whose whole list is their own group are left out, not faked
    monkeypatch.setattr(shift, "MAX_GROUP_SEARCH", 64)
    assert reference_distances(NeighbourIndex.build(x), x, k=3, groups=groups).size == 0


def test_estimator_groups_rule_round_trip_and_old_files(tmp_path):
    x, groups = _trajectories(seed=2)
    n = x.shape[0]
    errs = list(np.abs(np.random.default_rng(2).normal(size=(2, 6, n))) * 0.1)
    plain = LTAUEstimator(k=5, distribution="exact").fit(x, errs)
    grouped = LTAUEstimator(k=5, distribution="exact").fit(x, errs, groups=groups)
    assert plain.reference_rule_ == "atoms" and plain.train_groups_ is None
    assert grouped.reference_rule_ == "groups"
    np.testing.assert_allclose(grouped.train_distance_ref_, _brute_force(x, groups, 5), rtol=1e-5, atol=1e-6)
    # everything else is unchanged by the groups
    q = x[::37] + 0.3
    a, b = plain.predict(q), grouped.predict(q)
    assert all(np.array_equal(a[key], b[key]) for key in a)

    grouped.save(tmp_path / "g.ltau")
    loaded = LTAUEstimator.load(tmp_path / "g.ltau")
    assert loaded.reference_rule_ == "groups"
    np.testing.assert_array_equal(loaded.train_groups_, groups)
    np.testing.assert_array_equal(loaded.train_distance_ref_, grouped.train_distance_ref_)
    # select_k after a load recomputes the reference with the stored groups
    cal = x[::5] + 0.02
    loaded.select_k(cal, np.full(cal.shape[0], 0.05), k_grid=(3,))
    np.testing.assert_allclose(loaded.train_distance_ref_, _brute_force(x, groups, 3), rtol=1e-5, atol=1e-6)

    # a file written before the group rule (no reference_rule_, no train_groups_) loads as "atoms"
    plain.save(tmp_path / "p.ltau")
    header, arrays = read_container(tmp_path / "p.ltau")
    assert "reference_rule_" not in header["learned"] and "train_groups_" not in arrays
    old = LTAUEstimator.load(tmp_path / "p.ltau")
    assert old.reference_rule_ == "atoms" and old.train_groups_ is None
    a, b = plain.predict(q), old.predict(q)
    assert all(np.array_equal(a[key], b[key]) for key in a)


def test_hostile_group_fields_are_refused(tmp_path):
    x, groups = _trajectories(seed=3, n_groups=4, frames=5)
    n = x.shape[0]
    errs = list(np.abs(np.random.default_rng(3).normal(size=(1, 4, n))) * 0.1)
    LTAUEstimator(k=3).fit(x, errs, groups=groups).save(tmp_path / "g.ltau")

    def unknown_rule(header, arrays):
        header["learned"]["reference_rule_"] = "__import__('os')"

    def rule_without_groups(header, arrays):
        arrays.pop("train_groups_")

    def groups_without_rule(header, arrays):
        header["learned"].pop("reference_rule_")

    def too_long(header, arrays):
        arrays["train_groups_"] = np.zeros(n + 10**6, dtype=np.int64)

    def float_groups(header, arrays):
        arrays["train_groups_"] = arrays["train_groups_"].astype(np.float64)

    for name, edit, match in (("a.ltau", unknown_rule, "reference_rule_"), ("b.ltau", rule_without_groups, "train_groups_"),
                              ("c.ltau", groups_without_rule, "train_groups_"), ("d.ltau", too_long, "train_groups_"),
                              ("e.ltau", float_groups, "train_groups_")):
        with pytest.raises(ValueError, match=match):
            LTAUEstimator.load(rewrite(tmp_path / "g.ltau", tmp_path / name, edit=edit))


def test_bad_groups_at_fit():
    x, groups = _trajectories(seed=4, n_groups=3, frames=4)
    errs = list(np.abs(np.random.default_rng(4).normal(size=(1, 4, x.shape[0]))))
    with pytest.raises(ValueError, match="one structure group per training atom"):
        LTAUEstimator(k=3).fit(x, errs, groups=groups[:-1])
    with pytest.raises(ValueError, match="one structure group per training atom"):
        LTAUEstimator(k=3).fit(x, errs, groups=groups.astype(float))
    with pytest.raises(ValueError, match="at least two"):
        LTAUEstimator(k=3).fit(x, errs, groups=np.zeros_like(groups))
