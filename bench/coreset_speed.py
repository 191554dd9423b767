"""Scoring time with the full training set against a k-center coreset, on real embeddings.

Times the exact nearest-neighbour search of every test frame over every scope (what scoring
costs per frame), alternating full and coreset runs so that both see the same machine load;
prints the median of each and the speed-up.

    python bench/coreset_speed.py runs/ped2/embeddings/dinov2-s14 --fraction 0.25 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from vitad_ray.data.embeddings import load_embeddings
from vitad_ray.pipeline.fit import stack_scopes
from vitad_ray.search.coreset import kcenter_coreset
from vitad_ray.search.knn import knn_stacked


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("embeddings")
    p.add_argument("--fraction", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=64, help="test frames per search call")
    args = p.parse_args(argv)

    train = load_embeddings(args.embeddings, splits=["train"])
    test = load_embeddings(args.embeddings, splits=["test"])
    full = stack_scopes(train.global_, train.local)
    queries = stack_scopes(test.global_, test.local)
    del train, test
    start = time.perf_counter()
    keep = kcenter_coreset(full, round(args.fraction * full.shape[1]))
    select_s = time.perf_counter() - start
    small = np.ascontiguousarray(np.take_along_axis(full, keep[:, :, None], axis=1))

    def search(memory):
        t = time.perf_counter()
        for lo in range(0, queries.shape[1], args.batch):
            knn_stacked(queries[:, lo:lo + args.batch], memory, k=1)
        return time.perf_counter() - t

    times = {"full": [], "coreset": []}
    for _ in range(args.repeats):
        times["full"].append(search(full))
        times["coreset"].append(search(small))
    med = {k: statistics.median(v) for k, v in times.items()}
    n = queries.shape[1]
    print(f"scopes {full.shape[0]}, training vectors per scope {full.shape[1]} -> "
          f"{small.shape[1]} ({args.fraction:.0%}), dim {full.shape[2]}, {n} test frames, "
          f"batches of {args.batch}")
    print(f"k-center selection: {select_s:.1f} s")
    for k in ("full", "coreset"):
        print(f"{k:8s} search: median {med[k]:.1f} s over {args.repeats} runs "
              f"({1000 * med[k] / n:.1f} ms/frame); runs {', '.join(f'{t:.1f}' for t in times[k])}")
    print(f"speed-up: {med['full'] / med['coreset']:.2f}x; memory {full.nbytes / 2**20:.0f} MB -> "
          f"{small.nbytes / 2**20:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
