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


def memory_layout(clips: np.ndarray, extra_clips: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where training vectors (clips [N]) and memory-only ones (extra_clips [E]) go in a memory:
    (order of concat(train, extra) [N + E], the memory rows' clips, each training vector's
    memory row [N]). Each clip's rows are one run, so leave-one-clip-out masks them instead of
    copying the rest; a clip's training vectors come first, in their order, then its extras."""
    clips = np.asarray(clips).astype(str)
    both = clips if extra_clips is None else np.concatenate(
        [clips, np.asarray(extra_clips).astype(str)])
    order = np.argsort(both, kind="stable")
    row = np.empty_like(order)
    row[order] = np.arange(len(order))
    return order, both[order], row[:len(clips)]


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
        self.train_rows_ = np.arange(n)
        if extra is not None and np.shape(extra)[1]:
            order, memory_clips, self.train_rows_ = memory_layout(clips, extra_clips)
            memory = np.ascontiguousarray(
                np.concatenate([train, np.asarray(extra, np.float32)], axis=1)[:, order])
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
            self.train_rows_ = None  # training vectors are not all in the memory
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
        self._calibrate_on_loo()
        return self

    def _calibrate_on_loo(self) -> None:
        self.mu_ = self.loo_d_.mean(axis=1)
        self.sigma_ = np.maximum(self.loo_d_.std(axis=1), 1e-6)
        self.ref_sorted_ = np.sort(self.loo_d_, axis=1)

    def update(self, train: np.ndarray, clips: np.ndarray, extra: np.ndarray | None = None,
               extra_clips: np.ndarray | None = None) -> "CrossClipNormality":
        """Adds the training vectors of new clips (and their memory-only ones), as a fit on
        every clip would hold them, without searching the old vectors against each other again:
        an old vector's nearest of another clip can only become a new vector; a new one is
        searched against the whole memory. The new training vectors come after the old ones
        (``reorder`` puts them in another order)."""
        if self.coreset is not None or getattr(self, "train_rows_", None) is None \
                or getattr(self, "loo_d_", None) is None:
            raise ValueError("an update needs a fit that kept every vector (no coreset) with "
                             "its leave-one-clip-out distances; refit instead")
        if self.local_density:
            raise ValueError("the ratio calibration's local densities are not updated; refit")
        train = np.ascontiguousarray(train, np.float32)
        clips = np.asarray(clips).astype(str)
        held = np.asarray(self.memory_clips_).astype(str)
        clash = sorted(set(np.unique(clips)) & set(np.unique(held)))
        if clash:
            raise ValueError(f"clips {clash[:5]} are in the memory already: an update adds "
                             "new clips")
        added, added_clips = train, clips
        if extra is not None and np.shape(extra)[1]:
            added = np.concatenate([train, np.asarray(extra, np.float32)], axis=1)
            added_clips = np.concatenate([clips, np.asarray(extra_clips).astype(str)])
        old = np.asarray(self.memory_, np.float32)
        d_added, _ = knn_stacked(old[:, self.train_rows_], added, k=1, device=self.device)
        loo_old = np.minimum(self.loo_d_, d_added[:, :, 0])
        # (old memory, new training vectors, their extras) laid out as a fit on all of them
        # would lay out its memory; ``rows``: where the old memory's and the new vectors' go.
        order, memory_clips, rows = memory_layout(
            np.concatenate([held, clips]), added_clips[train.shape[1]:])
        self.memory_ = np.ascontiguousarray(np.concatenate([old, added], axis=1)[:, order])
        self.memory_clips_ = memory_clips
        self._memory_t = None
        d, _ = loo_clip_neighbors(train, clips, self.memory_, memory_clips, k=1,
                                  device=self.device)
        self.loo_d_ = np.concatenate([loo_old, d[:, :, 0]], axis=1)
        self.loo_nn_ = None  # (only the ratio calibration reads it)
        self.train_rows_ = np.concatenate([rows[self.train_rows_], rows[old.shape[1]:]])
        self._calibrate_on_loo()
        return self

    def reorder(self, order: np.ndarray) -> "CrossClipNormality":
        """The training vectors in another order (the memory stays as it is)."""
        self.loo_d_, self.train_rows_ = self.loo_d_[:, order], self.train_rows_[order]
        if getattr(self, "loo_nn_", None) is not None:
            self.loo_nn_ = self.loo_nn_[:, order]
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
                   device: str | None = None, loo_d: np.ndarray | None = None,
                   train_rows: np.ndarray | None = None,
                   memory_clips: np.ndarray | None = None) -> "CrossClipNormality":
        """A fitted estimator from stored arrays (``memory_`` may be a memory map); with the
        training vectors' distances, memory rows and the memory's clips, it can ``update``."""
        est = cls(m=m, device=device, local_density=bool(np.shape(loc_dens)[-1]))
        est.memory_, est.loc_dens_, est.mu_ = memory, loc_dens, mu
        est.sigma_, est.ref_sorted_ = sigma, ref_sorted
        est.loo_d_, est.loo_nn_, est.train_rows_ = loo_d, None, train_rows
        est.memory_clips_ = memory_clips
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
