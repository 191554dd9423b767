import numpy as np
import pytest

from vitad_ray.features.backbones import (create_backbone, get_spec, list_backbones,
                                          resolve_weights, weights_fingerprint)

from ...conftest import DINOV2_S


def test_registry_holds_the_papers_backbones():
    names = list_backbones()
    for name in ("vit-h14-in21k", "dinov2-l14", "ijepa-h14", "dinov2-s14", "dinov2-b14"):
        assert name in names
    assert get_spec("ijepa-h14").global_pool == "mean"
    assert get_spec("vit-h14-in21k").source == "vit_huge_patch14_224.orig_in21k"
    assert get_spec("dinov2-l14").num_patches == 256
    assert get_spec("dinov2-l14", image_size=448).grid == 32
    with pytest.raises(KeyError, match="unknown backbone"):
        get_spec("resnet50")
    with pytest.raises(ValueError, match="multiple"):
        get_spec("dinov2-s14", image_size=230)


@pytest.mark.parametrize("name,prefix", [("tiny-dinov2", 1), ("tiny-dinov2-reg", 5),
                                         ("tiny-ijepa", 0), ("tiny-vit", 1)])
def test_tiny_backbones_give_global_and_256_patches(name, prefix):
    bb = create_backbone(name, device="cpu")
    frames = np.random.default_rng(0).integers(0, 255, (3, 224, 224, 3), dtype=np.uint8)
    g, loc = bb.embed(frames)
    assert g.shape == (3, 32) and loc.shape == (3, 256, 32)
    assert bb.num_prefix_tokens == prefix  # CLS and registers are not patches
    g2, _ = create_backbone(name, device="cpu").embed(frames)
    np.testing.assert_array_equal(g, g2)  # random weights are seeded: every actor agrees


@pytest.mark.parametrize("name,layers", [("tiny-dinov2", ()), ("tiny-dinov2-reg", ()),
                                         ("tiny-ijepa", ()), ("tiny-vit", ()), ("tiny-vit", (1, 2)),
                                         ("tiny-dinov2", (1, 2))])
def test_traced_forward_pass_equals_eager_at_every_batch_size(name, layers):
    import torch

    traced = create_backbone(name, device="cpu", layers=layers)
    eager = create_backbone(name, device="cpu", layers=layers, trace=False)
    assert traced.trace and not eager.trace  # CPU traces by default
    rng = np.random.default_rng(1)
    # The trace is made on the first batch and checked against eager there and at the next
    # batch size; batches of 5 and 2 go through it unchecked and must still equal eager.
    for batch in (1, 3, 1, 5, 2):
        frames = rng.integers(0, 255, (batch, 224, 224, 3), dtype=np.uint8)
        for got, want in zip(traced.embed(frames), eager.embed(frames)):
            np.testing.assert_array_equal(got, want)
    assert isinstance(traced.traced_, torch.jit.ScriptModule) and traced.trace_error_ is None
    assert traced.trace_checked_ == {(1, 3, 224, 224), (3, 3, 224, 224)}


def test_a_trace_that_differs_from_eager_is_dropped_with_a_warning():
    import torch

    bb = create_backbone("tiny-dinov2", device="cpu")
    tokens = bb._tokens
    bb._tokens = lambda x: tokens(x) + torch.rand(())  # a trace replays other random draws
    frames = np.zeros((2, 224, 224, 3), np.uint8)
    with pytest.warns(UserWarning, match="running eager, not traced: the traced forward pass "
                                         "differs from eager"):
        bb.embed(frames)
    assert not bb.trace and bb.traced_ is None
    bb._tokens = tokens
    np.testing.assert_array_equal(bb.embed(frames)[1],
                                  create_backbone("tiny-dinov2", device="cpu").embed(frames)[1])


def test_ijepa_global_is_mean_of_patches():
    bb = create_backbone("tiny-ijepa", device="cpu")
    g, loc = bb.embed(np.zeros((1, 224, 224, 3), np.uint8) + 100)
    np.testing.assert_allclose(g, loc.mean(axis=1), rtol=1e-5, atol=1e-6)


def test_patch_grid_follows_input_size():
    bb = create_backbone("tiny-dinov2", image_size=448, device="cpu")
    _, loc = bb.embed(np.zeros((1, 448, 448, 3), np.uint8))
    assert loc.shape == (1, 1024, 32)
    with pytest.raises(ValueError, match="expected frames"):
        bb.embed(np.zeros((1, 224, 224, 3), np.uint8))


def test_weights_load_from_a_local_directory(tmp_path):
    bb = create_backbone("tiny-dinov2", device="cpu")
    bb.model.save_pretrained(tmp_path)
    again = create_backbone("tiny-dinov2", weights=str(tmp_path), device="cpu")
    frames = np.full((1, 224, 224, 3), 77, np.uint8)
    np.testing.assert_allclose(bb.embed(frames)[1], again.embed(frames)[1], atol=1e-6)
    fp = weights_fingerprint(get_spec("tiny-dinov2"), str(tmp_path))
    assert fp["weights"] == str(tmp_path) and len(fp["weights_sha256"]) == 64
    assert fp == weights_fingerprint(get_spec("tiny-dinov2"), str(tmp_path))


def test_missing_hub_weights_fail_with_a_clear_message():
    # HF_HUB_OFFLINE=1 (conftest): the hub id resolves through the cache only.
    with pytest.raises(RuntimeError, match="--weights"):
        resolve_weights(get_spec("dinov2-l14"), None)


@pytest.mark.skipif(not DINOV2_S.exists(), reason="shared DINOv2-S weights not present")
def test_real_dinov2_small_weights_load():
    bb = create_backbone("dinov2-s14", weights=str(DINOV2_S), device="cpu")
    g, loc = bb.embed(np.full((1, 224, 224, 3), 128, np.uint8))
    assert g.shape == (1, 384) and loc.shape == (1, 256, 384)
    assert np.isfinite(loc).all() and loc.std() > 0.1


@pytest.mark.parametrize("name", ["tiny-dinov2", "tiny-dinov2-reg", "tiny-ijepa", "tiny-vit"])
def test_layers_concatenate_blocks_through_the_final_norm(name):
    frames = np.random.default_rng(1).integers(0, 255, (2, 224, 224, 3), dtype=np.uint8)
    g_last, loc_last = create_backbone(name, device="cpu").embed(frames)
    both = create_backbone(name, device="cpu", layers=(1, 2))
    g, loc = both.embed(frames)
    assert both.dim == 64 and g.shape == (2, 64) and loc.shape == (2, 256, 64)
    # Block 2 of 2 through the final norm is the default (last) embedding.
    np.testing.assert_allclose(g[:, 32:], g_last, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loc[:, :, 32:], loc_last, rtol=1e-5, atol=1e-5)
    assert np.abs(loc[:, :, :32] - loc_last).max() > 1e-2  # block 1 is something else
    with pytest.raises(ValueError, match="blocks"):
        create_backbone(name, device="cpu", layers=(3,))
    # Asking for block 1 only runs block 1, and gives the same features as the two-block run.
    first = create_backbone(name, device="cpu", layers=(1,))
    assert first.depth == 1
    g1, loc1 = first.embed(frames)
    np.testing.assert_allclose(loc1, loc[:, :, :32], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g1, g[:, :32], rtol=1e-5, atol=1e-5)


def test_layers_are_parsed_and_checked():
    from vitad_ray.features.backbones import parse_layers

    assert parse_layers("8,12") == (8, 12) and parse_layers("") == ()
    with pytest.raises(ValueError, match="block numbers"):
        parse_layers("eight")
    with pytest.raises(ValueError, match="1-based"):
        get_spec("dinov2-s14", layers=(0, 12))


def test_bf16_autocast_is_a_choice_and_close_to_float32():
    frames = np.random.default_rng(0).integers(0, 255, (2, 224, 224, 3), np.uint8)
    fp32 = create_backbone("tiny-dinov2", device="cpu", trace=False, precision="fp32")
    bf16 = create_backbone("tiny-dinov2", device="cpu", trace=False, precision="bf16")
    assert not create_backbone("tiny-dinov2", device="cpu", trace=False).bf16  # auto on a CPU
    g32, l32 = fp32.embed(frames)
    g16, l16 = bf16.embed(frames)
    assert g16.dtype == np.float32 and l16.shape == l32.shape
    assert not np.array_equal(l16, l32)  # autocast did run in bf16
    cos = (l16 * l32).sum(-1) / np.linalg.norm(l16, axis=-1) / np.linalg.norm(l32, axis=-1)
    assert cos.min() > 0.99
    with pytest.raises(ValueError, match="precision"):
        create_backbone("tiny-dinov2", device="cpu", precision="fp8")


def test_the_papers_backbones_build_from_their_configs_without_weights():
    for name in ("vit-h14-in21k", "dinov2-l14", "ijepa-h14"):
        assert get_spec(name).random_config, name  # `--weights random` works offline
