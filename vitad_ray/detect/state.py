"""A Detector's fitted state in the model directory: plain arrays, never pickle.

    detector/<stream>/memory.npy        [S, K, D] float32: the vectors a query is searched against
    detector/<stream>/loc_dens.npy      [S, K]    leave-one-clip-out local density
    detector/<stream>/mu.npy, sigma.npy [S]       z-score calibration
    detector/<stream>/ref_sorted.npy    [S, N]    the ECDF calibration's reference
    detector/<stream>/train_scores.npy  [S, N]    training frames scored leave-one-clip-out
    detector/<stream>/loo_d.npy         [S, N]    their raw leave-one-clip-out distances, and
    detector/<stream>/train_rows.npy    [N]       their rows of the memory, and
    detector/<stream>/memory_groups.npy [K]       the memory rows' clips (or segments): what
                                                  ``vitad update`` needs to add clips
    detector/train_frames.parquet       the training frames (clip, frame_index, LOO group) and
                                        their frame scores, sorted by clip and time

The evidence scales and label-free thresholds are recomputed from these on load (the same
arithmetic as at fit), so the arrays are the one source of truth; ``model.json`` keeps the
threshold in force.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..normality.crossclip import CrossClipNormality
from ..storage.atomic import atomic_path, write_json
from .detector import Detector, stream_names
from .recipe import Recipe

DETECTOR_DIR = "detector"
TRAIN_FRAMES = "train_frames.parquet"
ARRAYS = ("memory", "loc_dens", "mu", "sigma", "ref_sorted", "train_scores")
UPDATE_ARRAYS = ("loo_d", "train_rows", "memory_groups")  # not in models fitted before them
DONE = "done.json"


def stream_dir(model_dir: str | os.PathLike, stream: str, detector_dir: str = DETECTOR_DIR
               ) -> Path:
    return Path(model_dir) / detector_dir / stream


def save_array(path: Path, value: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.asarray(value), allow_pickle=False)


def save_stream(model_dir, stream: str, arrays: dict[str, np.ndarray], signature: str,
                detector_dir: str = DETECTOR_DIR) -> None:
    """Every array of a stream, then its marker: a stream with a marker is whole."""
    folder = stream_dir(model_dir, stream, detector_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ARRAYS:
        save_array(folder / f"{name}.npy", arrays[name])
    for name in UPDATE_ARRAYS:
        if arrays.get(name) is not None:
            save_array(folder / f"{name}.npy", arrays[name])
    write_json(folder / DONE, {"signature": signature, "shape": list(arrays["memory"].shape)})


def stream_done(model_dir, stream: str, signature: str) -> bool:
    marker = stream_dir(model_dir, stream) / DONE
    return marker.exists() and json.loads(marker.read_text()).get("signature") == signature


def save_train_frames(model_dir, frames: pd.DataFrame, detector_dir: str = DETECTOR_DIR) -> None:
    with atomic_path(Path(model_dir) / detector_dir / TRAIN_FRAMES) as tmp:
        frames.to_parquet(tmp, index=False)


def load_detector(model_dir: str | os.PathLike, recipe: Recipe, device: str | None = None,
                  scopes: slice = slice(None), mmap: bool = True) -> Detector:
    """The fitted Detector of a model directory. ``scopes``: only these scopes' memories are
    read (a serving shard's range); ``mmap``: memories are searched where they lie on disk
    (through the page cache) rather than copied into the process."""
    model_dir = Path(model_dir)
    frames = pd.read_parquet(model_dir / DETECTOR_DIR / TRAIN_FRAMES,
                             columns=["clip", "frame_index"])
    states, loo = {}, {}
    for name, _ in stream_names(recipe):
        folder = stream_dir(model_dir, name)
        if not (folder / DONE).exists():
            raise FileNotFoundError(f"{model_dir}: stream {name} was not fitted whole; re-run "
                                    "`vitad fit` with the same arguments to finish it")

        def read(array: str, whole: bool = False):
            value = np.load(folder / f"{array}.npy", allow_pickle=False, mmap_mode="r")
            return np.array(value if whole else value[scopes])

        # The training vectors stay memory-mapped: gigabytes at 448 px, read by the search.
        memory = np.load(folder / "memory.npy", allow_pickle=False, mmap_mode="r")[scopes] \
            if mmap else read("memory")
        extra = {}
        if not mmap and all((folder / f"{a}.npy").exists() for a in UPDATE_ARRAYS):
            # A whole detector, to be updated: what adding clips needs.
            extra = {"loo_d": read("loo_d"), "train_rows": read("train_rows", whole=True),
                     "memory_clips": read("memory_groups", whole=True)}
        states[name] = CrossClipNormality.from_state(
            memory, read("loc_dens"), read("mu"), read("sigma"), read("ref_sorted"),
            m=recipe.m, device=device, **extra)
        # Evidence scales need every scope's training scores, whatever the shard holds.
        loo[name] = read("train_scores", whole=True)
    det = Detector(recipe, device)
    return det.set_fitted(states, loo, frames["clip"].to_numpy(),
                          frames["frame_index"].to_numpy())
