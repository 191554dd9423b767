"""Exact nearest-neighbour search by matrix multiplication (torch; GPU when present).

Squared distances come from |q|^2 + |x|^2 - 2 q.x, which loses precision when q is close to x;
the distance to the chosen neighbour is therefore recomputed directly from the difference.
Works on a stack of scopes at once: queries [S, B, D] against training vectors [S, N, D].
"""

from __future__ import annotations

import numpy as np


SPARE_CANDIDATES = 4


def _device(device: str | None):
    import torch

    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def knn_stacked(queries: np.ndarray, train: np.ndarray, k: int = 1, train_sqnorm=None,
                device: str | None = None, scope_chunk: int = 32):
    """k nearest training vectors for every query of every scope.

    queries [S, B, D], train [S, N, D] (float32). Returns (dist [S, B, k], index [S, B, k]) with
    true Euclidean distances, nearest first.
    """
    import torch

    dev = _device(device)
    queries = np.asarray(queries, np.float32)
    train_t = train if isinstance(train, torch.Tensor) else torch.from_numpy(np.asarray(train, np.float32))
    n_scopes, n_train = train_t.shape[0], train_t.shape[1]
    k = min(k, n_train)
    if train_sqnorm is None:
        train_sqnorm = (train_t.float() ** 2).sum(-1)
    dist_out = np.empty((n_scopes, queries.shape[1], k), np.float32)
    idx_out = np.empty((n_scopes, queries.shape[1], k), np.int64)
    with torch.inference_mode():
        for lo in range(0, n_scopes, scope_chunk):
            hi = min(n_scopes, lo + scope_chunk)
            x = train_t[lo:hi].to(dev)
            q = torch.from_numpy(queries[lo:hi]).to(dev)
            # |x|^2 - 2 q.x ranks neighbours like the squared distance (|q|^2 is constant per row).
            rank = torch.baddbmm(train_sqnorm[lo:hi].to(dev).unsqueeze(1), q, x.transpose(1, 2),
                                 alpha=-2.0)
            # The ranking carries float32 cancellation error, so near-ties can come out in
            # either order: take a few spare candidates and order them by exact distance. The
            # nearest vector then no longer depends on k, the batch shape or the thread count.
            cand = torch.topk(rank, min(n_train, k + SPARE_CANDIDATES), dim=-1, largest=False,
                              sorted=False).indices
            cand = torch.sort(cand, dim=-1).values  # equal distances: the lower row wins
            scope_ix = torch.arange(hi - lo, device=dev).view(-1, 1, 1)
            dist = torch.linalg.vector_norm(x[scope_ix, cand] - q.unsqueeze(2), dim=-1)
            dist, order = torch.sort(dist, dim=-1, stable=True)
            idx = torch.gather(cand, -1, order)[..., :k]
            dist = dist[..., :k]
            dist_out[lo:hi] = dist.cpu().numpy()
            idx_out[lo:hi] = idx.cpu().numpy()
    return dist_out, idx_out


def knn(queries: np.ndarray, train: np.ndarray, k: int = 1, device: str | None = None):
    """k nearest training vectors of one scope: queries [B, D], train [N, D] -> [B, k] each."""
    dist, idx = knn_stacked(np.asarray(queries, np.float32)[None], np.asarray(train, np.float32)[None],
                            k=k, device=device)
    return dist[0], idx[0]


def pairwise_distances(x: np.ndarray, device: str | None = None) -> np.ndarray:
    """Euclidean distance matrix [N, N] (float32, zero diagonal)."""
    import torch

    dev = _device(device)
    with torch.inference_mode():
        t = torch.from_numpy(np.asarray(x, np.float32)).to(dev)
        d = torch.cdist(t, t, compute_mode="donot_use_mm_for_euclid_dist" if len(x) < 512 else
                        "use_mm_for_euclid_dist")
        d.fill_diagonal_(0.0)
        return d.clamp_min_(0.0).cpu().numpy()
