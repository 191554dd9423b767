"""The endpoint's request rules and answers, without a server."""

import base64
import io

import numpy as np
import pytest

from vitad_ray.serve.api import (ApiError, DetectOptions, ImageInput, Limits, check_content_length,
                                 decode_image, decode_images, frame_answer, images_from_json,
                                 parse_options)
from vitad_ray.serve.app import effective_thresholds, model_id, shard_scopes
from vitad_ray.serve.config import ServeConfig

DOC = {"backbone": "tiny-dinov2", "thresholds": {
    "kmeans": {"global": 1.0, "patch": 0.9}, "hdbscan": {"global": 0.5, "patch": 0.6},
    "source": "calibrated"}}


def _png(w=30, h=20) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 200, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _status(fn, *args):
    with pytest.raises(ApiError) as info:
        fn(*args)
    return info.value.status, info.value.reason


def test_options_thresholds_fall_back_to_the_model():
    opts = parse_options({"method": "hdbscan", "patch_threshold": "0.7"})
    assert opts.thresholds(DOC["thresholds"]) == {"global": 0.5, "patch": 0.7}
    both = parse_options({"threshold": 0.2, "global_threshold": 0.3})
    assert both.thresholds(DOC["thresholds"]) == {"global": 0.3, "patch": 0.2}
    assert DetectOptions().thresholds(DOC["thresholds"]) == {"global": 1.0, "patch": 0.9}
    assert _status(parse_options, {"scope": "pixels"})[0] == 422
    assert _status(parse_options, {"threshold": "nan"})[0] == 422
    assert _status(parse_options, {"threshold": -1})[0] == 422


def test_json_images_and_limits():
    limits = Limits(max_images=2, max_image_bytes=10_000)
    png = _png()
    images, opts = images_from_json(
        f'{{"images": ["{base64.b64encode(png).decode()}", {{"name": "cam1", "data": '
        f'"data:image/png;base64,{base64.b64encode(png).decode()}"}}], "scope": "global"}}'
        .encode(), limits)
    assert [i.name for i in images] == ["images[0]", "cam1"] and images[1].data == png
    assert opts == {"scope": "global"}
    assert _status(images_from_json, b'{"images": ["a", "b", "c"]}', limits) == \
        (413, "too many images: 3 > the limit of 2 per request")
    assert _status(images_from_json, b"{not json", limits)[0] == 400
    assert _status(images_from_json, b'{"images": []}', limits)[0] == 422
    assert _status(check_content_length, "0", limits)[0] == 400
    assert _status(check_content_length, str(limits.max_body_bytes + 1), limits)[0] == 413


def test_decode_rejects_bombs_and_truncation():
    png = _png(100, 100)
    frame = decode_image(ImageInput("a", png), 28, Limits())
    assert frame.shape == (28, 28, 3) and frame.dtype == np.uint8
    assert _status(decode_image, ImageInput("a", png), 28, Limits(max_pixels=5000))[0] == 413
    assert _status(decode_image, ImageInput("a", png[:60]), 28, Limits())[0] == 422


def test_frame_answer_votes_like_vitad_score():
    patch = np.zeros(16, np.float32)
    patch[:8] = 0.95  # 8 of 16 at or over 0.9: a tie is anomalous (#anomalous >= #normal)
    a = frame_answer(0, "f", DetectOptions(), {"global": 1.0, "patch": 0.9}, 4, 0.99, patch)
    assert a["global"] == {"confidence": pytest.approx(0.99), "threshold": 1.0,
                           "anomalous": False}
    assert a["local"]["n_anomalous"] == 8 and a["local"]["anomalous"]
    assert np.asarray(a["local"]["grid"]).shape == (4, 4)
    patch[7] = 0.5
    assert not frame_answer(0, "f", DetectOptions(), {"global": 1.0, "patch": 0.9}, 4, None,
                            patch)["local"]["anomalous"]


def test_serve_config_from_strings_and_threshold_overrides():
    cfg = ServeConfig.from_args({"model_dir": "m", "shards": "3", "batch_wait_ms": "5",
                                 "use_gpu": "false", "token": "none",
                                 "thresholds": '{"kmeans": {"patch": 0.8}}'})
    assert (cfg.shards, cfg.batch_wait_ms, cfg.use_gpu, cfg.token) == (3, 5.0, False, None)
    eff = effective_thresholds(DOC, cfg.thresholds)
    assert eff["kmeans"] == {"global": 1.0, "patch": 0.8} and eff["hdbscan"]["patch"] == 0.6
    with pytest.raises(ValueError, match="unknown serve settings"):
        ServeConfig.from_args({"model_dir": "m", "shard": 2})
    with pytest.raises(ValueError, match="threshold overrides"):
        effective_thresholds(DOC, {"kmeans": {"local": 0.3}})
    # The model id ignores thresholds: recalibrating does not make it another model.
    assert model_id(DOC) == model_id({**DOC, "thresholds": {}})


def test_shards_are_contiguous_and_cover_every_scope_once():
    groups = shard_scopes(256, 3)
    flat = [s for g in groups for s in g]
    assert len(flat) == 257 == len(set(flat)) and flat[0] == "global"
    assert [len(g) for g in groups] == [86, 86, 85]


def test_deep_or_bracket_heavy_json_is_refused_before_parsing():
    limits = Limits(max_images=2)
    deep = b'{"images": ["a"], "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    status, reason = _status(images_from_json, deep, limits)
    assert status == 400 and "nested deeper" in reason
    many = b'{"images": ["a"], "x": [' + b'"",' * 10_000 + b'""]}'
    assert _status(images_from_json, many, limits)[0] == 400
    # Brackets and escaped quotes inside strings do not count as nesting.
    ok = base64.b64encode(_png()).decode()
    body = ('{"images": ["%s"], "stream": "cam [[[[[[[[[[ \\" {{{{{{{{{{ \\\\"}' % ok).encode()
    images, opts = images_from_json(body, limits)
    assert len(images) == 1 and opts["stream"].startswith("cam [[[")


def test_sixteen_bit_images_are_scaled_not_clipped():
    from PIL import Image

    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    with Image.open(io.BytesIO(buf.getvalue())) as img:
        assert img.mode.startswith("I")  # PIL keeps the 16 bits
    frame = decode_image(ImageInput("deep.png", buf.getvalue()), 64, Limits())
    expected = (ramp >> 8).astype(np.uint8)
    assert np.array_equal(frame[:, :, 0], expected) and np.array_equal(frame[:, :, 2], expected)
    assert (frame == 255).mean() < 0.02  # PIL's own convert("RGB") gave ~100% white


def test_pixel_limits_answer_413_for_one_image_and_for_a_request():
    from PIL import Image

    Image.MAX_IMAGE_PIXELS, before = 10_000, Image.MAX_IMAGE_PIXELS  # PIL's bomb bound
    try:
        big = _png(300, 300)  # 90,000 px: past PIL's bound above, which raises first
        status, reason = _status(decode_image, ImageInput("huge.png", big), 28, Limits())
        assert status == 413 and "pixel limit" in reason
    finally:
        Image.MAX_IMAGE_PIXELS = before
    images = [ImageInput(f"{i}.png", _png(100, 100)) for i in range(3)]
    assert len(decode_images(images, 28, Limits(max_request_pixels=30_000))) == 3
    status, reason = _status(decode_images, images, 28, Limits(max_request_pixels=29_999))
    assert status == 413 and "per request" in reason


def test_served_models_catalog_and_the_memory_bound(tmp_path):
    """One model is named after its folder; several need valid names and a stream map onto
    them; the memory bound gives how many models' shares a shard replica keeps."""
    from vitad_ray.serve.app import models_per_replica

    assert ServeConfig(model_dir="runs/cam-1/default").catalog() == {"default":
                                                                      "runs/cam-1/default"}
    with pytest.raises(ValueError, match="not both"):
        ServeConfig(model_dir="a", models={"b": "b"}).catalog()
    with pytest.raises(ValueError, match="no model"):
        ServeConfig().catalog()
    with pytest.raises(ValueError, match="model name"):
        ServeConfig(models={"bad name": "x"}).catalog()
    with pytest.raises(ValueError, match="streams map"):
        ServeConfig(models={"a": "x"}, streams={"gate": "b"}).catalog()
    folders = {}
    for name, size in (("a", 3 << 20), ("b", 1 << 20)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "memory.npy").write_bytes(b"\0" * size)
        folders[name] = str(tmp_path / name)
    # The largest model (3 MiB) over 2 shards: 1.5 MiB a share; 4 MiB hold 2 of them.
    assert models_per_replica(ServeConfig(models=folders, model_memory_mb=4), folders, 2) == 2
    assert models_per_replica(ServeConfig(models=folders), folders, 2) == 2  # unbounded: all
    assert models_per_replica(ServeConfig(models=folders, models_per_replica=1), folders, 2) == 1
    with pytest.raises(ValueError, match="holds no model"):
        models_per_replica(ServeConfig(models=folders, model_memory_mb=1), folders, 2)


def test_a_request_names_its_model():
    assert parse_options({"model": "cam-07"}).model == "cam-07"
    with pytest.raises(ApiError, match="model must be"):
        parse_options({"model": ""})
