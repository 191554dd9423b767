"""The Ray Serve application: online patch-voting inference over a fitted model directory.

    HTTP -> Ingress (parse, decode, resize) -> Embedder (backbone, @serve.batch, GPU when present)
         -> S ScopeShard deployments (each a contiguous range of the 257 scopes, @serve.batch)
         -> vote -> answer

Batching happens where it pays: the ingress gathers the frames of concurrent requests (Serve's
``@serve.batch``) and sends one stack per batch, the embedder merges stacks from every ingress
replica into one forward pass, and each shard scores a batch with one neighbour search per scope.
Calls between replicas go by value over Serve's inter-replica gRPC (``by_value``): the embedding
comes back to the ingress and travels on to each shard, which on one machine is quicker than
the object store's round trips. With ``by_value=False`` they go as Ray object references instead
and the embedding goes from the embedder to the shards without the ingress copying it.
``build_app`` (Python), ``app_builder`` (``serve run`` / a RayService) and ``vitad serve`` (CLI)
all build the same graph from a ``ServeConfig``.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at run time.
import asyncio
import dataclasses
import hashlib
import hmac
import json
import os
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from ray import serve

from .. import __version__
from ..detect import StreamState
from ..normality import METHODS
from ..search import INDEXES
from ..storage.feedback import enqueue, queued_frames
from ..storage.modeldir import read_model_json
from ..storage.store import GLOBAL, scope_names, shard_of
from .api import (JSON_TYPES, MULTIPART, SCOPES, ApiError, DetectOptions, ImageInput, Limits,
                  StreamRegistry, check_content_length, decode_images, detection_answer,
                  frame_answer, images_from_form, images_from_json, media_type, parse_options)
from .config import ServeConfig

TOKEN_ENV = "VITAD_SERVE_TOKEN"
APP_NAME = "vitad"
# How often a waiting request looks whether a backend replica died (one controller call per
# period per ingress replica, however many requests wait).
BACKEND_WATCH_S = 0.25
# How often the ingress looks whether a served model's model.json changed (`vitad update`).
MODEL_CHECK_S = 1.0


def model_id(doc: dict) -> str:
    """Identity of the fitted model: thresholds can change without changing it."""
    fitted = {k: v for k, v in doc.items() if k != "thresholds"}
    digest = hashlib.sha256(json.dumps(fitted, sort_keys=True).encode()).hexdigest()[:12]
    return f"{doc['backbone']}@{digest}"


def effective_thresholds(doc: dict, overrides: dict) -> dict:
    if "frame" in doc["thresholds"]:  # a cross-clip recipe: one frame threshold
        out = dict(doc["thresholds"])
        if overrides:
            if set(overrides) - {"frame", "appearance"}:
                raise ValueError(f"this model's thresholds are {{'frame': t, 'appearance': t}}; "
                                 f"got {overrides}")
            out.update({k: float(v) for k, v in overrides.items()})
            out["source"] = "user"
        return out
    out = {m: dict(doc["thresholds"][m]) for m in METHODS}
    for method, values in (overrides or {}).items():
        if method not in out or not set(values) <= {"global", "patch"}:
            raise ValueError(f"threshold overrides look like {{'kmeans': {{'global': t, "
                             f"'patch': t}}}}; got {overrides}")
        out[method].update({k: float(v) for k, v in values.items()})
    out["source"] = "deployment config" if overrides else doc["thresholds"].get("source", "model")
    return out


def shard_scopes(num_patches: int, n_shards: int) -> list[list[str]]:
    scopes = scope_names(num_patches)
    groups: list[list[str]] = [[] for _ in range(n_shards)]
    for i, scope in enumerate(scopes):
        groups[shard_of(i, len(scopes), n_shards)].append(scope)
    return groups


def shard_bounds(num_patches: int, n_shards: int) -> list[tuple[int, int]]:
    """Each shard's [lo, hi) of the scopes (contiguous: ``shard_scopes``' groups)."""
    bounds = np.cumsum([0] + [len(g) for g in shard_scopes(num_patches, n_shards)])
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(n_shards)]


# --- deployments ---------------------------------------------------------------------------------
def frames_in(calls: list) -> int:
    """Frames in a batch of calls, each carrying a stack of frames (or their embeddings)."""
    return sum(len(c["global"]) if isinstance(c, dict) else len(c) for c in calls)


@serve.deployment
class Embedder:
    """The frozen backbone. One forward pass per batch; a batch gathers the frame stacks of
    concurrent calls (from every ingress replica) up to ``max_batch`` frames."""

    def __init__(self, backbone: str, weights: str | None, image_size: int, threads: int,
                 max_batch: int, batch_wait_s: float, layers: tuple[int, ...] = (),
                 trace: bool = True):
        import torch

        from ..features.backbones import create_backbone

        torch.set_num_threads(max(1, threads))
        self.backbone = create_backbone(backbone, weights, image_size, layers=layers,
                                        trace=None if trace else False)
        # Trace, check and let TorchScript profile its first runs now, not on the first requests
        # (those runs are a few times slower than the ones after).
        for batch in (1, 2, 1) if self.backbone.trace else ():
            self.backbone.embed(np.zeros((batch, image_size, image_size, 3), np.uint8))
        self.embed.set_max_batch_size(max_batch)
        self.embed.set_batch_wait_timeout_s(batch_wait_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, batch_size_fn=frames_in)
    async def embed(self, stacks: list[np.ndarray]) -> list[dict]:
        frames = np.concatenate(stacks)
        start = time.perf_counter()
        global_, local = await asyncio.to_thread(self.backbone.embed, frames)
        ms = 1000 * (time.perf_counter() - start)
        out, lo = [], 0
        for stack in stacks:
            hi = lo + len(stack)
            out.append({"global": global_[lo:hi], "local": local[lo:hi], "batch": len(frames),
                        "ms": ms})
            lo = hi
        return out


def model_key(name: str, doc: dict) -> str:
    """A served model's key: its name and identity, so that a model updated or refitted in its
    directory is a new key, loaded afresh, while the old one ages out of the replicas."""
    return f"{name}@{model_id(doc)}"


def _replica_name() -> str:
    import ray

    try:
        replica = serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (a unit test)
        replica = "local"
    return f"{replica}@{ray.get_runtime_context().get_node_id()[:8]}"


class _MultiplexedShard:
    """A shard deployment's scene models: each loaded on its first request into this
    replica's least-recently-used cache (Serve's model multiplexing, which also routes a model's
    requests to the replicas holding it). Every answer says what the replica holds, so the
    ingress can report it without asking each replica."""

    def _init_models(self, catalog: dict[str, str], shard: int, n_shards: int,
                     max_models: int) -> None:
        self.catalog, self.shard, self.n_shards = catalog, shard, n_shards
        self.resident: dict[str, int] = {}  # key -> bytes, while loaded
        self.replica = _replica_name()

        async def load(key: str):
            name = key.split("@", 1)[0]
            if name not in self.catalog:
                raise KeyError(f"no model named {name!r} is served")
            start = time.perf_counter()
            model = await asyncio.to_thread(self._load_model, self.catalog[name])
            model.key, model.load_s = key, time.perf_counter() - start
            model.unloaded = self.resident.pop
            self.resident[key] = model.nbytes
            return model

        self.model = serve.multiplexed(max_num_models_per_replica=max_models)(load)

    def _residency(self) -> dict:
        return {"replica": self.replica, "models": dict(self.resident)}


class _ShardModel:
    """One scene model's part held by a shard replica."""

    key: str = ""
    unloaded = None

    def __del__(self):  # Serve's multiplexing calls it when the model leaves the replica
        # Once only: the garbage collector calls it again later, maybe after the same key was
        # loaded anew.
        unloaded, self.unloaded = self.unloaded, None
        if unloaded is not None:
            unloaded(self.key, None)


@serve.deployment
class ScopeShard(_MultiplexedShard):
    """A contiguous range of scopes of paper-recipe models: their training vectors, loc_dens and
    HDBSCAN states. Scores a whole batch of frames with one neighbour search per scope group."""

    def __init__(self, catalog: dict[str, str], shard: int, n_shards: int, index: str,
                 threads: int, max_batch: int, batch_wait_s: float, projected: bool = True,
                 max_models: int = 1):
        import torch

        torch.set_num_threads(max(1, threads))
        self.index, self.projected = index, projected
        self._init_models(catalog, shard, n_shards, max_models)
        self.score.set_max_batch_size(max_batch)
        self.score.set_batch_wait_timeout_s(batch_wait_s)

    def _load_model(self, model_dir: str) -> _ShardModel:
        from ..pipeline.score import ModelScorer

        doc = read_model_json(model_dir)
        num_patches = int(doc["embeddings"]["num_patches"])
        scopes = shard_scopes(num_patches, self.n_shards)[self.shard]
        m = _ShardModel()
        m.scorer = ModelScorer(model_dir, index=self.index, scopes=scopes,
                               projected=self.projected)
        m.has_global = scopes[0] == GLOBAL
        all_scopes = scope_names(num_patches)
        patches = [all_scopes.index(s) - 1 for s in scopes if s != GLOBAL]
        # Patch positions in the frame's [P, D] array, and the scorer's slices per request scope.
        m.patch_range = (patches[0], patches[-1] + 1) if patches else None
        m.slices = {"global": slice(0, 1) if m.has_global else None,
                    "local": slice(int(m.has_global), len(scopes)) if patches else None,
                    "both": slice(0, len(scopes))}
        m.nbytes = int(m.scorer.train_.numel() * 4 + m.scorer.loc_dens_.nbytes)
        return m

    @staticmethod
    def _queries(m: _ShardModel, global_: np.ndarray, local: np.ndarray, scope: str
                 ) -> np.ndarray:
        """[S', B, D] for the scopes of ``m.slices[scope]``."""
        parts = []
        if scope in ("global", "both") and m.has_global:
            parts.append(global_[None])
        if scope in ("local", "both") and m.patch_range:
            lo, hi = m.patch_range
            parts.append(local[:, lo:hi].transpose(1, 0, 2))
        return np.concatenate(parts) if len(parts) > 1 else np.ascontiguousarray(parts[0])

    def _score_frames(self, m: _ShardModel, global_: np.ndarray, local: np.ndarray,
                      methods: list[str], scopes: list[str]) -> list[dict | None]:
        """One result per frame (None where this shard holds none of the frame's scopes)."""
        out: list[dict | None] = [None] * len(global_)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, key in enumerate(zip(methods, scopes)):
            if m.slices[key[1]] is not None:
                groups.setdefault(key, []).append(i)
        for (method, scope), members in groups.items():
            queries = self._queries(m, global_[members], local[members], scope)
            conf = m.scorer.score_queries(queries, (method,), m.slices[scope])[method]
            first_patch = 1 if m.has_global and scope != "local" else 0
            for j, i in enumerate(members):
                out[i] = {"global": float(conf[0, j]) if first_patch else None,
                          "local": conf[first_patch:, j] if scope != "global" and
                          m.patch_range else None,
                          "patch_range": m.patch_range}
        return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=frames_in)
    async def score(self, embeddings: list[dict], methods: list[list[str]],
                    scopes: list[list[str]]) -> list[dict]:
        """Each call: a stack of frame embeddings and each frame's method and scope, of the
        model the call names (Serve splits batches by model)."""
        m = await self.model(serve.get_multiplexed_model_id())
        start = time.perf_counter()
        global_ = np.concatenate([e["global"] for e in embeddings])
        local = np.concatenate([e["local"] for e in embeddings])
        flat = await asyncio.to_thread(self._score_frames, m, global_, local,
                                       [m_ for ms in methods for m_ in ms],
                                       [s for ss in scopes for s in ss])
        ms = 1000 * (time.perf_counter() - start)
        out, lo = [], 0
        for e in embeddings:
            hi = lo + len(e["global"])
            for r in flat[lo:hi]:
                if r is not None:
                    r.update(batch=len(global_), ms=ms, embed_ms=e["ms"], embed_batch=e["batch"])
            out.append({"frames": flat[lo:hi], "resident": self._residency()})
            lo = hi
        return out


@serve.deployment
class DetectorShard(_MultiplexedShard):
    """A contiguous range of scopes of cross-clip Detectors: each stream's memory of them.

    Scores a batch of query vectors per stream with one nearest-neighbour search per stream;
    the ingress, which holds the streams' state, fuses the scopes of every shard."""

    def __init__(self, catalog: dict[str, str], shard: int, n_shards: int, threads: int,
                 max_batch: int, batch_wait_s: float, max_models: int = 1):
        import torch

        torch.set_num_threads(max(1, threads))
        self._init_models(catalog, shard, n_shards, max_models)
        self.score.set_max_batch_size(max_batch)
        self.score.set_batch_wait_timeout_s(batch_wait_s)

    def _load_model(self, model_dir: str) -> _ShardModel:
        from ..detect.model import load_model

        doc = read_model_json(model_dir)
        lo, hi = shard_bounds(int(doc["embeddings"]["num_patches"]), self.n_shards)[self.shard]
        m = _ShardModel()
        m.lo, m.hi = lo, hi
        m.detector = load_model(model_dir, scopes=slice(lo, hi), doc=doc)
        m.nbytes = int(sum(est.memory_.nbytes for est in m.detector.streams_.values()))
        return m

    @staticmethod
    def _score(m: _ShardModel, calls: list[dict]) -> list[dict]:
        from ..pipeline.fit import stack_scopes

        out = [{} for _ in calls]
        for name in m.detector.streams_:
            members = [i for i, c in enumerate(calls) if name in c]
            if not members:
                continue
            g = np.concatenate([calls[i][name][0] for i in members])
            loc = np.concatenate([calls[i][name][1] for i in members])
            queries = stack_scopes(g, loc)[m.lo:m.hi]
            scores = m.detector.scope_scores(name, queries)  # [S', B]
            at = 0
            for i in members:
                n = len(calls[i][name][0])
                out[i][name] = scores[:, at:at + n]
                at += n
        return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=lambda calls: sum(
        len(next(iter(c.values()))[0]) for c in calls))
    async def score(self, calls: list[dict]) -> list[dict]:
        """Each call: {stream: (global [B, D], local [B, P, D])} of the model the call names;
        returns {"scores": {stream: [S', B]}, "resident": what this replica holds}."""
        m = await self.model(serve.get_multiplexed_model_id())
        scores = await asyncio.to_thread(self._score, m, calls)
        resident = self._residency()
        return [{"scores": s, "resident": resident} for s in scores]


api = FastAPI(title="vitad_ray anomaly detection", version=__version__, openapi_url=None,
              docs_url=None, redoc_url=None,
              description="Frame-level visual anomaly detection for one fixed camera scene: a "
                          "frozen ViT, per-scope k-Means/HDBSCAN normality models and patch "
                          "voting. Every route except /v1/health needs `Authorization: Bearer "
                          "<token>` when the deployment has a token.")

# Options a request can carry, as form fields, JSON keys or query parameters.
_OPTIONS_SCHEMA = {
    "method": {"type": "string", "enum": list(METHODS)},
    "scope": {"type": "string", "enum": list(SCOPES)},
    "threshold": {"type": "number"}, "global_threshold": {"type": "number"},
    "patch_threshold": {"type": "number"},
    "stream": {"type": "string", "maxLength": 128,
               "description": "camera id: frames of one stream, sent in order, are scored with "
                              "their past (motion, smoothing); without it, appearance alone"},
    "model": {"type": "string", "maxLength": 128,
              "description": "the scene model, where the endpoint serves several (GET /v1/models;"
                             " default: the stream's model, or the only one)"},
    "frame_index": {"type": "integer", "minimum": 0,
                    "description": "the first image's frame number in its stream (default: the "
                                   "stream's next)"},
}
DETECT_BODY = {
    "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "images": {"type": "array", "minItems": 1,
                       "items": {"type": "string", "format": "binary"}},
            **_OPTIONS_SCHEMA}}},
        "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
            "images": {"type": "array", "minItems": 1, "items": {"oneOf": [
                {"type": "string", "format": "byte"},
                {"type": "object", "properties": {"name": {"type": "string"},
                                                  "data": {"type": "string", "format": "byte"}}}]}},
            **_OPTIONS_SCHEMA}}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    }},
    "responses": {
        "400": {"description": "malformed request (empty body, bad JSON, bad multipart)"},
        "401": {"description": "missing or wrong bearer token"},
        "404": {"description": "no model of that name is served"},
        "408": {"description": "the request body stopped arriving before its end"},
        "409": {"description": "a stream's frame older than the stream's last, or a stream "
                               "sent to another model than its own"},
        "413": {"description": "too many images, or an image or body over the size limit"},
        "415": {"description": "unsupported content type"},
        "422": {"description": "an image that cannot be decoded, or a bad option"},
        "503": {"description": "a backend replica failed; retry"},
        "504": {"description": "the backends did not answer in time"},
    },
}


def _error(status: int, reason: str, **extra) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": reason, "status": status, **extra}, status_code=status,
                        headers=headers)


def _deployments_not_running(app: str = APP_NAME) -> list[str]:
    """The app's deployments with no running replica (Serve's controller knows; asking it does
    not queue behind the replicas' own work, as a call to each backend would under load). A
    deployment replacing one of several replicas still runs on the others: not listed."""
    try:
        status = serve.status().applications[app]
    except Exception as exc:  # noqa: BLE001 - no controller answer: not known to be ready
        return [f"serve status unavailable ({exc.__class__.__name__})"]
    down = []
    for name, d in status.deployments.items():
        running = sum(n for state, n in d.replica_states.items()
                      if str(getattr(state, "value", state)) == "RUNNING")
        if not running:
            down.append(name)
    return sorted(down)


def wait_until_running(app: str = APP_NAME, timeout_s: float = 600.0) -> list[str]:
    """Blocks until every deployment of ``app`` has a running replica; returns the ones that
    still have none when ``timeout_s`` runs out (empty: all can answer)."""
    deadline = time.monotonic() + timeout_s
    while True:
        down = _deployments_not_running(app)
        if not down or time.monotonic() > deadline:
            return down
        time.sleep(0.5)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A fault of the server still answers in the contract's JSON, never a traceback."""
    return _error(500, f"internal error ({exc.__class__.__name__}); the server log has the rest")


async def per_model(score, models: list, *columns: list) -> list:
    """A batch of frames of several models: ``score(model, *its rows of each column)`` once per
    model, concurrently, the answers back in the batch's order."""
    rows: dict[str, list[int]] = {}
    for i, m in enumerate(models):
        rows.setdefault(m.key, []).append(i)
    parts = await asyncio.gather(*(score(models[r[0]], *([col[i] for i in r] for col in columns))
                                   for r in rows.values()))
    out: list = [None] * len(models)
    for r, answers in zip(rows.values(), parts):
        for i, answer in zip(r, answers):
            out[i] = answer
    return out


class ServedModel:
    """What the ingress holds of one scene model: its card (``info``) and, for cross-clip
    recipes, the Detector's evidence scales and decision (the shards hold the memories). It
    looks at its model.json at most every ``MODEL_CHECK_S``: an updated or refitted model is
    reloaded, under a new key, without a restart."""

    def __init__(self, name: str, model_dir: str, settings: dict):
        self.name, self.dir, self.settings = name, model_dir, settings
        self.checked_at, self.signature = 0.0, None
        self.lock = asyncio.Lock()
        self.load()

    def _stat(self) -> tuple:
        st = os.stat(Path(self.dir) / "model.json")
        return st.st_mtime_ns, st.st_size

    def load(self) -> None:
        signature = self._stat()
        doc = read_model_json(self.dir)
        info = model_info(self.name, self.dir, doc, self.settings)
        detector = None
        if info["recipe"]["kind"] != "paper":
            from ..detect.model import apply_thresholds, load_model

            detector = apply_thresholds(load_model(self.dir, scopes=slice(0, 0), doc=doc),
                                        info["thresholds"])
        self.info, self.detector, self.signature = info, detector, signature
        self.key, self.crossclip = info["key"], detector is not None
        self.embedder = embedder_key(doc, self.settings["weights"].get(self.name))
        self.has_global = [s["first"] == GLOBAL for s in info["shards"]]
        self.has_patches = [s["n_patches"] > 0 for s in info["shards"]]

    async def fresh(self) -> "ServedModel":
        """Itself, reloaded first when its model.json changed since it last looked."""
        now = time.monotonic()
        if now - self.checked_at < MODEL_CHECK_S:
            return self
        async with self.lock:
            if now - self.checked_at >= MODEL_CHECK_S:
                self.checked_at = time.monotonic()
                if await asyncio.to_thread(self._stat) != self.signature:
                    await asyncio.to_thread(self.load)
        return self


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, embedders: dict, detector_shards: list, scope_shards: list,
                 settings: dict):
        by_reference = not settings["by_value"]
        self.embedders = {k: e.options(_by_reference=by_reference) for k, e in embedders.items()}
        self.shards = {"detector": [s.options(_by_reference=by_reference)
                                    for s in detector_shards],
                       "scope": [s.options(_by_reference=by_reference) for s in scope_shards]}
        self._handles: dict[tuple, object] = {}
        self.settings = settings
        self.models = {name: ServedModel(name, d, settings)
                       for name, d in settings["catalog"].items()}
        self.stream_models = dict(settings["streams"])
        self.token = settings["token"]
        self.limits = Limits(**settings["limits"])
        self.timeout_s = settings["request_timeout_s"]
        self.body_timeout_s = settings["body_timeout_s"]
        self._infer.set_max_batch_size(settings["batch"])
        self._down, self._down_checked_at = [], 0.0
        self._infer_streams.set_max_batch_size(settings["batch"])
        self.batch_wait_s, self.in_flight = settings["batch_wait_s"], 0
        self._schema: dict | None = None
        self.streams = StreamRegistry(settings["max_streams"], settings["stream_idle_s"])
        self._locks: dict[str, asyncio.Lock] = {}
        self.residency: dict[str, tuple[float, dict]] = {}  # shard replica -> (when, held)

    def _shard(self, kind: str, i: int, key: str):
        """Shard ``i``'s handle for one model: Serve routes it to a replica holding the model."""
        handle = self._handles.get((kind, i, key))
        if handle is None:
            handle = self._handles[(kind, i, key)] = self.shards[kind][i].options(
                multiplexed_model_id=key)
        return handle

    def _held(self, kind: str, i: int, resident: dict) -> None:
        self.residency[f"{kind}{i}/{resident['replica']}"] = (time.time(), resident["models"])

    async def _model_for(self, opts: DetectOptions) -> ServedModel:
        """The model a request is for: named, its stream's, or the only one served."""
        name = opts.model
        if name is None and opts.stream is not None:
            state = self.streams.peek(opts.stream)
            name = self.stream_models.get(opts.stream) or (state.model if state else None)
        if name is None:
            if len(self.models) != 1:
                raise ApiError(422, f"name a model (model=...): this endpoint serves "
                                    f"{sorted(self.models)}")
            name = next(iter(self.models))
        model = self.models.get(name)
        if model is None:
            raise ApiError(404, f"no model named {name!r} here; GET /v1/models lists them")
        mapped = self.stream_models.get(opts.stream) if opts.stream else None
        if mapped is not None and mapped != name:
            raise ApiError(409, f"stream {opts.stream!r} belongs to model {mapped!r}, not "
                                f"{name!r}")
        try:
            return await model.fresh()
        except Exception as exc:  # noqa: BLE001 - a model directory mid-rewrite, or removed
            raise ApiError(503, f"model {name!r} could not be reloaded ({exc.__class__.__name__}:"
                                f" {str(exc)[:200]}); retry") from None

    def _authorized(self, request: Request) -> bool:
        if not self.token:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError, a 500).
        given = value.strip().encode("utf-8", "surrogateescape")
        return scheme.lower() == "bearer" and hmac.compare_digest(given, self.token.encode())

    @api.get("/v1/health", summary="Readiness; never needs a token: 200 ready, 503 starting")
    async def health(self):
        body = {"status": "ready", "models": len(self.models)}
        if len(self.models) == 1:
            body["model_id"] = next(iter(self.models.values())).info["model_id"]
        waiting = await self._backends_down()
        if waiting:  # the ingress answers before every backend replica can score
            return JSONResponse({**body, "status": "starting", "waiting_for": waiting},
                                status_code=503)
        return body

    @api.get("/v1/model", summary="A served model: backbone, weights, scopes, thresholds, "
                                  "version (?model=NAME where several are served)")
    async def model(self, request: Request):
        if not self._authorized(request):
            return _error(401, "missing or wrong bearer token")
        try:
            model = await self._model_for(DetectOptions(model=request.query_params.get("model")))
        except ApiError as exc:
            return _error(exc.status, exc.reason)
        out = dict(model.info)
        if model.crossclip:
            out["stream_state"] = self.streams.info()
        return out

    @api.get("/v1/models", summary="Every served model, its version, and the shard replicas "
                                   "that hold it")
    async def models_(self, request: Request):
        if not self._authorized(request):
            return _error(401, "missing or wrong bearer token")
        now = time.time()
        models = []
        for model in self.models.values():
            try:
                await model.fresh()
            except Exception:  # noqa: BLE001 - listed as last loaded
                pass
            held = {replica: models_[model.key] for replica, (_, models_)
                    in self.residency.items() if model.key in models_}
            info = model.info
            models.append({
                "name": model.name, "model_dir": model.dir, "key": model.key,
                "model_id": info["model_id"], "version": info["version"],
                "recipe": info["recipe"]["name"], "backbone": info["backbone"],
                "streams": sorted(s for s, m in self.stream_models.items() if m == model.name),
                "loaded_on": sorted(held), "loaded_bytes": int(sum(held.values()))})
        replicas = {replica: {"reported_s_ago": round(now - when, 1),
                              "models": sorted(held), "bytes": int(sum(held.values()))}
                    for replica, (when, held) in sorted(self.residency.items())}
        return {"models": models, "replicas": replicas,
                "models_per_replica": self.settings["models_per_replica"],
                "model_memory_mb": self.settings["model_memory_mb"]}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request):
        if not self._authorized(request):
            return _error(401, "missing or wrong bearer token")
        if self._schema is None:  # the routes never change: build it once
            self._schema = get_openapi(title=api.title, version=api.version,
                                       description=api.description, routes=api.routes)
            self._schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}}
            for path, ops in self._schema["paths"].items():
                for op in ops.values():
                    if self.token and path != "/v1/health":
                        op["security"] = [{"bearer": []}]
            body = self._schema["paths"]["/v1/detect"]["post"]["requestBody"]["content"]
            for kind in ("multipart/form-data", "application/json"):
                body[kind]["schema"]["properties"]["images"]["maxItems"] = self.limits.max_images
        return self._schema

    @api.post("/v1/detect", summary="Score one or many frames", openapi_extra=DETECT_BODY)
    async def detect(self, request: Request):
        start = time.perf_counter()
        if not self._authorized(request):
            return _error(401, "missing or wrong bearer token")
        try:
            images, opts = await self._parse(request)
            receive_ms = 1000 * (time.perf_counter() - start)
            model = await self._model_for(opts)
            if model.crossclip:
                self._check_stream_options(model, opts)
            elif opts.stream is not None:
                raise ApiError(422, "this model's recipe (paper) keeps no stream state; leave "
                                    "out stream")
            if opts.method == "hdbscan" and not model.info["hdbscan"]:
                raise ApiError(422, "this model was fitted without HDBSCAN; use method=kmeans")
            thresholds = None if model.crossclip else opts.thresholds(model.info["thresholds"])
            t0 = time.perf_counter()
            # Off the event loop: health checks and other requests go on while it decodes.
            frames = await asyncio.to_thread(decode_images, images, model.info["image_size"],
                                             self.limits)
            decode_ms = 1000 * (time.perf_counter() - t0)
        except ApiError as exc:
            return _error(exc.status, exc.reason)
        if model.crossclip:
            return await self._detect_streams(model, images, frames, opts, start, receive_ms,
                                              decode_ms)
        answers = await self._backends(
            len(frames), self._infer,
            lambda: asyncio.gather(*(self._infer(f, opts.method, opts.scope, model)
                                     for f in frames)))
        if isinstance(answers, JSONResponse):
            return answers
        results = []
        for i, (img, (global_conf, patch_conf, timing)) in enumerate(zip(images, answers)):
            answer = frame_answer(i, img.name, opts, thresholds, model.info["grid"], global_conf,
                                  patch_conf)
            answer["timings_ms"] = {"receive": round(receive_ms, 3),
                                    "decode": round(decode_ms / len(images), 3), **timing}
            results.append(answer)
        return {"model": model.name, "model_id": model.info["model_id"],
                "version": model.info["version"], "results": results,
                "timings_ms": {"total": round(1000 * (time.perf_counter() - start), 3)}}

    @api.post("/v1/streams/{stream}/normal", status_code=202,
              summary="Mark frames of a stream normal (\"this alarm was normal\"): queued in "
                      "the model directory for `vitad update MODEL --feedback`",
              openapi_extra={"requestBody": DETECT_BODY["requestBody"], "responses": {
                  "202": {"description": "queued"},
                  "413": DETECT_BODY["responses"]["413"],
                  "422": DETECT_BODY["responses"]["422"],
                  "429": {"description": "the model's feedback queue is full"}}})
    async def normal(self, stream: str, request: Request):
        if not self._authorized(request):
            return _error(401, "missing or wrong bearer token")
        try:
            images, opts = await self._parse(request, {"stream": stream})
            model = await self._model_for(opts)
            # Decoded only to refuse what an update could not read; the images as sent are kept.
            await asyncio.to_thread(decode_images, images, model.info["image_size"], self.limits)
            queued = await asyncio.to_thread(queued_frames, model.dir)
            room = self.settings["feedback_max_frames"] - queued
            if len(images) > room:
                raise ApiError(429, f"model {model.name!r}'s feedback queue holds {queued} "
                                    f"frames, its limit {self.settings['feedback_max_frames']}:"
                                    f" apply it with `vitad update {model.dir} --feedback`")
            clip = await asyncio.to_thread(enqueue, model.dir, stream, opts.frame_index,
                                           [img.data for img in images])
        except ApiError as exc:
            return _error(exc.status, exc.reason)
        except ValueError as exc:
            return _error(422, str(exc))
        return JSONResponse({"queued": len(images), "clip": clip, "model": model.name,
                             "queue_frames": queued + len(images),
                             "apply": f"vitad update {model.dir} --feedback"}, status_code=202)

    async def _backends(self, n_frames: int, batched, call):
        """Awaits ``call()``: the answers, or the error response for a timeout (504) or a failed
        replica (503). A lone frame goes straight through; with other requests in flight, the
        batch waits a little so that their frames share the forward pass and the search."""
        self.in_flight += n_frames
        batched.set_batch_wait_timeout_s(self.batch_wait_s if self.in_flight > 1 else 0.0)
        task = asyncio.ensure_future(call())
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=BACKEND_WATCH_S)
                if done:
                    return task.result()
                if time.monotonic() >= deadline:
                    task.cancel()
                    return _error(504, f"no answer from the backends within "
                                       f"{self.timeout_s:.0f} s", retry=True)
                # A request routed to a replica that died waits for its successor (a minute
                # for a shard to load): say so now rather than at the timeout.
                waiting = await self._backends_down()
                if waiting:
                    task.cancel()
                    return _error(503, f"a backend replica is restarting ({', '.join(waiting)})",
                                  retry=True)
        except ApiError:
            raise
        except Exception as exc:  # a replica died or failed mid-request
            return _error(503, f"a backend failed: {exc.__class__.__name__}: "
                               f"{str(exc).splitlines()[0][:300] if str(exc) else ''}", retry=True)
        finally:
            self.in_flight -= n_frames

    async def _backends_down(self) -> list[str]:
        """The app's deployments that are not running, asked of Serve's controller at most
        once per ``BACKEND_WATCH_S`` whatever the number of requests waiting."""
        now = time.monotonic()
        if now - self._down_checked_at >= BACKEND_WATCH_S:
            self._down_checked_at = now
            self._down = await asyncio.to_thread(_deployments_not_running)
        return self._down

    @staticmethod
    def _check_stream_options(model: ServedModel, opts: DetectOptions) -> None:
        recipe = model.info["recipe"]["name"]
        if opts.method != "kmeans" or opts.scope != "both":
            raise ApiError(422, f"this model's recipe ({recipe}) scores whole frames: leave out "
                                "method and scope")
        if opts.global_threshold is not None or opts.patch_threshold is not None:
            raise ApiError(422, f"this model's recipe ({recipe}) has one frame threshold: use "
                                "threshold")

    async def _detect_streams(self, model: ServedModel, images, frames, opts: DetectOptions,
                              start: float, receive_ms: float, decode_ms: float):
        """Frames of one request scored by the model's Detector, with their stream's past when
        the request names a stream. A stream's requests are scored one after the other, in the
        order they arrive."""
        key = opts.stream
        lock = self._locks.setdefault(key, asyncio.Lock()) if key else None
        if lock is not None:
            await lock.acquire()
        try:
            state = self.streams.get(key, lambda: StreamState(model=model.name)) if key else None
            if state is not None:
                if state.model != model.name:
                    raise ApiError(409, f"stream {key!r} is scored by model {state.model!r}; "
                                        f"a stream keeps its model while it is remembered")
                first = opts.frame_index if opts.frame_index is not None else state.next_index
                if state.frames_seen and first <= state.last_index:
                    raise ApiError(409, f"frame_index {first} is not after stream {key!r}'s "
                                        f"last frame {state.last_index}")
                indices = list(range(first, first + len(frames)))
            else:
                indices = [None] * len(frames)
            answers = await self._backends(len(frames), self._infer_streams, lambda: (
                asyncio.gather(*(self._infer_streams(f, state, i, model)
                                 for f, i in zip(frames, indices)))))
            if isinstance(answers, JSONResponse) and key:
                # A 503 / 504 may leave the frames half scored (the batch goes on without
                # this request): the stream starts afresh, so the client's retry of the same
                # frames is scored rather than refused as already seen.
                self.streams.forget(key)
        except ApiError as exc:
            return _error(exc.status, exc.reason)
        finally:
            if lock is not None:
                lock.release()
                self.streams.evict()
                for stale in [k for k, v in self._locks.items()
                              if k not in self.streams and not v.locked()]:
                    del self._locks[stale]
        if isinstance(answers, JSONResponse):
            return answers
        results = []
        for i, (img, (det, row, timing), index) in enumerate(zip(images, answers, indices)):
            answer = detection_answer(i, img.name, opts, det, row, model.info["grid"], index)
            answer["timings_ms"] = {"receive": round(receive_ms, 3),
                                    "decode": round(decode_ms / len(images), 3), **timing}
            results.append(answer)
        return {"model": model.name, "model_id": model.info["model_id"],
                "version": model.info["version"], "recipe": model.info["recipe"]["name"],
                "results": results,
                "timings_ms": {"total": round(1000 * (time.perf_counter() - start), 3)}}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _infer_streams(self, frames: list[np.ndarray], states: list, indices: list,
                             models: list[ServedModel]) -> list[tuple]:
        """Frames of concurrent requests, each model's through its embedder, its shards'
        searches and its Detector's decision, each stream's frames in order against its
        state."""
        return await per_model(self._score_streams, models, frames, states, indices)

    async def _score_streams(self, model: ServedModel, frames: list[np.ndarray], states: list,
                             indices: list) -> list[tuple]:
        det = model.detector
        emb = await self.embedders[model.embedder].embed.remote(np.stack(frames))
        g, loc = emb["global"], emb["local"]
        groups: dict[int, list[int]] = {}
        for i, st in enumerate(states):
            groups.setdefault(id(st) if st is not None else 0, []).append(i)
        call: dict[str, list] = {}
        layout = []  # (group rows, state, {stream: (offset, n)})
        for rows in groups.values():
            state = states[rows[0]]
            index = np.asarray([indices[i] if indices[i] is not None else 0 for i in rows])
            queries = det.queries(g[rows], loc[rows], index, state)
            spans = {}
            for name, (qg, ql) in queries.items():
                parts = call.setdefault(name, [])
                spans[name] = (sum(len(p[0]) for p in parts), len(qg))
                parts.append((qg, ql))
            layout.append((rows, state, index, spans))
        merged = {name: (np.concatenate([p[0] for p in parts]),
                         np.concatenate([p[1] for p in parts])) for name, parts in call.items()}
        t0 = time.perf_counter()
        answers = await asyncio.gather(*(self._shard("detector", i, model.key).score.remote(merged)
                                         for i in range(len(self.shards["detector"]))))
        search_ms = 1000 * (time.perf_counter() - t0)
        for i, a in enumerate(answers):
            self._held("DetectorShard", i, a["resident"])
        scores = {name: np.concatenate([a["scores"][name] for a in answers]) for name in merged}
        out: list = [None] * len(frames)
        for rows, state, index, spans in layout:
            mine = {name: scores[name][:, lo:lo + n] for name, (lo, n) in spans.items()}
            detection = det.decide(mine, index, state, (g[rows], loc[rows]))
            for j, i in enumerate(rows):
                out[i] = (detection, j, {"embed": round(emb["ms"], 3),
                                         "embed_batch": emb["batch"],
                                         "score": round(search_ms, 3),
                                         "score_batch": len(frames)})
        return out

    async def _parse(self, request: Request, path_fields: dict | None = None
                     ) -> tuple[list[ImageInput], DetectOptions]:
        check_content_length(request.headers.get("content-length"), self.limits)
        kind = media_type(request.headers.get("content-type"))
        fields = dict(request.query_params)
        body = await self._read_body(request)
        if kind in JSON_TYPES:
            images, body_fields = images_from_json(body, self.limits)
            fields.update({k: v for k, v in body_fields.items() if v is not None})
        elif kind == MULTIPART:
            try:
                form = await request.form(max_files=4 * self.limits.max_images + 8,
                                          max_part_size=1 << 20)
            except Exception as exc:
                raise ApiError(400, f"malformed multipart body: {exc}") from None
            files = []
            for key, value in form.multi_items():
                if isinstance(value, str):
                    fields[key] = value
                else:
                    files.append((value.filename or key, await value.read()))
            images = images_from_form(files, self.limits)
        elif kind.startswith("image/"):
            if not body:
                raise ApiError(400, "empty body")
            images = images_from_form([("body", body)], self.limits)
        elif not kind:
            raise ApiError(415 if body else 400,
                           "no Content-Type: send multipart/form-data, application/json or image/*")
        else:
            raise ApiError(415, f"unsupported content type {kind!r}: send multipart/form-data, "
                                "application/json or image/*")
        fields.update(path_fields or {})  # the path's, over a body's
        return images, parse_options(fields)

    async def _read_body(self, request: Request) -> bytes:
        """The body, counted as it streams in: a chunked body (no Content-Length) over the limit
        gets its 413 as soon as it passes it, not after it was read whole; a body that stops
        arriving gets its 408 after ``body_timeout_s`` without a byte."""
        limit, size, chunks = self.limits.max_body_bytes, 0, []
        stream = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), self.body_timeout_s)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise ApiError(408, f"request body incomplete: nothing arrived for "
                                    f"{self.body_timeout_s:g} s after {size} bytes") from None
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body over the limit of {limit} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        request._body = body  # Starlette's form parser reads a body already received from here
        return body

    @staticmethod
    def _needs(model: ServedModel, shard: int, scope: str) -> bool:
        return (scope != "local" and model.has_global[shard]) or \
            (scope != "global" and model.has_patches[shard])

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _infer(self, frames: list[np.ndarray], methods: list[str], scopes: list[str],
                     models: list[ServedModel]) -> list[tuple]:
        """Frames of concurrent requests, gathered here so that the backends get one call per
        batch and model (a call per frame costs a routing round trip each on a busy
        machine)."""
        return await per_model(self._score_scopes, models, frames, methods, scopes)

    async def _score_scopes(self, model: ServedModel, frames: list[np.ndarray],
                            methods: list[str], scopes: list[str]) -> list[tuple]:
        embedding = self.embedders[model.embedder].embed.remote(np.stack(frames))
        wanted = [i for i in range(len(self.shards["scope"]))
                  if any(self._needs(model, i, s) for s in scopes)]
        answers = await asyncio.gather(*(self._shard("scope", i, model.key).score.remote(
            embedding, methods, scopes) for i in wanted))
        for i, a in zip(wanted, answers):
            self._held("ScopeShard", i, a["resident"])
        parts = [a["frames"] for a in answers]
        grid = model.info["grid"]
        out = []
        for j, scope in enumerate(scopes):
            got = [p[j] for p in parts if p[j] is not None]
            global_conf = next((g["global"] for g in got if g["global"] is not None), None)
            patch_conf = None
            if scope != "global":
                patch_conf = np.empty(grid * grid, np.float32)
                for g in got:
                    lo, hi = g["patch_range"]
                    patch_conf[lo:hi] = g["local"]
            timing = {"embed": round(got[0]["embed_ms"], 3), "embed_batch": got[0]["embed_batch"],
                      "score": round(max(g["ms"] for g in got), 3),
                      "score_batches": [g["batch"] for g in got]}
            out.append((global_conf, patch_conf, timing))
        return out


# --- building the application ------------------------------------------------------------------
def _check_weights(doc: dict, weights: str | None) -> str | None:
    """The weights the embedder will load; refuses weights other than the model was fitted on."""
    from ..features.backbones import get_spec, weights_fingerprint

    emb = doc["embeddings"]
    weights = weights or emb["weights"]
    spec = get_spec(doc["backbone"], emb["image_size"], emb.get("layers"))
    local_or_random = weights == "random" or os.path.isdir(weights)
    if local_or_random:
        if os.path.isdir(weights):
            weights = str(Path(weights).resolve())
        got = weights_fingerprint(spec, weights)["weights_sha256"]
        if got != emb["weights_sha256"]:
            raise ValueError(f"weights {weights} (sha256 {got[:12]}) are not the ones the model "
                             f"was fitted on ({emb['weights_sha256'][:12]}); give --weights")
    return weights


def model_layers(doc: dict) -> tuple[int, ...]:
    """The blocks the model was fitted on: those it selected from the embeddings, or all."""
    emb = doc["embeddings"]
    return tuple(emb.get("selected_layers") or emb.get("layers") or ())


def embedder_key(doc: dict, weights: str | None) -> str:
    """Models embedded alike (backbone, weights, size, blocks) share one Embedder deployment."""
    emb = doc["embeddings"]
    return json.dumps([doc["backbone"], weights or emb["weights"], emb["weights_sha256"],
                       int(emb["image_size"]), list(model_layers(doc))])


def model_info(name: str, model_dir: str, doc: dict, settings: dict) -> dict:
    """A served model's card (``/v1/model``)."""
    from ..detect import recipe_from_model

    emb = doc["embeddings"]
    params = doc.get("params", {})
    groups = shard_scopes(int(emb["num_patches"]), settings["n_shards"])
    return {
        "name": name, "key": model_key(name, doc), "version": int(doc.get("version", 1)),
        "recipe": recipe_from_model(doc).to_dict(),
        "model_id": model_id(doc),
        "model_dir": model_dir,
        "backbone": doc["backbone"],
        "weights": emb["weights"], "weights_sha256": emb["weights_sha256"],
        "image_size": emb["image_size"], "patch_size": emb["patch_size"], "grid": emb["grid"],
        "num_patches": emb["num_patches"], "dim": emb["dim"],
        "scopes": 1 + emb["num_patches"], "train_frames": doc["train"]["n_frames"],
        "fps": doc["train"].get("fps"),  # the training video's rate: a client samples at it
        "updates": doc.get("updates", []),
        "hdbscan": bool(params.get("hdbscan")),
        "methods": ["kmeans"] + (["hdbscan"] if params.get("hdbscan") else []),
        "thresholds": effective_thresholds(doc, settings["thresholds"]),
        "index": settings["index"],
        "shards": [{"index": i, "first": g[0], "last": g[-1], "n_scopes": len(g),
                    "n_patches": sum(s != GLOBAL for s in g)} for i, g in enumerate(groups)],
        "batching": settings["batching"],
        "limits": settings["limits"],
    }


def model_bytes(model_dir: str) -> int:
    """What a model directory's scoring state weighs: its stored vectors and arrays."""
    root = Path(model_dir)
    return int(sum(f.stat().st_size for f in root.rglob("*") if f.is_file()))


def models_per_replica(cfg: ServeConfig, catalog: dict[str, str], n_shards: int) -> int:
    """How many scene models a shard replica keeps: ``models_per_replica``, or as many of the
    largest model's shares as ``model_memory_mb`` holds (at least one), or all of them."""
    if cfg.models_per_replica is not None:
        if cfg.models_per_replica < 1:
            raise ValueError(f"models_per_replica must be >= 1, got {cfg.models_per_replica}")
        return int(cfg.models_per_replica)
    if cfg.model_memory_mb is None:
        return len(catalog)
    share = max(model_bytes(d) for d in catalog.values()) / n_shards
    fits = int(cfg.model_memory_mb * 2**20 // max(share, 1))
    if fits < 1:
        raise ValueError(f"model_memory_mb {cfg.model_memory_mb:g} holds no model: one model's "
                         f"share of a shard replica is {share / 2**20:.0f} MiB (add shards, or "
                         f"raise the bound)")
    return min(fits, len(catalog))


def _replica_options(cfg: ServeConfig, num_cpus: float, num_gpus: float = 0) -> dict:
    """Actor options of the app's replicas."""
    # Calls between replicas go by value over gRPC, whose 4 MiB default a batch of a few
    # frames' embeddings passes (16 frames at 224 px: 6.3 MB; more with motion streams).
    env = {"RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(cfg.max_message_bytes)}
    if cfg.compute_niceness is not None:
        env["RAY_worker_niceness"] = str(cfg.compute_niceness)
    return {"num_cpus": num_cpus, "num_gpus": num_gpus, "runtime_env": {"env_vars": env}}


def _cluster_has_gpu() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def build_app(cfg: ServeConfig):
    """The Serve application graph for one or many model directories."""
    catalog = {name: str(Path(d).resolve()) for name, d in cfg.catalog().items()}
    if cfg.index not in INDEXES:
        raise ValueError(f"index must be exact or chroma, got {cfg.index!r}")
    docs = {name: read_model_json(d) for name, d in catalog.items()}
    weights = {name: _check_weights(doc, cfg.weights) for name, doc in docs.items()}
    fewest_scopes = min(1 + int(doc["embeddings"]["num_patches"]) for doc in docs.values())
    n_shards = cfg.shards or max(1, max(len(doc["shards"]) for doc in docs.values()))
    if not 1 <= n_shards <= fewest_scopes:
        raise ValueError(f"shards must be between 1 and {fewest_scopes}, got {n_shards}")
    per_replica = models_per_replica(cfg, catalog, n_shards)
    token = cfg.token if cfg.token is not None else os.environ.get(TOKEN_ENV) or None
    wait_s, backend_wait_s = cfg.batch_wait_ms / 1000, cfg.backend_wait_ms / 1000
    settings = {"token": token, "limits": dataclasses.asdict(cfg.limits),
                "request_timeout_s": cfg.request_timeout_s, "body_timeout_s": cfg.body_timeout_s,
                "batch": cfg.embed_batch, "batch_wait_s": wait_s, "by_value": cfg.by_value,
                "max_streams": cfg.max_streams, "stream_idle_s": cfg.stream_idle_s,
                "catalog": catalog, "streams": dict(cfg.streams), "weights": weights,
                "n_shards": n_shards, "thresholds": cfg.thresholds, "index": cfg.index,
                "models_per_replica": per_replica, "model_memory_mb": cfg.model_memory_mb,
                "feedback_max_frames": cfg.feedback_max_frames,
                "batching": {"embed_batch": cfg.embed_batch, "shard_batch": cfg.shard_batch,
                             "batch_wait_ms": cfg.batch_wait_ms}}
    infos = {name: model_info(name, catalog[name], doc, settings) for name, doc in docs.items()}
    gpu = cfg.use_gpu if cfg.use_gpu is not None else _cluster_has_gpu()
    embedders = {}
    for name, doc in docs.items():
        key = embedder_key(doc, weights[name])
        if key not in embedders:
            embedders[key] = Embedder.options(
                name="Embedder" if not embedders else f"Embedder{len(embedders)}",
                num_replicas=cfg.embed_replicas, max_ongoing_requests=4 * cfg.embed_batch,
                health_check_period_s=cfg.health_check_s,
                ray_actor_options=_replica_options(cfg, cfg.embed_cpus, 1 if gpu else 0),
            ).bind(doc["backbone"], weights[name], int(doc["embeddings"]["image_size"]),
                   cfg.embed_threads, cfg.embed_batch, backend_wait_s, model_layers(doc),
                   cfg.embed_trace)
    shard_options = dict(num_replicas=cfg.shard_replicas, max_ongoing_requests=4 * cfg.shard_batch,
                         health_check_period_s=cfg.health_check_s,
                         ray_actor_options=_replica_options(cfg, cfg.shard_cpus))
    shard_batch = max(cfg.shard_batch, cfg.embed_batch)
    paper = {n: catalog[n] for n, info in infos.items() if info["recipe"]["kind"] == "paper"}
    crossclip = {n: d for n, d in catalog.items() if n not in paper}
    scope_shards = [ScopeShard.options(name=f"ScopeShard{i}", **shard_options).bind(
        paper, i, n_shards, cfg.index, cfg.shard_threads, shard_batch, backend_wait_s,
        cfg.projected_search, min(per_replica, len(paper))) for i in range(n_shards)] \
        if paper else []
    detector_shards = [DetectorShard.options(name=f"DetectorShard{i}", **shard_options).bind(
        crossclip, i, n_shards, cfg.shard_threads, shard_batch, backend_wait_s,
        min(per_replica, len(crossclip))) for i in range(n_shards)] if crossclip else []
    return Ingress.options(
        num_replicas=cfg.ingress_replicas, max_ongoing_requests=256,
        ray_actor_options=_replica_options(cfg, cfg.ingress_cpus),
    ).bind(embedders, detector_shards, scope_shards, settings)


def app_builder(args: dict):
    """Entry point for ``serve run vitad_ray.serve.app:app_builder model_dir=...`` and RayService."""
    return build_app(ServeConfig.from_args(dict(args)))


def start(cfg: ServeConfig, name: str = APP_NAME):
    """Start Serve's HTTP proxy on cfg.host:cfg.port and deploy the app; returns its URL."""
    serve.start(proxy_location=cfg.proxy_location,
                http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name=name, route_prefix=cfg.route_prefix, blocking=False)
    prefix = cfg.route_prefix.rstrip("/")
    return f"http://{cfg.host}:{cfg.port}{prefix}"


def direct_urls(cfg: ServeConfig, name: str = APP_NAME) -> list[str]:
    """The URLs of the app's ingress replicas where the cluster runs Serve's direct ingress
    (``runtime.direct_ingress_env``): each answers the whole API itself, without the proxy's
    hop. Empty on a cluster without it."""
    import ray
    from ray.serve.context import _get_global_client

    groups = ray.get(_get_global_client()._controller.get_target_groups.remote(name))
    prefix = cfg.route_prefix.rstrip("/")
    any_host = cfg.host in ("0.0.0.0", "::")
    return [f"http://{target.ip if any_host else cfg.host}:{target.port}{prefix}"
            for group in groups if group.app_name == name and group.protocol == "HTTP"
            for target in group.targets if target.name.startswith("SERVE_REPLICA::")]
