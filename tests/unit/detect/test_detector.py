"""The Detector on vectors whose answers are known: streams, chunks, label-free thresholds, still
and one-frame anomalies, recipes."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from vitad_ray.data.embeddings import Embeddings
from vitad_ray.detect import (DEFAULT, PAPER, RECIPES, Detector, Recipe, StreamState, get_recipe,
                              label_free_threshold, loo_groups, recipe_from_model)
from vitad_ray.detect.offline import score_frames

GRID, DIM = 4, 6


def scene(rng, n_clips, frames, split="train", clip_spread=0.3, prefix="c"):
    """Patch vectors: a fixed scene per position, a slow per-clip drift, walkers (a travelling
    bump along the grid's rows), noise. Global = mean of the patches."""
    p = GRID * GRID
    base = np.random.default_rng(7).normal(0, 1, (p, DIM))
    rows, glob, loc = [], [], []
    for c in range(n_clips):
        drift = rng.normal(0, clip_spread, (1, DIM))
        speed = rng.uniform(0.5, 1.5)
        for t in range(frames):
            x = base + drift + rng.normal(0, 0.05, (p, DIM))
            walker = int(speed * t) % p
            x[walker] += 1.0
            rows.append({"frame_id": f"{prefix}{c}/{t}", "clip": f"{prefix}{c}", "frame_index": t,
                         "timestamp_s": t / 4.0, "split": split, "label": 0})
            loc.append(x)
            glob.append(x.mean(0))
    return Embeddings(pd.DataFrame(rows), np.asarray(glob, np.float32),
                      np.asarray(loc, np.float32), {})


RECIPE = DEFAULT.replace(image_size=None, block=None, zoom_views=(), top_k=0.1, pool=1,
                         motion_pool=1, motion_top_k=0.1, motion_lags=(1, 2), temporal_window=3)


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    return Detector(RECIPE).fit(scene(rng, 8, 40)), rng


def test_detector_is_a_scikit_learn_estimator(fitted):
    det, _ = fitted
    assert clone(det).get_params() == {"recipe": RECIPE, "device": None}
    assert not hasattr(clone(det), "streams_")
    assert set(det.streams_) == {"appearance", "motion-1", "motion-2"}
    assert det.train_scores_.shape == (8 * 40,)


def test_frames_one_at_a_time_score_as_the_whole_clip(fitted):
    det, rng = fitted
    test = scene(rng, 1, 30, "test", prefix="t")
    index = test.ids["frame_index"].to_numpy()
    whole = det.score(test.global_, test.local, index, StreamState())
    state, single = StreamState(), []
    for i in range(len(test)):
        single.append(det.score(test.global_[i:i + 1], test.local[i:i + 1], index[i:i + 1],
                                state).frame_score[0])
    np.testing.assert_allclose(single, whole.frame_score, atol=1e-9)
    # The state holds the last two frames' embeddings and two smoothing values, no more.
    assert len(state.frame_index) == 2 and len(state.motion) == 2
    assert state.nbytes == 2 * 4 * (DIM + GRID * GRID * DIM) + 8 * 4
    # Chunks that start from their context rows give the same scores as the clip at once.
    order, chunked = score_frames(det, test.ids, test.global_, test.local, chunk=7)
    np.testing.assert_array_equal(order, np.arange(len(test)))
    np.testing.assert_allclose(chunked.frame_score, whole.frame_score, atol=1e-9)
    with pytest.raises(ValueError, match="not after"):
        det.score(test.global_[:1], test.local[:1], index[:1], state)


def test_without_a_stream_only_appearance_scores(fitted):
    det, rng = fitted
    test = scene(rng, 1, 10, "test", prefix="t")
    index = test.ids["frame_index"].to_numpy()
    alone = det.score(test.global_, test.local, index, None)
    assert not alone.stateful and set(alone.evidence) == {"appearance"}
    assert alone.threshold == det.threshold_appearance_
    streamed = det.score(test.global_, test.local, index, StreamState())
    np.testing.assert_allclose(alone.evidence["appearance"], streamed.evidence["appearance"])


def test_label_free_threshold_hits_its_target_on_unseen_normal_clips():
    rng = np.random.default_rng(3)
    det = Detector(RECIPE.replace(target_fpr=0.05)).fit(scene(rng, 24, 40))
    assert (det.train_scores_ >= det.threshold_).mean() <= 0.05
    test = scene(rng, 24, 40, "test", prefix="t")
    _, out = score_frames(det, test.ids, test.global_, test.local)
    fpr = out.anomalous.mean()
    assert 0.01 <= fpr <= 0.10, fpr  # unseen normal clips fall as the left-out ones did
    # The in-sample alternative (no clip left out) would flag far more: its scale is too small.
    assert label_free_threshold(det.train_scores_, 0.05) == det.threshold_
    det.set_target_fpr(0.2)
    assert det.threshold_ < label_free_threshold(det.train_scores_, 0.05)


def test_label_free_threshold_arithmetic():
    s = np.arange(100, dtype=float)
    t = label_free_threshold(s, 0.05)
    assert (s >= t).sum() == 5 and 94 < t < 95
    assert (s >= label_free_threshold(s, 0.001)).sum() == 0


def _with_object(test, frames, patches, vector):
    local = test.local.copy()
    for t in frames:
        local[t, patches] = vector
    return Embeddings(test.ids, local.mean(axis=1), local, test.metadata)


def test_a_still_object_and_a_one_frame_event_are_flagged(fitted):
    """Motion and smoothing add evidence; they must not erase appearance evidence: a dropped
    object that never moves, and an object seen in one frame only."""
    det, rng = fitted
    test = scene(rng, 1, 40, "test", prefix="t")
    index = test.ids["frame_index"].to_numpy()
    obj = np.full(DIM, 3.0, np.float32)
    still = _with_object(test, range(10, 40), [5, 6, 9, 10], obj)
    out = det.score(still.global_, still.local, index, StreamState())
    assert out.anomalous[10:].all()
    assert (out.evidence["motion"][20:] < det.threshold_).all()  # no motion once it lies still
    assert all("appearance" in f for f in out.fired()[10:])
    flash = _with_object(test, [25], [5, 6, 9, 10], obj)
    out = det.score(flash.global_, flash.local, index, StreamState())
    assert out.anomalous[25] and out.frame_score[25] > out.frame_score[20:25].max()
    clean = det.score(test.global_, test.local, index, StreamState())
    assert clean.anomalous.mean() < 0.1
    # The patch grid shows where: the object's patches are the frame's highest.
    top = np.argsort(-out.patch_scores[25])[:4]
    assert set(top) == {5, 6, 9, 10}


def test_one_long_clip_is_cut_into_segments_for_leave_one_clip_out():
    ids = pd.DataFrame({"clip": ["cam"] * 100, "frame_index": np.arange(100),
                        "timestamp_s": np.arange(100) * 0.25})
    groups = loo_groups(ids["clip"], ids["frame_index"], ids["timestamp_s"], DEFAULT)
    assert list(np.unique(groups)) == ["cam#0", "cam#1", "cam#2"]  # 25 s in 10 s segments
    many = pd.DataFrame({"clip": np.repeat(list("abcd"), 10), "frame_index": np.tile(range(10), 4),
                         "timestamp_s": 0.0})
    assert list(loo_groups(many["clip"], many["frame_index"], many["timestamp_s"], DEFAULT)) \
        == list(many["clip"])
    with pytest.raises(ValueError, match="two training clips"):
        loo_groups(["x"] * 5, np.arange(5), np.zeros(5), DEFAULT)


def test_recipes_round_trip_through_model_json_and_yaml(tmp_path):
    for recipe in (*RECIPES.values(), RECIPE):
        doc = json.loads(json.dumps({"recipe": recipe.to_dict()}))
        assert recipe_from_model(doc) == recipe
    assert recipe_from_model({}) == PAPER  # models fitted before recipes existed
    # Fitted before zoomed views and motion's own pooling: none, and the appearance's.
    old = {k: v for k, v in DEFAULT.replace(pool=3, top_k=0.16).to_dict().items()
           if k not in ("zoom_views", "motion_pool", "motion_top_k")}
    assert recipe_from_model({"recipe": old}) == DEFAULT.replace(
        pool=3, top_k=0.16, motion_pool=3, motion_top_k=0.16, zoom_views=())
    with pytest.raises(ValueError, match="zoom views"):
        Recipe(zoom_views=(0.5,))
    path = tmp_path / "wide.yaml"
    path.write_text("base: default\nmotion_lags: [2, 4]\ntop_k: 0.04\n")
    wide = get_recipe(str(path))
    assert wide == DEFAULT.replace(name="wide", motion_lags=(2, 4), top_k=0.04)
    assert get_recipe("paper") is PAPER
    (tmp_path / "bad.yaml").write_text("top_kk: 3\n")
    with pytest.raises(ValueError, match="unknown recipe settings"):
        get_recipe(str(tmp_path / "bad.yaml"))
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("nope")
    with pytest.raises(ValueError, match="fusion"):
        Recipe(fusion="sum")


def test_recipe_blocks_resolve_against_the_backbone_depth():
    assert DEFAULT.layers_for(12) == (9,)
    assert DEFAULT.layers_for(32) == (24,)
    assert DEFAULT.layers_for(2) == ()  # a 2-block test backbone: its last block
    assert PAPER.layers_for(12) == ()


def test_recipes_are_chosen_on_the_calibration_clips_alone(fitted):
    from vitad_ray.detect.sweep import Sweep, choose_on_calibration, recipe_grid

    det, rng = fitted
    test = scene(rng, 4, 30, "test", prefix="t")
    local = test.local.copy()
    y = np.zeros(len(test), int)
    y[(test.ids["frame_index"] >= 15).to_numpy()] = 1  # the second half of every clip
    local[y == 1, 5] += 3.0  # one patch of 16 changes
    test = Embeddings(test.ids, local.mean(axis=1), local, {})
    sweep = Sweep(det, test.ids, test.global_, test.local)
    recipes = recipe_grid(RECIPE, top_k=[1, 8], motion_lags=[(), (1,)], temporal_window=[1, 3])
    assert len(recipes) == 6  # no window without motion
    is_calib = test.ids["clip"].isin(["t0", "t1"]).to_numpy()
    ranked = choose_on_calibration(sweep, recipes, y, is_calib)
    assert ranked[0][0].top_k == 1 and ranked[0][1] > 0.99  # the tail mean finds one patch
    # Scoring a recipe through the sweep equals fitting that recipe's detector and scoring.
    direct = det.with_recipe(ranked[0][0])
    _, alone = score_frames(direct, test.ids, test.global_, test.local)
    np.testing.assert_allclose(ranked[0][2].frame_score, alone.frame_score, atol=1e-9)
    # Labels of the evaluated clips play no part: flipping them changes nothing.
    flipped = np.where(is_calib, y, 1 - y)
    again = choose_on_calibration(sweep, recipes, flipped, is_calib)
    assert [r[0] for r in again] == [r[0] for r in ranked]
    with pytest.raises(ValueError, match="refit"):
        det.with_recipe(RECIPE.replace(motion_lags=(5,)))


def _views(train, clips, patches, vector):
    """Zoomed views of the training frames of ``clips`` (rows of split ``train@zoom1.5``) that
    show ``vector`` at ``patches``: what a walker nearer the camera looks like."""
    keep = train.ids["clip"].isin(clips).to_numpy()
    ids = train.ids[keep].copy()
    ids["frame_id"] = ids["frame_id"] + "@zoom1.5"
    ids["split"] = "train@zoom1.5"
    local = train.local[keep].copy()
    local[:, patches] = vector
    return Embeddings(ids, local.mean(axis=1), local, train.metadata)


def test_zoomed_views_join_the_memory_and_leave_with_their_clip():
    """Views make what they show normal for a new clip; a training frame is still judged
    without its own clip's views (leave-one-clip-out), so its clip's views change nothing of
    its own scores."""
    rng = np.random.default_rng(3)
    train = scene(rng, 6, 30)
    near = np.full(DIM, 2.5, np.float32)
    patches = [13, 14]
    recipe = RECIPE.replace(zoom_views=(1.5,))
    with pytest.raises(ValueError, match="zoom_views"):
        Detector(recipe).fit(train)
    plain = Detector(RECIPE).fit(train)
    zoomed = Detector(recipe).fit(train, views=_views(train, ["c0", "c1", "c2"], patches, near))
    assert zoomed.streams_["appearance"].memory_.shape[1] == 6 * 30 + 3 * 30
    test = scene(np.random.default_rng(4), 1, 30, "test", prefix="t")
    walker = _with_object(test, range(10, 20), patches, near)
    index = test.ids["frame_index"].to_numpy()
    before = plain.score(walker.global_, walker.local, index, StreamState())
    after = zoomed.score(walker.global_, walker.local, index, StreamState())
    # (Its arrival is motion evidence either way: the views never move.)
    assert (before.evidence["appearance"][10:20] >= plain.threshold_).all()
    assert (after.evidence["appearance"][10:20] < zoomed.threshold_).all()
    # Leave-one-clip-out: clips c3..c5 may now find the views of c0..c2 as their nearest; each
    # clip's own views never count for its frames.
    clips = plain.train_clips_
    for name in plain.streams_:
        a, b = plain.train_scope_scores_[name], zoomed.train_scope_scores_[name]
        assert (b <= a + 1e-6).all()
    # Views of the frames' own clip only (each clip's views at its own frames): none count.
    own = Detector(recipe).fit(train, views=_views(train, ["c0"], patches, near))
    c0 = clips == "c0"
    np.testing.assert_allclose(own.train_scope_scores_["appearance"][:, c0],
                               plain.train_scope_scores_["appearance"][:, c0], rtol=1e-6)


def test_an_update_with_new_clips_scores_as_a_fit_on_all_of_them():
    """``Detector.update`` adds clips (their frames, motion and views) to a fitted detector; it
    then holds the memory a fit on every clip holds and scores as that fit does."""
    rng = np.random.default_rng(5)
    train = scene(rng, 8, 30)
    near = np.full(DIM, 2.5, np.float32)
    views = _views(train, [f"c{i}" for i in range(8)], [13, 14], near)
    recipe = RECIPE.replace(zoom_views=(1.5,))
    first = train.ids["clip"].isin(["c0", "c1", "c2", "c5"]).to_numpy()
    first_views = views.ids["clip"].isin(["c0", "c1", "c2", "c5"]).to_numpy()
    updated = Detector(recipe).fit(train.select(first), views=views.select(first_views))
    updated.update(train.select(~first), views=views.select(~first_views))
    full = Detector(recipe).fit(train, views=views)
    assert list(updated.train_clips_) == list(full.train_clips_)
    for name, est in full.streams_.items():
        np.testing.assert_array_equal(updated.streams_[name].memory_, est.memory_)
        np.testing.assert_allclose(updated.train_scope_scores_[name],
                                   full.train_scope_scores_[name], rtol=1e-5, atol=1e-5)
    assert updated.threshold_ == pytest.approx(full.threshold_, rel=1e-5)
    test = scene(np.random.default_rng(6), 1, 30, "test", prefix="t")
    index = test.ids["frame_index"].to_numpy()
    a = updated.score(test.global_, test.local, index, StreamState())
    b = full.score(test.global_, test.local, index, StreamState())
    np.testing.assert_allclose(a.frame_score, b.frame_score, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already"):  # the same clips again
        updated.update(train.select(~first), views=views.select(~first_views))
    ratio = Detector(RECIPE.replace(calibration="ratio")).fit(train.select(first))
    with pytest.raises(ValueError, match="ratio"):
        ratio.update(train.select(~first))
