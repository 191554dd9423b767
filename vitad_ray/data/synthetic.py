"""A small fixed-camera scene, generated: walkers on a path across a lawn.

Normal: 1-3 walkers moving along the path. Anomalous: an intruder walking across the grass, or a
foreign object (a red cart) rolling along the path. Training clips are written as MP4 videos
(decoded again through PyAV like any camera recording); test clips as PNG folders with a
manifest carrying frame labels.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WIDTH, HEIGHT = 240, 160
PATH_TOP, PATH_BOTTOM = 70, 100


def _background(rng: np.random.Generator) -> np.ndarray:
    img = np.zeros((HEIGHT, WIDTH, 3), np.float32)
    img[:] = (70, 130, 60)
    img += rng.normal(0, 12, (HEIGHT, WIDTH, 1))  # grass texture, fixed for the camera
    img[PATH_TOP:PATH_BOTTOM] = (150, 145, 140)
    img[PATH_TOP:PATH_BOTTOM] += rng.normal(0, 5, (PATH_BOTTOM - PATH_TOP, WIDTH, 1))
    img[20:45, 30:40] = (90, 60, 30)  # a tree trunk and crown: fixed landmarks
    img[5:25, 20:50] = (40, 100, 40)
    img[110:118, 170:210] = (120, 80, 50)  # a bench
    return img


def _walker(img: np.ndarray, x: float, y: float, colour, scale: float = 1.0) -> None:
    yy, xx = np.ogrid[:HEIGHT, :WIDTH]
    body = ((xx - x) / (4.0 * scale)) ** 2 + ((yy - y) / (9.0 * scale)) ** 2 <= 1.0
    head = (xx - x) ** 2 + (yy - (y - 12 * scale)) ** 2 <= 9.0 * scale ** 2
    img[body | head] = colour


def _cart(img: np.ndarray, x: float, y: float) -> None:
    x0, y0 = int(x) - 20, int(y) - 16
    img[max(0, y0):y0 + 26, max(0, x0):max(0, x0 + 40)] = (220, 40, 30)
    img[max(0, y0 + 4):y0 + 12, max(0, x0 + 4):max(0, x0 + 36)] = (240, 240, 240)


@dataclass
class SceneConfig:
    train_clips: int = 6
    test_clips: int = 4
    frames_per_clip: int = 48
    video_fps: float = 8.0
    seed: int = 0


def render_clip(bg: np.ndarray, n_frames: int, rng: np.random.Generator,
                anomaly: str | None = None, start: int = 0) -> tuple[list[np.ndarray], list[int]]:
    n_walkers = int(rng.integers(1, 4))
    walkers = [(rng.uniform(0, WIDTH), rng.uniform(PATH_TOP + 10, PATH_BOTTOM - 2),
                rng.choice([-1, 1]) * rng.uniform(2.0, 4.0), rng.uniform(20, 60))
               for _ in range(n_walkers)]
    frames, labels = [], []
    for t in range(n_frames):
        img = bg.copy()
        for x, y, vx, shade in walkers:
            _walker(img, (x + vx * t) % WIDTH, y, (shade, shade * 0.9, shade * 1.1))
        anomalous = anomaly is not None and t >= start
        if anomalous and anomaly == "intruder":
            # A person in a high-visibility vest crossing the lawn, off the path.
            _walker(img, 120 + 2.0 * (t - start), 20 + (2.0 * (t - start)) % 45, (230, 160, 30),
                    scale=1.4)
        elif anomalous and anomaly == "cart":
            _cart(img, (5 + 4.0 * (t - start)) % WIDTH, (PATH_TOP + PATH_BOTTOM) / 2)
        img += rng.normal(0, 3, img.shape)  # sensor noise
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
        labels.append(int(anomalous))
    return frames, labels


def write_video(path: Path, frames: list[np.ndarray], fps: float) -> None:
    from fractions import Fraction

    import av

    with av.open(str(path), "w") as container:
        # Lossless H.264 (RGB): training and test frames must differ in content only, not in
        # codec artefacts, or every test patch would look novel.
        stream = container.add_stream("libx264rgb", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "rgb24"
        stream.options = {"crf": "0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def generate_scene(out_dir: str | Path, cfg: SceneConfig | None = None) -> dict:
    """Writes train/*.mp4, test/<clip>/*.png and test_manifest.csv; returns their paths."""
    from PIL import Image

    cfg = cfg or SceneConfig()
    out = Path(out_dir)
    rng = np.random.default_rng(cfg.seed)
    bg = _background(rng)
    (out / "train").mkdir(parents=True, exist_ok=True)
    for c in range(cfg.train_clips):
        frames, _ = render_clip(bg, cfg.frames_per_clip, rng)
        write_video(out / "train" / f"walk{c:02d}.mp4", frames, cfg.video_fps)
    rows = []
    for c in range(cfg.test_clips):
        kind = ("intruder", "cart")[c % 2]
        start = cfg.frames_per_clip // 3
        frames, labels = render_clip(bg, cfg.frames_per_clip, rng, kind, start)
        clip_dir = out / "test" / f"{c + 1:02d}"
        clip_dir.mkdir(parents=True, exist_ok=True)
        for i, (frame, label) in enumerate(zip(frames, labels)):
            rel = f"test/{c + 1:02d}/{i:03d}.png"
            Image.fromarray(frame).save(out / rel)
            rows.append({"split": "test", "clip": f"{c + 1:02d}", "frame_index": i,
                         "label": label, "path": rel})
    manifest = out / "test_manifest.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["split", "clip", "frame_index", "label", "path"])
        writer.writeheader()
        writer.writerows(rows)
    return {"train_videos": out / "train", "test_manifest": manifest,
            "video_fps": cfg.video_fps}
