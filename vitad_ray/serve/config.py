"""Everything a deployment of the endpoint can be told, and its defaults: the one definition
the app, `vitad serve`'s flags and config files read (no Ray or web imports)."""

import dataclasses
import json
import re
from dataclasses import dataclass, field

from .api import Limits

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class ServeConfig:
    """Everything a deployment of the endpoint can be told. Strings are accepted for every field
    (``serve run ... key=value`` passes strings)."""

    model_dir: str | None = None      # one model; or several in ``models``
    # Several scene models behind one endpoint: {name: model directory}. A request names its
    # model (``model``), or its stream does through ``streams``; with one model it is implied.
    models: dict = field(default_factory=dict)
    streams: dict = field(default_factory=dict)  # {stream: model name}
    # Each shard replica keeps the scene models it was last asked for and drops the least
    # recently used past this memory (its share of the model directories), or past
    # ``models_per_replica``; by default every model fits. Requests for a model go to the
    # replicas that hold it (Serve's model multiplexing).
    model_memory_mb: float | None = None
    models_per_replica: int | None = None
    # Frames ``POST /v1/streams/{id}/normal`` may queue in a model directory before
    # `vitad update MODEL --feedback` applies them (429 past it).
    feedback_max_frames: int = 10_000
    weights: str | None = None        # default: the weights model.json names
    shards: int | None = None         # ScopeShard deployments; default: the model's store shards
    index: str = "exact"              # exact (in-memory matmul) | chroma (HNSW queries)
    embed_replicas: int = 1
    shard_replicas: int = 1
    ingress_replicas: int = 1
    embed_batch: int = 16
    shard_batch: int = 32
    batch_wait_ms: float = 10.0       # the ingress gathering frames of concurrent requests
    backend_wait_ms: float = 0.0      # embedder and shards: calls arrive batched already
    embed_threads: int = 2
    # The forward pass through a TorchScript trace on CPU (Backbone's trace): same numbers, less
    # Python per call.
    embed_trace: bool = True
    # Two: while a frame is searched the embedder has finished with it, so a lone frame's
    # search has the cores to itself; under load the two share them (docs/benchmarks.md).
    shard_threads: int = 2
    # Shards search a lone frame's neighbours through a projection bound, certified exact
    # (knn.ProjectedSearch): answers equal to the full search, about a sixth of its memory
    # traffic.
    projected_search: bool = True
    # Ingress -> embedder -> shard calls by value over Serve's gRPC between replicas (the
    # handles' _by_reference=False, Ray 2.60), not through the object store: fewer round trips
    # per lone frame on one machine (docs/benchmarks.md). Each shard then receives the whole
    # embedding (S copies per frame).
    by_value: bool = True
    # Ray starts workers at niceness 15, under its own daemons; the embedder's two threads then
    # lose their cores to any of them and the forward pass waits for the slower thread, and the
    # ingress (parsing, decoding, every hop of a request) waits behind them too. The app's
    # replicas run at this niceness instead (None: Ray's default).
    compute_niceness: int | None = 0
    max_message_bytes: int = 512 << 20  # one call between replicas (by value)
    embed_cpus: float = 0.5
    shard_cpus: float = 0.5
    ingress_cpus: float = 0.25
    use_gpu: bool | None = None       # default: when the cluster has a GPU
    thresholds: dict = field(default_factory=dict)  # {"kmeans": {"global": t, "patch": t}, ...}
    token: str | None = None          # default: $VITAD_SERVE_TOKEN; none = no auth
    max_images: int = 32
    max_image_bytes: int = 8 << 20
    # Stream state (cross-clip recipes): how many streams an ingress replica remembers, and for
    # how long a stream without a frame is kept.
    max_streams: int = 1024
    stream_idle_s: float = 300.0
    request_timeout_s: float = 60.0
    # A request body that stops arriving (shorter than its Content-Length, a stalled chunked
    # upload) is answered 408 after this long without a byte, rather than holding its
    # connection and ingress slot until the client gives up.
    body_timeout_s: float = 10.0
    # How often Serve checks a backend replica: a dead one is noticed (its requests answered
    # 503, a successor started) within this, where Serve's default is 10 s.
    health_check_s: float = 0.5
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    # One HTTP proxy, on the head node: several raylets on one machine cannot all bind the same
    # 127.0.0.1 port. "EveryNode" suits a real cluster with a load balancer in front.
    proxy_location: str = "HeadOnly"

    @classmethod
    def from_args(cls, args: dict) -> "ServeConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ValueError(f"unknown serve settings {unknown}; known: {sorted(known)}")
        values = {}
        for name, value in args.items():
            hint = known[name].type
            kind = hint.__name__ if isinstance(hint, type) else str(hint)
            if isinstance(value, str):
                if value.lower() in ("", "none", "null"):
                    value = None
                elif kind.startswith("int"):
                    value = int(value)
                elif kind.startswith("float"):
                    value = float(value)
                elif kind.startswith("bool"):
                    value = value.lower() in ("1", "true", "yes")
                elif kind == "dict":
                    value = json.loads(value)
            values[name] = value
        return cls(**values)

    def catalog(self) -> dict[str, str]:
        """{model name: directory} of the models served: ``models``, or ``model_dir`` alone
        (named after its folder)."""
        from pathlib import PurePath

        if self.model_dir and self.models:
            raise ValueError("give model_dir or models, not both")
        if self.model_dir:
            return {PurePath(self.model_dir).name or "model": self.model_dir}
        if not self.models:
            raise ValueError("no model: give model_dir or models")
        for name in self.models:
            if not MODEL_NAME.fullmatch(str(name)):
                raise ValueError(f"model name {name!r}: 1 to 64 letters, digits, '.', '_', '-'")
        unknown = {s: m for s, m in self.streams.items() if m not in self.models}
        if unknown:
            raise ValueError(f"streams map to models not served: {unknown}")
        return {str(k): str(v) for k, v in self.models.items()}

    @property
    def limits(self) -> Limits:
        return Limits(max_images=self.max_images, max_image_bytes=self.max_image_bytes)


def serve_default(name: str):
    """ServeConfig's default for ``name``."""
    f = next(f for f in dataclasses.fields(ServeConfig) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
