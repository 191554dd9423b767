"""Fit every scope's normality models in parallel with Ray tasks and write the model directory.

Work unit: one scope (k-Means sweep + local density + HDBSCAN). The training vectors of all
scopes go into the object store once ([S, N, D]); tasks read their slice zero-copy. One writer
actor per Chroma store (pinned to the driver's node, where the model directory is) stores each
finished scope and then drops a marker file: a re-run skips every scope whose marker is there and
whose collection holds the full count, so an interrupted fit resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..data.embeddings import frame_rate, load_embeddings
from ..normality.estimators import HDBSCANNormality, KMeansNormality, k_range
from ..storage.atomic import write_json
from ..storage.modeldir import (DEFAULT_THRESHOLDS, HDBSCAN_DIR, MODEL_FILE, SCOPES_DIR,
                                embeddings_entry, hdbscan_path, read_model_json, scope_marker,
                                shard_locations, write_model_json)
from ..storage.store import ScopeStore, collection_name, scope_names, shard_location, shard_of
from ..storage.versions import package_versions
from .progress import Progress


@dataclass
class FitConfig:
    k_max: int | None = None  # None: max(2, half the training clips), capped at 50 (the paper)
    k_cap: int = 50
    m: int = 5
    min_cluster_size: int = 40
    min_samples: int = 40
    hdbscan: bool = True
    silhouette_sample_size: int | None = None
    n_shards: int = 1
    chroma_url: str | None = None  # a `chroma run` server instead of embedded stores
    train_splits: tuple[str, ...] = ("train",)
    max_in_flight: int | None = None

    def task_settings(self, k_max: int) -> dict:
        """What a scope's task (``fit_one_scope``) is told."""
        return {"k_max": k_max, "m": self.m, "silhouette_sample_size":
                self.silhouette_sample_size, "hdbscan": self.hdbscan,
                "min_cluster_size": self.min_cluster_size, "min_samples": self.min_samples}

    @classmethod
    def from_recipe(cls, recipe, **settings) -> "FitConfig":
        """The paper recipe's k-Means / HDBSCAN settings, plus storage settings."""
        return cls(k_max=recipe.k_max, m=recipe.m, hdbscan=recipe.hdbscan, **settings)


def stack_scopes(global_: np.ndarray, local: np.ndarray) -> np.ndarray:
    """[S = 1 + P, N, D] float32: the global scope first, then patch scopes in grid order."""
    n, p, d = local.shape
    out = np.empty((1 + p, n, d), np.float32)
    out[0] = global_
    out[1:] = local.transpose(1, 0, 2)
    return out


def fit_one_scope(train: np.ndarray, scope_index: int, cfg: dict,
                  warm: dict | None = None) -> dict:
    """Fit both estimators on one scope; returns only the small learned state. ``warm`` (an
    update): the scope's stored k-Means labels and loc_dens of the first rows, which keep their
    k and are updated (``KMeansNormality.update``) rather than refitted."""
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    x = train[scope_index]
    params = dict(k_min=2, k_max=cfg["k_max"], m=cfg["m"],
                  silhouette_sample_size=cfg["silhouette_sample_size"])
    if warm is None:
        km = KMeansNormality(**params).fit(x)
    else:
        n_old = len(warm["cluster"])
        km = KMeansNormality.from_state(x[:n_old], warm["cluster"], warm["loc_dens"], **params)
        km.silhouette_, km.silhouette_by_k_ = warm["silhouette"], {}
        km.update(x[n_old:])
    out = {"scope_index": scope_index, "k": int(km.k_), "silhouette": float(km.silhouette_),
           "silhouette_by_k": {str(k): v for k, v in km.silhouette_by_k_.items()},
           "cluster": km.labels_, "loc_dens": km.loc_dens_, "hdbscan": None,
           "hdbscan_clusters": None}
    if cfg["hdbscan"]:
        from ..normality.hdbscan_predict import export_model

        hd = HDBSCANNormality(cfg["min_cluster_size"], cfg["min_samples"]).fit(x)
        out["hdbscan"] = export_model(hd.model_)
        out["hdbscan_clusters"] = hd.n_clusters_
    import ray

    out["node_id"] = ray.get_runtime_context().get_node_id()
    out["seconds"] = time.perf_counter() - start
    return out


class ShardWriter:
    """The one writer of a Chroma store: stores scopes, their HDBSCAN state and done markers."""

    def __init__(self, model_dir: str, location: str, backbone: str, frame_ids: list[str],
                 train_holder: list):
        import ray

        self.model_dir = Path(model_dir)
        self.store = ScopeStore(location)
        self.backbone = backbone
        self.frame_ids = list(frame_ids)
        self.train = ray.get(train_holder[0])

    def done_scopes(self, scopes: list[str]) -> list[str]:
        """Scopes already complete: marker present and the collection holds every vector."""
        out = []
        for scope in scopes:
            if scope_marker(self.model_dir, scope).exists() and \
                    self.store.count(collection_name(self.backbone, scope)) == len(self.frame_ids):
                out.append(scope)
        return out

    def write(self, scope: str, result: dict) -> str:
        from ..normality.hdbscan_predict import save_state

        self.store.write_scope(collection_name(self.backbone, scope), self.frame_ids,
                               self.train[result["scope_index"]], result["cluster"],
                               result["loc_dens"])
        if result["hdbscan"] is not None:
            save_state(result["hdbscan"], hdbscan_path(self.model_dir, scope))
        marker = {k: result[k] for k in ("k", "silhouette", "silhouette_by_k", "hdbscan_clusters",
                                          "node_id", "seconds")}
        marker["train_count"] = len(self.frame_ids)
        # The marker appears only once everything else is stored.
        write_json(scope_marker(self.model_dir, scope), marker)
        return scope


@dataclass
class FitResult:
    model_dir: Path
    fitted: int
    skipped: int
    seconds: float
    nodes: dict[str, int]
    threshold: float | None = None


def _round_robin(todo: list[int], shard: list[int]) -> list[int]:
    """``todo`` taken in turn from each shard. Each shard has one writer; shards are contiguous
    ranges of scopes, so in scope order one writer would store while the others waited."""
    rank, seen = {}, {}
    for i in todo:
        rank[i] = seen.get(shard[i], 0)
        seen[shard[i]] = rank[i] + 1
    return sorted(todo, key=lambda i: (rank[i], shard[i]))


def _signature(backbone: str, weights_sha: str, frame_ids: list[str], cfg: FitConfig) -> str:
    h = hashlib.sha256()
    h.update(f"{backbone}|{weights_sha}|".encode())
    h.update("\n".join(frame_ids).encode())
    params = {k: v for k, v in asdict(cfg).items() if k not in ("max_in_flight",)}
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    return h.hexdigest()


def load_training_frames(emb_dir: str | os.PathLike, recipe, splits: tuple[str, ...]):
    """(training embeddings with the recipe's blocks selected, those blocks)."""
    from ..data.embeddings import select_layers
    from ..detect.recipe import embedding_layers

    emb = load_embeddings(emb_dir, splits=list(splits))
    if len(emb) < 3:
        raise ValueError(f"{emb_dir}: {len(emb)} training frames in splits {list(splits)}; "
                         "need at least 3")
    layers = embedding_layers(recipe, emb.metadata)
    return (select_layers(emb, layers) if layers else emb), layers


def load_training_views(emb_dir: str | os.PathLike, recipe, splits: tuple[str, ...],
                        layers: tuple[int, ...]):
    """The training frames' zoomed views the recipe's memory holds (None: it holds none)."""
    from ..data.embeddings import select_layers
    from ..detect.recipe import check_views, view_splits

    if not recipe.zoom_views:
        return None
    views = load_embeddings(emb_dir, splits=view_splits(recipe, splits))
    check_views(recipe, set(views.ids["split"].unique()), splits)
    return select_layers(views, layers) if layers else views


def fit_recipe(emb_dir: str | os.PathLike, model_dir: str | os.PathLike, recipe=None,
               cfg: FitConfig | None = None, show_progress: bool = True) -> FitResult:
    """Fit a model directory for a recipe (a name, a YAML path or a Recipe): the paper's
    per-scope k-Means / HDBSCAN over Chroma stores, or the cross-clip Detector."""
    from ..detect import get_recipe
    from ..detect.fit import fit_detector_model

    recipe = get_recipe(recipe)
    cfg = cfg or FitConfig.from_recipe(recipe)
    if recipe.kind == "paper":
        return fit_model(emb_dir, model_dir, cfg, show_progress, recipe=recipe)
    start = time.perf_counter()
    done = fit_detector_model(emb_dir, model_dir, recipe, cfg.train_splits, show_progress)
    return FitResult(Path(model_dir), fitted=len(done["fitted"]), skipped=len(done["resumed"]),
                     seconds=time.perf_counter() - start, nodes={}, threshold=done["threshold"])


def fit_model(emb_dir: str | os.PathLike, model_dir: str | os.PathLike,
              cfg: FitConfig | None = None, show_progress: bool = True, recipe=None
              ) -> FitResult:
    """The paper recipe's fit: every scope's k-Means and HDBSCAN, stored in Chroma."""
    from ..detect import PAPER

    cfg = cfg or FitConfig()
    recipe = recipe or PAPER
    start = time.perf_counter()
    model_dir = Path(model_dir)
    emb, layers = load_training_frames(emb_dir, recipe, cfg.train_splits)
    meta = emb.metadata
    backbone = meta["backbone"]
    clips = sorted(emb.ids["clip"].unique())
    k_min, k_max = k_range(len(clips), cfg.k_cap)
    if cfg.k_max is not None:
        k_max = cfg.k_max
    frame_ids = emb.ids["frame_id"].tolist()
    scopes = scope_names(int(meta["num_patches"]))
    signature = _signature(backbone, meta["weights_sha256"] + (f"|layers={list(layers)}" if layers
                                                               else ""), frame_ids, cfg)

    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / SCOPES_DIR).mkdir(exist_ok=True)
    (model_dir / HDBSCAN_DIR).mkdir(exist_ok=True)
    state_file = model_dir / "fit_state.json"
    if state_file.exists() and json.loads(state_file.read_text())["signature"] != signature:
        raise RuntimeError(f"{model_dir} holds a fit of other embeddings or settings; "
                           "use a new model directory")
    write_json(state_file, {"signature": signature})

    train = stack_scopes(emb.global_, emb.local)
    fps = frame_rate(emb.ids)
    del emb
    locations = [shard_location(model_dir, s, cfg.chroma_url) for s in range(cfg.n_shards)]
    fitted, done, nodes = _fit_scopes(model_dir, locations, backbone, frame_ids, train, cfg,
                                      cfg.task_settings(k_max), show_progress)
    shard_scopes = _shard_scopes(scopes, cfg.n_shards)
    _write_model_json(model_dir, meta, emb_dir, clips, frame_ids, scopes, shard_scopes, locations,
                      cfg, k_min, k_max, time.perf_counter() - start, recipe, layers, fps)
    return FitResult(model_dir, fitted=fitted, skipped=done,
                     seconds=time.perf_counter() - start, nodes=nodes)


def _shard_scopes(scopes: list[str], n_shards: int) -> list[list[str]]:
    return [[sc for i, sc in enumerate(scopes) if shard_of(i, len(scopes), n_shards) == s]
            for s in range(n_shards)]


def _fit_scopes(model_dir: Path, locations: list[str], backbone: str, frame_ids: list[str],
                train: np.ndarray, cfg: FitConfig, task_cfg: dict, show_progress: bool,
                warm: list[dict] | None = None) -> tuple[int, int, dict[str, int]]:
    """Every scope not yet stored whole: a Ray task each (``fit_one_scope``), written by its
    shard's one Chroma writer. Returns (scopes fitted, scopes already done, tasks per node)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    scopes = scope_names(train.shape[0] - 1)
    train_ref = ray.put(train)
    del train
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    writer_cls = ray.remote(num_cpus=0, scheduling_strategy=here)(ShardWriter)
    # With a Chroma server every shard lives there; embedded stores get one folder each.
    writers = [writer_cls.remote(str(model_dir), loc, backbone, frame_ids, [train_ref])
               for loc in locations]
    done = set()
    for writer, owned in zip(writers, _shard_scopes(scopes, cfg.n_shards)):
        done.update(ray.get(writer.done_scopes.remote(owned)))
    fit_task = ray.remote(num_cpus=1, max_retries=3)(fit_one_scope)
    todo = _round_robin([i for i, sc in enumerate(scopes) if sc not in done],
                        [shard_of(i, len(scopes), cfg.n_shards) for i in range(len(scopes))])
    cpus = int(ray.cluster_resources().get("CPU", 1))
    max_in_flight = cfg.max_in_flight or 2 * cpus
    progress = Progress("fit" if warm is None else "update", total=len(todo),
                        enabled=show_progress)
    pending, writes, nodes = {}, [], {}
    queue = list(todo)
    while queue or pending:
        while queue and len(pending) < max_in_flight:
            i = queue.pop(0)
            pending[fit_task.remote(train_ref, i, task_cfg,
                                    None if warm is None else warm[i])] = i
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            i = pending.pop(ref)
            result = ray.get(ref)
            nodes[result["node_id"]] = nodes.get(result["node_id"], 0) + 1
            shard = shard_of(i, len(scopes), cfg.n_shards)
            writes.append(writers[shard].write.remote(scopes[i], result))
            progress.update(1, f"scope {scopes[i]} k={result['k']}")
        # Bound the writers' backlog so results do not pile up in memory.
        if len(writes) > 4 * cfg.n_shards:
            finished, writes = ray.wait(writes, num_returns=len(writes) - 2 * cfg.n_shards)
            ray.get(finished)
    ray.get(writes)
    progress.close()
    for writer in writers:
        ray.kill(writer)
    return len(todo), len(done), nodes


def update_paper_model(model_dir: str | os.PathLike, emb_dir: str | os.PathLike,
                       train_splits: tuple[str, ...] = ("train",), show_progress: bool = True
                       ) -> dict:
    """``vitad update`` of a paper-recipe model: the new clips' vectors join every scope. Each
    scope keeps its k; its k-Means clusters are updated from their present centres and loc_dens
    recomputed in the clusters whose members changed (``KMeansNormality.update``); HDBSCAN,
    which has no incremental form, is refitted on the scope's vectors. The stores are written
    aside and swapped in whole; a killed update is resumed by running it again."""
    import shutil

    from ..detect import recipe_from_model
    from ..pipeline.score import model_features

    start = time.perf_counter()
    model_dir = Path(model_dir)
    doc = read_model_json(model_dir)
    recipe = recipe_from_model(doc)
    if recipe.kind != "paper":
        raise ValueError(f"{model_dir} is a {recipe.name} model: update_detector_model")
    if any(sh["location"].startswith(("http://", "https://")) for sh in doc["shards"]):
        raise ValueError(f"{model_dir} keeps its vectors in a Chroma server: refit it")
    emb, _ = load_training_frames(emb_dir, recipe, train_splits)
    model_features(doc, emb.metadata, emb_dir)
    clips = sorted(map(str, emb.ids["clip"].unique()))
    again = sorted(set(clips) & set(doc["train"]["clips"]))
    if again:
        raise ValueError(f"clips {again} are already in {model_dir}: an update adds new clips")
    backbone = doc["backbone"]
    scopes = scope_names(int(doc["embeddings"]["num_patches"]))
    new = stack_scopes(emb.global_, emb.local)
    new_ids = emb.ids["frame_id"].tolist()
    del emb
    n_old = int(doc["train"]["n_frames"])
    train = np.empty((len(scopes), n_old + len(new_ids), new.shape[2]), np.float32)
    train[:, n_old:] = new
    del new
    warm: list[dict] = [{} for _ in scopes]
    old_ids: list[str] = []
    for loc, owned in shard_locations(model_dir, doc):
        store = ScopeStore(loc)
        for scope in owned:
            i = scopes.index(scope)
            ids, vecs, cluster, dens = store.read_scope(collection_name(backbone, scope))
            if len(ids) != n_old:
                raise RuntimeError(f"{model_dir}: scope {scope} holds {len(ids)} vectors, not "
                                   f"{n_old}; `vitad verify` says more")
            train[i, :n_old] = vecs
            warm[i] = {"cluster": cluster, "loc_dens": dens,
                       "silhouette": doc["scopes"][scope]["silhouette"]}
            old_ids = old_ids or ids
        store.close()
    params = doc["params"]
    cfg = FitConfig(k_max=params["k_max"], m=params["m"], hdbscan=params["hdbscan"],
                    min_cluster_size=params["min_cluster_size"],
                    min_samples=params["min_samples"],
                    silhouette_sample_size=params["silhouette_sample_size"],
                    n_shards=len(doc["shards"]), train_splits=tuple(train_splits))
    frame_ids = old_ids + new_ids
    staging = model_dir / "update.staging"
    signature = hashlib.sha256("\n".join(frame_ids).encode()).hexdigest()
    state_file = staging / "fit_state.json"
    if state_file.exists() and json.loads(state_file.read_text())["signature"] != signature:
        shutil.rmtree(staging)  # an interrupted update of other clips: start it afresh
    for folder in (SCOPES_DIR, HDBSCAN_DIR):
        (staging / folder).mkdir(parents=True, exist_ok=True)
    write_json(state_file, {"signature": signature})
    t0 = time.perf_counter()
    _fit_scopes(staging, [shard_location(staging, s) for s in range(cfg.n_shards)], backbone,
                frame_ids, train, cfg, cfg.task_settings(cfg.k_max), show_progress, warm=warm)
    update_s = time.perf_counter() - t0
    del train
    # The swap: each of the stores, the scope markers and HDBSCAN states moves in whole.
    parts = [SCOPES_DIR, HDBSCAN_DIR] + [
        os.path.relpath(shard_location(staging, s), staging) for s in range(cfg.n_shards)]
    old = model_dir / "update.old"
    shutil.rmtree(old, ignore_errors=True)
    for part in parts:
        (old / part).parent.mkdir(parents=True, exist_ok=True)
        if (model_dir / part).exists():
            os.replace(model_dir / part, old / part)
        os.replace(staging / part, model_dir / part)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    for scope in scopes:
        marker = json.loads(scope_marker(model_dir, scope).read_text())
        doc["scopes"][scope] = {"k": marker["k"], "silhouette": marker["silhouette"],
                                "train_count": marker["train_count"],
                                "hdbscan_clusters": marker["hdbscan_clusters"]}
    doc["train"].update(clips=sorted(set(doc["train"]["clips"]) | set(clips)),
                        n_frames=len(frame_ids))
    doc["version"] = int(doc.get("version", 1)) + 1
    doc.setdefault("updates", []).append({"clips": clips, "frames": len(new_ids),
                                          "seconds": round(update_s, 2)})
    write_model_json(model_dir, doc)
    return {"version": doc["version"], "clips": clips, "frames": len(new_ids),
            "update_seconds": update_s, "seconds": time.perf_counter() - start,
            "threshold": doc["thresholds"]["kmeans"]["patch"], "thresholds_kept": None}


def _write_model_json(model_dir: Path, meta: dict, emb_dir, clips, frame_ids, scopes,
                      shard_scopes, locations, cfg: FitConfig, k_min, k_max, seconds, recipe,
                      layers, fps: float | None) -> None:
    per_scope = {}
    for scope in scopes:
        marker = json.loads(scope_marker(model_dir, scope).read_text())
        per_scope[scope] = {"k": marker["k"], "silhouette": marker["silhouette"],
                            "train_count": marker["train_count"],
                            "hdbscan_clusters": marker["hdbscan_clusters"]}
    previous = read_model_json(model_dir) if (model_dir / MODEL_FILE).exists() else {}
    doc = {
        "format": 1,
        "backbone": meta["backbone"],
        "embeddings": embeddings_entry(emb_dir, meta, layers),
        "recipe": recipe.replace(k_max=k_max, hdbscan=cfg.hdbscan).to_dict(),
        "train": {"splits": list(cfg.train_splits), "clips": clips, "n_frames": len(frame_ids),
                  "fps": fps},
        "params": {"k_min": k_min, "k_max": k_max, "m": cfg.m, "hdbscan": cfg.hdbscan,
                   "min_cluster_size": cfg.min_cluster_size, "min_samples": cfg.min_samples,
                   "silhouette_sample_size": cfg.silhouette_sample_size},
        "shards": [{"index": s, "location": _relative(loc, model_dir), "scopes": owned}
                   for s, (loc, owned) in enumerate(zip(locations, shard_scopes))],
        "scopes": per_scope,
        "thresholds": previous.get("thresholds", DEFAULT_THRESHOLDS),
        "versions": package_versions(),
        "fit_seconds": round(seconds, 2),
    }
    write_model_json(model_dir, doc)


def _relative(location: str, model_dir: Path) -> str:
    if location.startswith(("http://", "https://")):
        return location
    return os.path.relpath(location, model_dir)
