"""Normality that learns without a refit, on a labelled scene: the default recipe fitted on the
first N training clips and updated with the others (``Detector.update``, what `vitad update`
runs), against a fit on all of them: the time of each, whether the memories are equal, how far
the training frames' leave-one-clip-out scores and the test frames' scores are apart, and the
test frames' AUROC. One process, one after the other, on the same machine.

    python bench/update.py --embeddings runs/ped2/embeddings/dinov2-s14 --first 8
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from vitad_ray.data.embeddings import load_embeddings, select_layers
from vitad_ray.detect import DEFAULT, Detector
from vitad_ray.detect.offline import score_frames
from vitad_ray.detect.recipe import view_splits
from vitad_ray.evaluation.metrics import auroc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--embeddings", required=True, help="embeddings folder with training views")
    p.add_argument("--first", type=int, default=8, help="training clips of the first fit")
    args = p.parse_args(argv)

    recipe = DEFAULT

    def load(splits):
        emb = load_embeddings(args.embeddings, splits=splits)
        layers = recipe.layers_for(int(emb.metadata["depth"]))
        return select_layers(emb, layers) if len(emb.metadata.get("layers") or []) > 1 else emb

    train, views, test = load(["train"]), load(view_splits(recipe, ["train"])), load(["test"])
    clips = sorted(train.ids["clip"].unique())
    first = set(clips[:args.first])
    in_first = train.ids["clip"].isin(first).to_numpy()
    views_first = views.ids["clip"].isin(first).to_numpy()
    y = test.ids["label"].to_numpy()

    def test_scores(det):
        order, out = score_frames(det, test.ids, test.global_, test.local)
        return out.frame_score[np.argsort(order)]

    t0 = time.perf_counter()
    updated = Detector(recipe).fit(train.select(in_first), views=views.select(views_first))
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    updated.update(train.select(~in_first), views=views.select(~views_first))
    update_s = time.perf_counter() - t0
    s_updated = test_scores(updated)
    memories = {n: np.asarray(e.memory_) for n, e in updated.streams_.items()}
    loo = dict(updated.train_scope_scores_)
    threshold = updated.threshold_
    del updated
    t0 = time.perf_counter()
    full = Detector(recipe).fit(train, views=views)
    full_s = time.perf_counter() - t0
    s_full = test_scores(full)
    same_memory = all(np.array_equal(memories[n], np.asarray(e.memory_))
                      for n, e in full.streams_.items())
    loo_diff = max(float(np.abs(loo[n] - full.train_scope_scores_[n]).max()) for n in loo)
    print(f"training clips: {len(clips)}; first fit on {args.first}, update with "
          f"{len(clips) - args.first}; {len(train)} frames, {len(views)} views; "
          f"{len(test)} test frames")
    print("| | seconds | test AUROC | label-free threshold |")
    print("|---|---|---|---|")
    print(f"| fit on the first {args.first} clips | {first_s:.1f} | | |")
    print(f"| update with the other {len(clips) - args.first} | {update_s:.1f} "
          f"({update_s / full_s:.2f} of the full fit) | {auroc(y, s_updated):.4f} | "
          f"{threshold:.4f} |")
    print(f"| fit on all {len(clips)} | {full_s:.1f} | {auroc(y, s_full):.4f} | "
          f"{full.threshold_:.4f} |")
    print(f"memories equal: {same_memory}; largest difference of the training frames' "
          f"leave-one-clip-out scores {loo_diff:.2e}, of the test frames' scores "
          f"{float(np.abs(s_updated - s_full).max()):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
