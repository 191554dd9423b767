"""Cross-clip normality: distances judged on the scale at which *unseen* normal clips fall.

Consecutive frames of one clip are near-duplicates, so a training vector's nearest neighbours
are almost always its own clip's neighbouring frames. The paper's loc_dens is then tiny and
``d / loc_dens`` saturates at 1 for nearly every test frame. Here every statistic of the
training set is taken leave-one-clip-out: a training vector is compared only with vectors of
*other* clips, exactly as a normal test frame from a new clip is compared with the training set.

``CrossClipNormality`` (scikit-learn style) holds, per scope:
- ``memory_`` [S, K, D]: the vectors a query is searched against (the training vectors and any
  memory-only ones, such as zoomed views of the training frames; all, or a k-center coreset);
- ``loo_d_`` [S, N]: each training vector's distance to its nearest memory vector of another clip;
- ``loc_dens_`` [S, K]: each memory vector's mean distance to its m nearest of other clips;
- ``mu_``, ``sigma_`` [S] and ``ref_sorted_`` [S, N]: the z-score and empirical-CDF calibration of
  raw distances, both fitted on ``loo_d_``.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import BaseEstimator

from ..search.coreset import kcenter_coreset
from ..search.knn import knn_stacked
from . import CALIBRATIONS


def loo_clip_neighbors(queries: np.ndarray, query_clips: np.ndarray, memory: np.ndarray,
                       memory_clips: np.ndarray, k: int = 1, device: str | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """For every query vector, its k nearest memory vectors that come from *other* clips.

    queries [S, Q, D], memory [S, K, D]; clips [Q] / [K] shared by all scopes, or [S, Q] / [S, K]
    per scope (a coreset keeps different rows in each scope). Returns (distance [S, Q, k],
    memory row [S, Q, k]), nearest first.
    """
    queries = np.asarray(queries, np.float32)
    memory = np.asarray(memory, np.float32)
    query_clips, memory_clips = np.asarray(query_clips), np.asarray(memory_clips)
    n_scopes, n_q = queries.shape[:2]
    if len(np.unique(memory_clips)) < 2:
        raise ValueError("leave-one-clip-out needs training frames from at least two clips")
    dist = np.empty((n_scopes, n_q, k), np.float32)
    rows = np.empty((n_scopes, n_q, k), np.int64)
    if query_clips.ndim == 1 and memory_clips.ndim == 1:
        import torch

        memory_t = torch.from_numpy(memory)
        sqnorm = (memory_t ** 2).sum(-1)
        for clip in np.unique(query_clips):
            q_rows = np.flatnonzero(query_clips == clip)
            own = np.flatnonzero(memory_clips == clip)
            if len(own) and own[-1] - own[0] + 1 == len(own):
                # The clip's rows are one run (frames sorted by clip): masked, not copied out.
                d, r = knn_stacked(queries[:, q_rows], memory_t, k=k, train_sqnorm=sqnorm,
                                   device=device, exclude=(int(own[0]), int(own[-1]) + 1))
                dist[:, q_rows], rows[:, q_rows] = d, r
                continue
            keep = np.flatnonzero(memory_clips != clip)
            d, r = knn_stacked(queries[:, q_rows], memory[:, keep], k=k, device=device)
            dist[:, q_rows], rows[:, q_rows] = d, keep[r]
        return dist, rows
    query_clips = np.broadcast_to(query_clips, (n_scopes, n_q))
    memory_clips = np.broadcast_to(memory_clips, memory.shape[:2])
    for s in range(n_scopes):
        d, r = loo_clip_neighbors(queries[s:s + 1], query_clips[s], memory[s:s + 1],
                                  memory_clips[s], k=k, device=device)
        dist[s], rows[s] = d[0], r[0]
    return dist, rows


class CrossClipNormality(BaseEstimator):
    """Per-scope nearest-neighbour normality with leave-one-clip-out density and calibration.

    ``coreset``: None (keep every training vector) or the fraction kept by greedy k-center.
    ``local_density``: whether to learn ``loc_dens_`` (the ``ratio`` calibration needs it; it
    costs a search of the memory against itself, the largest of a fit with memory-only vectors).
    """

    def __init__(self, m: int = 5, coreset: float | None = None, coreset_dim: int = 128,
                 seed: int = 0, device: str | None = None, local_density: bool = True):
        self.m, self.coreset, self.coreset_dim = m, coreset, coreset_dim
        self.seed, self.device, self.local_density = seed, device, local_density

    def fit(self, train: np.ndarray, clips: np.ndarray, extra: np.ndarray | None = None,
            extra_clips: np.ndarray | None = None) -> "CrossClipNormality":
        """train [S, N, D] (scopes first), clips [N]: the clip of each training frame. ``extra``
        [S, E, D] with ``extra_clips`` [E]: vectors that join the memory only (views of the
        training frames), left out with their clip like the clip's own frames."""
        train = np.ascontiguousarray(train, np.float32)
        clips = np.asarray(clips)
        self._memory_t = None
        n_scopes, n = train.shape[:2]
        memory, memory_clips = train, clips
        if extra is not None and np.shape(extra)[1]:
            memory = np.concatenate([train, np.asarray(extra, np.float32)], axis=1)
            memory_clips = np.concatenate([clips, np.asarray(extra_clips).astype(clips.dtype)])
            # Each clip's rows in one run: leave-one-clip-out masks them instead of copying.
            order = np.argsort(memory_clips, kind="stable")
            memory, memory_clips = np.ascontiguousarray(memory[:, order]), memory_clips[order]
        own_memory = memory is train
        if self.coreset is None:
            self.memory_ = memory
        else:
            if not 0 < self.coreset <= 1:
                raise ValueError(f"coreset is a fraction in (0, 1], got {self.coreset}")
            keep = kcenter_coreset(memory, max(self.m + 1, round(self.coreset * n)),
                                   proj_dim=self.coreset_dim, seed=self.seed, device=self.device)
            self.memory_ = np.take_along_axis(memory, keep[:, :, None], axis=1)
            memory_clips = memory_clips[keep]  # [S, K]
        self.memory_clips_ = memory_clips
        self.loc_dens_ = np.zeros((n_scopes, 0), np.float32)
        dens = None
        if self.local_density or (self.coreset is None and own_memory):
            dens, rows = loo_clip_neighbors(self.memory_, memory_clips, self.memory_,
                                            memory_clips, k=self.m, device=self.device)
            if self.local_density:
                self.loc_dens_ = dens.mean(axis=2)
        if dens is not None and self.coreset is None and own_memory:  # nearest of other clips
            self.loo_d_, self.loo_nn_ = dens[:, :, 0], rows[:, :, 0]
        else:
            d, nn = loo_clip_neighbors(train, clips, self.memory_, memory_clips, k=1,
                                       device=self.device)
            self.loo_d_, self.loo_nn_ = d[:, :, 0], nn[:, :, 0]
        self.mu_ = self.loo_d_.mean(axis=1)
        self.sigma_ = np.maximum(self.loo_d_.std(axis=1), 1e-6)
        self.ref_sorted_ = np.sort(self.loo_d_, axis=1)
        return self

    def nearest(self, queries: np.ndarray, scopes: slice = slice(None)
                ) -> tuple[np.ndarray, np.ndarray]:
        """(d [S', B], memory row [S', B]) of queries [S', B, D] for the scopes ``scopes``."""
        import torch

        if getattr(self, "_memory_t", None) is None:  # searched many times: convert once
            memory = np.ascontiguousarray(self.memory_, np.float32)
            with warnings.catch_warnings():
                # A read-only memory map of the model directory's array: searched, never
                # written, and its pages stay the page cache's (shared, evictable), not a copy.
                warnings.filterwarnings("ignore", message=".*not writable.*")
                self._memory_t = torch.from_numpy(memory)
            self._sqnorm_t = (self._memory_t ** 2).sum(-1)
        d, rows = knn_stacked(queries, self._memory_t[scopes], k=1,
                              train_sqnorm=self._sqnorm_t[scopes], device=self.device)
        return d[:, :, 0], rows[:, :, 0]

    @classmethod
    def from_state(cls, memory: np.ndarray, loc_dens: np.ndarray, mu: np.ndarray,
                   sigma: np.ndarray, ref_sorted: np.ndarray, m: int = 5,
                   device: str | None = None) -> "CrossClipNormality":
        """A fitted estimator from stored arrays (``memory_`` may be a memory map)."""
        est = cls(m=m, device=device)
        est.memory_, est.loc_dens_, est.mu_ = memory, loc_dens, mu
        est.sigma_, est.ref_sorted_ = sigma, ref_sorted
        return est

    def calibrate(self, d: np.ndarray, nn: np.ndarray, how: str, scopes: slice = slice(None)
                  ) -> np.ndarray:
        """Raw distances d [S, B] to memory rows nn [S, B] -> calibrated scores [S, B].

        raw: d. ratio: d / loc_dens(nn), uncapped, loc_dens leave-one-clip-out. zscore: (d - mu) /
        sigma of the leave-one-clip-out distances. ecdf: the share of those distances below d,
        continued past the largest by its z-distance, so the tail still ranks.
        """
        d = np.asarray(d, np.float32)
        if how == "raw":
            return d
        if how == "ratio":
            if not self.loc_dens_.shape[-1]:
                raise ValueError("the ratio calibration needs a fit with local_density=True")
            loc = np.take_along_axis(self.loc_dens_[scopes], nn, axis=1)
            return d / np.maximum(loc, 1e-6)
        mu, sigma = self.mu_[scopes, None], self.sigma_[scopes, None]
        if how == "zscore":
            return (d - mu) / sigma
        if how == "ecdf":
            ref = self.ref_sorted_[scopes]
            share = np.stack([np.searchsorted(r, x, side="right") for r, x in zip(ref, d)])
            beyond = np.maximum(0.0, (d - ref[:, -1:]) / sigma)
            return share.astype(np.float32) / ref.shape[1] + beyond
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {how!r}")

    def score(self, queries: np.ndarray, how: str) -> np.ndarray:
        d, nn = self.nearest(queries)
        return self.calibrate(d, nn, how)

    def train_scores(self, how: str) -> np.ndarray:
        """Leave-one-clip-out calibrated scores of the training vectors [S, N]: how normal frames
        of unseen clips score, the reference for frame-level statistics."""
        return self.calibrate(self.loo_d_, self.loo_nn_, how)
