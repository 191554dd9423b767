"""The backbone's forward pass at a given batch size: eager against the TorchScript trace.

    python bench/backbone_speed.py dinov2-s14 --weights ../shared/models/dinov2-small-imgfocus

Both run in this one process on the same random frames, alternating call by call, so that a
change in the machine's speed during the run hits both alike. Prints the median and minimum
milliseconds per call of each, the ratio of the medians, and whether the outputs are equal.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("backbone")
    ap.add_argument("--weights")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--calls", type=int, default=30, help="timed calls of each, per batch size")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from vitad_ray.features.backbones import create_backbone

    torch.set_num_threads(args.threads)
    runs = {name: create_backbone(args.backbone, args.weights, args.image_size, trace=trace)
            for name, trace in (("eager", False), ("traced", True))}
    size = runs["eager"].spec.image_size
    rng = np.random.default_rng(0)
    print(f"{args.backbone} at {size}, {args.threads} threads, {args.calls} calls each")
    for batch in args.batch:
        frames = rng.integers(0, 255, (batch, size, size, 3), dtype=np.uint8)
        outs = {name: bb.embed(frames) for name, bb in runs.items()}  # traced here: not timed
        equal = all(np.array_equal(a, b) for a, b in zip(outs["eager"], outs["traced"]))
        ms: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.calls):
            for name, bb in runs.items():
                start = time.perf_counter()
                bb.embed(frames)
                ms[name].append(1000 * (time.perf_counter() - start))
        med = {name: float(np.median(v)) for name, v in ms.items()}
        print(f"batch {batch:>3}: " + ", ".join(
            f"{name} p50 {med[name]:.1f} ms (min {min(ms[name]):.1f})" for name in runs)
            + f"; eager / traced {med['eager'] / med['traced']:.2f}x; outputs equal: {equal}"
            + ("" if runs["traced"].trace else f" (trace off: {runs['traced'].trace_error_})"))


if __name__ == "__main__":
    main()
