"""Which zoom factor for the perspective views, from the training video alone (no labels).

A memory that covers the scene's normal variation leaves few normal frames of an unseen clip
far from it. For each candidate factor this embeds the zoomed views of every ``--every``-th
training frame (the product's own decode, zoom and backbone), adds them to the appearance
memory, scores every training frame leave-one-clip-out (as ``vitad fit`` does) and prints how
heavy the tail of those scores is: patch distances in standard deviations of all of them (99.9th,
99.99th percentile, largest) and the share of frames whose appearance evidence passes 3. The
lightest tail wins; "none" is the memory without views.

    python bench/zoom_views.py --manifest ../shared/data/ucsd_ped2/manifest.csv \\
        --embeddings runs/ped2/embeddings/dinov2-s14 \\
        --weights ../shared/models/dinov2-small-imgfocus --zooms 1.25,1.5,2 --every 6
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from vitad_ray.data.embeddings import Embeddings, load_embeddings, select_layers
from vitad_ray.data.frames import VIEW_MARK, decode_item, items_from_manifest
from vitad_ray.detect import DEFAULT, Detector
from vitad_ray.detect.aggregate import pool_patches, topk_mean
from vitad_ray.detect.detector import training_frames, view_frames
from vitad_ray.features.backbones import create_backbone


def embed_views(items: list[dict], meta: dict, weights: str, zoom: float, batch: int = 16):
    """The zoomed views of ``items`` as Embeddings of split train@zoom<z>, the backbone and block
    of the embeddings folder."""
    size, layers = int(meta["image_size"]), tuple(meta.get("layers") or ())
    backbone = create_backbone(meta["backbone"], weights, size, layers=layers)
    rows, glob, loc = [], [], []
    for lo in range(0, len(items), batch):
        views = [r for it in items[lo:lo + batch] for r in decode_item(it, (size,), (zoom,))
                 if VIEW_MARK in r["split"]]
        g, p = backbone.embed(np.stack([r[f"pixels_{size}"] for r in views]))
        glob.append(g)
        loc.append(p)
        rows += [{k: r[k] for k in ("frame_id", "clip", "frame_index", "timestamp_s", "split",
                                    "label")} for r in views]
    import pandas as pd

    return Embeddings(pd.DataFrame(rows), np.concatenate(glob), np.concatenate(loc), meta)


def tail(detector: Detector, train, views) -> dict:
    """Leave-one-clip-out appearance scores of the training frames with these views."""
    stacked, clips, _, groups = training_frames(train, detector.recipe)
    extra = detector.view_streams(view_frames(views, clips, detector.recipe)) if views else {}
    est = detector.normality().fit(stacked, groups, *extra.get("appearance", (None, None)))
    d = est.loo_d_[1:]
    z = (d - d.mean()) / d.std()
    frame = topk_mean(pool_patches(d.T, detector.recipe.pool), detector.recipe.top_k)
    frame = (frame - frame.mean()) / frame.std()
    return {"patch_z_p99.9": float(np.percentile(z, 99.9)),
            "patch_z_p99.99": float(np.percentile(z, 99.99)), "patch_z_max": float(z.max()),
            "frames_over_3": float((frame > 3).mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--manifest", required=True)
    p.add_argument("--embeddings", required=True, help="an embeddings folder of the manifest")
    p.add_argument("--weights", required=True)
    p.add_argument("--zooms", default="1.25,1.5,2")
    p.add_argument("--every", type=int, default=6, help="views of every N-th training frame")
    args = p.parse_args(argv)

    recipe = DEFAULT.replace(motion_lags=(), temporal_window=1)
    train = load_embeddings(args.embeddings, splits=["train"])
    layers = recipe.layers_for(int(train.metadata["depth"]))
    if len(train.metadata.get("layers") or []) > 1:
        train = select_layers(train, layers)
    meta = dict(train.metadata, layers=list(layers))
    items = items_from_manifest(args.manifest, splits=["train"])
    items = sorted(items, key=lambda it: (it["clip"], it["frame_index"]))[::args.every]
    detector = Detector(recipe)
    print("| zoom | views | patch z p99.9 | patch z p99.99 | patch z max | frames over 3 | s |")
    print("|---|---|---|---|---|---|---|")
    for zoom in [None] + [float(z) for z in args.zooms.split(",")]:
        t = time.perf_counter()
        views = embed_views(items, meta, args.weights, zoom) if zoom else None
        row = tail(detector, train, views)
        print(f"| {zoom or 'none'} | {0 if views is None else len(views)} | "
              f"{row['patch_z_p99.9']:.2f} | {row['patch_z_p99.99']:.2f} | "
              f"{row['patch_z_max']:.2f} | {row['frames_over_3']:.4f} | "
              f"{time.perf_counter() - t:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
