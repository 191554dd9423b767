"""The embeddings contract: a Parquet dataset per backbone, readable with plain pyarrow.

Columns: the frame identity columns, ``global`` (float32 [D]) and ``local`` (float32 [P, D]),
stored as fixed-size lists. ``_metadata.json`` beside the parts names the backbone, its weights,
D, the image size, the preprocessing and package versions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..storage.atomic import atomic_path, write_json
from .frames import ID_COLUMNS, VIEW_MARK

# pandas and pyarrow are imported where they are used: reading a folder's metadata (the CLI's
# input checks) must not cost their seconds of import.
if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

# A leading "_" (and "." for unfinished parts) keeps pyarrow's dataset discovery from reading
# these files as data: `pq.read_table(folder)` sees the parts only.
METADATA_FILE = "_metadata.json"
# Videos whose every frame is in the parts, with the file's size, mtime and sampling rate: a
# re-run skips them without decoding them again.
VIDEOS_FILE = "_videos.json"


def _fixed_list(values: np.ndarray) -> pa.Array:
    """Nested fixed-size lists for a float32 array of any rank >= 2 (first axis = rows)."""
    import pyarrow as pa

    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
    for width in reversed(values.shape[1:]):
        flat = pa.FixedSizeListArray.from_arrays(flat, int(width))
    return flat


def _to_numpy(column: pa.ChunkedArray, shape: tuple[int, ...]) -> np.ndarray:
    import pyarrow as pa

    flat = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    for _ in shape:
        flat = flat.flatten()
    return flat.to_numpy(zero_copy_only=False).reshape((-1, *shape))


def identity_table(rows: dict) -> dict:
    import pyarrow as pa

    return {
        "frame_id": pa.array(rows["frame_id"], pa.string()),
        "clip": pa.array(rows["clip"], pa.string()),
        "frame_index": pa.array(np.asarray(rows["frame_index"], np.int64)),
        "timestamp_s": pa.array(np.asarray(rows["timestamp_s"], np.float64)),
        "split": pa.array(rows["split"], pa.string()),
        "label": pa.array(np.asarray(rows["label"], np.int8)),
    }


class EmbeddingWriter:
    """Appends parts to one backbone's embeddings folder; knows which frames it already holds."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._next_part = len(list(self.out_dir.glob("part-*.parquet")))
        videos = self.out_dir / VIDEOS_FILE
        self.finished_videos: dict[str, dict] = json.loads(videos.read_text()) \
            if videos.exists() else {}

    def existing_frame_ids(self) -> set[str]:
        import pyarrow.parquet as pq

        parts = sorted(self.out_dir.glob("part-*.parquet"))
        if not parts:
            return set()
        return set(pq.read_table(parts, columns=["frame_id"]).column("frame_id").to_pylist())

    def write(self, rows: dict, global_: np.ndarray, local: np.ndarray) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = identity_table(rows)
        columns["global"] = _fixed_list(global_)
        columns["local"] = _fixed_list(local)
        path = self.out_dir / f"part-{self._next_part:05d}.parquet"
        with atomic_path(path) as tmp:  # a crash never leaves half a part behind
            pq.write_table(pa.table(columns), tmp)
        self._next_part += 1
        return path

    def mark_video_finished(self, source: str, record: dict) -> None:
        """Records that every frame of video ``source`` is written (``record``: the file's
        fingerprint and its number of frames). Call only after the parts holding them."""
        self.finished_videos[source] = record
        write_json(self.out_dir / VIDEOS_FILE, self.finished_videos, indent=1, sort_keys=True)


def frame_rate(ids) -> float | None:
    """The frames' sampling rate (frames per second) from their clips' timestamps: what a
    client of the fitted model should sample its camera at. None: no clip has two frames."""
    steps = []
    for _, clip in ids.groupby("clip", sort=False):
        dt = np.diff(np.sort(clip["timestamp_s"].to_numpy(np.float64)))
        dt = dt[dt > 0]
        if len(dt):
            steps.append(float(np.median(dt)))
    return round(1.0 / float(np.median(steps)), 3) if steps else None


def write_metadata(out_dir: str | os.PathLike, metadata: dict) -> None:
    write_json(Path(out_dir) / METADATA_FILE, metadata, indent=2, sort_keys=True)


def read_metadata(emb_dir: str | os.PathLike) -> dict:
    path = Path(emb_dir) / METADATA_FILE
    if not path.exists():
        raise FileNotFoundError(f"{emb_dir} is not an embeddings folder (no {METADATA_FILE})")
    return json.loads(path.read_text())


class Embeddings:
    """Embeddings of a set of frames, in frame order (clip, frame_index)."""

    def __init__(self, ids: pd.DataFrame, global_: np.ndarray | None, local: np.ndarray | None,
                 metadata: dict):
        self.ids = ids.reset_index(drop=True)
        self.global_ = global_
        self.local = local
        self.metadata = metadata

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, mask: np.ndarray) -> "Embeddings":
        mask = np.asarray(mask, bool)
        return Embeddings(self.ids[mask], None if self.global_ is None else self.global_[mask],
                          None if self.local is None else self.local[mask], self.metadata)


def splits_present(emb_dir: str | os.PathLike) -> set[str]:
    """The split names an embeddings folder holds rows of (zoomed views' included)."""
    import pyarrow.parquet as pq

    parts = sorted(Path(emb_dir).glob("part-*.parquet"))
    if not parts:
        return set()
    return set(pq.read_table(parts, columns=["split"]).column("split").unique().to_pylist())


def frame_filter(splits: list[str] | None = None, clips: list[str] | None = None):
    """The pyarrow filter of a read: these splits (all when None, zoomed views only when their
    split is named) and clips."""
    import pyarrow.compute as pc

    split = pc.field("split")
    expr = split.isin(list(splits)) if splits else ~pc.match_substring(split, VIEW_MARK)
    if clips:
        expr = expr & pc.field("clip").isin(list(clips))
    return expr


def load_embeddings(emb_dir: str | os.PathLike, splits: list[str] | None = None,
                    clips: list[str] | None = None, with_local: bool = True) -> Embeddings:
    import pyarrow as pa
    import pyarrow.parquet as pq

    metadata = read_metadata(emb_dir)
    parts = sorted(Path(emb_dir).glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no embedding parts in {emb_dir}")
    columns = list(ID_COLUMNS) + ["global"] + (["local"] if with_local else [])
    table = pq.read_table(parts, columns=columns, filters=frame_filter(splits, clips))
    ids = table.select(list(ID_COLUMNS)).to_pandas()
    order = np.lexsort((ids["frame_index"].to_numpy(), ids["clip"].to_numpy()))
    dim = int(metadata["dim"])
    global_ = _to_numpy(table.column("global"), (dim,))[order]
    local = None
    if with_local:
        local = _to_numpy(table.column("local"), (int(metadata["num_patches"]), dim))[order]
    del table
    # The arrays above are copies; hand Arrow's buffers back to the system now (its allocator
    # keeps freed memory for reuse, gigabytes at 448 px, while fit holds its own copies).
    pa.default_memory_pool().release_unused()
    return Embeddings(ids.iloc[order], global_, local, metadata)


def layer_columns(metadata: dict, layers: tuple[int, ...]) -> np.ndarray:
    """Columns of the feature axis that hold the given blocks of a multi-block embedding."""
    have = list(metadata.get("layers") or [])
    if not have:
        raise ValueError("these embeddings hold one block's features; there are no layers to pick")
    missing = [i for i in layers if i not in have]
    if missing:
        raise ValueError(f"layers {missing} not in these embeddings (they hold {have})")
    width = int(metadata["dim"]) // len(have)
    return np.concatenate([np.arange(have.index(i) * width, (have.index(i) + 1) * width)
                           for i in layers])


def select_layers(emb: Embeddings, layers: tuple[int, ...]) -> Embeddings:
    """The given blocks' features of an embedding taken from several blocks (``--layers``)."""
    cols = layer_columns(emb.metadata, layers)
    metadata = dict(emb.metadata, layers=list(layers), dim=len(cols))
    return Embeddings(emb.ids, np.ascontiguousarray(emb.global_[:, cols]),
                      None if emb.local is None else np.ascontiguousarray(emb.local[..., cols]),
                      metadata)
