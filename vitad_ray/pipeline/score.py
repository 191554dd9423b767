"""Batched scoring of frames against every scope of a model, voting, and the scores table.

A batch of B frames is scored with one neighbour search per scope for all B frames together:
either one Chroma HNSW query per collection (``index="chroma"``) or one stacked matmul over all
scopes (``index="exact"``, torch, GPU when present). The same search serves k-Means (nearest
vector) and HDBSCAN (its 2 * min_samples neighbours).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..data.embeddings import _fixed_list, _to_numpy, frame_filter, identity_table
from ..data.frames import ID_COLUMNS
from ..normality import METHODS
from ..normality.estimators import knnn_confidence, knnn_ratio
from ..normality.hdbscan_predict import load_state, membership_from_neighbors
from ..search import INDEXES
from ..search.knn import ProjectedSearch, _device, knn_stacked
from ..storage.atomic import atomic_path
from ..storage.modeldir import hdbscan_path, read_model_json, shard_locations
from ..storage.store import GLOBAL, ScopeStore, collection_name, scope_names
from .fit import stack_scopes
from .progress import Progress

if TYPE_CHECKING:
    import pandas as pd

# Up to this many frames a search is bound by reading the training vectors and the projected
# search pays; past it, measuring every frame's candidates costs more than one full pass.
PROJECTED_SEARCH_MAX_BATCH = 4


def majority_anomalous(n_anomalous: np.ndarray, n_patches: int) -> np.ndarray:
    """The paper's local decision: anomalous if #anomalous patches >= #normal patches."""
    n_anomalous = np.asarray(n_anomalous)
    return n_anomalous >= n_patches - n_anomalous


def vote_score(patch_conf: np.ndarray) -> np.ndarray:
    """A frame score whose threshold t gives exactly the majority vote at patch threshold t.

    #patches >= t reaches ceil(P/2) exactly when the ceil(P/2)-th largest confidence is >= t.
    """
    p = patch_conf.shape[1]
    k = math.ceil(p / 2)
    return np.partition(patch_conf, p - k, axis=1)[:, p - k]


class ModelScorer:
    """Holds a model's scopes (all, or a subset for one shard) and scores batches of frames."""

    def __init__(self, model_dir: str | os.PathLike, index: str = "exact",
                 scopes: list[str] | None = None, hdbscan: bool = True, device: str | None = None,
                 projected: bool = False):
        if index not in INDEXES:
            raise ValueError(f"index must be one of {INDEXES}, got {index!r}")
        self.model_dir = Path(model_dir)
        self.doc = read_model_json(model_dir)
        self.index, self.device = index, device
        # Certified-exact pruned search for small batches (knn.ProjectedSearch): the answers
        # are the full search's; memory grows by (dims + 1) / D. CPU only.
        self.projected = projected and index == "exact" and _device(device).type == "cpu"
        self.backbone = self.doc["backbone"]
        self.num_patches = int(self.doc["embeddings"]["num_patches"])
        all_scopes = scope_names(self.num_patches)
        self.scopes = list(scopes) if scopes is not None else all_scopes
        self._scope_pos = [all_scopes.index(s) for s in self.scopes]
        self.hdbscan = hdbscan and bool(self.doc["params"].get("hdbscan"))
        self._stores: dict[str, ScopeStore] = {}
        self._store_of: dict[str, ScopeStore] = {}
        for loc, owned in shard_locations(model_dir, self.doc):
            wanted = [s for s in owned if s in self.scopes]
            if wanted:
                store = self._stores.setdefault(loc, ScopeStore(loc))
                for s in wanted:
                    self._store_of[s] = store
        self._load()

    def _load(self) -> None:
        import torch

        n_train = int(self.doc["train"]["n_frames"])
        dim = int(self.doc["embeddings"]["dim"])
        # Filled in place, scope by scope: no second copy of the vectors while loading.
        vectors = np.empty((len(self.scopes), n_train, dim), np.float32)  # [S, N, D]
        self.loc_dens_ = np.empty((len(self.scopes), n_train), np.float32)  # [S, N]
        for s, scope in enumerate(self.scopes):
            _, vecs, _, dens = self._store_of[scope].read_scope(collection_name(self.backbone, scope))
            if len(vecs) != n_train:
                raise RuntimeError(f"store for scope {scope} holds {len(vecs)} vectors, model.json "
                                   f"says {n_train}: the store is incomplete; re-run `vitad fit`")
            vectors[s], self.loc_dens_[s] = vecs, dens
        self.train_ = torch.from_numpy(vectors)
        self.train_sqnorm_ = (self.train_ ** 2).sum(-1)
        self.projected_ = ProjectedSearch(self.train_) if self.projected else None
        self.hdbscan_states_ = ([load_state(hdbscan_path(self.model_dir, s)) for s in self.scopes]
                                if self.hdbscan else [])
        self.k_neighbors = max([1] + [2 * st.min_samples for st in self.hdbscan_states_])
        if self.index == "exact":
            # The vectors are in memory now; Chroma's own cache of every segment would double it.
            for store in self._stores.values():
                store.close()
            self._stores, self._store_of = {}, {}

    def _queries(self, global_: np.ndarray, local: np.ndarray) -> np.ndarray:
        stacked = stack_scopes(global_, local)  # [1 + P, B, D]
        return stacked[self._scope_pos]

    def neighbors(self, queries: np.ndarray, k: int, scopes: slice = slice(None)
                  ) -> tuple[np.ndarray, np.ndarray]:
        """(distance [S, B, k], fit-order row [S, B, k]) from the chosen index.

        ``queries`` holds the scopes ``self.scopes[scopes]`` (a slice: a view, never a copy).
        """
        if self.projected_ is not None and queries.shape[1] <= PROJECTED_SEARCH_MAX_BATCH:
            return self.projected_.search(queries, k=k, scopes=scopes)
        if self.index == "exact":
            return knn_stacked(queries, self.train_[scopes], k=k,
                               train_sqnorm=self.train_sqnorm_[scopes], device=self.device)
        names = self.scopes[scopes]
        dist = np.empty((len(names), queries.shape[1], k), np.float32)
        rows = np.empty_like(dist, dtype=np.int64)
        for s, scope in enumerate(names):
            dist[s], rows[s] = self._store_of[scope].query_nearest(
                collection_name(self.backbone, scope), queries[s], k)
        return dist, rows

    def score(self, global_: np.ndarray, local: np.ndarray, methods=METHODS) -> dict:
        """Per scope and frame: k-Means confidence, d, ratio; HDBSCAN confidence. [S, B] each."""
        return self.score_queries(self._queries(global_, local), methods)

    def score_queries(self, queries: np.ndarray, methods=METHODS, scopes: slice = slice(None)
                      ) -> dict:
        """Like ``score`` for queries already stacked per scope: [S, B, D] for
        ``self.scopes[scopes]``."""
        use_hdbscan = self.hdbscan and "hdbscan" in methods
        dist, rows = self.neighbors(queries, self.k_neighbors if use_hdbscan else 1, scopes)
        d = dist[:, :, 0]
        loc = np.take_along_axis(self.loc_dens_[scopes], rows[:, :, 0], axis=1)
        out = {"kmeans": knnn_confidence(d, loc), "kmeans_d": d, "kmeans_ratio": knnn_ratio(d, loc)}
        if use_hdbscan:
            out["hdbscan"] = np.stack([
                1.0 - membership_from_neighbors(state, rows[s], dist[s])
                for s, state in enumerate(self.hdbscan_states_[scopes])]).astype(np.float32)
        return out


def frame_results(scores: dict, scopes: list[str], thresholds: dict) -> dict:
    """Scores per frame, split into the global scope and the patch grid, with decisions."""
    out = {}
    has_global = GLOBAL in scopes
    patch_pos = [i for i, s in enumerate(scopes) if s != GLOBAL]
    for method in METHODS:
        if method not in scores:
            continue
        conf = scores[method]
        t = thresholds[method]
        if has_global:
            g = conf[scopes.index(GLOBAL)]
            out[f"global_{method}"] = g
            out[f"global_{method}_anomalous"] = g >= t["global"]
        if patch_pos:
            local = conf[patch_pos].T  # [B, P]
            n_anom = (local >= t["patch"]).sum(axis=1)
            out[f"local_{method}"] = local
            out[f"local_{method}_n_anomalous"] = n_anom.astype(np.int32)
            out[f"local_{method}_anomalous"] = majority_anomalous(n_anom, local.shape[1])
    for extra in ("kmeans_d", "kmeans_ratio"):
        if has_global:
            out[f"global_{extra}"] = scores[extra][scopes.index(GLOBAL)]
        if patch_pos:
            out[f"local_{extra}"] = scores[extra][patch_pos].T
    return out


def write_scores(path: str | os.PathLike, ids: dict, results: dict) -> None:
    columns = identity_table(ids)
    for name, values in results.items():
        values = np.asarray(values)
        if values.dtype == object:
            columns[name] = pa.array(values.tolist(), pa.string())
        elif values.ndim == 1:
            columns[name] = pa.array(values)
        else:
            columns[name] = _fixed_list(values)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(columns), tmp)


def read_scores(path: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    """(identity + scalar columns as a DataFrame, {list column: numpy array [N, P]})."""
    table = pq.read_table(path)
    scalar = [f.name for f in table.schema if not pa.types.is_fixed_size_list(f.type)]
    arrays = {f.name: _to_numpy(table.column(f.name), (f.type.list_size,))
              for f in table.schema if pa.types.is_fixed_size_list(f.type)}
    return table.select(scalar).to_pandas(), arrays


class ScoreActor:
    """Ray Data actor: the model directory's detector, scoring Arrow blocks of frames.

    Each block is one chunk of one clip in time order; its first ``_context`` rows are the
    frames before the chunk, which stream state needs (motion, smoothing) and which are scored
    and dropped."""

    def __init__(self, model_dir: str, index: str, methods: tuple, dim: int, num_patches: int,
                 threads: int, columns: list[int] | None = None):
        import torch

        from ..detect.model import load_model

        torch.set_num_threads(max(1, threads))
        self.detector = load_model(model_dir, index=index, methods=methods)
        self.dim, self.num_patches = dim, num_patches
        self.columns = None if columns is None else np.asarray(columns)

    def __call__(self, batch: pa.Table) -> dict:
        from ..detect.offline import score_chunk

        global_ = _to_numpy(batch.column("global"), (self.dim,))
        local = _to_numpy(batch.column("local"), (self.num_patches, self.dim))
        if self.columns is not None:
            global_, local = global_[:, self.columns], local[..., self.columns]
        n_context = int(batch.column("_context")[0].as_py())
        index = batch.column("frame_index").to_numpy()
        det = score_chunk(self.detector, global_, local, index, n_context)
        out = {k: batch.column(k).to_numpy(zero_copy_only=False)[n_context:] for k in ID_COLUMNS}
        out.update(det.columns())
        return out


def chunk_tables(table: pa.Table, chunk: int, context: int) -> list[pa.Table]:
    """One Arrow table per chunk of each clip, in time order, led by its context rows."""
    from ..detect.offline import chunks, clip_rows

    ids = table.select(["clip", "frame_index"]).to_pandas()
    out = []
    for rows in clip_rows(ids):
        for sel, n_context in chunks(rows, chunk, context):
            part = table.take(pa.array(sel))
            out.append(part.append_column("_context", pa.array([n_context] * len(sel),
                                                               pa.int32())))
    return out


def model_features(doc: dict, meta: dict, emb_dir) -> list[int] | None:
    """Refuses embeddings of other features than the model's (backbone, weights, size, blocks);
    the feature columns of the model's blocks in a multi-block embedding (None: all)."""
    from ..data.embeddings import layer_columns

    if meta["weights_sha256"] != doc["embeddings"]["weights_sha256"] or \
            meta["backbone"] != doc["backbone"]:
        raise ValueError(f"{emb_dir} was embedded with {meta['backbone']} "
                         f"({meta['weights_sha256'][:12]}), the model with {doc['backbone']} "
                         f"({doc['embeddings']['weights_sha256'][:12]})")
    if int(meta["image_size"]) != int(doc["embeddings"]["image_size"]):
        raise ValueError(f"{emb_dir} holds {meta['image_size']} px features, the model was "
                         f"fitted on {doc['embeddings']['image_size']} px")
    selected = doc["embeddings"].get("selected_layers") or []
    columns = layer_columns(meta, tuple(selected)).tolist() if selected else None
    if columns is None and list(meta.get("layers") or []) != list(doc["embeddings"]["layers"]):
        raise ValueError(f"{emb_dir} holds blocks {meta.get('layers') or 'last'}, the model was "
                         f"fitted on {doc['embeddings']['layers'] or 'the last block'}")
    return columns


def score_embeddings(model_dir: str | os.PathLike, emb_dir: str | os.PathLike,
                     out_path: str | os.PathLike, index: str = "exact", batch_size: int = 64,
                     splits: list[str] | None = None, clips: list[str] | None = None,
                     methods=METHODS, actors: int = 1, show_progress: bool = True) -> dict:
    """Score every frame of an embeddings folder with a Ray Data actor pool of the model's
    detector, each clip as a stream in time order; writes Parquet sorted by clip and time."""
    import ray

    from ..data.embeddings import read_metadata
    from ..detect import recipe_from_model

    doc = read_model_json(model_dir)
    meta = read_metadata(emb_dir)
    columns = model_features(doc, meta, emb_dir)
    recipe = recipe_from_model(doc)
    start = time.perf_counter()
    parts = sorted(str(p) for p in Path(emb_dir).glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no embedding parts in {emb_dir}")
    table = pq.read_table(parts, filters=frame_filter(splits, clips))
    if not len(table):
        raise ValueError(f"{emb_dir}: no frames in splits {splits or 'any'}"
                         + (f" and clips {clips}" if clips else ""))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    n_frames = len(table)
    ds = ray.data.from_arrow(chunk_tables(table, batch_size, recipe.context_frames))
    del table  # the chunks are in the object store now
    ds = ds.map_batches(
        ScoreActor, batch_format="pyarrow", batch_size=None,
        fn_constructor_kwargs={"model_dir": str(Path(model_dir).resolve()), "index": index,
                               "methods": tuple(methods), "dim": int(meta["dim"]),
                               "num_patches": int(meta["num_patches"]),
                               "threads": max(1, cpus // actors), "columns": columns},
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1)
    progress = Progress("score", total=n_frames, enabled=show_progress)
    chunks = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        chunks.append(batch)
        progress.update(len(batch["frame_id"]))
    progress.close()
    merged = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    order = np.lexsort((merged["frame_index"], merged["clip"]))
    merged = {k: v[order] for k, v in merged.items()}
    if len(np.unique(merged["frame_id"])) != n_frames:
        raise RuntimeError(f"scored {len(np.unique(merged['frame_id']))} distinct frames of "
                           f"{n_frames}")
    ids = {k: merged.pop(k) for k in ID_COLUMNS}
    write_scores(out_path, ids, merged)
    return {"frames": len(order), "seconds": time.perf_counter() - start, "path": str(out_path),
            "recipe": recipe.name}
