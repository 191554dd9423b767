"""GPU readiness: the project's GPU paths, run once, in one table. Nothing is downloaded.

    python bench/gpu_check.py --json runs/gpu_check.json   # a CUDA device: about 4 min on one H200
    python bench/gpu_check.py --cpu                        # the same checks, small, on the CPU

1. backbone: ``Backbone.embed`` (upload of uint8 frames, forward, tokens back as float32) at
   224 px, batch 64, fp32 and bf16 autocast, for vit-h14-in21k, dinov2-l14 and ijepa-h14 with
   random weights built from their configs: frames/s, and the share of the device's dense bf16
   peak it reaches. FLOPs per frame are counted by ``torch.utils.flop_counter.FlopCounterMode``
   over one forward pass: 2 per multiply-add of every matrix product, convolution and attention
   product (softmax, norms and other elementwise work not counted).
2. pipeline: ``vitad embed``'s Ray Data pipeline (decode tasks, an Embedder actor pool with one
   GPU per actor) on a generated scene: frames/s end to end, and the share of the wall time the
   backbone was busy (frames / the backbone's own frames/s at the same batch, measured here),
   with nvidia-smi's mean utilisation beside it where nvidia-smi exists.
3. knn: the exact search of a Ped2-sized model (257 scopes x 2,550 training vectors of 384 and
   1,024 dims, synthetic) on the device against the same search on the CPU: share of queries
   with the same nearest row, max |difference| of the distances and of the paper's capped
   confidence min(1, d / loc_dens); frames/s of the paper recipe's search and of the default
   recipe's Detector (appearance and motion streams, pooling, top-k, smoothing) on one stream.
4. serve: the default recipe fitted on the generated scene behind ``vitad serve``'s app with the
   Embedder on the device: a lone frame's p50 and the frames/s of 16 clients over real HTTP.

``--cpu`` runs every check on the CPU with tiny backbones and small sizes; the test suite runs it
so the script cannot rot. Without ``--cpu`` and without a CUDA device it stops with a message.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # serve_load, a sibling driver

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, SXM parts.
BF16_PEAK = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362.05e12,
             "L4": 121e12}


@dataclass(frozen=True)
class Sizes:
    """What each check runs on: the paper's sizes on a device, tiny ones on the CPU."""

    device: str
    backbones: tuple[str, ...]
    batch: int
    timed_calls: int
    pipeline_backbone: str
    scene_clips: tuple[int, int]  # training, test clips of the generated scene
    scene_frames: int
    scopes: int
    train_vectors: int
    dims: tuple[int, ...]
    query_frames: int
    serve_seconds: float


GPU = Sizes("cuda", ("vit-h14-in21k", "dinov2-l14", "ijepa-h14"), 64, 5, "dinov2-l14",
            (6, 2), 96, 257, 2550, (384, 1024), 256, 20.0)
CPU = Sizes("cpu", ("tiny-vit", "tiny-dinov2", "tiny-ijepa"), 4, 2, "tiny-dinov2",
            (4, 1), 16, 17, 200, (64, 128), 24, 3.0)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def bf16_peak(device: str) -> float | None:
    import torch

    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def forward_flops(backbone, frames: np.ndarray) -> float:
    """FLOPs of one forward pass per frame, counted on the model's own operations."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.from_numpy(np.ascontiguousarray(frames[:1])).to(backbone.device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        backbone._tokens(x)
    return float(counter.get_total_flops())


def time_embed(backbone, frames: np.ndarray, calls: int) -> float:
    """Frames/s of ``Backbone.embed`` after a warm-up call."""
    backbone.embed(frames)
    _sync(backbone.device.type)
    start = time.perf_counter()
    for _ in range(calls):
        backbone.embed(frames)
    _sync(backbone.device.type)
    return calls * len(frames) / (time.perf_counter() - start)


def check_backbones(sizes: Sizes, rows: list) -> dict[str, float]:
    """Section 1; returns bf16 frames/s per backbone (the pipeline's reference)."""
    import torch

    from vitad_ray.features.backbones import create_backbone

    peak = bf16_peak(sizes.device)
    frames = np.random.default_rng(0).integers(0, 255, (sizes.batch, 224, 224, 3), np.uint8)
    speeds = {}
    for name in sizes.backbones:
        backbone = create_backbone(name, "random", 224, device=sizes.device, trace=False,
                                   precision="fp32")
        flops = forward_flops(backbone, frames)
        for precision in ("fp32", "bf16"):
            backbone.bf16 = precision == "bf16"
            fps = time_embed(backbone, frames, sizes.timed_calls)
            share = f"{fps * flops / peak:.1%}" if peak else "-"
            rows.append(("backbone", f"{name} {precision} batch {sizes.batch}",
                         f"{fps:.1f} frames/s", f"{flops / 1e9:.3g} GFLOP/frame; "
                                                 f"bf16 peak share {share}"))
            speeds[(name, precision)] = fps
        del backbone
        if sizes.device == "cuda":
            torch.cuda.empty_cache()
    return speeds


class GpuSampler:
    """nvidia-smi's utilisation sampled every 100 ms while the block runs (None: no nvidia-smi)."""

    def __init__(self):
        self.samples: list[float] = []
        self._proc = None

    def __enter__(self):
        exe = shutil.which("nvidia-smi")
        if exe:
            self._proc = subprocess.Popen(
                [exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", "100"], stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self):
        for line in self._proc.stdout:
            try:
                self.samples.append(float(line.split(",")[0]))
            except ValueError:
                pass

    def __exit__(self, *exc):
        if self._proc:
            self._proc.terminate()
            self._proc.wait()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def check_pipeline(sizes: Sizes, work: Path, rows: list) -> tuple[Path, dict]:
    """Section 2; returns the embeddings folder and the scene (for section 4)."""
    from vitad_ray.data.frames import items_from_manifest, items_from_videos
    from vitad_ray.data.synthetic import SceneConfig, generate_scene
    from vitad_ray.detect import DEFAULT
    from vitad_ray.features.backbones import create_backbone, get_spec
    from vitad_ray.pipeline.embed import BackboneChoice, run_embedding
    from vitad_ray.pipeline.runtime import init_ray

    scene = generate_scene(work / "scene", SceneConfig(
        train_clips=sizes.scene_clips[0], test_clips=sizes.scene_clips[1],
        frames_per_clip=sizes.scene_frames, seed=0))
    items = items_from_videos([scene["train_videos"]], "train", label=0, fps=0) + \
        items_from_manifest(scene["test_manifest"])
    name = sizes.pipeline_backbone
    layers = DEFAULT.layers_for(get_spec(name).depth)
    choice = BackboneChoice(name, "random", 224, layers)
    init_ray()
    batch = min(sizes.batch, 32)
    with GpuSampler() as gpu:
        # As `vitad embed` does: the training frames' zoomed views too, which the default
        # recipe fitted in section 4 holds.
        result = run_embedding(items, [choice], work / "embeddings", batch_size=batch,
                               show_progress=False, zooms=DEFAULT.zoom_views)
    expected = sizes.scene_frames * (sum(sizes.scene_clips)
                                     + sizes.scene_clips[0] * len(DEFAULT.zoom_views))
    if result.errors or result.written != expected:
        raise RuntimeError(f"embed pipeline: {result.written} of {expected} frames written, "
                           f"errors {result.errors[:3]}")
    fps = result.written / result.seconds
    backbone = create_backbone(name, "random", 224, device=sizes.device, layers=layers)
    frames = np.random.default_rng(1).integers(0, 255, (batch, 224, 224, 3), np.uint8)
    alone = time_embed(backbone, frames, sizes.timed_calls)
    del backbone
    busy = min(1.0, fps / alone)
    rows.append(("pipeline", f"{name} block {layers or 'last'}, {result.written} frames and "
                             f"views, batch {batch}", f"{fps:.1f} frames/s",
                 f"backbone busy {busy:.0%} of the wall time (alone {alone:.1f} frames/s)"
                 + (f"; nvidia-smi mean {gpu.mean:.0f}%" if gpu.mean is not None else "")))
    return work / "embeddings" / name, scene


def _synthetic_scene_vectors(rng, n_frames: int, scopes: int, dim: int, clips: int):
    """Clustered vectors [frames, scopes, dim] that drift slowly in time, like a video's."""
    centers = rng.normal(0, 1, (scopes, 8, dim)).astype(np.float32)
    which = rng.integers(0, 8, (n_frames, scopes))
    drift = np.cumsum(rng.normal(0, 0.05, (n_frames, scopes, dim)), axis=0).astype(np.float32)
    x = centers[np.arange(scopes)[None, :], which] + drift + \
        rng.normal(0, 0.3, (n_frames, scopes, dim)).astype(np.float32)
    clip = np.repeat(np.arange(clips), -(-n_frames // clips))[:n_frames]
    return x, clip


def check_knn(sizes: Sizes, rows: list) -> None:
    """Section 3."""
    import pandas as pd
    import torch

    from vitad_ray.data.embeddings import Embeddings
    from vitad_ray.detect import DEFAULT, Detector
    from vitad_ray.detect.detector import StreamState
    from vitad_ray.search.knn import knn_stacked

    rng = np.random.default_rng(2)
    patches = sizes.scopes - 1
    for dim in sizes.dims:
        x, clip = _synthetic_scene_vectors(rng, sizes.train_vectors + sizes.query_frames,
                                           sizes.scopes, dim, 16 if sizes.device == "cuda" else 4)
        train = np.ascontiguousarray(x[:sizes.train_vectors].transpose(1, 0, 2))  # [S, N, D]
        queries = np.ascontiguousarray(x[sizes.train_vectors:].transpose(1, 0, 2))  # [S, B, D]
        loc_dens = rng.uniform(0.5, 2.0, train.shape[:2]).astype(np.float32)
        d_dev, nn_dev = knn_stacked(queries, train, k=1, device=sizes.device)
        d_cpu, nn_cpu = knn_stacked(queries, train, k=1, device="cpu")
        conf = [np.minimum(1.0, d[..., 0] / np.take_along_axis(loc_dens, n[..., 0], axis=1))
                for d, n in ((d_dev, nn_dev), (d_cpu, nn_cpu))]
        same = float((nn_dev == nn_cpu).mean())
        rows.append(("knn", f"{sizes.scopes} scopes x {sizes.train_vectors} x {dim}, "
                            f"{sizes.query_frames} frames", f"same nearest {same:.2%}",
                     f"max |d| diff {np.abs(d_dev - d_cpu).max():.2e}, max |confidence| diff "
                     f"{np.abs(conf[0] - conf[1]).max():.2e}"))
        # The paper recipe's exact search: every scope of a batch of frames, one stream.
        train_t = torch.from_numpy(train).to(sizes.device)
        sqnorm = (train_t ** 2).sum(-1)
        knn_stacked(queries, train_t, k=1, train_sqnorm=sqnorm, device=sizes.device)
        _sync(sizes.device)
        start = time.perf_counter()
        knn_stacked(queries, train_t, k=1, train_sqnorm=sqnorm, device=sizes.device)
        _sync(sizes.device)
        paper_fps = sizes.query_frames / (time.perf_counter() - start)
        del train_t, sqnorm
        # The default recipe's Detector: fitted leave-one-clip-out, then one stream in order.
        n = sizes.train_vectors
        ids = pd.DataFrame({"frame_id": [f"{c}/{i}" for i, c in enumerate(clip[:n])],
                            "clip": clip[:n].astype(str), "frame_index": np.arange(n),
                            "timestamp_s": np.zeros(n)})
        emb = Embeddings(ids, x[:n, 0].copy(), x[:n, 1:].copy(), {})
        det = Detector(DEFAULT.replace(image_size=None, block=None, zoom_views=()),
                       device=sizes.device).fit(emb)
        test = x[n:]
        det.score(test[:8, 0], test[:8, 1:], np.arange(8), StreamState())  # warm-up
        _sync(sizes.device)
        start = time.perf_counter()
        det.score(test[:, 0], test[:, 1:], np.arange(len(test)), StreamState())
        _sync(sizes.device)
        default_fps = len(test) / (time.perf_counter() - start)
        rows.append(("knn", f"scoring {dim}-d, {patches} patches", f"paper {paper_fps:.1f} "
                            f"frames/s", f"default recipe {default_fps:.1f} frames/s"))
        del det, emb
        if sizes.device == "cuda":
            torch.cuda.empty_cache()


def check_serve(sizes: Sizes, emb_dir: Path, scene: dict, work: Path, rows: list) -> None:
    """Section 4."""
    from ray import serve
    from serve_load import _sequential, load_images, run_load

    from vitad_ray.detect import DEFAULT
    from vitad_ray.detect.fit import fit_detector_model
    from vitad_ray.serve.app import ServeConfig, start

    model_dir = work / "model"
    fit_detector_model(emb_dir, model_dir, DEFAULT, show_progress=False)
    images = load_images(str(Path(scene["test_manifest"]).parent / "test"), 64)
    cfg = ServeConfig(model_dir=str(model_dir), shards=1, port=_free_port(),
                      use_gpu=sizes.device == "cuda", embed_batch=16, batch_wait_ms=10)
    url = start(cfg)
    try:
        asyncio.run(run_load(url, images, "frame", 2, 2.0, 1, None))  # warm-up
        lone = asyncio.run(_sequential(url, images, "frame", 20, None))
        load = asyncio.run(run_load(url, images, "stream", 16, sizes.serve_seconds, 1, None))
    finally:
        serve.shutdown()
    if lone["errors"] or load["errors"]:
        raise RuntimeError(f"serve: errors {lone['error_samples'] + load['error_samples']}")
    rows.append(("serve", f"default recipe, Embedder on {sizes.device}",
                 f"lone frame p50 {lone['p50']} ms",
                 f"16 clients, a stream each: {load['frames_per_s']} frames/s, "
                 f"p50 {load['p50']} ms, {load['requests']} requests, 0 errors"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def print_table(rows: list, device: str) -> str:
    lines = [f"# gpu_check on {device}", "", "| check | setting | figure | detail |",
             "|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="small sizes on the CPU (what the suite "
                                                       "runs)")
    ap.add_argument("--only", nargs="+", choices=["backbone", "pipeline", "knn", "serve"],
                    help="run these checks only (serve needs pipeline)")
    ap.add_argument("--json", help="write the rows here too")
    ap.add_argument("--work", help="folder for the generated scene and model (default: a "
                                   "temporary one, removed after)")
    args = ap.parse_args(argv)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --cpu for the small CPU check",
              file=sys.stderr)
        return 2
    sizes = CPU if args.cpu else GPU
    device = "CPU" if args.cpu else torch.cuda.get_device_name()
    only = set(args.only or ("backbone", "pipeline", "knn", "serve"))
    if "serve" in only:
        only.add("pipeline")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    rows: list[tuple[str, str, str, str]] = []
    timings = {}
    try:
        for name in ("backbone", "pipeline", "knn", "serve"):
            if name not in only:
                continue
            start = time.perf_counter()
            if name == "backbone":
                check_backbones(sizes, rows)
            elif name == "pipeline":
                emb_dir, scene = check_pipeline(sizes, work, rows)
            elif name == "knn":
                check_knn(sizes, rows)
            else:
                check_serve(sizes, emb_dir, scene, work, rows)
            timings[name] = round(time.perf_counter() - start, 1)
            print(f"# {name} done in {timings[name]} s", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print_table(rows, device)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": device, "seconds": timings,
                                               "rows": [list(r) for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
