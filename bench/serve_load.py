"""Load test of the detection endpoint: concurrent clients over real HTTP for N seconds.

For each shard count it deploys the Serve app on a local Ray cluster (or uses --url), then per
request scope (both = global + local, global; for a cross-clip recipe's model: stream = each
client its own camera stream, its frames in order, or frame = no stream, appearance alone):
  latency: one client, one frame per request, sequential -> p50/p95/p99 of a lone frame;
  load:    --concurrency clients for --duration seconds -> requests/s, frames/s, p50/p95/p99,
           errors (any non-200 or transport failure).
It also measures offline batched scoring of the same frames in this process (the backbone and
ModelScorer over batches, no HTTP, no Ray) as the reference the endpoint is compared with.

    python bench/serve_load.py runs/ped2/models/dinov2-s14 \
        --images ../shared/data/ucsd_ped2/frames/test --shards 1 2 --duration 60
"""

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_images(root: str, limit: int) -> list[tuple[str, bytes]]:
    paths = sorted(p for p in Path(root).rglob("*")
                   if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".bmp"))
    if not paths:
        sys.exit(f"no images under {root}")
    step = max(1, len(paths) // limit)
    return [(p.name, p.read_bytes()) for p in paths[::step][:limit]]


def percentiles(ms: list[float]) -> dict:
    if not ms:
        return {"p50": None, "p95": None, "p99": None}
    a = np.asarray(ms)
    return {f"p{q}": round(float(np.percentile(a, q)), 1) for q in (50, 95, 99)}


def request_fields(scope: str, client: int = 0) -> dict:
    """The form fields of a request in this scope: a stream per client for ``stream``."""
    if scope == "stream":
        return {"stream": f"client-{client}"}
    return {} if scope == "frame" else {"scope": scope}


async def _client(client, url, images, scope, per_request, stop_at, stats, offset):
    import httpx

    i = offset
    step = 1 if scope == "stream" else 7  # a stream's frames follow each other
    while time.monotonic() < stop_at:
        batch = [images[(i + j) % len(images)] for j in range(per_request)]
        i += per_request * step
        files = [("images", (name, data, "application/octet-stream")) for name, data in batch]
        start = time.perf_counter()
        try:
            r = await client.post(url, files=files, data=request_fields(scope, offset))
            ok = r.status_code == 200
            if not ok:
                stats["error_samples"].append(f"{r.status_code}: {r.text[:200]}")
        except httpx.HTTPError as exc:
            ok = False
            stats["error_samples"].append(repr(exc)[:200])
        elapsed = 1000 * (time.perf_counter() - start)
        if ok:
            stats["latency_ms"].append(elapsed)
            stats["frames"] += per_request
        else:
            stats["errors"] += 1
        stats["requests"] += 1


async def run_load(url: str, images, scope: str, concurrency: int, duration: float,
                   per_request: int, token: str | None) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    stats = {"requests": 0, "frames": 0, "errors": 0, "latency_ms": [], "error_samples": []}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, headers=headers, limits=limits) as client:
        start = time.monotonic()
        stop_at = start + duration
        await asyncio.gather(*(_client(client, url + "/v1/detect", images, scope, per_request,
                                       stop_at, stats, k) for k in range(concurrency)))
        wall = time.monotonic() - start
    return {"scope": scope, "concurrency": concurrency, "seconds": round(wall, 1),
            "requests": stats["requests"], "errors": stats["errors"],
            "requests_per_s": round(stats["requests"] / wall, 2),
            "frames_per_s": round(stats["frames"] / wall, 2),
            **percentiles(stats["latency_ms"]), "error_samples": stats["error_samples"][:5]}


def offline_reference(model_dir: str, weights: str | None, images, batch: int) -> dict:
    """Frames/s of in-process batched decode + embed + score (both scopes, then global only;
    a cross-clip recipe's Detector on the frames as one stream)."""
    import torch

    from vitad_ray.detect import StreamState
    from vitad_ray.detect.model import load_model
    from vitad_ray.features.backbones import create_backbone
    from vitad_ray.pipeline.score import ModelScorer
    from vitad_ray.serve.api import ImageInput, Limits, decode_image
    from vitad_ray.serve.app import model_layers
    from vitad_ray.storage.modeldir import read_model_json
    from vitad_ray.storage.store import GLOBAL

    torch.set_num_threads(os.cpu_count() or 1)
    doc = read_model_json(model_dir)
    emb = doc["embeddings"]
    backbone = create_backbone(doc["backbone"], weights or emb["weights"], emb["image_size"],
                               layers=model_layers(doc))
    crossclip = doc.get("recipe", {}).get("kind", "paper") != "paper"
    out = {}
    for scope, scopes in ((("stream", None),) if crossclip else
                          (("both", None), ("global", [GLOBAL]))):
        if crossclip:
            detector, state, seen = load_model(model_dir), StreamState(), [0]

            def score(g, l):
                index = np.arange(seen[0], seen[0] + len(g))
                seen[0] += len(g)
                detector.score(g, l, index, state)
        else:
            scorer = ModelScorer(model_dir, index="exact", scopes=scopes, hdbscan=False)

            def score(g, l):
                scorer.score(g, l, ("kmeans",))
        frames = [decode_image(ImageInput(n, d), emb["image_size"], Limits()) for n, d in images]
        backbone.embed(np.stack(frames[:2]))  # warm-up
        start = time.perf_counter()
        embed_s = 0.0
        for lo in range(0, len(images), batch):
            chunk = [decode_image(ImageInput(n, d), emb["image_size"], Limits())
                     for n, d in images[lo:lo + batch]]
            t0 = time.perf_counter()
            g, l = backbone.embed(np.stack(chunk))
            embed_s += time.perf_counter() - t0
            score(g, l)
        wall = time.perf_counter() - start
        out[scope] = {"frames_per_s": round(len(images) / wall, 2),
                      "score_only_frames_per_s": round(len(images) / max(1e-9, wall - embed_s), 1)}
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--images", required=True, help="folder of frames to send (recursive)")
    ap.add_argument("--max-images", type=int, default=120)
    ap.add_argument("--weights", help="backbone weights (default: the ones model.json names)")
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--scopes", nargs="+", choices=["both", "global", "local", "stream", "frame"],
                    help="request kinds (default: both and global for a paper model, stream and "
                         "frame for a cross-clip recipe's)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load per phase")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--per-request", type=int, default=1, help="frames per request")
    ap.add_argument("--latency-requests", type=int, default=30)
    ap.add_argument("--embed-batch", type=int, default=8)
    ap.add_argument("--batch-wait-ms", type=float, default=50.0)
    ap.add_argument("--embed-threads", type=int, default=2)
    ap.add_argument("--shard-threads", type=int, default=2)
    ap.add_argument("--no-trace", action="store_true",
                    help="the embedder runs the backbone eagerly (no TorchScript trace)")
    ap.add_argument("--by-reference", action="store_true",
                    help="calls between replicas through Ray object references, not by value")
    ap.add_argument("--no-projected-search", action="store_true",
                    help="shards search every training vector (no certified projection bound)")
    ap.add_argument("--compute-niceness", default="0",
                    help="niceness of the app's replicas ('none': Ray's 15)")
    ap.add_argument("--direct-port", type=int,
                    help="the local cluster runs Serve's direct ingress from this port up and the "
                         "clients call the ingress replica there instead of the proxy")
    ap.add_argument("--offline-batch", type=int, default=16)
    ap.add_argument("--no-offline", action="store_true")
    ap.add_argument("--url", help="an already running endpoint (skips deploying)")
    ap.add_argument("--token", default=os.environ.get("VITAD_SERVE_TOKEN"))
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()

    from vitad_ray.storage.modeldir import read_model_json

    if args.scopes is None:
        kind = read_model_json(args.model_dir).get("recipe", {}).get("kind", "paper")
        args.scopes = ["both", "global"] if kind == "paper" else ["stream", "frame"]
    images = load_images(args.images, args.max_images)
    print(f"{len(images)} frames from {args.images}", flush=True)
    rows = []
    if not args.no_offline:
        ref = offline_reference(args.model_dir, args.weights, images, args.offline_batch)
        print(f"offline batched decode+embed+score (in-process, batch {args.offline_batch}): "
              + ", ".join(f"{s}: {v['frames_per_s']} frames/s (scoring alone "
                          f"{v['score_only_frames_per_s']})" for s, v in ref.items()), flush=True)
        rows.append({"phase": "offline", **ref})

    from ray import serve

    from vitad_ray.pipeline.runtime import init_ray
    from vitad_ray.serve.app import ServeConfig, direct_urls, start

    header = (f"{'shards':>6} {'scope':>6} {'phase':>8} {'conc':>4} {'req/s':>7} {'frames/s':>8} "
              f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'errors':>6}")
    print(header, flush=True)
    for n_shards in ([None] if args.url else args.shards):
        if args.url:
            url = args.url
        else:
            init_ray(direct_ingress_port=args.direct_port)
            cfg = ServeConfig(model_dir=args.model_dir, weights=args.weights, shards=n_shards,
                              port=_free_port(), token=args.token, embed_batch=args.embed_batch,
                              batch_wait_ms=args.batch_wait_ms, embed_threads=args.embed_threads,
                              shard_threads=args.shard_threads, embed_trace=not args.no_trace,
                              projected_search=not args.no_projected_search,
                              by_value=not args.by_reference,
                              compute_niceness=None if args.compute_niceness == "none"
                              else int(args.compute_niceness),
                              max_images=max(32, args.per_request))
            t0 = time.perf_counter()
            url = start(cfg)
            print(f"# {n_shards} shard(s) deployed in {time.perf_counter() - t0:.0f} s", flush=True)
            if args.direct_port:
                direct = direct_urls(cfg)
                if not direct:
                    sys.exit("--direct-port: the cluster runs no direct ingress (was one already "
                             "running?)")
                url = direct[0]
                print(f"# clients call the ingress replica at {url} (direct ingress)", flush=True)
        for scope in args.scopes:
            asyncio.run(run_load(url, images, scope, 2, 5, 1, args.token))  # warm-up
            for phase, conc, duration in (("latency", 1, None), ("load", args.concurrency,
                                                                   args.duration)):
                if phase == "latency":
                    res = asyncio.run(_sequential(url, images, scope, args.latency_requests,
                                                  args.token))
                else:
                    res = asyncio.run(run_load(url, images, scope, conc, duration,
                                               args.per_request, args.token))
                res.update(phase=phase, shards=n_shards)
                rows.append(res)
                print(f"{str(n_shards):>6} {scope:>6} {phase:>8} {conc:>4} "
                      f"{res['requests_per_s']:>7} {res['frames_per_s']:>8} {res['p50']:>7} "
                      f"{res['p95']:>7} {res['p99']:>7} {res['errors']:>6}", flush=True)
                if res.get("median_ms"):
                    print("    lone frame, server-side medians (ms): " + ", ".join(
                        f"{k} {v}" for k, v in res["median_ms"].items()), flush=True)
                for sample in res["error_samples"]:
                    print(f"    error: {sample}", flush=True)
        if not args.url:
            serve.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.json}")


async def _sequential(url, images, scope, n, token) -> dict:
    """One client, one frame at a time: the latency of a lone frame."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    ms, errors, samples = [], 0, []
    parts = {"receive": [], "decode": [], "embed": [], "score": [], "server": []}  # where a
    # lone frame's time goes: request parsing, image decoding, backbone, search, whole handler
    async with httpx.AsyncClient(timeout=120, headers=headers) as client:
        start = time.monotonic()
        for i in range(n):
            name, data = images[(i * 5) % len(images)]
            t0 = time.perf_counter()
            r = await client.post(url + "/v1/detect", files=[("images", (name, data))],
                                  data=request_fields(scope))
            if r.status_code == 200:
                ms.append(1000 * (time.perf_counter() - t0))
                body = r.json()
                timing = body["results"][0]["timings_ms"]
                for key in ("receive", "decode", "embed", "score"):
                    parts[key].append(timing[key])
                parts["server"].append(body["timings_ms"]["total"])
            else:
                errors += 1
                samples.append(f"{r.status_code}: {r.text[:200]}")
        wall = time.monotonic() - start
    return {"scope": scope, "concurrency": 1, "seconds": round(wall, 1), "requests": n,
            "errors": errors, "requests_per_s": round(n / wall, 2),
            "frames_per_s": round(len(ms) / wall, 2), **percentiles(ms), "error_samples": samples,
            "median_ms": {k: round(float(np.median(v)), 1) for k, v in parts.items() if v}}


if __name__ == "__main__":
    main()
