"""Motion over time as a feature: how each patch's embedding changed since an earlier frame.

A cyclist and a pedestrian look alike in one frame at 224 x 224; they differ in how fast their
patches change. The change x_t - x_{t - lag} of a scope's embedding is modelled like any other
feature (nearest neighbours per scope, leave-one-clip-out calibration). It only looks back, so it
runs online with a buffer of ``lag`` frames per stream.
"""

from __future__ import annotations

import numpy as np

from ..data.embeddings import Embeddings


def past_rows(frame_index: np.ndarray, lag: int) -> np.ndarray:
    """For frames of one clip sorted by frame_index: the row of the latest frame at or before
    t - lag (the clip's first frame when there is none: a clip's first frames look still)."""
    frame_index = np.asarray(frame_index)
    rows = np.searchsorted(frame_index, frame_index - lag, side="right") - 1
    return np.maximum(rows, 0)


def patch_motion(emb: Embeddings, lag: int = 2) -> Embeddings:
    """Embeddings of change: global and every patch minus the same frame ``lag`` frames earlier
    (frame_index units, so subsampled clips keep the same time step)."""
    if lag < 1:
        raise ValueError(f"motion lag must be >= 1 frame, got {lag}")
    clips = emb.ids["clip"].to_numpy()
    index = emb.ids["frame_index"].to_numpy()
    local = np.empty_like(emb.local)
    global_ = np.empty_like(emb.global_)
    for clip in np.unique(clips):
        rows = np.flatnonzero(clips == clip)
        rows = rows[np.argsort(index[rows], kind="stable")]
        prev = rows[past_rows(index[rows], lag)]
        local[rows] = emb.local[rows] - emb.local[prev]
        global_[rows] = emb.global_[rows] - emb.global_[prev]
    return Embeddings(emb.ids, global_, local, dict(emb.metadata, motion_lag=lag))
