"""Dataset cartography: regions, per-frame aggregates, loss weights and the extxyz export."""
from __future__ import annotations

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from ltau_ase.cartography import (
    REGIONS,
    aggregate_per_frame,
    cartography_frames,
    export_extxyz,
    loss_weights,
    regions,
    values_for_frames,
)
from ltau_ase.core.atom_ids import global_atom_ids


# ----------------------------------------------------------------------------- weights
def test_loss_weights_hand_computed():
    mu = np.array([0.9, 0.1, 0.5])
    sigma = np.array([0.0, 0.1, 0.3])
    # easy, λ = 2: exp(2*0.9)=e^1.8, exp(2*0.2)=e^0.4, exp(2*0.8)=e^1.6, then divide by their mean
    raw = np.array([np.e**1.8, np.e**0.4, np.e**1.6])
    np.testing.assert_allclose(loss_weights(mu, sigma, "easy", lam=2.0), raw / raw.mean(), rtol=1e-12)
    # hard, λ = 4.5: exp(4.5*(1-µ+σ)) = e^0.45, e^4.5, e^3.6
    raw = np.array([np.e**0.45, np.e**4.5, np.e**3.6])
    np.testing.assert_allclose(loss_weights(mu, sigma, "hard", lam=4.5), raw / raw.mean(), rtol=1e-12)
    np.testing.assert_array_equal(loss_weights(mu, sigma, "uniform"), [1.0, 1.0, 1.0])
    # λ = 0 gives uniform weights for every scheme
    np.testing.assert_allclose(loss_weights(mu, sigma, "hard", lam=0.0), 1.0)


def test_loss_weights_normalised_and_ordered():
    rng = np.random.default_rng(0)
    mu = rng.uniform(size=1000)
    sigma = rng.uniform(0, 0.5, 1000) * np.sqrt(mu * (1 - mu))
    for scheme, lam in (("easy", 2.0), ("hard", 4.5), ("uniform", 2.0), ("easy", 300.0)):
        w = loss_weights(mu, sigma, scheme, lam)
        assert w.shape == (1000,) and np.isfinite(w).all()
        assert w.mean() == pytest.approx(1.0, rel=1e-12)
    easy = loss_weights(mu, np.zeros(1000), "easy")
    assert np.all(np.diff(easy[np.argsort(mu)]) >= 0)  # more confident -> heavier


@pytest.mark.parametrize(
    "mu, sigma, kw, match",
    [
        ([0.5, np.nan], [0.1, 0.1], {}, "NaN"),
        ([0.5, 0.5], [0.1], {}, "2 atoms but variability has 1"),
        ([0.5, 1.5], [0.1, 0.1], {}, r"\[0, 1\]"),
        ([0.5, 0.5], [0.1, 0.7], {}, r"\[0, 0.5\]"),
        ([], [], {}, "empty"),
        ([0.5], [0.1], {"scheme": "medium"}, "scheme"),
        ([0.5], [0.1], {"lam": np.inf}, "lam"),
    ],
)
def test_loss_weights_bad_input(mu, sigma, kw, match):
    with pytest.raises(ValueError, match=match):
        loss_weights(mu, sigma, **kw)


# ----------------------------------------------------------------------------- regions, aggregates
def test_regions_rules():
    mu = np.array([0.9, 0.1, 0.5, 0.6, 0.4, 0.55])
    sigma = np.array([0.05, 0.05, 0.3, 0.19, 0.0, 0.2])
    assert regions(mu, sigma).tolist() == [
        "easy-to-learn", "hard-to-learn", "ambiguous", "easy-to-learn", "hard-to-learn", "ambiguous"
    ]
    # a middle band between the confidence thresholds is neither easy nor hard
    assert regions(mu, sigma, easy_threshold=0.7, hard_threshold=0.3).tolist() == [
        "easy-to-learn", "hard-to-learn", "ambiguous", "ambiguous", "ambiguous", "ambiguous"
    ]
    assert set(regions(mu, sigma)) <= set(REGIONS)
    with pytest.raises(ValueError, match="hard_threshold <= easy_threshold"):
        regions(mu, sigma, easy_threshold=0.3, hard_threshold=0.7)


def test_aggregate_per_frame_hand_computed():
    v = np.array([1.0, 2.0, 6.0, 4.0, 5.0])
    idx = np.array([0, 0, 1, 1, 2])
    np.testing.assert_allclose(aggregate_per_frame(v, idx, "mean"), [1.5, 5.0, 5.0])
    np.testing.assert_allclose(aggregate_per_frame(v, idx, "min"), [1.0, 4.0, 5.0])
    np.testing.assert_allclose(aggregate_per_frame(v, idx, "max"), [2.0, 6.0, 5.0])
    with pytest.raises(ValueError, match="no atoms"):
        aggregate_per_frame(v, np.array([0, 0, 2, 2, 2]))
    with pytest.raises(ValueError, match="how"):
        aggregate_per_frame(v, idx, "median")
    with pytest.raises(ValueError, match="equal length"):
        aggregate_per_frame(v, idx[:-1])


# ----------------------------------------------------------------------------- frames and export
def make_frames(rng, sizes=(3, 5, 2)):
    frames = []
    for f, n in enumerate(sizes):
        atoms = Atoms(["Cu"] * (n - 1) + ["O"], positions=rng.uniform(0, 5, (n, 3)), cell=[6, 6, 6], pbc=True)
        atoms.info["frame_id"] = 10 + 7 * f
        atoms.info["config_type"] = "slab"
        atoms.calc = SinglePointCalculator(atoms, energy=-1.5 * n, forces=rng.normal(size=(n, 3)))
        frames.append(atoms)
    return frames


def test_export_extxyz_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    frames = make_frames(rng)
    n = sum(len(a) for a in frames)
    mu = rng.uniform(size=n)
    sigma = rng.uniform(0, 0.4, n) * np.sqrt(mu * (1 - mu)) * 2
    w = loss_weights(mu, sigma, "hard", 4.5)
    path = export_extxyz(frames, mu, sigma, tmp_path / "out" / "train.extxyz", weights=w)
    back = ase.io.read(path, index=":", format="extxyz")
    assert len(back) == len(frames)
    labels = regions(mu, sigma)
    got = {k: np.concatenate([a.arrays[k] for a in back]) for k in ("ltau_confidence", "ltau_variability", "ltau_weight")}
    np.testing.assert_allclose(got["ltau_confidence"], mu, atol=5e-9, rtol=0)  # extxyz writes 8 decimals
    np.testing.assert_allclose(got["ltau_variability"], sigma, atol=5e-9, rtol=0)
    np.testing.assert_allclose(got["ltau_weight"], w, atol=5e-9, rtol=0)
    assert np.concatenate([a.arrays["ltau_region"] for a in back]).tolist() == labels.tolist()
    start = 0
    for orig, a in zip(frames, back):
        sl = slice(start, start + len(orig))
        start += len(orig)
        # frames, species, positions and reference results unchanged
        assert a.info["frame_id"] == orig.info["frame_id"] and a.info["config_type"] == "slab"
        np.testing.assert_array_equal(a.numbers, orig.numbers)
        np.testing.assert_allclose(a.positions, orig.positions, atol=5e-9)
        np.testing.assert_allclose(a.get_forces(), orig.get_forces(), atol=5e-9)
        assert a.get_potential_energy() == pytest.approx(orig.get_potential_energy())
        assert a.info["ltau_confidence_mean"] == pytest.approx(mu[sl].mean())
        assert a.info["ltau_confidence_min"] == pytest.approx(mu[sl].min())
        assert a.info["ltau_variability_max"] == pytest.approx(sigma[sl].max())
        assert a.info["ltau_weight_mean"] == pytest.approx(w[sl].mean())
        assert a.info["ltau_n_easy"] + a.info["ltau_n_hard"] + a.info["ltau_n_ambiguous"] == len(orig)
        assert a.info["ltau_n_hard"] == int(np.sum(labels[sl] == "hard-to-learn"))
    # the input frames were not modified
    assert "ltau_confidence" not in frames[0].arrays


def test_export_bad_inputs(tmp_path):
    rng = np.random.default_rng(2)
    frames = make_frames(rng)
    n = sum(len(a) for a in frames)
    mu, sigma = np.full(n, 0.5), np.full(n, 0.1)
    with pytest.raises(ValueError, match=f"{n - 1} values but the 3 frames hold {n} atoms"):
        export_extxyz(frames, mu[:-1], sigma[:-1], tmp_path / "a.extxyz")
    with pytest.raises(ValueError, match=f"weights have shape \\({n + 1},\\)"):
        export_extxyz(frames, mu, sigma, tmp_path / "a.extxyz", weights=np.ones(n + 1))
    bad = mu.copy()
    bad[4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        export_extxyz(frames, bad, sigma, tmp_path / "a.extxyz")
    assert not (tmp_path / "a.extxyz").exists()
    with pytest.raises(ValueError, match="no frames"):
        cartography_frames([], mu, sigma)


def test_values_for_frames_reorders_by_atom_id():
    rng = np.random.default_rng(3)
    frames = make_frames(rng)
    ids = global_atom_ids([a.info["frame_id"] for a in frames], [len(a) for a in frames])
    values = np.arange(ids.size, dtype=float)  # value k belongs to ids[k]
    perm = rng.permutation(ids.size)
    extra_ids = np.concatenate([ids[perm], [999 << 20]])  # plus an atom of a frame not given
    extra_vals = np.concatenate([values[perm], [-1.0]])
    (got,) = values_for_frames(frames, extra_ids, extra_vals)
    np.testing.assert_array_equal(got, values)
    with pytest.raises(ValueError, match="1 atom\\(s\\) of the training frames have no logged value"):
        values_for_frames(frames, ids[1:], values[1:])
    with pytest.raises(ValueError, match="duplicates"):
        values_for_frames(frames, np.concatenate([ids, ids[:1]]), np.concatenate([values, values[:1]]))
    del frames[1].info["frame_id"]
    with pytest.raises(ValueError, match="frame 1 has no info\\['frame_id'\\]"):
        values_for_frames(frames, ids, values)
