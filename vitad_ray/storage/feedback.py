"""A model directory's feedback queue: frames an operator marked normal ("this alarm was
normal", ``POST /v1/streams/{id}/normal``), waiting for ``vitad update MODEL --feedback`` to
add them to the model's memory.

    MODEL/feedback/queue/<clip>/<n>.<ext>    one clip per feedback request, the images as sent
    MODEL/feedback/applied/<clip>/...         clips an update has added

A clip appears whole or not at all (written aside, then renamed), so an update running while
the endpoint queues more never reads half a clip.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import time
import uuid
from pathlib import Path

FEEDBACK_DIR = "feedback"
QUEUE, APPLIED = "queue", "applied"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# Pillow's format names -> the suffixes a frame folder is read with (data.frames).
_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}


def queue_dir(model_dir: str | os.PathLike) -> Path:
    return Path(model_dir) / FEEDBACK_DIR / QUEUE


def image_suffix(data: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        fmt = img.format
    if fmt not in _SUFFIX:
        raise ValueError(f"a {fmt} image cannot be queued: send PNG, JPEG, BMP, TIFF or WebP")
    return _SUFFIX[fmt]


def enqueue(model_dir: str | os.PathLike, stream: str, first_index: int | None,
            images: list[bytes]) -> str:
    """Queues one request's images as a new clip; returns the clip's name."""
    suffixes = [image_suffix(data) for data in images]
    start = "" if first_index is None else f"-{first_index:06d}"
    clip = (f"fb-{_UNSAFE.sub('_', stream)[:64]}{start}-{time.strftime('%Y%m%dT%H%M%S')}-"
            f"{uuid.uuid4().hex[:6]}")
    root = queue_dir(model_dir)
    staging = root.parent / f".{clip}.partial"
    staging.mkdir(parents=True)
    try:
        for n, (data, suffix) in enumerate(zip(images, suffixes)):
            (staging / f"{n:06d}{suffix}").write_bytes(data)
        root.mkdir(exist_ok=True)
        os.replace(staging, root / clip)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return clip


def queued_clips(model_dir: str | os.PathLike) -> list[str]:
    root = queue_dir(model_dir)
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def queued_frames(model_dir: str | os.PathLike) -> int:
    root = queue_dir(model_dir)
    return sum(1 for _ in root.glob("*/*")) if root.is_dir() else 0


def mark_applied(model_dir: str | os.PathLike, clips: list[str]) -> None:
    """Moves clips an update added out of the queue."""
    applied = Path(model_dir) / FEEDBACK_DIR / APPLIED
    applied.mkdir(parents=True, exist_ok=True)
    for clip in clips:
        os.replace(queue_dir(model_dir) / clip, applied / clip)
