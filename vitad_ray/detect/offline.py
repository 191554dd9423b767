"""Scoring recorded frames with a Detector: each clip is a stream, in time order.

A clip is scored in chunks of frames; each chunk starts a stream state from the frames before it
(``Recipe.context_frames`` of them, scored and dropped), so chunks can go to different workers
and still give the scores of the whole clip scored at once.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .detector import Detection, Detector, StreamState


def clip_rows(ids: pd.DataFrame) -> list[np.ndarray]:
    """Row numbers of each clip, in time order."""
    clips = ids["clip"].to_numpy()
    index = ids["frame_index"].to_numpy()
    out = []
    for clip in pd.unique(clips):
        rows = np.flatnonzero(clips == clip)
        out.append(rows[np.argsort(index[rows], kind="stable")])
    return out


def chunks(rows: np.ndarray, size: int, context: int) -> list[tuple[np.ndarray, int]]:
    """(rows to score, how many leading rows are context only) for chunks of one clip."""
    out = []
    for lo in range(0, len(rows), size):
        start = max(0, lo - context)
        out.append((rows[start:lo + size], lo - start))
    return out


def concat(parts: list[Detection]) -> Detection:
    first = parts[0]
    return Detection(
        np.concatenate([p.frame_score for p in parts]),
        np.concatenate([p.anomalous for p in parts]),
        np.concatenate([p.patch_scores for p in parts]),
        {k: np.concatenate([p.evidence[k] for p in parts]) for k in first.evidence},
        first.threshold, first.stateful,
        {k: np.concatenate([p.extra[k] for p in parts]) for k in first.extra}, first.limits)


def score_chunk(detector: Detector, global_: np.ndarray, local: np.ndarray,
                frame_index: np.ndarray, n_context: int) -> Detection:
    """Frames of one clip in time order, the first ``n_context`` of them only its past."""
    state = StreamState()
    if n_context:
        detector.score(global_[:n_context], local[:n_context], frame_index[:n_context], state)
    return detector.score(global_[n_context:], local[n_context:], frame_index[n_context:], state)


def score_frames(detector: Detector, ids: pd.DataFrame, global_: np.ndarray, local: np.ndarray,
                 chunk: int = 256) -> tuple[np.ndarray, Detection]:
    """Every clip of a set of frames as a stream: (row order, detections in that order)."""
    order, parts = [], []
    for rows in clip_rows(ids):
        for sel, n_context in chunks(rows, chunk, detector.recipe.context_frames):
            parts.append(score_chunk(detector, global_[sel], local[sel],
                                     ids["frame_index"].to_numpy()[sel], n_context))
            order.append(sel[n_context:])
    return np.concatenate(order), concat(parts)
