"""HDBSCAN membership of new points without storing the training vectors twice.

``hdbscan.approximate_predict`` needs the clusterer's raw data and a KD-tree over it; a pickled
clusterer with prediction data is ~35 MB per scope at D=1024, mostly copies of the training
vectors that Chroma already holds. We keep only the clustering state (condensed tree, core
distances, cluster map, lambdas) and answer the neighbour query with the exact matmul search over
the vectors from Chroma; the per-point step is hdbscan's own ``_find_cluster_and_probability``,
so the result equals ``approximate_predict`` (tests check it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..search.knn import knn_stacked
from ..storage.atomic import atomic_path


class ExactTree:
    """Stands in for the KD-tree of hdbscan's PredictionData: exact matmul neighbours.

    In 384-1280 dimensions a KD-tree degenerates to a slow brute force; the core-distance query
    over all training points took most of a scope's fit time.
    """

    def __init__(self, data: np.ndarray, metric: str = "euclidean", **_):
        if metric != "euclidean":
            raise ValueError("ExactTree supports the euclidean metric only")
        self.data = np.asarray(data, np.float32)

    def query(self, x: np.ndarray, k: int = 1):
        dist, idx = knn_stacked(np.asarray(x, np.float32)[None], self.data[None], k=k)
        return dist[0].astype(np.float64), idx[0]


EXACT_TREE = "vitad-exact"


def fit_hdbscan(x: np.ndarray, min_cluster_size: int, min_samples: int):
    """hdbscan.HDBSCAN fitted on x, with prediction data built on exact neighbours.

    The 'generic' algorithm (a full distance matrix) is an order of magnitude faster than the
    tree-based ones at these dimensions for the few thousand vectors a scope holds.
    """
    import hdbscan
    from hdbscan.prediction import PredictionData

    PredictionData._tree_type_map.setdefault(EXACT_TREE, ExactTree)
    x = np.ascontiguousarray(x, np.float64)
    algorithm = "generic" if len(x) <= 20000 else "best"
    model = hdbscan.HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min_samples,
                            algorithm=algorithm).fit(x)
    model.prediction_data_ = PredictionData(x, model.condensed_tree_, min_samples,
                                            tree_type=EXACT_TREE, metric="euclidean")
    return model


class RawCondensedTree:
    """What hdbscan's per-point prediction reads of a ``CondensedTree``: its raw structured
    array (parent, child, lambda_val, child_size)."""

    def __init__(self, raw_tree: np.ndarray):
        self._raw_tree = raw_tree


@dataclass
class HDBSCANState:
    condensed_tree: RawCondensedTree
    cluster_tree: np.ndarray
    core_distances: np.ndarray
    cluster_map: dict
    max_lambdas: dict
    min_samples: int

    @property
    def n_clusters(self) -> int:
        return len(set(self.cluster_map.values())) if len(self.cluster_tree) else 0


def export_model(model) -> HDBSCANState:
    pred = model.prediction_data_
    return HDBSCANState(
        condensed_tree=RawCondensedTree(np.asarray(model.condensed_tree_._raw_tree)),
        cluster_tree=np.asarray(pred.cluster_tree),
        core_distances=np.asarray(pred.core_distances, np.float64),
        cluster_map={int(k): int(v) for k, v in pred.cluster_map.items()},
        max_lambdas={int(k): float(v) for k, v in pred.max_lambdas.items()},
        min_samples=int(model.min_samples or model.min_cluster_size),
    )


def save_state(state: HDBSCANState, path: str | os.PathLike) -> None:
    """The state as plain arrays (``.npz``): a model directory is read without unpickling."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cmap, lambdas = sorted(state.cluster_map.items()), sorted(state.max_lambdas.items())
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(
            fh, raw_tree=state.condensed_tree._raw_tree, cluster_tree=state.cluster_tree,
            core_distances=state.core_distances,
            cluster_map=np.asarray(cmap, np.int64).reshape(-1, 2),
            max_lambda_keys=np.asarray([k for k, _ in lambdas], np.int64),
            max_lambda_values=np.asarray([v for _, v in lambdas], np.float64),
            min_samples=np.int64(state.min_samples))


def load_state(path: str | os.PathLike) -> HDBSCANState:
    with np.load(path, allow_pickle=False) as z:
        return HDBSCANState(
            condensed_tree=RawCondensedTree(z["raw_tree"]), cluster_tree=z["cluster_tree"],
            core_distances=z["core_distances"],
            cluster_map={int(k): int(v) for k, v in z["cluster_map"]},
            max_lambdas={int(k): float(v) for k, v in zip(z["max_lambda_keys"],
                                                          z["max_lambda_values"])},
            min_samples=int(z["min_samples"]))


def membership_from_neighbors(state: HDBSCANState, neighbor_idx: np.ndarray,
                              neighbor_dist: np.ndarray) -> np.ndarray:
    """Membership strength [B] from each query's 2 * min_samples nearest training vectors."""
    from hdbscan.prediction import _cluster_tree_lookup, _find_cluster_and_probability

    n = len(neighbor_idx)
    if len(state.cluster_tree) == 0:
        return np.zeros(n, np.float64)  # no clusters: everything is noise
    lookup = _cluster_tree_lookup(state.cluster_tree)
    root = state.cluster_tree["parent"].min()
    out = np.empty(n, np.float64)
    for i in range(n):
        _, prob, _ = _find_cluster_and_probability(
            state.condensed_tree, state.cluster_tree, neighbor_idx[i],
            neighbor_dist[i].astype(np.float64), state.core_distances, state.cluster_map,
            state.max_lambdas, state.min_samples, lookup, root)
        out[i] = prob
    return out


def membership_strength(state_or_model, queries: np.ndarray, train: np.ndarray | None = None
                        ) -> np.ndarray:
    """Membership strength of each query; accepts a fitted hdbscan.HDBSCAN or a stored state."""
    if not isinstance(state_or_model, HDBSCANState):
        if train is None:
            train = state_or_model.prediction_data_.raw_data
        state_or_model = export_model(state_or_model)
    k = 2 * state_or_model.min_samples
    dist, idx = knn_stacked(np.asarray(queries, np.float32)[None],
                            np.asarray(train, np.float32)[None], k=k)
    return membership_from_neighbors(state_or_model, idx[0], dist[0])
