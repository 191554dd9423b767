"""Scoring throughput on 1 node vs 2 nodes (1 CPU each), on raylets started by cluster/local.

    python bench/scale.py MODEL_DIR EMB_DIR [--frames 1024] [--batch-size 128]

For each cluster size, one scorer actor per node (SPREAD) loads the model, then the frames are
split evenly and scored in parallel; the time counted is the scoring, after every actor has
loaded (loading is a one-off cost per replica). Prints frames/s for each size and the ratio.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class Scorer:
    def __init__(self, model_dir: str):
        import torch

        from vitad_ray.pipeline.score import ModelScorer

        torch.set_num_threads(1)
        self.scorer = ModelScorer(model_dir, index="exact", hdbscan=False)

    def ready(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def score(self, global_, local, batch_size: int) -> int:
        for lo in range(0, len(global_), batch_size):
            self.scorer.score(global_[lo:lo + batch_size], local[lo:lo + batch_size],
                              methods=("kmeans",))
        return len(global_)


def run_size(nodes: int, model: str, g, loc, batch_size: int) -> tuple[float, int]:
    import ray

    state = tempfile.mkdtemp(prefix="vscale-")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", NODE_CPUS="1",
               NODE_MEMORY=str(8 * 2**30), NODE_OBJECT_STORE=str(2**30),
               RAY_BIN=str(Path(sys.executable).with_name("ray")))
    subprocess.run(["bash", str(REPO / "cluster/local/start.sh"), str(nodes - 1), state],
                   env=env, check=True, capture_output=True)
    try:
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(address=Path(state, "address").read_text().strip(), logging_level="ERROR")
        actor = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(Scorer)
        actors = [actor.remote(model) for _ in range(nodes)]
        used = set(ray.get([a.ready.remote() for a in actors]))
        shares = np.array_split(np.arange(len(g)), nodes)
        ray.get([a.score.remote(g[:8], loc[:8], batch_size) for a in actors])  # warm-up
        start = time.perf_counter()
        done = ray.get([a.score.remote(g[s], loc[s], batch_size) for a, s in zip(actors, shares)])
        secs = time.perf_counter() - start
        return sum(done) / secs, len(used)
    finally:
        ray.shutdown()
        subprocess.run(["bash", str(REPO / "cluster/local/stop.sh"), state], env=env,
                       capture_output=True)


def main() -> None:
    from vitad_ray.data.embeddings import load_embeddings

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("embeddings")
    ap.add_argument("--split", default="test")
    ap.add_argument("--frames", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    emb = load_embeddings(args.embeddings, splits=[args.split])
    n = min(args.frames, len(emb))
    g, loc = emb.global_[:n], emb.local[:n]
    results = {}
    for nodes in (1, 2):
        fps, used = run_size(nodes, str(Path(args.model).resolve()), g, loc, args.batch_size)
        results[nodes] = fps
        print(f"{nodes} node(s) x 1 CPU ({used} used): {fps:,.1f} frames/s "
              f"(local + global k-Means, exact index, {n} frames)", flush=True)
    print(f"2 nodes / 1 node: {results[2] / results[1]:.2f}x")


if __name__ == "__main__":
    main()
