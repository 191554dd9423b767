"""Many scene models behind one endpoint: requests/s and latency with 1, 4, 16 ... models at one
memory bound per shard replica, and the cost of a cold model load.

Each count serves that many names for the same fitted model directory (each name is loaded on
its own, as a different camera's model would be), with ``--model-memory-mb`` per shard replica.
Then, over real HTTP:
  cold:  the first frame of each of the first ``--cold`` models (a load on the shard replicas)
         and right after it a second frame (resident): the difference is the load's cost;
  load:  ``--concurrency`` clients for ``--duration`` seconds, each request naming the next
         model in turn -> requests/s, p50/p95, errors. Where more models are asked for than the
         bound holds, requests also pay for loads (the replicas' LRU).

    python bench/multi_model.py runs/demo_check/models/tiny-dinov2/default \
        --images runs/demo_check/scene/test --models 1 4 16 --model-memory-mb 120
"""

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import _free_port, load_images, percentiles  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


async def _client(url, images, names, offset, stop_at, stats):
    import httpx

    i = offset
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        while time.monotonic() < stop_at:
            name, data = images[(7 * i) % len(images)]
            t0 = time.perf_counter()
            try:
                r = await http.post("/v1/detect", files=[("images", (name, data, "image/png"))],
                                    data={"model": names[i % len(names)]})
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            stats["ms" if ok else "errors"].append(1000 * (time.perf_counter() - t0))
            i += 1


async def run_load(url, images, names, concurrency, duration) -> dict:
    stats = {"ms": [], "errors": []}
    stop_at = time.monotonic() + duration
    start = time.perf_counter()
    await asyncio.gather(*(_client(url, images, names, c * 5, stop_at, stats)
                           for c in range(concurrency)))
    wall = time.perf_counter() - start
    return {"requests_per_s": round(len(stats["ms"]) / wall, 2), **percentiles(stats["ms"]),
            "requests": len(stats["ms"]), "errors": len(stats["errors"])}


def cold_loads(url, images, names, n) -> dict:
    import httpx

    cold, warm = [], []
    with httpx.Client(base_url=url, timeout=300) as http:
        for name in names[:n]:
            for into in (cold, warm):
                t0 = time.perf_counter()
                r = http.post("/v1/detect", files=[("images", images[0])], data={"model": name})
                r.raise_for_status()
                into.append(1000 * (time.perf_counter() - t0))
    return {"models": len(cold), "cold_p50_ms": round(float(np.median(cold)), 1),
            "warm_p50_ms": round(float(np.median(warm)), 1),
            "load_cost_ms": round(float(np.median(np.subtract(cold, warm))), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--images", required=True, help="folder of frames to send (recursive)")
    ap.add_argument("--max-images", type=int, default=60)
    ap.add_argument("--models", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--model-memory-mb", type=float, required=True,
                    help="the bound per shard replica, the same for every count")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--cold", type=int, default=4, help="models whose first load is timed")
    ap.add_argument("--weights")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()

    import ray
    from ray import serve

    from vitad_ray.pipeline.runtime import init_ray
    from vitad_ray.serve.app import (ServeConfig, model_bytes, models_per_replica, start,
                                     wait_until_running)

    images = load_images(args.images, args.max_images)
    init_ray(temp_dir=tempfile.mkdtemp(prefix="vitad-bench-"))
    aliases = Path(tempfile.mkdtemp(prefix="vitad-models-"))
    model = Path(args.model_dir).resolve()
    print(f"model {model}: {model_bytes(str(model)) / 2**20:.1f} MiB on disk; bound "
          f"{args.model_memory_mb:g} MiB per shard replica, {args.shards} shard(s)")
    rows = []
    for count in args.models:
        names = [f"cam{i:02d}" for i in range(count)]
        for name in names:
            if not (aliases / name).exists():
                (aliases / name).symlink_to(model, target_is_directory=True)
        cfg = ServeConfig(models={n: str(aliases / n) for n in names}, weights=args.weights,
                          shards=args.shards, model_memory_mb=args.model_memory_mb,
                          port=_free_port(), batch_wait_ms=20, embed_batch=8)
        held = models_per_replica(cfg, cfg.catalog(), args.shards)
        url = start(cfg)
        down = wait_until_running(timeout_s=600)
        if down:
            sys.exit(f"not running after 600 s: {down}")
        cold = cold_loads(url, images, names, min(args.cold, count))
        load = asyncio.run(run_load(url, images, names, args.concurrency, args.duration))
        row = {"models": count, "held_per_replica": held, **load, "cold": cold}
        rows.append(row)
        print(json.dumps(row))
        serve.shutdown()
    print(f"\n| scene models | held per shard replica | requests/s | p50 ms | p95 ms | errors "
          f"| cold load (ms, median of {args.cold}) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['models']} | {r['held_per_replica']} | {r['requests_per_s']} | {r['p50']} | "
              f"{r['p95']} | {r['errors']} | {r['cold']['load_cost_ms']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
