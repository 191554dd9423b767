"""The options beyond the paper: leave-one-clip-out density and calibration, frame aggregation,
temporal smoothing, k-center coreset and localization, on data whose answers are known."""

import numpy as np
import pytest

from vitad_ray.detect.aggregate import (causal_ema, causal_mean, fuse, pool_patches, standardize,
                                        topk_mean)
from vitad_ray.evaluation.localize import pixel_auroc, upsample_maps
from vitad_ray.normality.crossclip import CrossClipNormality, loo_clip_neighbors
from vitad_ray.normality.estimators import KMeansNormality
from vitad_ray.search.coreset import kcenter_coreset


def clips_of_near_duplicates(rng, n_clips=6, per_clip=30, dim=8, spread=1.0, jitter=0.01):
    """Each clip sits at its own offset (a scene's slow changes) with near-duplicate frames."""
    centres = rng.normal(0, spread, (n_clips, dim))
    x = np.concatenate([c + rng.normal(0, jitter, (per_clip, dim)) for c in centres])
    clips = np.repeat([f"{i:02d}" for i in range(n_clips)], per_clip)
    return x.astype(np.float32), clips


def test_loo_neighbours_never_come_from_the_own_clip_and_are_the_nearest_of_the_rest():
    rng = np.random.default_rng(0)
    x, clips = clips_of_near_duplicates(rng)
    d, rows = loo_clip_neighbors(x[None], clips, x[None], clips, k=3)
    assert (clips[rows[0]] != clips[:, None]).all()
    for i in (0, 45, 179):
        other = np.flatnonzero(clips != clips[i])
        brute = np.sort(np.linalg.norm(x[other] - x[i], axis=1))[:3]
        np.testing.assert_allclose(d[0, i], brute, rtol=1e-5)
    with pytest.raises(ValueError, match="two clips"):
        loo_clip_neighbors(x[None], np.zeros(len(x)), x[None], np.zeros(len(x)))


def test_a_normal_frame_of_an_unseen_clip_is_normal_only_on_the_cross_clip_scale():
    rng = np.random.default_rng(1)
    x, clips = clips_of_near_duplicates(rng, n_clips=7)
    train, test_clip = x[clips != "06"], x[clips == "06"]  # clip 06: normal, never seen
    train_clips = clips[clips != "06"]
    far = test_clip + 4.0  # an anomaly: well beyond how far clips fall from each other

    # The paper's in-sample loc_dens comes from near-duplicates: an unseen normal clip saturates.
    paper = KMeansNormality(k_min=2, k_max=3).fit(train)
    assert (paper.score_samples(test_clip) >= 1.0).mean() > 0.9

    est = CrossClipNormality(m=5).fit(train[None], train_clips)
    assert est.loc_dens_.shape == (1, len(train)) and est.loo_d_.shape == (1, len(train))
    assert est.loc_dens_.min() > 20 * 0.01  # cross-clip scale, not the jitter
    for how in ("zscore", "ecdf", "ratio"):
        normal = est.score(test_clip[None], how)[0]
        anomalous = est.score(far[None], how)[0]
        assert anomalous.min() > normal.max(), how
    z = est.score(test_clip[None], "zscore")[0]
    assert np.median(z) < 3.0  # a new normal clip falls where held-out clips fell
    share = est.score(test_clip[None], "ecdf")[0]
    assert ((share >= 0) & (share <= 1.0 + 1e-6)).mean() > 0.5
    ref = est.train_scores("zscore")
    np.testing.assert_allclose(ref.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(ref.std(), 1.0, rtol=1e-4)
    with pytest.raises(ValueError, match="calibration"):
        est.calibrate(z[None], None, "sigmoid")


def test_kcenter_keeps_one_vector_per_far_apart_blob_and_covers_the_set():
    rng = np.random.default_rng(2)
    blobs = np.concatenate([c + rng.normal(0, 0.05, (40, 4)) for c in np.eye(4) * 10
                            ] + [rng.normal(0, 0.05, (40, 4))]).astype(np.float32)
    keep = kcenter_coreset(blobs[None], 5, proj_dim=None)[0]
    assert len(set(keep // 40)) == 5  # one per blob
    keep = kcenter_coreset(blobs[None], 50, proj_dim=None)[0]
    assert len(set(keep)) == 50
    # Coverage: every vector lies within the greedy radius of the kept set.
    dist = np.linalg.norm(blobs[:, None] - blobs[keep][None], axis=2).min(axis=1)
    assert dist.max() < 0.2
    np.testing.assert_array_equal(kcenter_coreset(blobs[None], 9, seed=3),
                                  kcenter_coreset(blobs[None], 9, seed=3))
    with pytest.raises(ValueError, match="coreset size"):
        kcenter_coreset(blobs[None], 0)


def test_coreset_memory_is_the_kept_fraction_and_scores_stay_close():
    rng = np.random.default_rng(3)
    x, clips = clips_of_near_duplicates(rng, n_clips=6, per_clip=40, jitter=0.05)
    stacked = np.stack([x, x[:, ::-1].copy()])  # two scopes
    full = CrossClipNormality().fit(stacked, clips)
    small = CrossClipNormality(coreset=0.25).fit(stacked, clips)
    assert small.memory_.shape == (2, 60, 8)
    assert (small.memory_clips_.shape == (2, 60))
    q = stacked[:, :10] + rng.normal(0, 0.05, (2, 10, 8)).astype(np.float32)
    d_full, _ = full.nearest(q)
    d_small, _ = small.nearest(q)
    assert (d_small >= d_full - 1e-6).all()  # a subset is never nearer
    assert np.median(d_small - d_full) < 0.1


def test_topk_fusion_and_causal_smoothing():
    s = np.array([[0.0, 5.0, 1.0, 3.0], [2.0, 2.0, 2.0, 2.0]])
    np.testing.assert_allclose(topk_mean(s, 2), [4.0, 2.0])
    np.testing.assert_allclose(topk_mean(s, 0.25), [5.0, 2.0])
    np.testing.assert_allclose(standardize([1.0, 3.0], np.array([1.0, 3.0])), [-1.0, 1.0])
    np.testing.assert_allclose(fuse([1.0], [3.0], 0.25), [2.5])
    with pytest.raises(ValueError):
        fuse([1.0], [1.0], 1.5)

    clips = np.array(["b", "a", "a", "a", "b", "a"])
    index = np.array([1, 2, 0, 1, 0, 3])
    scores = np.array([10.0, 3.0, 1.0, 2.0, 20.0, 4.0])
    mean = causal_mean(scores, clips, index, window=2)
    # clip a in time order: 1, 2, 3, 4 -> 1, 1.5, 2.5, 3.5; clip b: 20, 10 -> 20, 15.
    np.testing.assert_allclose(mean, [15.0, 2.5, 1.0, 1.5, 20.0, 3.5])
    # Causal: changing a later frame never changes an earlier frame's smoothed score.
    later = scores.copy()
    later[5] = 100.0
    changed = causal_ema(later, clips, index, 2.0) != causal_ema(scores, clips, index, 2.0)
    np.testing.assert_array_equal(changed, [False, False, False, False, False, True])


def test_pooling_groups_neighbouring_patches():
    grid = np.zeros((1, 4, 4))
    grid[0, 1, 1] = 9.0
    pooled = pool_patches(grid.reshape(1, 16), 3).reshape(4, 4)
    # The 3 x 3 windows holding (1, 1) each get 9 / 9 = 1; the rest stay 0.
    np.testing.assert_allclose(pooled, np.pad(np.ones((3, 3)), ((0, 1), (0, 1))))
    np.testing.assert_array_equal(pool_patches(grid.reshape(1, 16), 1), grid.reshape(1, 16))
    # An object three patches wide outranks a lone spike twice as high once pooled.
    obj, spike = np.zeros((8, 8)), np.zeros((8, 8))
    obj[2:5, 2:5], spike[6, 6] = 1.0, 2.0
    frames = np.stack([obj.ravel(), spike.ravel()])
    assert topk_mean(frames, 1)[1] > topk_mean(frames, 1)[0]
    after = topk_mean(pool_patches(frames, 3), 1)
    assert after[0] > after[1]
    with pytest.raises(ValueError, match="square grid"):
        pool_patches(np.zeros((1, 10)), 3)


def test_localization_upsamples_the_grid_and_scores_pixels():
    maps = np.zeros((2, 4, 4), np.float32)
    maps[0, 1, 2] = 5.0
    up = upsample_maps(maps, (40, 40))
    assert up.shape == (2, 40, 40)
    assert np.unravel_index(up[0].argmax(), (40, 40)) in {(14, 24), (14, 25), (15, 24), (15, 25)}
    masks = np.zeros((2, 40, 40), bool)
    masks[0, 10:20, 20:30] = True
    assert pixel_auroc(maps, masks) > 0.95
    assert pixel_auroc(-maps, masks) < 0.1


def test_motion_is_the_change_since_lag_frames_earlier_in_frame_index_units():
    import pandas as pd

    from vitad_ray.data.embeddings import Embeddings
    from vitad_ray.detect.motion import past_rows, patch_motion

    np.testing.assert_array_equal(past_rows(np.array([0, 2, 4, 6, 8]), 4), [0, 0, 0, 1, 2])
    ids = pd.DataFrame({"clip": ["a"] * 4 + ["b"] * 3,
                        "frame_index": [0, 2, 4, 6, 0, 1, 2]})
    local = np.arange(7, dtype=np.float32)[:, None, None] ** 2 * np.ones((7, 4, 3), np.float32)
    emb = Embeddings(ids, local[:, 0], local, {})
    mot = patch_motion(emb, lag=2)
    # clip a (every 2nd frame): 0, 1, 4, 9 -> 0, 1-0, 4-1, 9-4; clip b: 16, 25, 36 -> 0, 25-16
    # (frame 1 has no frame 2 earlier: the clip's first frame stands in), 36-16.
    np.testing.assert_allclose(mot.local[:, 0, 0], [0, 1, 3, 5, 0, 9, 20])
    np.testing.assert_allclose(mot.global_[:, 0], mot.local[:, 0, 0])
    with pytest.raises(ValueError, match="lag"):
        patch_motion(emb, lag=0)
