"""The flat index's pruned exact search against float64 brute force (numpy)."""
import numpy as np
import pytest

from ltau_ase.core.exact_search import PRUNED_MIN_ATOMS, PrunedExactSearch, default_clusters
from ltau_ase.core.index import NeighbourIndex


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d2 = ((q[:, None, :].astype(np.float64) - x[None, :, :].astype(np.float64)) ** 2).sum(axis=-1)
    ids = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d2, ids, axis=1), ids


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    """Latent-like data: tight clusters of very different sizes and spreads, plus exact duplicates."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, size=(40, d))
    which = rng.choice(40, size=n, p=rng.dirichlet(np.full(40, 0.5)))
    x = centres[which] + rng.normal(size=(n, d)) * rng.uniform(0.005, 0.2, size=40)[which, None]
    x[: n // 10] = x[n // 10 : 2 * (n // 10)]  # 10 % exact duplicates (symmetry-equivalent atoms)
    return x.astype(np.float32)


def check_exact(x, q, k, d2, ids):
    ref_d2, _ = brute_force(x, q, k)
    np.testing.assert_allclose(np.sqrt(d2), np.sqrt(ref_d2), rtol=1e-5, atol=1e-5)
    # the returned ids are real rows at the returned distances (ties may pick other rows)
    got = ((q[:, None, :].astype(np.float64) - x[ids].astype(np.float64)) ** 2).sum(axis=-1)
    np.testing.assert_allclose(np.sqrt(got), np.sqrt(ref_d2), rtol=1e-5, atol=1e-5)
    assert all(len(set(row)) == k for row in ids.tolist())  # no neighbour counted twice


@pytest.mark.parametrize("k", [1, 2, 10, 50])
def test_same_neighbour_distances_as_brute_force_in_and_out_of_domain(k):
    x = clustered(6000, 8, seed=1)
    rng = np.random.default_rng(2)
    near = x[rng.choice(len(x), 60)] + rng.normal(0.0, 0.01, size=(60, 8)).astype(np.float32)
    between = rng.normal(0.0, 1.0, size=(30, 8)).astype(np.float32)  # between clusters
    far = rng.normal(0.0, 1.0, size=(10, 8)).astype(np.float32) + 25.0  # far from everything
    exact_copies = x[:5]
    q = np.concatenate([near, between, far, exact_copies])
    search = PrunedExactSearch(x)
    d2, ids = search.search(q, k)
    check_exact(x, q, k, d2, ids)


def test_k_larger_than_every_cluster_falls_back_to_a_full_scan():
    x = clustered(5000, 4, seed=3)
    search = PrunedExactSearch(x, n_clusters=500)  # ~10 atoms per cluster
    q = x[::250] + 0.001
    d2, ids = search.search(q, 200)
    check_exact(x, q, 200, d2, ids)


def test_all_identical_vectors():
    x = np.ones((4200, 3), dtype=np.float32)
    search = PrunedExactSearch(x, n_clusters=16)
    d2, ids = search.search(np.zeros((2, 3), dtype=np.float32), 5)
    np.testing.assert_allclose(d2, 3.0)
    assert all(len(set(row)) == 5 for row in ids.tolist())


def test_flat_index_uses_it_above_the_size_threshold_and_agrees_with_a_scan():
    x = clustered(PRUNED_MIN_ATOMS + 1000, 6, seed=4)
    index = NeighbourIndex.build(x, "flat")
    rng = np.random.default_rng(5)
    q = np.concatenate([x[rng.choice(len(x), 40)] + 0.02, rng.normal(size=(10, 6)).astype(np.float32) * 3])
    dist, ids, valid = index.search(q, 7)
    assert index._pruned is not None and valid.all()
    ref_d2, _ = brute_force(x, q, 7)
    np.testing.assert_allclose(dist, np.sqrt(ref_d2), rtol=1e-5, atol=1e-5)
    small = NeighbourIndex.build(x[: PRUNED_MIN_ATOMS - 1], "flat")
    small.search(q, 3)
    assert small._pruned is None


def test_batches_the_bounds_cannot_prune_are_scanned_and_pruned_ones_are_not(monkeypatch):
    def watch(search):
        probed = []
        real_probe = search._probe
        monkeypatch.setattr(search, "_probe", lambda q, k, lists: probed.append(lists.shape) or real_probe(q, k, lists))
        return probed

    x = clustered(6000, 8, seed=6)
    search = PrunedExactSearch(x)
    probed = watch(search)
    rng = np.random.default_rng(7)
    near = x[rng.choice(len(x), 20)] + 0.001
    check_exact(x, near, 5, *search.search(near, 5))
    assert probed, "an in-domain batch of clustered data must be pruned"
    # unclustered data: every cluster overlaps every query's ball, nothing to exclude
    gauss = rng.normal(size=(5000, 16)).astype(np.float32)
    unclustered = PrunedExactSearch(gauss)
    probed = watch(unclustered)
    q = rng.normal(size=(10, 16)).astype(np.float32)
    check_exact(gauss, q, 3, *unclustered.search(q, 3))
    assert not probed, "a batch the bounds cannot prune must be scanned by brute force"


def test_an_estimator_that_searched_can_be_copied_and_pickled():
    """The pruned search (FAISS lists, a lock) is a cache: deepcopy (the shift benchmark) and pickling
    (Dask) must work after a prediction built it, and give the same predictions."""
    import copy
    import pickle

    from ltau_ase.core.estimator import LTAUEstimator

    x = clustered(PRUNED_MIN_ATOMS + 500, 6, seed=8)
    rng = np.random.default_rng(9)
    est = LTAUEstimator(k=4).fit(x, rng.lognormal(-3, 0.5, size=(5, len(x))))
    q = x[:30] + 0.01
    first = est.predict(q)
    assert est.index_._pruned is not None
    for clone in (copy.deepcopy(est), pickle.loads(pickle.dumps(est))):
        again = clone.predict(q)
        for key in ("confidence", "distance", "expected_error"):
            np.testing.assert_allclose(again[key], first[key], rtol=1e-6)


def test_default_clusters_bounds():
    assert default_clusters(4096) == 128
    assert default_clusters(10_000) == 200
    assert default_clusters(10**8) == 4096
    assert default_clusters(100) == 16
