"""Exact k-nearest-neighbour search pruned by cluster bounds (the flat index's fast path).

A brute-force search over N training descriptors costs n·N distance evaluations plus a top-k
selection over N candidates per query. At the per-step sizes of an MD run (tens of query atoms,
10⁴–10⁵ training atoms) the selection dominates, and in the demo it was 18 % of a step of the tiny
model. Training descriptors are strongly clustered (atoms in alike environments), so most of them
can be excluded *with a proof* instead of being looked at:

* the training vectors are grouped into C clusters (k-means centroids c, every vector assigned to
  its nearest centroid), and each cluster's radius r_c = max ‖x − c‖ over its members is stored;
* by the triangle inequality no member of cluster c is closer to a query q than
  lb_c = ‖q − c‖ − r_c;
* k members of cluster c lie within ρ_k(c) of c (ρ_k: the k-th smallest member distance), so q's
  k-th neighbour distance is at most u = min_c ‖q − c‖ + ρ_k(c), known before any search; every
  cluster with lb_c ≤ u is visited, in one FAISS call. No cluster that can hold one of
  the k nearest neighbours is skipped, so the result is exact (same distances as brute force, up to
  float32 round-off, which a relative margin on the bound absorbs). Far from the training set,
  or on unclustered data, the bounds exclude little; when they leave more than
  :data:`FULL_SCAN_SHARE` of the atoms to visit, the batch is scanned by brute force instead.

The inverted lists are FAISS ``IndexIVFFlat`` lists (a second float32 copy of the vectors, 4·D bytes
per atom), so the fast path is used only up to :data:`PRUNED_MAX_BYTES`; above that (and below
:data:`PRUNED_MIN_ATOMS`, where a scan is already cheap) the flat index scans everything.
"""
from __future__ import annotations

import math
import threading

import faiss
import numpy as np

#: below this many training atoms a plain scan is as fast as the two-pass search
PRUNED_MIN_ATOMS = 4096
#: the inverted lists copy the vectors; above this many bytes of vectors the flat index just scans
PRUNED_MAX_BYTES = 256 << 20
#: scan everything instead when the bounds leave more than this share of the atoms to visit: the
#: per-query list scans cost ~2x a brute-force scan per atom (measured: 12.5 k x 16 Gaussian vectors,
#: where no cluster can be excluded, 3.8 ms pruned vs 2.0 ms scanned for 29 queries)
FULL_SCAN_SHARE = 0.4
#: relative and absolute slack on the pruning bound: float32 distances carry ~1e-7 relative error
_RELATIVE_MARGIN = 1e-4
_ABSOLUTE_MARGIN = 1e-6


def default_clusters(n_atoms: int) -> int:
    """C ≈ 2·√N clusters (measured on the demo's 12.5 k descriptors: ~5 % of the atoms visited in
    domain), at least 16, at most 4096 and at least 32 atoms per cluster."""
    return int(max(16, min(4096, round(2 * math.sqrt(n_atoms)), n_atoms // 32)))


class PrunedExactSearch:
    """Exact kNN over fixed (N, D) float32 vectors, pruned by cluster lower bounds.

    Args:
        vectors: (N, D) float32, C-contiguous training descriptors (not modified; referenced for the
            full scan, and copied into the inverted lists).
        n_clusters: C; None = :func:`default_clusters`.
        seed: k-means seed (the result of :meth:`search` does not depend on it, only the speed).
    """

    def __init__(self, vectors: np.ndarray, n_clusters: int | None = None, seed: int = 0) -> None:
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        n, d = x.shape
        c = default_clusters(n) if n_clusters is None else int(n_clusters)
        if not 1 <= c <= n:
            raise ValueError(f"n_clusters must lie in [1, {n}]; got {n_clusters}")
        # k-means on a subsample: 64 points per centroid is plenty for a partition used only to prune
        kmeans = faiss.Kmeans(d, c, niter=10, seed=seed, max_points_per_centroid=64, min_points_per_centroid=1,
                              verbose=False)
        kmeans.train(x)
        quantizer = faiss.IndexFlatL2(d)
        quantizer.add(kmeans.centroids)
        self._ivf = faiss.IndexIVFFlat(quantizer, d, c)
        self._ivf.add(x)  # every vector goes to its nearest centroid's list, under its row number
        self._centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
        self._vectors = x  # the caller's array when it already was C-contiguous float32 (no copy)
        self._centroids64 = self._centroids.astype(np.float64)
        self._centroid_norms = (self._centroids64 ** 2).sum(axis=1)
        self.radii, self._member_distances = self._list_geometry(x)
        self._list_sizes = np.array([m.size for m in self._member_distances], dtype=np.int64)
        self._kth_cache: dict[int, np.ndarray] = {}
        self.n_clusters, self.n_atoms, self.dim = c, n, d
        self._lock = threading.Lock()  # nprobe is index state; search_preassigned reads it

    def _list_geometry(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """(C,) float64 radius of each list (max member distance to its centroid) and, per list, the
        ascending member distances; read from the lists themselves."""
        invlists = self._ivf.invlists
        radii = np.zeros(self._centroids.shape[0], dtype=np.float64)
        members = []
        for c in range(radii.size):
            size = invlists.list_size(c)
            if size == 0:
                members.append(np.empty(0))
                continue
            ids = faiss.rev_swig_ptr(invlists.get_ids(c), size).copy()
            diff = x[ids].astype(np.float64) - self._centroids64[c]
            dist = np.sort(np.sqrt(np.einsum("nd,nd->n", diff, diff)))
            radii[c] = float(dist[-1])
            members.append(dist)
        return radii, members

    def _kth_member_distance(self, k: int) -> np.ndarray:
        """(C,) distance from each centroid within which its list holds k members (inf: fewer than k)."""
        if k not in self._kth_cache:
            self._kth_cache[k] = np.array([m[k - 1] if m.size >= k else np.inf for m in self._member_distances])
        return self._kth_cache[k]

    def _probe(self, q: np.ndarray, k: int, lists: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """kNN of each query row among the given lists ((n, p) cluster ids, −1 = none)."""
        with self._lock:
            self._ivf.nprobe = lists.shape[1]
            return self._ivf.search_preassigned(q, k, lists, None)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, k) float32 squared L2 distances (ascending) and int64 row ids of the exact k nearest
        training vectors of each query row; id −1 / distance inf only when k > N."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        n, c = q.shape[0], self.n_clusters
        # distances to every centroid by one small matrix product (C ≤ 4096), in float64 for the bounds
        q64 = q.astype(np.float64)
        d2c = (q64 * q64).sum(axis=1)[:, None] + self._centroid_norms[None, :] - 2.0 * (q64 @ self._centroids64.T)
        dist_c = np.sqrt(np.maximum(d2c, 0.0))
        lower = np.maximum(dist_c - self.radii[None, :], 0.0)  # no member is closer
        # An upper bound on the k-th neighbour distance without searching: k members of cluster c lie
        # within ρ_k(c) of its centroid, hence within ‖q − c‖ + ρ_k(c) of q; take the best cluster.
        upper = (dist_c + self._kth_member_distance(k)[None, :]).min(axis=1)
        upper = upper * (1 + _RELATIVE_MARGIN) + _ABSOLUTE_MARGIN
        must = lower <= upper[:, None]
        if int((must @ self._list_sizes).sum()) > FULL_SCAN_SHARE * n * self.n_atoms:
            return faiss.knn(q, self._vectors, k)  # far from the data (or unclustered data): nothing to prune
        width = int(must.sum(axis=1).max())
        lists = np.full((n, width), -1, dtype=np.int64)
        r, col = np.nonzero(must)
        lists[r, (np.cumsum(must, axis=1) - 1)[r, col]] = col  # needed clusters, left-aligned, −1 pads
        return self._probe(q, k, lists)
