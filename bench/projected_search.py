"""Lone-frame exact search: the full pass over every training vector against the certified
projected search (knn.ProjectedSearch), on a fitted model and its test embeddings.

    python bench/projected_search.py runs/ped2/models/dinov2-s14 runs/ped2/embeddings/dinov2-s14

Prints the build time, the median and minimum search time per frame (all scopes, k = 1), the
share of answers certified in the first round, in the second, or searched in full, and whether
the nearest rows equal the full search's on every frame timed.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("embeddings")
    ap.add_argument("--frames", type=int, default=20, help="test frames, one at a time")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 96, 128])
    ap.add_argument("--spare", type=int, default=32)
    args = ap.parse_args()

    import torch

    from vitad_ray.data.embeddings import load_embeddings
    from vitad_ray.pipeline.fit import stack_scopes
    from vitad_ray.pipeline.score import ModelScorer
    from vitad_ray.search.knn import ProjectedSearch, knn_stacked

    torch.set_num_threads(args.threads)
    test = load_embeddings(args.embeddings, splits=["test"])
    scorer = ModelScorer(args.model_dir, index="exact", hdbscan=False)
    queries = stack_scopes(test.global_, test.local)  # [S, M, D]
    picks = [(i * 97) % len(test) for i in range(args.frames)]
    s, n, d = scorer.train_.shape
    print(f"{s} scopes x {n} training vectors x {d} dims ({scorer.train_.numel() * 4 / 2**30:.2f} "
          f"GB), {len(picks)} test frames one at a time, {args.threads} threads")

    def timed(search):
        times, rows = [], []
        for j in picks:
            q = np.ascontiguousarray(queries[:, j:j + 1])
            t0 = time.perf_counter()
            rows.append(search(q)[1])
            times.append(1000 * (time.perf_counter() - t0))
        return np.median(times), min(times), rows

    def full(q):
        return knn_stacked(q, scorer.train_, k=1, train_sqnorm=scorer.train_sqnorm_)

    med, low, want = timed(full)
    print(f"full search: median {med:.1f} ms, min {low:.1f} ms")
    for dims in args.dims:
        t0 = time.perf_counter()
        index = ProjectedSearch(scorer.train_, dims=dims, spare=args.spare)
        build = time.perf_counter() - t0
        med, low, got = timed(partial(index.search, k=1))
        total = index.certified_ + index.second_round_ + index.fallback_
        same = all(np.array_equal(a, b) for a, b in zip(got, want))
        print(f"projected dims {dims}, {args.spare} spare: build {build:.1f} s, median {med:.1f} "
              f"ms, min {low:.1f} ms; certified first/second round/full search "
              f"{index.certified_ / total:.3f}/{index.second_round_ / total:.3f}/"
              f"{index.fallback_ / total:.4f}; same rows as the full search: {same}")
        del index
    med, low, _ = timed(full)
    print(f"full search again: median {med:.1f} ms, min {low:.1f} ms")


if __name__ == "__main__":
    main()
