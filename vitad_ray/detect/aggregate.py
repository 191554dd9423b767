"""From patch scores to frame scores, and frame scores over time.

Each function is one named option beside the paper's majority vote (``score.vote_score``):
- ``topk_mean``: the mean of a frame's k highest patch scores (AnomalyDINO's tail mean): an
  object a few patches wide raises it, where a majority vote needs half the frame;
- ``pool_patches``: each patch's score averaged with its grid neighbours' (the paper's "grouping
  sensitive patches"): an object spans several neighbouring patches, noise mostly one;
- ``standardize`` + ``fuse``: global and local evidence on one scale (z against how normal
  frames of unseen clips score) and summed with a weight;
- ``causal_mean`` / ``causal_ema``: smoothing within a clip over past frames only, so it can run
  online on a stream.
"""

from __future__ import annotations

import math

import numpy as np

TEMPORAL = ("none", "mean", "ema")


def topk_mean(patch_scores: np.ndarray, k: int | float = 10) -> np.ndarray:
    """Mean of the k largest patch scores per frame: [B, P] -> [B].

    ``k`` is a count (int) or a share of the patches (float in (0, 1]).
    """
    patch_scores = np.asarray(patch_scores, np.float64)
    p = patch_scores.shape[1]
    count = k if isinstance(k, (int, np.integer)) else math.ceil(float(k) * p)
    count = int(min(max(1, count), p))
    top = np.partition(patch_scores, p - count, axis=1)[:, p - count:]
    return top.mean(axis=1)


def pool_patches(patch_scores: np.ndarray, size: int = 3) -> np.ndarray:
    """Mean over a size x size window of the square patch grid, per frame: [B, P] -> [B, P]
    (the grid's border repeated outward)."""
    from scipy.ndimage import uniform_filter

    patch_scores = np.asarray(patch_scores, np.float64)
    if size <= 1:
        return patch_scores
    b, p = patch_scores.shape
    grid = math.isqrt(p)
    if grid * grid != p:
        raise ValueError(f"{p} patches do not form a square grid")
    pooled = uniform_filter(patch_scores.reshape(b, grid, grid), size=(1, size, size),
                            mode="nearest")
    return pooled.reshape(b, p)


def standardize(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(scores - mean) / std of the reference (normal frames scored leave-one-clip-out)."""
    reference = np.asarray(reference, np.float64)
    return (np.asarray(scores, np.float64) - reference.mean()) / max(reference.std(), 1e-12)


def fuse(global_z: np.ndarray, local_z: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """weight * global + (1 - weight) * local, both already standardized."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"fusion weight must be in [0, 1], got {weight}")
    return weight * np.asarray(global_z, np.float64) + (1 - weight) * np.asarray(local_z, np.float64)


def _per_clip(scores: np.ndarray, clips: np.ndarray, frame_index: np.ndarray, fn) -> np.ndarray:
    scores = np.asarray(scores, np.float64)
    out = np.empty_like(scores)
    clips = np.asarray(clips)
    for clip in np.unique(clips):
        rows = np.flatnonzero(clips == clip)
        rows = rows[np.argsort(np.asarray(frame_index)[rows], kind="stable")]
        out[rows] = fn(scores[rows])
    return out


def causal_mean(scores: np.ndarray, clips: np.ndarray, frame_index: np.ndarray,
                window: int = 9) -> np.ndarray:
    """Mean of each frame's score and the window - 1 frames before it in its clip."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")

    def smooth(x):
        c = np.cumsum(np.r_[0.0, x])
        hi = np.arange(1, len(x) + 1)
        lo = np.maximum(0, hi - window)
        return (c[hi] - c[lo]) / (hi - lo)

    return _per_clip(scores, clips, frame_index, smooth)


def causal_ema(scores: np.ndarray, clips: np.ndarray, frame_index: np.ndarray,
               halflife: float = 4.0) -> np.ndarray:
    """Exponential moving average within each clip; a frame's weight halves every ``halflife``
    frames. Online it is one number of state per stream."""
    if halflife <= 0:
        raise ValueError(f"halflife must be > 0, got {halflife}")
    alpha = 1.0 - 0.5 ** (1.0 / halflife)

    def smooth(x):
        out = np.empty_like(x)
        acc = x[0] if len(x) else 0.0
        for i, v in enumerate(x):
            acc = v if i == 0 else (1 - alpha) * acc + alpha * v
            out[i] = acc
        return out

    return _per_clip(scores, clips, frame_index, smooth)


def smooth_in_time(scores: np.ndarray, clips: np.ndarray, frame_index: np.ndarray,
                   how: str = "none", size: float = 9) -> np.ndarray:
    if how == "none":
        return np.asarray(scores, np.float64)
    if how == "mean":
        return causal_mean(scores, clips, frame_index, int(size))
    if how == "ema":
        return causal_ema(scores, clips, frame_index, float(size))
    raise ValueError(f"temporal smoothing must be one of {TEMPORAL}, got {how!r}")
