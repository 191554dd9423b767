"""The Ray Data embedding pipeline: source items -> decode + resize (CPU tasks) -> one embedder
actor pool per backbone -> Parquet per the embeddings contract.

The driver is the single writer: it streams the pipeline's output, writes each frame once (a
re-run, or a block retried after a node failure, never duplicates a frame) and records every
frame that could not be decoded in ``errors.csv``.
"""

from __future__ import annotations

import csv
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.embeddings import EmbeddingWriter, write_metadata
from ..data.frames import (ID_COLUMNS, VIEW_MARK, decode_item, expected_frames, frame_id,
                           item_zooms, video_fingerprint, view_frame_id, view_name)
from ..features.backbones import create_backbone, get_spec, weights_fingerprint
from ..storage.atomic import write_json
from ..storage.versions import package_versions
from .progress import Progress

ERRORS_FILE = "errors.csv"
RUN_LOG_FILE = "embed_run.json"


@dataclass(frozen=True)
class BackboneChoice:
    name: str
    weights: str | None = None
    image_size: int | None = None
    layers: tuple[int, ...] = ()

    @property
    def spec(self):
        return get_spec(self.name, self.image_size, self.layers)


@dataclass
class EmbedResult:
    out_dirs: dict[str, Path]
    written: int = 0  # frames and views
    views_written: int = 0
    already_present: int = 0
    errors: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    nodes: Counter = field(default_factory=Counter)  # node id -> frames embedded there
    decode_nodes: Counter = field(default_factory=Counter)  # node id -> frames decoded there


# Frames leave a decode task in chunks of this many as they are decoded: a long video streams
# into the embedders and onto disk instead of arriving whole at the end of its task, and no task
# holds a whole video in memory.
DECODE_CHUNK_FRAMES = 32


def decode_batch(batch: dict, sizes: tuple[int, ...], zooms: tuple[float, ...] = ()
                 ) -> Iterator[dict]:
    """Ray Data batch function: source items in, frame rows out (one item may give many rows;
    training frames also their zoomed views), yielded in chunks of at most
    ``DECODE_CHUNK_FRAMES``.

    ``source_rows`` is 0 on every row but an item's last, where it is the number of rows the
    item gave: the driver knows a video is whole once it holds that many of its frames."""
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    keys = list(batch)
    rows: list[dict] = []
    for i in range(len(batch[keys[0]])):
        item = {k: (batch[k][i].item() if hasattr(batch[k][i], "item") else batch[k][i])
                for k in keys}
        for row in _last_counts(decode_item(item, sizes, zooms)):
            rows.append(row)
            if len(rows) == DECODE_CHUNK_FRAMES:
                yield _columns(rows, sizes, node)
                rows = []
    if rows:
        yield _columns(rows, sizes, node)


def _last_counts(rows: Iterator[dict]) -> Iterator[dict]:
    """The rows with ``source_rows`` set: 0, and on the last one the number of rows."""
    count, held = 0, None
    for row in rows:
        if held is not None:
            yield held
        row["source_rows"] = 0
        held, count = row, count + 1
    if held is not None:
        held["source_rows"] = count
        yield held


def _columns(rows: list[dict], sizes: tuple[int, ...], node: str) -> dict:
    """Column arrays of a non-empty list of frame rows."""
    out = {}
    for key in (*ID_COLUMNS, "error", "source", "source_rows"):
        values = [r[key] for r in rows]
        out[key] = np.asarray(values, dtype=object if isinstance(values[0], str) else None)
    for size in sizes:
        out[f"pixels_{size}"] = np.stack([r[f"pixels_{size}"] for r in rows])
    out["decode_node"] = np.full(len(rows), node, dtype=object)
    return out


class Embedder:
    """Ray Data actor: holds one backbone and embeds batches of decoded frames."""

    def __init__(self, name: str, weights: str | None, image_size: int | None, threads: int,
                 drop_pixels: tuple[int, ...] = (), layers: tuple[int, ...] = ()):
        import torch

        torch.set_num_threads(max(1, threads))
        self.backbone = create_backbone(name, weights, image_size, layers=layers)
        self.prefix = f"emb.{name}"
        self.size = self.backbone.spec.image_size
        # The last pool drops the pixels: no separate (CPU-holding) task just to drop columns.
        self.drop = [f"pixels_{s}" for s in drop_pixels]
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict) -> dict:
        pixels = batch[f"pixels_{self.size}"]
        ok = np.asarray([not e for e in batch["error"]], bool)
        n, dim, patches = len(pixels), self.backbone.dim, self.backbone.spec.num_patches
        global_ = np.zeros((n, dim), np.float32)
        local = np.zeros((n, patches, dim), np.float32)
        if ok.any():
            global_[ok], local[ok] = self.backbone.embed(pixels[ok])
        batch[f"{self.prefix}.global"] = global_
        batch[f"{self.prefix}.local"] = local
        batch[f"{self.prefix}.node"] = np.full(n, self.node_id, dtype=object)
        for key in self.drop:
            batch.pop(key, None)
        return batch


def _cluster_cpus_gpus() -> tuple[int, int]:
    import ray

    res = ray.cluster_resources()
    return int(res.get("CPU", 1)), int(res.get("GPU", 0))


def build_dataset(items: list[dict], choices: list[BackboneChoice], batch_size: int,
                  actors_per_backbone: int | None, threads_per_actor: int | None,
                  zooms: tuple[float, ...] = ()):
    import ray

    cpus, gpus = _cluster_cpus_gpus()
    sizes = tuple(sorted({c.spec.image_size for c in choices}))
    # Small input blocks keep the stream moving (results reach the writer as they are made).
    n_blocks = max(1, min(len(items), max(4 * cpus, len(items) // 32)))
    ds = ray.data.from_items(items, override_num_blocks=n_blocks)
    # Decoding asks for a quarter CPU, embedders for half a CPU (plus a GPU when there is one):
    # the different resource shapes keep Ray Data from fusing decode into the embedder actors, so
    # CPU tasks decode while the accelerator embeds; and the actors, however many backbones, never
    # hold every CPU, which would leave no room for decoding and stall the stream. Tasks and actors
    # are spread over the nodes by Ray Data's default strategy (SPREAD).
    # Decoding takes 8 images at a time, or one video: a video is many frames already, and
    # Ray Data then does not bundle the one-video input blocks of a short list into one task,
    # so the videos are decoded in parallel over the nodes.
    items_per_batch = 1 if any(it["kind"] == "video" for it in items) else 8
    ds = ds.map_batches(decode_batch, fn_kwargs={"sizes": sizes, "zooms": tuple(zooms)},
                        batch_size=items_per_batch,
                        batch_format="numpy", num_cpus=0.25)
    nodes = max(1, sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")))
    for i, choice in enumerate(choices):
        gpus_each = 1 if gpus else 0
        # Up to one actor per GPU, or per node without GPUs; at least one. The pool shrinks when
        # a node is lost (its actors are not waited for) and the work goes on elsewhere.
        n_actors = actors_per_backbone or max(1, gpus // len(choices) if gpus else nodes)
        threads = threads_per_actor or max(1, cpus // max(1, n_actors * len(choices)))
        ds = ds.map_batches(
            Embedder,
            fn_constructor_kwargs={"name": choice.name, "weights": choice.weights,
                                   "image_size": choice.image_size, "threads": threads,
                                   "layers": tuple(choice.layers),
                                   "drop_pixels": sizes if i == len(choices) - 1 else ()},
            batch_size=batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n_actors,
                                               initial_size=n_actors),
            num_gpus=gpus_each, num_cpus=0.5)
    return ds


def run_embedding(items: list[dict], choices: list[BackboneChoice], out_root: str | Path,
                  batch_size: int = 32, actors_per_backbone: int | None = None,
                  threads_per_actor: int | None = None, show_progress: bool = True,
                  zooms: tuple[float, ...] = ()) -> EmbedResult:
    """Embed every item with every backbone, and the training frames' views zoomed by
    ``zooms`` (the recipes' ``zoom_views``); resumes by skipping frames already written."""
    out_root = Path(out_root)
    for c in choices:
        check_features(out_root / c.name, c)
    writers = {c.name: EmbeddingWriter(out_root / c.name) for c in choices}
    result = EmbedResult(out_dirs={c.name: out_root / c.name for c in choices})
    written_ids = {name: w.existing_frame_ids() for name, w in writers.items()}
    todo, result.already_present = still_to_embed(items, list(writers.values()),
                                                  list(written_ids.values()), zooms)
    videos = _VideoTally(todo, zooms)
    start = time.perf_counter()
    metadata_written: set[str] = set()
    # Rows to come: each frame's, unless held already, and its zoomed views'.
    counts = [None if (n := expected_frames(it)) is None
              else n * (int(not it.get("views_only")) + len(item_zooms(it, zooms)))
              for it in todo]
    progress = Progress("embed", total=None if None in counts else sum(counts) or None,
                        enabled=show_progress)
    if todo:
        ds = build_dataset(todo, choices, batch_size, actors_per_backbone, threads_per_actor,
                           zooms)
        # Whole blocks as they come: each is written (and survives a crash) without waiting
        # for later ones.
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            bad = np.asarray([bool(e) for e in batch["error"]])
            for i in np.flatnonzero(bad):
                result.errors.append({"source": batch["source"][i], "frame_id": batch["frame_id"][i],
                                      "clip": batch["clip"][i], "reason": batch["error"][i]})
            new_frames = set()
            for choice in choices:
                keep = ~bad & np.asarray([f not in written_ids[choice.name]
                                          for f in batch["frame_id"]])
                new_frames.update(batch["frame_id"][keep])
                if not keep.any():
                    continue
                rows = {k: batch[k][keep] for k in ID_COLUMNS}
                global_ = batch[f"emb.{choice.name}.global"][keep]
                local = batch[f"emb.{choice.name}.local"][keep]
                if choice.name not in metadata_written:
                    write_metadata(out_root / choice.name, _metadata(choice, global_, local))
                    metadata_written.add(choice.name)
                writers[choice.name].write(rows, global_, local)
                written_ids[choice.name].update(rows["frame_id"])
                result.nodes.update(batch[f"emb.{choice.name}.node"][keep])
            result.written += len(new_frames)
            result.views_written += sum(VIEW_MARK in f for f in new_frames)
            result.decode_nodes.update(batch["decode_node"])
            for source, record in videos.add(batch):
                for writer in writers.values():
                    writer.mark_video_finished(source, record)
            progress.update(len(bad), f"{len(result.errors)} skipped")
    progress.close()
    _write_errors(out_root / ERRORS_FILE, result.errors)
    result.seconds = time.perf_counter() - start
    _write_run_log(out_root, result)
    return result


def check_features(folder: Path, choice: BackboneChoice) -> None:
    """Refuses to add frames of other features to an embeddings folder: a resumed run would
    skip the frames it holds and mix two kinds of vectors."""
    from ..data.embeddings import METADATA_FILE

    path = folder / METADATA_FILE
    if not path.exists():
        return
    meta = json.loads(path.read_text())
    spec = choice.spec
    have = (meta.get("image_size"), list(meta.get("layers") or []))
    want = (spec.image_size, list(spec.layers))
    if have != want:
        raise ValueError(f"{folder} holds {have[0]} px features of blocks {have[1] or 'last'}; "
                         f"this run asks for {want[0]} px, blocks {want[1] or 'last'}: give "
                         "another --out, or the same --image-size and --layers")


def still_to_embed(items: list[dict], writers: list[EmbeddingWriter], written_ids: list[set],
                   zooms: tuple[float, ...] = ()) -> tuple[list[dict], int]:
    """(items some backbone still lacks, frames every backbone holds already).

    An image is done when every folder holds its frame id and those of its zoomed views; a
    video when every folder records it finished with the file's current size, mtime, the same
    sampling rate and the same views. Other videos are decoded again and the frames already
    written are dropped as they arrive."""
    done = set.intersection(*written_ids)
    todo, present = [], 0
    for it in items:
        if it["kind"] == "image":
            fid = frame_id(it["clip"], it["frame_index"])
            views = [view_frame_id(fid, z) for z in item_zooms(it, zooms)]
            if fid in done:
                present += 1
                if all(v in done for v in views):
                    continue
                # Views asked of frames embedded without them: the views alone are embedded.
                todo.append(dict(it, views_only=True))
                continue
        else:
            fp = _video_record(it, zooms)
            records = [w.finished_videos.get(fp["path"]) if fp else None for w in writers]
            if all(r is not None and {k: r.get(k) for k in fp} == fp for r in records):
                present += records[0]["frames"]
                continue
        todo.append(dict(it, views_only=False))  # (every item has the key: one schema)
    return todo, present


def _video_record(item: dict, zooms: tuple[float, ...]) -> dict | None:
    """What a finished video is recorded with: its file's fingerprint, and the zoomed views its
    frames were given (a run asking for other views decodes it again)."""
    fp = video_fingerprint(item)
    views = item_zooms(item, zooms)
    return dict(fp, views=[view_name(z) for z in views]) if fp and views else fp


class _VideoTally:
    """The distinct frames of each video seen so far. A video is whole when the count its last
    row carries is reached (retried blocks repeat frames, so ids are counted, not rows); one with
    an undecodable part is never recorded finished, and is decoded (and reported) again."""

    def __init__(self, items: list[dict], zooms: tuple[float, ...] = ()):
        self.fingerprints = {it["path"]: _video_record(it, zooms) for it in items
                             if it["kind"] == "video"}
        self.seen: dict[str, set] = {}
        self.total: dict[str, int] = {}
        self.failed: set[str] = set()

    def add(self, batch: dict) -> list[tuple[str, dict]]:
        """(resolved path, record) of the videos this batch completed."""
        touched = set()
        for source, fid, error, rows in zip(batch["source"], batch["frame_id"], batch["error"],
                                            batch["source_rows"]):
            if self.fingerprints.get(source) is None:
                continue
            touched.add(source)
            self.seen.setdefault(source, set()).add(fid)
            if error:
                self.failed.add(source)
            if rows:
                self.total[source] = int(rows)
        whole = []
        for source in touched - self.failed:
            if len(self.seen[source]) == self.total.get(source, -1):
                fp = self.fingerprints.pop(source)  # recorded once
                del self.seen[source]
                rows_per_frame = 1 + len(fp.get("views", []))
                whole.append((fp["path"], dict(fp, frames=self.total[source] // rows_per_frame)))
        return whole


def _metadata(choice: BackboneChoice, global_: np.ndarray, local: np.ndarray) -> dict:
    spec = choice.spec
    return {
        "backbone": spec.name,
        "family": spec.family,
        **weights_fingerprint(spec, choice.weights),
        "dim": int(global_.shape[1]),
        "num_patches": int(local.shape[1]),
        "grid": spec.grid,
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
        "global_pool": spec.global_pool,
        "layers": list(spec.layers),
        "depth": spec.depth,
        "preprocessing": {"resize": f"{spec.image_size}x{spec.image_size} bicubic, whole frame, "
                                    "no centre crop", "mean": spec.mean, "std": spec.std},
        "versions": package_versions(),
    }


def _write_run_log(out_root: Path, result: EmbedResult) -> None:
    """What this run did and where: frames written per node (all backbones counted)."""
    write_json(out_root / RUN_LOG_FILE, {
        "written": result.written, "already_present": result.already_present,
        "errors": len(result.errors), "seconds": round(result.seconds, 2),
        "nodes": result.nodes, "decode_nodes": result.decode_nodes}, indent=2)


def _write_errors(path: Path, errors: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["source", "frame_id", "clip", "reason"])
        writer.writeheader()
        writer.writerows(errors)
