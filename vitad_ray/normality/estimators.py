"""Per-scope normality estimators (scikit-learn style: ``fit`` returns self, learned state ends
in ``_``): the paper's k-NNN-style k-Means confidence and HDBSCAN membership.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator

from ..search.knn import knn, pairwise_distances


def knnn_confidence(d: np.ndarray, loc_dens_nn: np.ndarray) -> np.ndarray:
    """The paper's rule: min(1, d / loc_dens(nn)), and 1 where loc_dens(nn) is 0."""
    d = np.asarray(d, np.float64)
    loc = np.asarray(loc_dens_nn, np.float64)
    safe = np.where(loc > 0, loc, 1.0)
    return np.where(loc > 0, np.minimum(1.0, d / safe), 1.0).astype(np.float32)


def knnn_ratio(d: np.ndarray, loc_dens_nn: np.ndarray) -> np.ndarray:
    """The uncapped ratio d / loc_dens(nn) (inf where loc_dens is 0 and d > 0, 0 where both are)."""
    d = np.asarray(d, np.float64)
    loc = np.asarray(loc_dens_nn, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(loc > 0, d / np.where(loc > 0, loc, 1.0), np.where(d > 0, np.inf, 0.0))
    return ratio.astype(np.float32)


def local_density(x: np.ndarray, labels: np.ndarray, m: int = 5) -> np.ndarray:
    """Per training vector: mean distance to its m nearest *other* members of its cluster.

    A cluster with fewer than m + 1 members uses all its other members; a singleton gets 0.
    """
    x = np.asarray(x, np.float32)
    labels = np.asarray(labels)
    loc = np.zeros(len(x), np.float32)
    for cluster in np.unique(labels):
        members = np.flatnonzero(labels == cluster)
        if len(members) < 2:
            continue
        dist = pairwise_distances(x[members]).astype(np.float64)
        np.fill_diagonal(dist, np.inf)
        take = min(m, len(members) - 1)
        nearest = np.partition(dist, take - 1, axis=1)[:, :take]
        loc[members] = nearest.mean(axis=1)
    return loc


def k_range(n_train_clips: int, cap: int = 50) -> tuple[int, int]:
    """The paper's sweep: k = 2 .. max(2, half the number of training clips), at most ``cap``."""
    return 2, min(cap, max(2, n_train_clips // 2))


class KMeansNormality(BaseEstimator):
    """k-Means with k chosen by silhouette, and the capped distance-to-local-density confidence.

    Learned: ``k_``, ``silhouette_``, ``silhouette_by_k_``, ``labels_``, ``cluster_centers_``,
    ``loc_dens_`` (per training vector) and ``train_`` (the training vectors themselves).
    """

    def __init__(self, k_min: int = 2, k_max: int = 50, m: int = 5, n_init: int = 1,
                 silhouette_sample_size: int | None = None, random_state: int = 0):
        self.k_min, self.k_max, self.m = k_min, k_max, m
        self.n_init = n_init
        self.silhouette_sample_size = silhouette_sample_size
        self.random_state = random_state

    def fit(self, x: np.ndarray, y=None) -> "KMeansNormality":
        from sklearn.cluster import KMeans
        from sklearn.metrics import silhouette_score

        x = np.ascontiguousarray(x, np.float32)
        n = len(x)
        if n < 2:
            raise ValueError(f"k-Means needs at least 2 training vectors, got {n}")
        ks = list(range(self.k_min, min(self.k_max, n - 1) + 1))
        self.silhouette_by_k_ = {}
        best = None
        if ks:
            # One distance matrix serves every k's silhouette (the sweep's dominant cost otherwise).
            sample = self._silhouette_sample(n)
            dist = pairwise_distances(x[sample])
            for k in ks:
                km = KMeans(n_clusters=k, n_init=self.n_init, random_state=self.random_state).fit(x)
                labels = km.labels_
                if len(np.unique(labels[sample])) < 2:
                    score = -1.0
                else:
                    score = float(silhouette_score(dist, labels[sample], metric="precomputed"))
                self.silhouette_by_k_[k] = score
                if best is None or score > best[0]:
                    best = (score, k, km)
            self.silhouette_, self.k_, km = best
        else:  # two or three points: one cluster, no silhouette to compare
            km = KMeans(n_clusters=1, n_init=1, random_state=self.random_state).fit(x)
            self.silhouette_, self.k_ = float("nan"), 1
        self.labels_ = km.labels_.astype(np.int32)
        self.cluster_centers_ = km.cluster_centers_.astype(np.float32)
        self.loc_dens_ = local_density(x, self.labels_, self.m)
        self.train_ = x
        return self

    def update(self, x_new: np.ndarray) -> "KMeansNormality":
        """Adds normal vectors without a new k sweep: k stays, Lloyd's iterations start from the
        clusters' present centres over every vector, and loc_dens is recomputed only in the
        clusters whose members changed. Where the clusters are stable (a refit would find the
        same ones) the result is the refit's: same partition, same loc_dens."""
        from sklearn.cluster import KMeans

        x_new = np.ascontiguousarray(x_new, np.float32)
        n_old = len(self.train_)
        x = np.concatenate([self.train_, x_new])
        old = self.labels_
        centres = np.stack([self.train_[old == c].mean(axis=0) for c in range(self.k_)])
        km = KMeans(n_clusters=self.k_, init=centres, n_init=1,
                    random_state=self.random_state).fit(x)
        labels = km.labels_.astype(np.int32)
        loc = np.concatenate([self.loc_dens_, np.zeros(len(x_new), np.float32)])
        moved = labels[:n_old] != old  # old vectors now in another cluster: both clusters change
        changed = set(labels[n_old:].tolist()) | set(old[moved].tolist()) | \
            set(labels[:n_old][moved].tolist())
        for cluster in sorted(changed):
            members = np.flatnonzero(labels == cluster)
            loc[members] = local_density(x[members], np.zeros(len(members)), self.m)
        self.labels_, self.loc_dens_, self.train_ = labels, loc, x
        self.cluster_centers_ = km.cluster_centers_.astype(np.float32)
        self.clusters_changed_ = len(changed)
        return self

    def _silhouette_sample(self, n: int) -> np.ndarray:
        size = self.silhouette_sample_size
        if not size or size >= n:
            return np.arange(n)
        return np.sort(np.random.default_rng(self.random_state).choice(n, size, replace=False))

    @classmethod
    def from_state(cls, train: np.ndarray, labels: np.ndarray, loc_dens: np.ndarray,
                   **params) -> "KMeansNormality":
        """Rebuild a scorer from stored state (vectors, cluster, loc_dens), no refitting."""
        est = cls(**params)
        est.train_ = np.ascontiguousarray(train, np.float32)
        est.labels_ = np.asarray(labels, np.int32)
        est.loc_dens_ = np.asarray(loc_dens, np.float32)
        est.k_ = int(len(np.unique(est.labels_)))
        return est

    def nearest(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(d, nn): Euclidean distance to, and index of, the nearest training vector."""
        dist, idx = knn(x, self.train_, k=1)
        return dist[:, 0], idx[:, 0]

    def score_samples(self, x: np.ndarray) -> np.ndarray:
        d, nn = self.nearest(x)
        return knnn_confidence(d, self.loc_dens_[nn])


class HDBSCANNormality(BaseEstimator):
    """HDBSCAN (the hdbscan package) with confidence = 1 - membership strength of the query.

    Learned: ``model_`` (with prediction data) and ``n_clusters_``.
    """

    def __init__(self, min_cluster_size: int = 40, min_samples: int = 40):
        self.min_cluster_size = min_cluster_size
        self.min_samples = min_samples

    def fit(self, x: np.ndarray, y=None) -> "HDBSCANNormality":
        from .hdbscan_predict import fit_hdbscan

        min_cluster_size = max(2, min(self.min_cluster_size, len(x)))
        min_samples = max(1, min(self.min_samples, len(x) - 1))
        self.model_ = fit_hdbscan(x, min_cluster_size, min_samples)
        labels = self.model_.labels_
        self.n_clusters_ = int(labels.max() + 1) if len(labels) else 0
        return self

    def score_samples(self, x: np.ndarray) -> np.ndarray:
        from .hdbscan_predict import membership_strength

        return (1.0 - membership_strength(self.model_, x)).astype(np.float32)
