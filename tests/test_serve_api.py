"""The endpoint's request rules and answers, without a server."""

import base64
import io

import numpy as np
import pytest

from vitad_ray.serve import ServeConfig, effective_thresholds, model_id, shard_scopes
from vitad_ray.serve_api import (ApiError, DetectOptions, ImageInput, Limits, check_content_length,
                                 decode_image, frame_answer, images_from_json, parse_options)

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
