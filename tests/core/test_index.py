"""FAISS index wrapper: exact search against brute force, approximate recall, −1 ids, parameters."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from ltau_ase.core.index import NeighbourIndex, as_float32, resolve_params


def clustered(n, d, n_clusters=40, intrinsic=4, seed=0):
    """Latent-like data: anisotropic low-dimensional Gaussian clusters embedded in d dimensions."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=3.0, size=(n_clusters, d))
    bases = rng.normal(size=(n_clusters, intrinsic, d))
    scales = rng.uniform(0.3, 1.0, size=(n_clusters, intrinsic))
    lab = rng.integers(n_clusters, size=n)
    z = rng.normal(size=(n, intrinsic)) * scales[lab]
    return centers[lab] + np.einsum("ni,nid->nd", z, bases[lab]) + 0.05 * rng.normal(size=(n, d))


def brute_knn(x, q, k):
    x, q = np.asarray(x, np.float64), np.asarray(q, np.float64)
    d = np.sqrt(np.stack([((x - row) ** 2).sum(1) for row in q]))
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, ids, axis=1), ids


def recall(ids, ref):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, ref)])


def test_flat_matches_brute_force():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 7))  # float64, converted inside
    q = np.asfortranarray(rng.normal(size=(40, 7)))  # not C-contiguous
    index = NeighbourIndex.build(x, "flat")
    dist, ids, valid = index.search(q, 5)
    ref_d, ref_ids = brute_knn(x.astype(np.float32), q.astype(np.float32), 5)
    assert valid.all()
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-4, atol=1e-4)  # Euclidean, not squared


@pytest.fixture(scope="module")
def clustered_data():
    x = clustered(5200, 32, seed=1).astype(np.float32)
    x, q = x[:5000], x[5000:]
    return x, q, brute_knn(x, q, 10)[1]


def test_hnsw_recall(clustered_data):
    x, q, ref = clustered_data
    index = NeighbourIndex.build(x, "hnsw")
    assert index.index.hnsw.efSearch == 16 and index.params == {"M": 32, "efConstruction": 40, "efSearch": 16}
    _, ids, valid = index.search(q, 10)
    assert valid.all()
    assert recall(ids, ref) >= 0.9


def test_ivfpq_recall_and_compression(clustered_data):
    x, q, ref = clustered_data
    index = NeighbourIndex.build(x, "ivfpq", {"m": 8, "nbits": 6, "nprobe": 8})
    assert index.index.nprobe == 8 and index.index.pq.M == 8 and index.index.pq.nbits == 6
    _, ids, valid = index.search(q, 10)
    assert recall(np.where(valid, ids, -1), ref) >= 0.6
    flat = NeighbourIndex.build(x, "flat")
    assert index.to_bytes().size < flat.to_bytes().size / 4


def test_search_params_survive_serialisation():
    x = clustered(800, 16, seed=2)
    h = NeighbourIndex.build(x, "hnsw", {"efSearch": 77, "M": 8})
    h2 = NeighbourIndex.from_bytes(h.to_bytes(), "hnsw", h.params)
    assert h2.index.hnsw.efSearch == 77 and h2.index.hnsw.nb_neighbors(1) == 8
    v = NeighbourIndex.build(x, "ivfpq", {"nlist": 10, "nprobe": 3, "m": 4, "nbits": 4, "refine": 0})
    raw = faiss.deserialize_index(v.to_bytes())
    raw.nprobe = 1  # whatever FAISS stores, our loader must apply the recorded nprobe
    v2 = NeighbourIndex.from_bytes(np.asarray(faiss.serialize_index(raw)), "ivfpq", v.params)
    assert v2.index.nprobe == 3
    for a, b in ((h, h2), (v, v2)):
        da, ia, _ = a.search(x[:50], 4)
        db, ib, _ = b.search(x[:50], 4)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(da, db)


def test_minus_one_ids_are_masked():
    x = clustered(400, 8, seed=3)
    index = NeighbourIndex.build(x, "ivfpq", {"nlist": 20, "nprobe": 1, "m": 2, "nbits": 4, "refine": 0})
    dist, ids, valid = index.search(x[:30], 100)  # one probed list holds far fewer than 100 atoms
    raw_d, raw_i = index.index.search(np.ascontiguousarray(x[:30], dtype=np.float32), 100)
    np.testing.assert_array_equal(valid, raw_i >= 0)
    assert (~valid).any()
    assert np.all(np.isinf(dist[~valid])) and np.all(ids[~valid] == 0)
    np.testing.assert_array_equal(ids[valid], raw_i[raw_i >= 0])


def test_parameter_validation():
    x = np.random.default_rng(0).normal(size=(300, 12))
    with pytest.raises(ValueError, match="divide"):
        NeighbourIndex.build(x, "ivfpq", {"m": 5})
    with pytest.raises(ValueError, match="unknown index kind"):
        NeighbourIndex.build(x, "lsh")
    with pytest.raises(ValueError, match="unknown index_params"):
        NeighbourIndex.build(x, "hnsw", {"nprobe": 3})
    with pytest.raises(ValueError, match="integer"):
        NeighbourIndex.build(x, "hnsw", {"efSearch": 2.5})
    with pytest.raises(ValueError, match=r"must lie in \[2, 256\]"):
        NeighbourIndex.build(x, "hnsw", {"M": 0})
    with pytest.raises(ValueError, match="nlist"):
        NeighbourIndex.build(x, "ivfpq", {"nlist": 301})
    assert resolve_params("ivfpq", None, 10**6, 32) == {
        "nlist": 4000, "m": 8, "nbits": 8, "nprobe": 8, "train_size": 256000, "seed": 0, "refine": 4,
    }
    flat = NeighbourIndex.build(x, "flat")
    with pytest.raises(ValueError, match=r"k must lie in \[1, 300\]"):
        flat.search(x[:2], 301)
    with pytest.raises(ValueError, match="expected 12"):
        flat.search(np.ones((2, 5)), 1)
    with pytest.raises(ValueError, match="NaN or inf"):
        as_float32(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="overflow"):
        as_float32(np.array([[1e300]]))
    with pytest.raises(ValueError, match="empty"):
        as_float32(np.ones((0, 3)))
    with pytest.raises(ValueError, match="2-d"):
        as_float32(np.ones(3))
    with pytest.raises(ValueError, match="corrupt"):
        NeighbourIndex.from_bytes(np.frombuffer(b"garbage!" * 10, np.uint8), "flat", {})


def test_ivfpq_exact_reranking_against_brute_force(clustered_data):
    x, q, ref = clustered_data
    params = {"nlist": 32, "m": 8, "nbits": 6, "nprobe": 4}
    plain = NeighbourIndex.build(x, "ivfpq", {**params, "refine": 0})
    refined = NeighbourIndex.build(x, "ivfpq", {**params, "refine": 8})
    assert plain.vectors is None and refined.vectors is not None
    _, ids0, valid0 = plain.search(q, 10)
    dist, ids, valid = refined.search(q, 10)
    r0, r = recall(np.where(valid0, ids0, -1), ref), recall(np.where(valid, ids, -1), ref)
    assert r >= 0.95 and r > r0
    # Re-ranked distances are exact Euclidean distances of the returned ids, in increasing order.
    exact = np.linalg.norm(q[:, None, :].astype(np.float64) - x[ids].astype(np.float64), axis=2)
    np.testing.assert_allclose(dist[valid], exact[valid], rtol=1e-5)
    assert np.all(np.diff(np.where(valid, dist, np.inf), axis=1) >= -1e-6)
    # Refined ids are the brute-force top-k among the shortlist: never worse than the PQ order.
    ref_d = np.sort(np.linalg.norm(q[:, None, :] - x[None], axis=2), axis=1)[:, :10]
    assert np.all(dist[:, 0] >= ref_d[:, 0] - 1e-5)


def test_fit_reranks_against_the_callers_descriptors_without_a_copy(clustered_data, tmp_path):
    from ltau_ase.core.estimator import LTAUEstimator

    x, q, ref = clustered_data
    x = x.copy()  # this test's own array (the fixture's is shared)
    params = {"nlist": 32, "m": 8, "nbits": 6, "nprobe": 4, "refine": 8}
    errors = np.abs(np.random.default_rng(0).normal(size=(6, x.shape[0])))
    est = LTAUEstimator(index="ivfpq", index_params=params, k=10).fit(x, errors)
    # one copy of the vectors: re-ranking reads the fitted array; the FAISS object holds m-byte codes only
    assert np.shares_memory(est.index_.vectors, x) and est.index_.vectors.shape == x.shape
    assert est.index_.index.code_size == 6  # 8 sub-quantizers x 6 bits, no float32 storage in FAISS
    own = NeighbourIndex.build(x, "ivfpq", params)  # default copy=True: the same index on its own copy
    assert not np.shares_memory(own.vectors, x)
    dist, ids, valid = est.index_.search(q, 10)
    for a, b in zip((dist, ids, valid), own.search(q, 10)):
        np.testing.assert_array_equal(a, b)
    # against brute-force numpy: exact distances of the returned ids, and the true neighbours found
    exact = np.linalg.norm(q[:, None, :].astype(np.float64) - x[ids].astype(np.float64), axis=2)
    np.testing.assert_allclose(dist[valid], exact[valid], rtol=1e-5)
    assert valid.all() and recall(ids, ref) >= 0.95
    # save / load: the loaded index re-ranks against the file's memory-mapped vectors, same neighbours
    est.save(str(tmp_path / "e.ltau"))
    loaded = LTAUEstimator.load(str(tmp_path / "e.ltau"), eager_bytes=0)  # map every array, as for a large file
    assert isinstance(loaded.index_.vectors, np.memmap) and not loaded.index_.vectors.flags.writeable
    for a, b in zip(loaded.index_.search(q, 10), (dist, ids, valid)):
        np.testing.assert_array_equal(a, b)
    # a rebuild (set_params) reuses those vectors instead of copying them into RAM
    mapped = loaded.index_.vectors
    loaded.set_params(index="flat", index_params=None)
    assert loaded.index_.kind == "flat" and np.shares_memory(loaded.index_.vectors, mapped)
    np.testing.assert_array_equal(loaded.index_.search(q, 10)[1], brute_knn(x, q, 10)[1])


def test_choose_index_policy_and_auto_build():
    from ltau_ase.core.index import AUTO_HNSW_ATOMS, AUTO_IVFPQ_ATOMS, choose_index

    assert [choose_index(n)[0] for n in (1, AUTO_HNSW_ATOMS - 1, AUTO_HNSW_ATOMS, AUTO_IVFPQ_ATOMS - 1,
                                         AUTO_IVFPQ_ATOMS, 10**7)] == ["flat", "flat", "hnsw", "hnsw", "ivfpq", "ivfpq"]
    assert "10000000 >= 1000000" in choose_index(10**7)[1]
    x = clustered(300, 8).astype(np.float32)
    auto = NeighbourIndex.build(x, "auto")
    assert auto.kind == "flat" and auto.reason.startswith("auto: flat")
    with pytest.raises(ValueError, match="explicit index kind"):
        NeighbourIndex.build(x, "auto", {"efSearch": 3})
    from ltau_ase.core.estimator import LTAUEstimator

    est = LTAUEstimator(index="auto").fit(x, np.abs(np.random.default_rng(0).normal(size=(4, 300))))
    assert est.index == "auto" and est.index_.kind == "flat" and "auto: flat" in est.index_.reason


def test_auto_policy_large_sizes_and_its_report(monkeypatch):
    import ltau_ase.core.index as index_module
    from ltau_ase.core.estimator import LTAUEstimator
    from ltau_ase.core.index import HNSW_QUANTIZER_NLIST, LARGE_LIST_ATOMS, default_params

    # up to ~2.5e6 atoms: 4·sqrt(N) lists (at most 4096, exact quantizer); above: lists of ~610 atoms
    assert default_params("ivfpq", 10**6, 32)["nlist"] == 4000
    assert default_params("ivfpq", 2 * 10**6, 32)["nlist"] == HNSW_QUANTIZER_NLIST
    big = default_params("ivfpq", 10**7, 32)
    assert big["nlist"] == 10**7 // LARGE_LIST_ATOMS == 16393 and big["train_size"] == 40 * 16393
    assert (big["m"], big["nbits"], big["nprobe"], big["refine"]) == (8, 8, 8, 4)
    # the policy's thresholds scaled down so that "auto" picks ivfpq on a small set, and says so
    monkeypatch.setattr(index_module, "AUTO_HNSW_ATOMS", 500)
    monkeypatch.setattr(index_module, "AUTO_IVFPQ_ATOMS", 2000)
    x = clustered(3000, 8, seed=2).astype(np.float32)
    auto = NeighbourIndex.build(x, "auto")
    assert auto.kind == "ivfpq" and auto.params == default_params("ivfpq", 3000, 8)
    assert auto.params["nlist"] == 3000 // 39  # 4·sqrt(3000) = 219 lists would hold < 39 atoms each
    assert auto.reason == ("auto: ivfpq index with exact re-ranking for 3000 >= 2000 training atoms: ivfpq nlist=76 "
                           "(exact coarse quantizer), m=2, nbits=6, nprobe=8, a shortlist of 4·k re-ranked exactly")
    est = LTAUEstimator(index="auto", k=5).fit(x, np.abs(np.random.default_rng(0).normal(size=(4, 3000))))
    assert est.index_.reason == auto.reason and np.shares_memory(est.index_.vectors, x)


def test_hnsw_coarse_quantizer_above_4096_lists_against_brute_force():
    from ltau_ase.core.index import HNSW_QUANTIZER_NLIST, quantizer_ef_search

    x = clustered(12_000, 8, seed=3).astype(np.float32)
    q = x[:40] + 0.02
    params = {"nlist": HNSW_QUANTIZER_NLIST + 100, "m": 4, "nbits": 4, "nprobe": 24, "train_size": 12_000, "refine": 8}
    index = NeighbourIndex.build(x, "ivfpq", params, copy=False)
    quantizer = faiss.downcast_index(index.index.quantizer)
    assert type(quantizer) is faiss.IndexHNSWFlat and quantizer.ntotal == params["nlist"]
    assert quantizer.hnsw.efSearch == quantizer_ef_search(24) == 48
    assert np.shares_memory(index.vectors, x)
    dist, ids, valid = index.search(q, 5)
    ref_d, ref_ids = brute_knn(x, q, 5)
    assert valid.all() and recall(ids, ref_ids) >= 0.9
    exact = np.linalg.norm(q[:, None, :].astype(np.float64) - x[ids].astype(np.float64), axis=2)
    np.testing.assert_allclose(dist, exact, rtol=1e-5)
    again = NeighbourIndex.from_arrays("ivfpq", index.params, index.to_arrays(), 12_000, 8)
    for a, b in zip(again.search(q, 5), (dist, ids, valid)):
        np.testing.assert_array_equal(a, b)


def test_stored_arrays_round_trip_and_strict_params():
    x = clustered(600, 8, seed=4).astype(np.float32)
    q = x[:25] + 0.01
    for kind, params in (("flat", {}), ("hnsw", {"M": 8, "efSearch": 33}),
                         ("ivfpq", {"nlist": 8, "m": 4, "nbits": 5, "nprobe": 3, "refine": 3})):
        index = NeighbourIndex.build(x, kind, params)
        arrays = index.to_arrays()
        assert set(arrays) == NeighbourIndex.stored_arrays(kind, index.params)
        again = NeighbourIndex.from_arrays(kind, index.params, arrays, 600, 8)
        for a, b in zip(index.search(q, 4), again.search(q, 4)):
            np.testing.assert_array_equal(a, b)
        with pytest.raises(ValueError):
            NeighbourIndex.from_arrays(kind, index.params, arrays, 601, 8)  # N disagrees with the header
        if kind != "flat":
            wrong = {**index.params, next(iter(params)): index.params[next(iter(params))] + 1}
            with pytest.raises(ValueError):
                NeighbourIndex.from_arrays(kind, wrong, arrays, 600, 8)
            missing = dict(index.params)
            missing.pop(next(iter(params)))
            with pytest.raises(ValueError, match="stored index parameters"):
                NeighbourIndex.from_arrays(kind, missing, arrays, 600, 8)
    with pytest.raises(ValueError, match="needs arrays"):
        NeighbourIndex.from_arrays("flat", {}, {}, 600, 8)
