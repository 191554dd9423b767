"""The Detector: one object from a frame's embeddings (and its stream's past) to a decision.

Every consumer (``vitad score``'s actors, the serving shards and ingress, ``vitad evaluate``,
the benchmarks) goes through it, so a rule, a fusion or a threshold means the same everywhere.

A frame is scored in three steps, split where a cluster splits the work:
1. ``queries``: the vectors each stream searches with: the frame's own embedding (appearance)
   and, per motion lag, its change since that many frames earlier in the stream;
2. ``scope_scores``: per stream and scope, the calibrated distance to the nearest training
   vector (leave-one-clip-out calibration, ``CrossClipNormality``); a shard computes it for
   its range of scopes;
3. ``decide``: per stream, patch scores pooled over the grid and their top-k mean, each on the
   scale of the training frames scored leave-one-clip-out; motion smoothed over the stream's
   last frames; appearance, motion and global evidence fused into one frame score; the
   decision at the threshold in force and the evidence that fired.

Streams carry their past in a ``StreamState`` (motion lags, the smoothing window), so frames
scored one at a time get the scores of a whole clip scored at once. Without a state a frame is
scored by the appearance part alone, against a threshold set for that part.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from sklearn.base import BaseEstimator

from ..data.frames import PAPER_FPS
from ..normality.crossclip import CrossClipNormality
from .aggregate import causal_mean, pool_patches, topk_mean
from .motion import past_rows
from .recipe import DEFAULT, Recipe

APPEARANCE = "appearance"
# The recipe settings a fitted stream depends on; the others (aggregation, fusion, smoothing,
# threshold) can change on fitted streams (``Detector.with_recipe``).
FITTED_SETTINGS = ("calibration", "m", "coreset", "loo_min_clips", "loo_segment_s", "zoom_views")
MOTION = "motion"
GLOBAL_EVIDENCE = "global"


def stream_names(recipe: Recipe) -> list[tuple[str, int]]:
    """(stream name, motion lag; 0 = appearance) in the order they are fitted and stored."""
    return [(APPEARANCE, 0)] + [(f"motion-{lag}", lag) for lag in recipe.motion_lags]


def loo_groups(clips: np.ndarray, frame_index: np.ndarray, timestamp_s: np.ndarray,
               recipe: Recipe, by_clip: bool | None = None) -> np.ndarray:
    """The groups that leave-one-clip-out leaves out: the training clips; or, with fewer than
    ``recipe.loo_min_clips`` clips (one long recording, say), segments of
    ``recipe.loo_segment_s`` seconds of each clip (frame_index / 4.17 fps where a clip has no
    timestamps). ``by_clip``: which of the two, when already decided for the frames that
    these rows are views of."""
    clips = np.asarray(clips).astype(str)
    if by_clip is None:
        by_clip = len(np.unique(clips)) >= recipe.loo_min_clips
    if by_clip:
        return clips
    t = np.asarray(timestamp_s, np.float64).copy()
    index = np.asarray(frame_index, np.float64)
    for clip in np.unique(clips):
        rows = clips == clip
        if np.ptp(t[rows]) == 0:
            t[rows] = index[rows] / PAPER_FPS
    segment = np.floor(t / recipe.loo_segment_s).astype(np.int64)
    groups = np.char.add(np.char.add(clips, "#"), segment.astype(str))
    if len(np.unique(groups)) < 2:
        raise ValueError(
            f"leave-one-clip-out needs at least two training clips or {recipe.loo_segment_s:g} s "
            "segments; give more training video (or a recipe with a shorter loo_segment_s)")
    return groups


def training_frames(emb, recipe: Recipe, by_clip: bool | None = None):
    """(embeddings [S, N, D], clips [N], frame_index [N], leave-one-clip-out groups [N]) of the
    training frames, sorted by clip and time (no copy beyond the scope-major one where they
    are sorted already). ``by_clip``: as ``loo_groups``."""
    from ..pipeline.fit import stack_scopes

    ids = emb.ids
    clips_all, index_all = ids["clip"].to_numpy(), ids["frame_index"].to_numpy()
    order = np.lexsort((index_all, clips_all))
    if np.array_equal(order, np.arange(len(order))):
        stacked = stack_scopes(emb.global_, emb.local)
    else:
        stacked = stack_scopes(emb.global_[order], emb.local[order])
    clips, index = clips_all[order], index_all[order]
    groups = loo_groups(clips, index, ids["timestamp_s"].to_numpy()[order], recipe, by_clip)
    return stacked, clips, index, groups


def by_clip(train_clips: np.ndarray, recipe: Recipe) -> bool:
    """Whether leave-one-clip-out leaves out clips (else segments) for these training clips."""
    return len(np.unique(np.asarray(train_clips).astype(str))) >= recipe.loo_min_clips


def view_frames(views, train_clips: np.ndarray, recipe: Recipe,
                clip_groups: bool | None = None) -> list[tuple]:
    """``training_frames`` of each zoom factor's views of the training frames (Embeddings
    whose split names the view), grouped for leave-one-clip-out as the frames they are views
    of: a view is left out with its frame's clip. ``clip_groups``: as ``loo_groups``'
    ``by_clip`` (default: decided on ``train_clips``)."""
    if views is None or not len(views):
        return []
    by_clip_ = by_clip(train_clips, recipe) if clip_groups is None else clip_groups
    split = views.ids["split"].to_numpy()
    return [training_frames(views.select(split == name), recipe, by_clip_)
            for name in sorted(set(split))]


def motion_vectors(x: np.ndarray, frame_index: np.ndarray, lag: int, n_past: int = 0
                   ) -> np.ndarray:
    """x[t] - x[latest frame at or before t - lag] for the rows of one stream in time order;
    the first ``n_past`` rows are the stream's past, only looked back at. [R, ...] -> [R - n_past,
    ...]."""
    prev = past_rows(frame_index, lag)[n_past:]
    return x[n_past:] - x[prev]


@dataclass
class StreamState:
    """What a stream's next frame needs of its past: the embeddings of its last ``max lag``
    frames and the motion evidence of its last ``temporal_window - 1`` frames."""

    frame_index: deque = field(default_factory=deque)
    global_: deque = field(default_factory=deque)
    local: deque = field(default_factory=deque)
    motion: deque = field(default_factory=deque)  # instant motion evidence, before smoothing
    last_used: float = field(default_factory=time.monotonic)
    frames_seen: int = 0
    last_index: int = -1  # frame_index of the stream's latest frame
    model: str = ""  # the served scene model whose stream it is

    @property
    def next_index(self) -> int:
        return self.last_index + 1

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.global_) + sum(a.nbytes for a in self.local)
                   + 8 * (len(self.frame_index) + len(self.motion)))

    def past(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        index = np.asarray(self.frame_index, np.int64)
        if not len(index):
            return index, None, None
        return index, np.stack(self.global_), np.stack(self.local)


@dataclass
class Detection:
    """Scores of a batch of frames: [B] each, patch_scores [B, P]."""

    frame_score: np.ndarray
    anomalous: np.ndarray
    patch_scores: np.ndarray
    evidence: dict[str, np.ndarray]  # name -> [B]
    threshold: float
    stateful: bool  # False: scored by the appearance part alone (no stream)
    extra: dict = field(default_factory=dict)  # a recipe's own per-frame columns
    limits: dict = field(default_factory=dict)  # evidence -> threshold (default: ``threshold``)

    def fired(self) -> list[list[str]]:
        """Per frame, the evidence at or above its threshold."""
        names = list(self.evidence)
        hits = np.stack([self.evidence[n] >= self.limits.get(n, self.threshold) for n in names],
                        axis=1)
        return [[n for n, h in zip(names, row) if h] for row in hits]

    def columns(self) -> dict[str, np.ndarray]:
        """The scores table's columns (DESIGN.md's contract), then the recipe's own."""
        out = {"frame_score": self.frame_score.astype(np.float32),
               "anomalous": self.anomalous.astype(bool),
               "patch_scores": self.patch_scores.astype(np.float32)}
        out.update({f"evidence_{n}": v.astype(np.float32) for n, v in self.evidence.items()})
        out["fired"] = np.asarray([",".join(f) for f in self.fired()], dtype=object)
        out.update(self.extra)
        return out


class Detector(BaseEstimator):
    """A fitted cross-clip detector for one scene. ``fit`` takes the training embeddings;
    learned state ends in ``_``. Scores: higher = more anomalous."""

    def __init__(self, recipe: Recipe = DEFAULT, device: str | None = None):
        self.recipe = recipe
        self.device = device

    # --- fit --------------------------------------------------------------------------------
    def fit(self, emb, y=None, views=None) -> "Detector":
        """emb: training ``Embeddings`` (frames of normal video, any clip order); views: their
        zoomed views (``vitad embed --zoom-views``), memory only."""
        self._check_views(views)
        stacked, clips, index, groups = training_frames(emb, self.recipe)
        extra = self.view_streams(view_frames(views, clips, self.recipe))
        states, loo = {}, {}
        for name, x in self.training_streams(stacked, clips, index):
            est = self.normality().fit(x, groups, *extra.get(name, (None, None)))
            states[name] = est
            loo[name] = est.train_scores(self.recipe.calibration)
        return self.set_fitted(states, loo, clips, index)

    def update(self, emb, views=None) -> "Detector":
        """Adds normal frames of new clips (``emb``; their zoomed ``views`` when the recipe has
        some) to every stream's memory and calibration without refitting the rest: it then
        scores as a fit on all the clips does (``CrossClipNormality.update``)."""
        self._check_views(views)
        old = by_clip(self.train_clips_, self.recipe)
        every = np.concatenate([self.train_clips_, emb.ids["clip"].to_numpy()])
        if by_clip(every, self.recipe) != old:
            raise ValueError("with these clips leave-one-clip-out would leave out clips instead "
                             "of segments: refit on all of them")
        stacked, clips, index, groups = training_frames(emb, self.recipe, old)
        extra = self.view_streams(view_frames(views, clips, self.recipe, old))
        for name, x in self.training_streams(stacked, clips, index):
            self.streams_[name].update(x, groups, *extra.pop(name, (None, None)))
        all_clips = np.concatenate([np.asarray(self.train_clips_).astype(str), clips.astype(str)])
        all_index = np.concatenate([self.train_index_, index])
        order = np.lexsort((all_index, all_clips))
        loo = {name: est.reorder(order).train_scores(self.recipe.calibration)
               for name, est in self.streams_.items()}
        return self.set_fitted(self.streams_, loo, all_clips[order], all_index[order])

    def _check_views(self, views) -> None:
        if bool(self.recipe.zoom_views) != (views is not None):
            raise ValueError(f"recipe {self.recipe.name!r} has zoom_views "
                             f"{list(self.recipe.zoom_views)}: give their views (the training "
                             "frames' rows of split 'train@zoom<factor>') exactly when it has some")

    def normality(self) -> CrossClipNormality:
        """An unfitted estimator of one stream, as the recipe sets it."""
        return CrossClipNormality(m=self.recipe.m, coreset=self.recipe.coreset,
                                  device=self.device,
                                  local_density=self.recipe.calibration == "ratio")

    def view_streams(self, view_sets: list[tuple]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per stream, (vectors [S, E, D], leave-one-clip-out groups [E]) of the views of the
        training frames (``view_frames``): each view set's own motion, within its own frames."""
        parts: dict[str, list] = {}
        for stacked, clips, index, groups in view_sets:
            for name, x in self.training_streams(stacked, clips, index):
                parts.setdefault(name, []).append((x, groups))
        return {name: (np.concatenate([x for x, _ in xs], axis=1),
                       np.concatenate([g for _, g in xs])) for name, xs in parts.items()}

    def training_streams(self, stacked: np.ndarray, clips: np.ndarray, index: np.ndarray):
        """(stream name, vectors [S, N, D]) from the training frames' embeddings [S, N, D],
        frames sorted by clip and time; one stream's array at a time."""
        for name, lag in stream_names(self.recipe):
            if not lag:
                yield name, stacked
                continue
            out = np.empty_like(stacked)
            for clip in np.unique(clips):
                rows = np.flatnonzero(clips == clip)
                prev = rows[past_rows(index[rows], lag)]
                out[:, rows] = stacked[:, rows] - stacked[:, prev]
            yield name, out
            del out

    def set_fitted(self, states: dict[str, CrossClipNormality], loo: dict[str, np.ndarray],
                   clips: np.ndarray, index: np.ndarray) -> "Detector":
        """The state of fitted streams and their training frames' leave-one-clip-out scores
        ([S, N] per stream, frames sorted by clip and time): evidence scales, training frame
        scores and the label-free thresholds."""
        self.streams_ = states
        self.train_scope_scores_ = loo
        self.train_clips_, self.train_index_ = np.asarray(clips), np.asarray(index)
        self.num_patches_ = int(next(iter(loo.values())).shape[0] - 1)
        self.grid_ = math.isqrt(self.num_patches_)
        raw = {name: self._raw_evidence(name, s) for name, s in loo.items()}
        self.evidence_mean_ = {n: float(r[1].mean()) for n, r in raw.items()}
        self.evidence_std_ = {n: max(float(r[1].std()), 1e-12) for n, r in raw.items()}
        self.global_mean_ = {n: float(s[0].mean()) for n, s in loo.items()}
        self.global_std_ = {n: max(float(s[0].std()), 1e-12) for n, s in loo.items()}
        z = {n: self._standardize(n, r) for n, r in raw.items()}
        scores = {}
        for stateful in (True, False):
            motion = None
            if stateful and self.recipe.motion_lags:
                motion = causal_mean(self._motion_instant(z), clips, index,
                                     self.recipe.temporal_window)
            frame, _, _ = self._fuse(z, motion, stateful)
            scores[stateful] = frame
        self.train_scores_ = scores[True]
        self.train_scores_appearance_ = scores[False]
        self.set_target_fpr(self.recipe.target_fpr)
        return self

    def with_recipe(self, recipe: Recipe) -> "Detector":
        """Another recipe's detector on these fitted streams, without refitting them: only the
        aggregation, fusion, smoothing and threshold settings may differ (and fewer lags)."""
        changed = [k for k in FITTED_SETTINGS if getattr(recipe, k) != getattr(self.recipe, k)]
        names = [n for n, _ in stream_names(recipe)]
        missing = [n for n in names if n not in self.streams_]
        if changed or missing:
            raise ValueError(f"recipe {recipe.name!r} needs a refit: it changes {changed} "
                             f"and needs streams {missing}")
        out = Detector(recipe, self.device)
        return out.set_fitted({n: self.streams_[n] for n in names},
                              {n: self.train_scope_scores_[n] for n in names},
                              self.train_clips_, self.train_index_)

    def set_target_fpr(self, target_fpr: float) -> "Detector":
        """Thresholds at which that share of training frames (scored leave-one-clip-out, as
        frames of unseen normal clips) is flagged."""
        if not 0 < target_fpr < 1:
            raise ValueError(f"target FPR is in (0, 1), got {target_fpr}")
        self.target_fpr_ = float(target_fpr)
        self.threshold_ = label_free_threshold(self.train_scores_, target_fpr)
        self.threshold_appearance_ = label_free_threshold(self.train_scores_appearance_,
                                                          target_fpr)
        return self

    # --- the three steps -------------------------------------------------------------------
    def queries(self, global_: np.ndarray, local: np.ndarray, frame_index: np.ndarray,
                state: StreamState | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per stream, (global [B, D], local [B, P, D]) to search with. Frames of one stream in
        time order; their past comes from ``state`` (None: appearance only)."""
        out = {APPEARANCE: (global_, local)}
        if state is None:
            return out
        frame_index = np.asarray(frame_index, np.int64)
        past_index, past_g, past_l = state.past()
        if state.frames_seen and frame_index[0] <= state.last_index:
            raise ValueError(f"frame {int(frame_index[0])} is not after the stream's last frame "
                             f"{state.last_index}")
        if np.any(np.diff(frame_index) <= 0):
            raise ValueError("frames of a stream must come in increasing frame order")
        n_past = len(past_index)
        index = np.concatenate([past_index, frame_index])
        g = global_ if past_g is None else np.concatenate([past_g, global_])
        loc = local if past_l is None else np.concatenate([past_l, local])
        for name, lag in stream_names(self.recipe)[1:]:
            out[name] = (motion_vectors(g, index, lag, n_past),
                         motion_vectors(loc, index, lag, n_past))
        return out

    def scope_scores(self, stream: str, queries: np.ndarray, scopes: slice = slice(None)
                     ) -> np.ndarray:
        """Calibrated nearest distances [S', B] of queries [S', B, D] in ``scopes``."""
        est = self.streams_[stream]
        d, nn = est.nearest(queries, scopes)
        return est.calibrate(d, nn, self.recipe.calibration, scopes)

    def decide(self, scores: dict[str, np.ndarray], frame_index: np.ndarray,
               state: StreamState | None, embeddings: tuple[np.ndarray, np.ndarray] | None = None
               ) -> Detection:
        """Scope scores [S, B] per stream -> the frames' detection; a state is advanced past
        these frames (``embeddings``: the frames' own (global, local), kept for motion)."""
        stateful = state is not None
        z = {name: self._standardize(name, self._raw_evidence(name, s))
             for name, s in scores.items()}
        motion = instant = None
        if stateful and self.recipe.motion_lags:
            instant = self._motion_instant(z)
            past = np.asarray(state.motion, np.float64)
            both = np.concatenate([past, instant])
            smoothed = causal_mean(both, np.zeros(len(both)), np.arange(len(both)),
                                   self.recipe.temporal_window)
            motion = smoothed[len(past):]
        frame, evidence, patch = self._fuse(z, motion, stateful)
        threshold = self.threshold_ if stateful else self.threshold_appearance_
        if stateful:
            self._advance(state, frame_index, embeddings, instant)
        return Detection(frame, frame >= threshold, patch, evidence, threshold, stateful)

    def score(self, global_: np.ndarray, local: np.ndarray, frame_index: np.ndarray,
              state: StreamState | None = None) -> Detection:
        """All three steps on this process: frames of one stream in time order."""
        from ..pipeline.fit import stack_scopes

        q = self.queries(global_, local, frame_index, state)
        scores = {name: self.scope_scores(name, stack_scopes(*v)) for name, v in q.items()}
        return self.decide(scores, frame_index, state, (global_, local))

    # --- internals --------------------------------------------------------------------------
    def _raw_evidence(self, stream: str, scope_scores: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[S, B] -> (global [B], frame evidence [B], pooled patch scores [B, P])."""
        r = self.recipe
        pool, top = (r.pool, r.top_k) if stream == APPEARANCE else (r.motion_pool, r.motion_top_k)
        patch = pool_patches(np.asarray(scope_scores[1:], np.float64).T, pool)
        return np.asarray(scope_scores[0], np.float64), topk_mean(patch, top), patch

    def _standardize(self, name: str, raw: tuple) -> tuple:
        g, frame, patch = raw
        mean, std = self.evidence_mean_[name], self.evidence_std_[name]
        return ((g - self.global_mean_[name]) / self.global_std_[name], (frame - mean) / std,
                (patch - mean) / std)

    def _motion_instant(self, z: dict) -> np.ndarray:
        names = [n for n, lag in stream_names(self.recipe) if lag]
        return np.mean([z[n][1] for n in names], axis=0)

    def _fuse(self, z: dict, motion: np.ndarray | None, stateful: bool
              ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """(frame score [B], evidence by name [B], patch scores [B, P])."""
        evidence = {APPEARANCE: z[APPEARANCE][1]}
        patches = [z[APPEARANCE][2]]
        if stateful and motion is not None:
            evidence[MOTION] = motion
            patches.append(np.mean([z[n][2] for n, lag in stream_names(self.recipe) if lag],
                                   axis=0))
        stack = np.stack(list(evidence.values()))
        local = stack.max(axis=0) if self.recipe.fusion == "max" else stack.mean(axis=0)
        patch = np.max(patches, axis=0) if self.recipe.fusion == "max" else np.mean(patches, 0)
        frame = local
        w = self.recipe.global_weight
        if w > 0:
            evidence[GLOBAL_EVIDENCE] = z[APPEARANCE][0]
            frame = (1 - w) * local + w * z[APPEARANCE][0]
        return frame, evidence, patch

    def _advance(self, state: StreamState, frame_index: np.ndarray, embeddings,
                 motion_instant: np.ndarray | None) -> None:
        keep_frames = max(self.recipe.motion_lags, default=0)
        if keep_frames and embeddings is None:
            raise ValueError("a stream's state needs the frames' embeddings for motion")
        for i, fi in enumerate(np.asarray(frame_index, np.int64)):
            if keep_frames:
                state.frame_index.append(int(fi))
                state.global_.append(np.array(embeddings[0][i], np.float32))
                state.local.append(np.array(embeddings[1][i], np.float32))
            if motion_instant is not None:
                state.motion.append(float(motion_instant[i]))
        for buf in (state.frame_index, state.global_, state.local):
            while len(buf) > keep_frames:
                buf.popleft()
        while len(state.motion) > self.recipe.temporal_window - 1:
            state.motion.popleft()
        state.frames_seen += len(frame_index)
        state.last_index = int(frame_index[-1])
        state.last_used = time.monotonic()


def label_free_threshold(train_scores: np.ndarray, target_fpr: float) -> float:
    """The smallest threshold that flags at most ``target_fpr`` of the training frames (scored
    leave-one-clip-out): the false-alarm rate to expect on normal frames of unseen clips."""
    s = np.sort(np.asarray(train_scores, np.float64))
    allowed = int(math.floor(target_fpr * len(s)))  # frames that may sit at or above it
    if allowed <= 0:
        return float(np.nextafter(s[-1], np.inf))
    # Between the highest frame kept below and the lowest one allowed above.
    below, above = s[len(s) - allowed - 1], s[len(s) - allowed]
    return float((below + above) / 2) if above > below else float(np.nextafter(above, np.inf))
