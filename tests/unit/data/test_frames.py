import csv
import inspect
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitad_ray.data.embeddings import EmbeddingWriter
from vitad_ray.data.frames import (decode_item, items_from_frame_folder, items_from_manifest,
                                   items_from_videos, sample_video, split_clips)
from vitad_ray.data.synthetic import write_video
from vitad_ray.pipeline.embed import DECODE_CHUNK_FRAMES, _VideoTally, decode_batch, still_to_embed


def _frames(n, w=64, h=48):
    return [np.full((h, w, 3), 10 * i % 256, np.uint8) for i in range(n)]


def test_video_sampled_at_requested_fps(tmp_path):
    path = tmp_path / "clip.mp4"
    frames = _frames(30)
    frames = [np.pad(f, ((0, 112), (0, 176), (0, 0))) for f in frames]  # 240x160
    write_video(path, frames, fps=10.0)
    every = list(sample_video(path, None))
    assert len(every) == 30
    half = list(sample_video(path, 5.0))
    assert [n for n, _, _ in half] == list(range(0, 30, 2))
    assert [round(t, 2) for _, t, _ in half[:3]] == [0.0, 0.2, 0.4]
    paper = list(sample_video(path, 4.17))
    assert len(paper) == 13  # 3 s at 4.17 fps
    item = items_from_videos([tmp_path], split="train", fps=5.0)
    assert len(item) == 1 and item[0]["clip"] == "clip" and item[0]["kind"] == "video"
    rows = list(decode_item(item[0], (224,)))
    assert len(rows) == 15 and rows[2]["frame_id"] == "clip/4"
    assert rows[0]["pixels_224"].shape == (224, 224, 3) and not rows[0]["error"]


def _as_batch(rows):
    """Ray Data's numpy batch of a list of items or rows."""
    return {k: np.asarray([r[k] for r in rows], dtype=object) for k in rows[0]}


def test_a_long_video_leaves_decoding_in_chunks(tmp_path):
    """Decode tasks stream: a video's frames come out in chunks as they are decoded, not as one
    block at the end of the file."""
    n = 2 * DECODE_CHUNK_FRAMES + 6
    write_video(tmp_path / "long.mp4", [np.pad(f, ((0, 16), (0, 0), (0, 0))) for f in _frames(n)],
                fps=10.0)
    write_video(tmp_path / "short.mp4", [np.pad(f, ((0, 16), (0, 0), (0, 0))) for f in _frames(5)],
                fps=10.0)
    items = items_from_videos([tmp_path], split="train", fps=0)
    chunks = decode_batch(_as_batch(items), (32,))
    assert inspect.isgenerator(chunks)  # nothing decoded yet
    sizes, ids, counts = [], [], []
    for chunk in chunks:
        sizes.append(len(chunk["frame_id"]))
        assert chunk["pixels_32"].shape == (sizes[-1], 32, 32, 3)
        assert len(chunk["decode_node"]) == sizes[-1]
        ids.extend(chunk["frame_id"])
        counts.extend(chunk["source_rows"])
    # The chunks fill up across videos, in order, every frame once.
    assert sizes == [DECODE_CHUNK_FRAMES, DECODE_CHUNK_FRAMES, 11]
    assert ids == [f"long/{i}" for i in range(n)] + [f"short/{i}" for i in range(5)]
    # Each video's last row carries its number of rows.
    assert [(i, c) for i, c in enumerate(counts) if c] == [(n - 1, n), (n + 4, 5)]


def _video_items(folder):
    """Two videos, a (6 frames) and b (4), as items sampling every frame."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("a", 6), ("b", 4)):
        write_video(folder / f"{name}.mp4", _frames(n, 32, 32), fps=10.0)
    return items_from_videos([folder], split="train", fps=0)


def _rows_of(items, zooms=()):
    return [row for chunk in decode_batch(_as_batch(items), (16,), zooms) for row in
            (dict(zip(chunk, values)) for values in zip(*chunk.values()))]


def test_a_video_is_recorded_whole_once_all_its_frames_arrived(tmp_path):
    items = _video_items(tmp_path)
    rows = _rows_of(items)
    a = [r for r in rows if r["clip"] == "a"]
    b = [r for r in rows if r["clip"] == "b"]
    tally = _VideoTally(items)
    # Out of order, with a retried block repeating frames: a is whole only with its last frame
    # id, however many rows came before.
    assert tally.add(_as_batch(a[-1:] + a[:2] + b[:3])) == []
    assert tally.add(_as_batch(a[:4])) == []
    whole = tally.add(_as_batch(a[4:5] + b[3:]))
    assert sorted((Path(p).name, rec["frames"]) for p, rec in whole) == [("a.mp4", 6), ("b.mp4", 4)]
    assert tally.add(_as_batch(a)) == []  # recorded once
    # A video with an undecodable part is never recorded whole.
    tally = _VideoTally(items)
    broken = [dict(r, error="video after frame 2: bad") if r["frame_index"] == 3 else r for r in a]
    assert tally.add(_as_batch(broken)) == []


def test_a_rerun_skips_finished_videos_unless_the_file_or_the_rate_changed(tmp_path):
    items = _video_items(tmp_path / "videos")
    writers = [EmbeddingWriter(tmp_path / "emb" / name) for name in ("x", "y")]
    tally = _VideoTally(items)
    for source, record in tally.add(_as_batch(_rows_of(items))):
        for writer in writers:
            writer.mark_video_finished(source, record)
    todo, present = still_to_embed(items, writers, [set(), set()])
    assert todo == [] and present == 10
    # Reopened folders read the records back.
    reopened = [EmbeddingWriter(w.out_dir) for w in writers]
    assert still_to_embed(items, reopened, [set(), set()]) == ([], 10)
    # Another sampling rate is other frames.
    at_5fps = items_from_videos([tmp_path / "videos"], split="train", fps=5.0)
    assert len(still_to_embed(at_5fps, reopened, [set(), set()])[0]) == 2
    # A rewritten file is decoded again.
    path = Path(items[0]["path"])
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))
    assert still_to_embed(items, reopened, [set(), set()]) == ([dict(items[0], views_only=False)],
                                                                4)
    # A backbone folder without the record (a backbone added later) needs the video too.
    fresh = EmbeddingWriter(tmp_path / "emb" / "z")
    assert len(still_to_embed(items, [reopened[1], fresh], [set(), set()])[0]) == 2


def test_whole_frame_is_resized_not_cropped(tmp_path):
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, -20:] = 255  # content at the right edge must survive
    Image.fromarray(img).save(tmp_path / "000.png")
    item = items_from_frame_folder(tmp_path, split="test")[0]
    row = next(decode_item(item, (224,)))
    assert row["pixels_224"].shape == (224, 224, 3)
    assert row["pixels_224"][:, -5:].mean() > 200 and row["pixels_224"][:, :100].mean() < 5


def test_corrupt_inputs_are_reported_not_dropped(tmp_path):
    good = tmp_path / "c1"
    good.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(good / "000.jpg")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(good / "001.jpg")
    data = (good / "001.jpg").read_bytes()
    (good / "001.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    (good / "002.jpg").write_bytes(b"")  # empty
    (good / "003.jpg").write_bytes(b"this is not an image")
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 100)
    items = items_from_frame_folder(tmp_path, split="train")
    rows = [r for it in items for r in decode_item(it, (32,))]
    assert len(rows) == 4
    errors = {r["frame_id"]: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"c1/1", "c1/2", "c1/3"}
    assert all(errors.values())
    video_rows = list(decode_item(items_from_videos([tmp_path / "bad.mp4"])[0], (32,)))
    assert len(video_rows) == 1 and video_rows[0]["error"].startswith("video")


def test_manifest_keeps_splits_apart_and_filters(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["split", "clip", "frame_index", "label", "path"])
        w.writerow(["train", "01", 0, 0, "a.png"])
        w.writerow(["test", "01", 0, 1, "a.png"])
    items = items_from_manifest(tmp_path / "m.csv")
    assert [i["clip"] for i in items] == ["train/01", "test/01"]
    assert [i["label"] for i in items] == [0, 1]
    assert len(items_from_manifest(tmp_path / "m.csv", splits=["test"])) == 1
    (tmp_path / "bad.csv").write_text("clip,path\n01,a.png\n")
    with pytest.raises(ValueError, match="lacks columns"):
        items_from_manifest(tmp_path / "bad.csv")


def test_split_is_by_clip_and_calibration_has_both_classes():
    labels = {f"c{i}": np.array([0] * 5 + [1] * (i % 3) * 5) for i in range(9)}
    held, rest = split_clips(labels, 1 / 3, seed=0)
    assert len(held) == 3 and set(held).isdisjoint(rest) and set(held) | set(rest) == set(labels)
    pooled = np.concatenate([labels[c] for c in held])
    assert (pooled == 0).any() and (pooled == 1).any()
    assert split_clips(labels, 1 / 3, seed=0) == (held, rest)


def test_sixteen_bit_frames_are_scaled_to_eight_bits(tmp_path):
    from PIL import Image

    from vitad_ray.data.frames import decode_item

    ramp = (np.arange(28 * 28, dtype=np.uint32).reshape(28, 28) * 80).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    item = {"kind": "image", "path": str(tmp_path / "deep.png"), "clip": "c", "split": "test",
            "label": 0, "frame_index": 0, "timestamp_s": 0.0}
    (row,) = decode_item(item, (28,))
    assert not row["error"]
    assert np.array_equal(row["pixels_28"][:, :, 1], (ramp >> 8).astype(np.uint8))


@pytest.mark.parametrize("fps", [0, 2, 3, 4.17, 8])
def test_a_videos_expected_frames_are_the_frames_it_gives(tmp_path, fps):
    from vitad_ray.data.frames import expected_frames, items_from_videos, sample_video
    from vitad_ray.data.synthetic import write_video

    frames = [np.full((32, 48, 3), i * 5, np.uint8) for i in range(40)]
    write_video(tmp_path / "clip.mp4", frames, 8.0)
    (item,) = items_from_videos([tmp_path / "clip.mp4"], "train", fps=fps)
    given = sum(1 for _ in sample_video(item["path"], item["fps"] or None))
    assert expected_frames(item) == given
    assert expected_frames({"kind": "video", "path": str(tmp_path / "nope.mp4"), "fps": 0}) is None


def test_training_frames_get_zoomed_views_as_rows_of_their_own(tmp_path):
    """A view is the frame's top-centre 1/zoom, resized: rows apart from the frames (split
    ``train@zoom1.5``), for the training split only; a folder embedded without views embeds the
    views alone when they are asked for later."""
    from vitad_ray.data.frames import zoom_toward_top

    image = np.zeros((60, 90, 3), np.uint8)
    image[:40, 15:75] = 200  # the top-centre 2/3 of each side
    crop = zoom_toward_top(image, 1.5)
    assert crop.shape == (40, 60, 3) and (crop == 200).all()
    with pytest.raises(ValueError, match="> 1"):
        zoom_toward_top(image, 1.0)
    for split in ("train", "test"):
        Image.fromarray(image).save(tmp_path / f"{split}.png")
    train = {"kind": "image", "path": str(tmp_path / "train.png"), "clip": "c", "split": "train",
             "frame_index": 3, "label": 0, "timestamp_s": 0.3, "fps": 0.0}
    rows = list(decode_item(train, (30,), zooms=(1.5, 2.0)))
    assert [(r["frame_id"], r["split"]) for r in rows] == [
        ("c/3", "train"), ("c/3@zoom1.5", "train@zoom1.5"), ("c/3@zoom2", "train@zoom2")]
    assert all(r["clip"] == "c" and r["frame_index"] == 3 for r in rows)
    assert (rows[1]["pixels_30"] == 200).all() and not (rows[0]["pixels_30"] == 200).all()
    test = dict(train, path=str(tmp_path / "test.png"), split="test")
    assert [r["frame_id"] for r in decode_item(test, (30,), zooms=(1.5,))] == ["c/3"]
    writer = EmbeddingWriter(tmp_path / "emb")
    todo, present = still_to_embed([train, test], [writer], [{"c/3"}], zooms=(1.5,))
    assert present == 2 and todo == [dict(train, views_only=True)]
    assert [r["frame_id"] for r in decode_item(todo[0], (30,), (1.5,))] == ["c/3@zoom1.5"]
    assert still_to_embed([train], [writer], [{"c/3", "c/3@zoom1.5"}], zooms=(1.5,)) == ([], 1)


def test_a_finished_video_is_decoded_again_for_views_it_lacks(tmp_path):
    items = _video_items(tmp_path / "videos")
    writer = EmbeddingWriter(tmp_path / "emb")
    for source, record in _VideoTally(items).add(_as_batch(_rows_of(items))):
        writer.mark_video_finished(source, record)
    assert still_to_embed(items, [writer], [set()]) == ([], 10)
    assert len(still_to_embed(items, [writer], [set()], zooms=(1.5,))[0]) == 2
    # Recorded with its views, it is whole for that run; its frame count leaves the views out.
    views = _rows_of(items, (1.5,))
    assert len(views) == 20
    for source, record in _VideoTally(items, (1.5,)).add(_as_batch(views)):
        writer.mark_video_finished(source, record)
    assert still_to_embed(items, [writer], [set()], zooms=(1.5,)) == ([], 10)


def test_frame_rate_of_the_training_clips():
    """The clips' median step, whatever the clips' order, gaps and a clip of one frame."""
    import pandas as pd

    from vitad_ray.data.embeddings import frame_rate

    ids = pd.DataFrame({"clip": ["b", "b", "b", "b", "a", "a", "a", "c"],
                        "timestamp_s": [0.0, 0.1, 0.2, 0.9, 0.4, 0.2, 0.3, 5.0]})
    assert frame_rate(ids) == 10.0
    assert frame_rate(ids[ids["clip"] == "c"]) is None
