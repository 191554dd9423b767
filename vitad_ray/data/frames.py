"""Frame sources: image folders, video files (PyAV) and manifest CSVs, turned into frame rows.

A *source item* names one thing to decode (an image file, or a whole video to sample). Decoding
turns items into frame rows (the contract in DESIGN.md) plus, for anything unreadable, an error
row with its reason: bad input is reported and skipped, never silently dropped.
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..features.backbones import resize_frame

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}
PAPER_FPS = 4.17  # the paper sampled its videos at 4.17 frames per second
ID_COLUMNS = ("frame_id", "clip", "frame_index", "timestamp_s", "split", "label")
# Zoomed views of training frames are rows of their own, apart from the frames: their split is
# "<split>@zoom<factor>" (so reading split "train" never returns them) and their frame id the
# frame's plus the same suffix.
VIEW_MARK = "@"
VIEW_SPLITS = ("train",)  # the splits whose frames get views: the normal memory


def clip_key(split: str, clip: str) -> str:
    """Clips of different splits may share a name ("01"): a manifest clip is kept apart as
    "split/clip"."""
    return f"{split}/{clip}" if split else clip


def frame_id(clip: str, frame_index: int) -> str:
    return f"{clip}/{int(frame_index)}"


def view_name(zoom: float) -> str:
    return f"zoom{float(zoom):g}"


def view_split(split: str, zoom: float) -> str:
    return f"{split}{VIEW_MARK}{view_name(zoom)}"


def view_frame_id(frame: str, zoom: float) -> str:
    return f"{frame}{VIEW_MARK}{view_name(zoom)}"


def zoom_toward_top(image: np.ndarray, factor: float) -> np.ndarray:
    """The frame's top-centre 1/factor of width and height: where a camera looking down on a
    floor sees far away, so the crop, resized back, shows the scene's objects as they would look
    nearer the camera (larger, lower in the frame)."""
    if factor <= 1:
        raise ValueError(f"a zoom factor is > 1, got {factor}")
    h, w = image.shape[:2]
    cw, ch = w / factor, h / factor
    left = int(round((w - cw) / 2))
    return np.ascontiguousarray(image[:int(round(ch)), left:int(round((w + cw) / 2))])


def _item(kind: str, path: str, clip: str, split: str, frame_index: int = -1, label: int = -1,
          timestamp_s: float = 0.0, fps: float = 0.0) -> dict:
    return {"kind": kind, "path": str(path), "clip": str(clip), "split": split,
            "frame_index": int(frame_index), "label": int(label),
            "timestamp_s": float(timestamp_s), "fps": float(fps)}


def items_from_manifest(path: str | os.PathLike, splits: Iterable[str] | None = None,
                        frame_rate: float = 10.0) -> list[dict]:
    """One image item per manifest row (columns split, clip, frame_index, label, path).

    Paths are relative to the manifest's folder. ``frame_rate`` gives timestamps to frames.
    """
    root = Path(path).parent
    wanted = set(splits) if splits else None
    items = []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"split", "clip", "frame_index", "path"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: manifest lacks columns {sorted(missing)}")
        for row in reader:
            if wanted is not None and row["split"] not in wanted:
                continue
            index = int(row["frame_index"])
            clip = clip_key(row["split"], row["clip"])
            label = int(row["label"]) if row.get("label", "") not in ("", None) else -1
            items.append(_item("image", root / row["path"], clip, row["split"], index, label,
                               index / frame_rate))
    return items


def items_from_frame_folder(root: str | os.PathLike, split: str = "", label: int = -1,
                            frame_rate: float = 10.0) -> list[dict]:
    """Image items from a folder of clips (one subfolder each) or from one clip's folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such frame folder: {root}")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    clip_dirs = subdirs if subdirs else [root]
    items = []
    for clip_dir in clip_dirs:
        images = sorted(p for p in clip_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for index, image in enumerate(images):
            items.append(_item("image", image, clip_dir.name, split, index, label,
                               index / frame_rate))
    return items


def items_from_videos(paths: Iterable[str | os.PathLike], split: str = "", label: int = -1,
                      fps: float = PAPER_FPS) -> list[dict]:
    """One video item per file (a folder is searched for video files); clip = file stem."""
    items = []
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES) \
            if path.is_dir() else [path]
        for video in files:
            items.append(_item("video", video, video.stem, split, label=label, fps=fps))
    return items


def video_fingerprint(item: dict) -> dict | None:
    """What identifies a video item's frames: the file's resolved path, size and mtime, and the
    sampling rate (None when the file cannot be read)."""
    try:
        path = Path(item["path"]).resolve()
        stat = path.stat()
    except OSError:
        return None
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "fps": float(item["fps"])}


def sample_video(path: str, fps: float | None) -> Iterator[tuple[int, float, np.ndarray]]:
    """Yield (source frame number, timestamp in s, RGB frame) sampled at ``fps`` (None: all)."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        next_time = 0.0
        for number, frame in enumerate(container.decode(stream)):
            t = float(frame.time) if frame.time is not None else number / rate
            if fps and t + 0.5 / rate < next_time:
                continue
            yield number, t, frame.to_ndarray(format="rgb24")
            if fps:
                while next_time <= t + 0.5 / rate:
                    next_time += 1.0 / fps


def expected_frames(item: dict) -> int | None:
    """Frames an item gives: 1 for an image; for a video, what its header says (frame count,
    or duration at the sampling rate), without decoding; None when the header does not say."""
    if item["kind"] == "image":
        return 1
    import av

    try:
        with av.open(str(item["path"])) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            if stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            elif container.duration:
                seconds = container.duration / 1e6
            else:
                seconds = stream.frames / rate if stream.frames and rate else 0.0
    except Exception:  # noqa: BLE001 - unreadable: decoding reports it
        return None
    fps = float(item.get("fps") or 0) or rate
    if fps >= rate and stream.frames:  # every frame
        return int(stream.frames)
    if not seconds or not fps:
        return None
    last = max(0.0, seconds - 1.0 / rate) if rate else seconds  # the last frame's time
    return int(np.floor(last * fps + 1e-9)) + 1


def image_rgb8(img) -> np.ndarray:
    """A loaded PIL image as RGB uint8 [H, W, 3]. 16-bit images (PNG, TIFF) are scaled to 8
    bits by their top byte: PIL's own ``convert("RGB")`` clips them, so nearly every pixel of a
    16-bit frame would come out white. Float images are refused with the reason."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img, dtype=np.int64)
        if values.min() < 0 or values.max() > 0xFFFF:
            raise ValueError(f"{mode} image with values outside 0..65535: not a 16-bit frame")
        gray = (values >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        raise ValueError("32-bit float images are not supported: send 8- or 16-bit frames")
    return np.asarray(img.convert("RGB"))


def _read_image(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # forces a full decode: a truncated file fails here, not later
        return image_rgb8(img)


def item_zooms(item: dict, zooms: Iterable[float]) -> tuple[float, ...]:
    """The zoomed views an item's frames get: those asked for, on training frames only."""
    return tuple(zooms) if item["split"] in VIEW_SPLITS else ()


def decode_item(item: dict, sizes: Iterable[int], zooms: Iterable[float] = ()
                ) -> Iterator[dict]:
    """Frame rows for one item, each with ``pixels_<size>``, each training frame followed by its
    zoomed views (``zooms``); failures come as rows with ``error``."""
    sizes = tuple(sizes)
    zooms = item_zooms(item, zooms)
    base = {k: item[k] for k in ("clip", "split", "label")}

    def row(index: int, t: float, image: np.ndarray | None, error: str = "", zoom: float = 0
            ) -> dict:
        fid = frame_id(item["clip"], index)
        out = dict(base, frame_id=fid, frame_index=int(index), timestamp_s=float(t),
                   error=error, source=item["path"])
        if zoom:
            out.update(frame_id=view_frame_id(fid, zoom), split=view_split(item["split"], zoom))
            image = zoom_toward_top(image, zoom)
        for size in sizes:
            out[f"pixels_{size}"] = (resize_frame(image, size) if image is not None
                                     else np.zeros((size, size, 3), np.uint8))
        return out

    def rows(index: int, t: float, image: np.ndarray) -> Iterator[dict]:
        if not item.get("views_only"):  # (an image whose frame is embedded already)
            yield row(index, t, image)
        for zoom in zooms:
            yield row(index, t, image, zoom=zoom)

    if item["kind"] == "image":
        try:
            image = _read_image(item["path"])
            if image.size == 0:
                raise ValueError("empty image")
        except Exception as exc:
            yield row(item["frame_index"], item["timestamp_s"], None, _reason(exc))
            return
        yield from rows(item["frame_index"], item["timestamp_s"], image)
        return

    last = -1
    try:
        for number, t, image in sample_video(item["path"], item["fps"] or None):
            last = number
            yield from rows(number, t, image)
        if last < 0:
            raise ValueError("no decodable frame")
    except Exception as exc:
        # Frames decoded before the failure are kept; the rest of the file is reported.
        where = "video" if last < 0 else f"video after frame {last}"
        yield row(last + 1, 0.0, None, f"{where}: {_reason(exc)}")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}"[:500]


def split_clips(clip_labels: dict[str, np.ndarray], fraction: float, seed: int = 0
                ) -> tuple[list[str], list[str]]:
    """Split clips (never frames) into (held_out, rest), with ``fraction`` of clips held out.

    Where possible the held-out clips contain both normal and anomalous frames, so a threshold
    can be calibrated on them.
    """
    clips = sorted(clip_labels)
    if len(clips) < 2:
        raise ValueError("need at least two clips to hold some out")
    n_held = min(len(clips) - 1, max(1, round(fraction * len(clips))))
    rng = random.Random(seed)
    best = None
    for _ in range(200):
        held = sorted(rng.sample(clips, n_held))
        labels = np.concatenate([np.asarray(clip_labels[c]) for c in held])
        if best is None:
            best = held
        if (labels == 0).any() and (labels == 1).any():
            best = held
            break
    rest = [c for c in clips if c not in best]
    return best, rest
