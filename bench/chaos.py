"""Chaos run of the endpoint: a bounded load on 127.0.0.1 while backend replicas are killed.

    python bench/chaos.py runs/demo/models/tiny-dinov2/default --images runs/demo/scene/test \
        --duration 600 --kill-every 120 --shard-replicas 2

Deploys the app on a local Ray cluster (its own), sends frames from ``--concurrency`` clients
(each its own camera stream for a cross-clip recipe) for ``--duration`` seconds, and every
``--kill-every`` seconds SIGKILLs the process of one randomly chosen ScopeShard / DetectorShard
or Embedder replica. Prints requests, answers by status, p50/p95/p99 of the answers, the slowest
failed request, and the longest time without a successful answer. Every request has a timeout,
the run stops by itself, and nothing but 127.0.0.1 is called.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # serve_load, a sibling driver

from serve_load import _free_port, load_images, percentiles, request_fields  # noqa: E402

BACKENDS = ("ScopeShard", "DetectorShard", "Embedder")


def backend_replicas() -> list[str]:
    """Names of the backends' alive replica actors (Serve's namespace)."""
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and any(b in a["name"] for b in BACKENDS)]


def kill_replica(name: str) -> int:
    """SIGKILL a replica's process (it runs on this machine); returns its pid."""
    import ray

    actor = ray.get_actor(name, namespace="serve")
    pid = ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)
    os.kill(pid, signal.SIGKILL)
    return pid


async def client(url: str, images, scope: str, worker: int, stop_at: float, log: list,
                 timeout_s: float) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=timeout_s) as http:
        i = worker
        while time.monotonic() < stop_at:
            name, data = images[i % len(images)]
            sent = time.monotonic()
            try:
                r = await http.post(url + "/v1/detect", files=[("images", (name, data))],
                                    data=request_fields(scope, worker))
                status = r.status_code
            except httpx.HTTPError:
                status = -1  # no answer in time, or the connection broke
            log.append((sent, time.monotonic(), status))
            i += 1
            if status != 200:
                await asyncio.sleep(0.2)  # a client backs off a little after an error


async def killer(every_s: float, stop_at: float, kills: list, seed: int) -> None:
    rng = random.Random(seed)
    while True:
        await asyncio.sleep(every_s)
        if time.monotonic() >= stop_at - 1:
            return
        replicas = await asyncio.to_thread(backend_replicas)
        if not replicas:
            continue
        victim = rng.choice(sorted(replicas))
        try:
            pid = await asyncio.to_thread(kill_replica, victim)
        except Exception as exc:  # noqa: BLE001 - gone already, or not answering: next round
            print(f"# could not kill {victim}: {exc.__class__.__name__}", flush=True)
            continue
        kills.append((time.monotonic(), victim))
        print(f"# killed {victim} (pid {pid})", flush=True)


def summarize(log: list, start: float, end: float, kills: list) -> dict:
    statuses = Counter(s for _, _, s in log)
    ok = sorted(done for _, done, s in log if s == 200)
    marks = [start, *ok, end]
    gap = max(b - a for a, b in zip(marks, marks[1:]))
    failed = [done - sent for sent, done, s in log if s != 200]
    return {"requests": len(log), "by_status": {str(k): v for k, v in sorted(statuses.items())},
            "errors_other_than_503": sum(v for k, v in statuses.items() if k not in (200, 503)),
            **percentiles([1000 * (done - sent) for sent, done, s in log if s == 200]),
            "slowest_failed_s": round(max(failed, default=0.0), 2),
            "longest_gap_without_success_s": round(gap, 2), "kills": len(kills),
            "frames_per_s": round(len(ok) / (end - start), 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--images", required=True, help="folder of frames to send (recursive)")
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    ap.add_argument("--kill-every", type=float, default=120.0, help="seconds between kills")
    ap.add_argument("--shard-replicas", type=int, default=2, help="replicas of each shard")
    ap.add_argument("--embed-replicas", type=int, default=2, help="Embedder replicas")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--replica-cpus", type=float, default=0.25,
                    help="CPUs each backend replica asks for (several fit on a small machine)")
    ap.add_argument("--concurrency", type=int, default=8, help="clients")
    ap.add_argument("--request-timeout", type=float, default=60.0,
                    help="the server's request timeout (s); clients wait 10 s more")
    ap.add_argument("--seed", type=int, default=0, help="which replicas are killed")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args(argv)

    from ray import serve

    from vitad_ray.pipeline.runtime import init_ray
    from vitad_ray.serve.app import ServeConfig, start
    from vitad_ray.storage.modeldir import read_model_json

    kind = read_model_json(args.model_dir).get("recipe", {}).get("kind", "paper")
    scope = "stream" if kind != "paper" else "both"
    images = load_images(args.images, 120)
    init_ray()
    cfg = ServeConfig(model_dir=args.model_dir, shards=args.shards, port=_free_port(),
                      shard_replicas=args.shard_replicas, embed_replicas=args.embed_replicas,
                      request_timeout_s=args.request_timeout, embed_cpus=args.replica_cpus,
                      shard_cpus=args.replica_cpus)
    url = start(cfg)
    print(f"# {args.shards} shard(s) x {args.shard_replicas} replicas, {args.embed_replicas} "
          f"embedder replicas; {args.concurrency} clients for {args.duration:.0f} s, a kill "
          f"every {args.kill_every:.0f} s", flush=True)
    log: list = []
    kills: list = []

    async def warm_up() -> None:  # the first frames trace the backbone: not part of the run
        warm: list = []
        await asyncio.gather(*(client(url, images, scope, w, time.monotonic() + 5, warm,
                                      args.request_timeout + 10) for w in range(2)))

    async def run() -> tuple[float, float]:
        await warm_up()
        start_t = time.monotonic()
        stop_at = start_t + args.duration
        await asyncio.gather(
            killer(args.kill_every, stop_at, kills, args.seed),
            *(client(url, images, scope, w, stop_at, log, args.request_timeout + 10)
              for w in range(args.concurrency)))
        return start_t, time.monotonic()

    try:
        start_t, end_t = asyncio.run(run())
    finally:
        serve.shutdown()
    result = summarize(log, start_t, end_t, kills)
    result.update(shard_replicas=args.shard_replicas, embed_replicas=args.embed_replicas,
                  duration_s=args.duration, kill_every_s=args.kill_every,
                  killed=[name for _, name in kills])
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
