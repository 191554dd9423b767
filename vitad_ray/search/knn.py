"""Exact nearest-neighbour search by matrix multiplication (torch; GPU when present).

Squared distances come from |q|^2 + |x|^2 - 2 q.x, which loses precision when q is close to x;
the distance to the chosen neighbour is therefore recomputed directly from the difference.
Works on a stack of scopes at once: queries [S, B, D] against training vectors [S, N, D].

A search of a few queries reads every training vector once and is bound by memory bandwidth.
``ProjectedSearch`` reads a small projection instead: candidates are ranked by a lower bound of
their distance and each answer is certified exact (or searched again in full), see its
docstring.
"""

from __future__ import annotations

import numpy as np

SPARE_CANDIDATES = 4


def _device(device: str | None):
    import torch

    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _nearest_candidates(train, queries, cand, k: int, scope_ix=None):
    """The k candidates nearest by exact distance: (dist [S, B, k], row [S, B, k]).

    train [S, N, D], queries [S, B, D], cand [S, B, C] candidate rows (torch tensors). With
    ``scope_ix`` [S'] the i-th row of queries and cand belongs to scope ``scope_ix[i]`` of train
    (S' rows of any scopes)."""
    import torch

    cand = torch.sort(cand, dim=-1).values  # equal distances: the lower row wins
    if scope_ix is None:
        scope_ix = torch.arange(train.shape[0], device=cand.device)
    n_train, dim = train.shape[1], train.shape[2]
    # One index_select on the flattened rows: half the time of advanced indexing on CPU.
    rows = train.reshape(-1, dim).index_select(0, (scope_ix.view(-1, 1, 1) * n_train + cand)
                                               .flatten()).view(*cand.shape, dim)
    dist = torch.linalg.vector_norm(rows - queries.unsqueeze(2), dim=-1)
    dist, order = torch.sort(dist, dim=-1, stable=True)
    return dist[..., :k], torch.gather(cand, -1, order)[..., :k]


def knn_stacked(queries: np.ndarray, train: np.ndarray, k: int = 1, train_sqnorm=None,
                device: str | None = None, scope_chunk: int = 32,
                exclude: tuple[int, int] | None = None):
    """k nearest training vectors for every query of every scope.

    queries [S, B, D], train [S, N, D] (float32). Returns (dist [S, B, k], index [S, B, k]) with
    true Euclidean distances, nearest first. ``exclude``: a range of training rows [lo, hi) no
    query may take (its own clip, leave-one-clip-out) without copying the rest.
    """
    import torch

    dev = _device(device)
    queries = np.asarray(queries, np.float32)
    train_t = train if isinstance(train, torch.Tensor) else torch.from_numpy(np.asarray(train, np.float32))
    n_scopes, n_train = train_t.shape[0], train_t.shape[1]
    k = min(k, n_train - (exclude[1] - exclude[0] if exclude else 0))
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
            if exclude is not None:
                rank[..., exclude[0]:exclude[1]] = float("inf")
            # The ranking carries float32 cancellation error, so near-ties can come out in
            # either order: take a few spare candidates and order them by exact distance. The
            # nearest vector then no longer depends on k, the batch shape or the thread count.
            cand = torch.topk(rank, min(n_train, k + SPARE_CANDIDATES), dim=-1, largest=False,
                              sorted=False).indices
            dist, idx = _nearest_candidates(x, q, cand, k)
            dist_out[lo:hi] = dist.cpu().numpy()
            idx_out[lo:hi] = idx.cpu().numpy()
    return dist_out, idx_out


# Unit roundoff of float32: rounding moves a D-term dot product by at most about D units of
# |a||b| (Higham's gamma_D, the worst case).
_F32_UNIT = 2.0 ** -24


class ProjectedSearch:
    """Exact k-NN over a stack of scopes that reads a small projection instead of every vector.

    Per scope, the training vectors are centred and projected on their top ``dims`` principal
    axes; each keeps its projection z and the norm e of what the projection leaves out. For a
    query with (z_q, e_q), |z_q - z|^2 + (e_q - e)^2 is a lower bound of the squared distance
    (the left-out parts are at least |e_q - e| apart), and it is one (dims + 1)-wide matmul. The
    ``k + spare`` vectors with the smallest bound are measured exactly on the float32 vectors,
    and the answer is certified when the k-th exact distance is below the bound of every vector
    left out (with the float32 rounding of the bound allowed for). An uncertified answer gets a
    second round with ``second_round`` times the candidates, then a full search. The answers are
    the exact k nearest, as ``knn_stacked`` gives them (it can only differ among near-copies that
    its float32 ranking cannot order), while a lone query reads (dims + 1) / D of the training
    data (65 / 384 for DINOv2-S at the default dims=64).

    Pays for small batches only: each query measures its candidates exactly, so past a few
    queries that costs more than one full pass. ``train`` is [S, N, D] float32 (tensor or numpy
    array), kept as given for the exact distances and the fallback.
    """

    def __init__(self, train, dims: int = 64, spare: int = 32, second_round: int = 8):
        import torch

        self.train_ = train if isinstance(train, torch.Tensor) else torch.from_numpy(
            np.asarray(train, np.float32))
        n_scopes, n_train, dim = self.train_.shape
        self.dims, self.spare, self.dim = min(dims, dim - 1), spare, dim
        self.second_round = second_round  # candidates of the second round, x the first's
        self.pairs_per_round = 64  # (scope, query) pairs measured together in the second round
        self.mean_ = torch.empty(n_scopes, 1, dim)
        self.axes_ = torch.empty(n_scopes, dim, self.dims)           # principal axes
        # [z, e] of each vector, a column each: the bound of one query then reads every row of
        # a scope from start to end (a fifth faster than rows of dims + 1 on this CPU).
        self.coords_ = torch.empty(n_scopes, self.dims + 1, n_train)
        self.sqnorm_ = torch.empty(n_scopes, n_train)                 # |z|^2 + e^2
        self.radius_ = torch.empty(n_scopes)                          # max |x - mean|
        with torch.inference_mode():
            for s in range(n_scopes):  # one scope at a time: no second float32 copy
                x = self.train_[s].double()
                mean = x.mean(0)
                centred = x - mean
                _, vecs = torch.linalg.eigh(centred.T @ centred)
                axes = vecs[:, -self.dims:].flip(-1)
                z = centred @ axes
                e = (centred - z @ axes.T).norm(dim=-1, keepdim=True)
                coords = torch.cat([z, e], dim=-1).float()
                self.mean_[s, 0], self.axes_[s] = mean.float(), axes.float()
                self.coords_[s] = coords.T
                self.sqnorm_[s] = (coords.double() ** 2).sum(-1).float()
                self.radius_[s] = centred.norm(dim=-1).max().float()
        # (scope, query) answers certified in the first round, in the second, or searched in
        # full: for benchmarks and tests.
        self.certified_ = self.second_round_ = self.fallback_ = 0

    def search(self, queries: np.ndarray, k: int = 1, scopes: slice = slice(None)):
        """(dist [S, B, k], index [S, B, k]) for queries [S, B, D] of the scopes ``scopes``."""
        import torch

        queries = np.asarray(queries, np.float32)
        train = self.train_[scopes]
        n_train = train.shape[1]
        k = min(k, n_train)
        n_cand = min(n_train, k + self.spare)
        if n_cand == n_train:  # nothing to leave out: plain exact search
            return knn_stacked(queries, train, k=k, device="cpu")
        mean, axes, coords = self.mean_[scopes], self.axes_[scopes], self.coords_[scopes]
        with torch.inference_mode():
            q = torch.from_numpy(queries)
            centred = q - mean                                        # [S, B, D]
            z = torch.bmm(centred, axes)                              # [S, B, dims]
            e = (centred - torch.bmm(z, axes.transpose(1, 2))).norm(dim=-1, keepdim=True)
            q_coords = torch.cat([z, e], dim=-1)
            q_sqnorm = (q_coords ** 2).sum(-1)                        # [S, B]
            bound = torch.baddbmm(self.sqnorm_[scopes].unsqueeze(1), q_coords, coords,
                                  alpha=-2.0)  # + q_sqnorm: below
            val, cand = torch.topk(bound, n_cand, dim=-1, largest=False, sorted=False)
            dist, idx = _nearest_candidates(train, q, cand, k)
            # Every vector left out has bound >= the largest candidate's. Allow for the float32
            # rounding of the bound and of the query's projection: each moves the bound by about
            # D units of (|q - mean| + radius)^2 at worst; the slack is 16 times that.
            reach = centred.norm(dim=-1) + self.radius_[scopes].unsqueeze(1)
            slack = 16 * (self.dim + 2) * _F32_UNIT * reach ** 2

            def left_out_above(cand_bound, q_sq, sl, kth_dist):
                """No vector outside the candidates can be nearer than the k-th candidate."""
                worst = cand_bound.max(dim=-1).values
                return torch.sqrt((worst + q_sq - sl).clamp_min(0.0)) > kth_dist

            certified = left_out_above(val, q_sqnorm, slack, dist[..., -1])
            dist_out, idx_out = dist.numpy().copy(), idx.numpy().copy()
            self.certified_ += int(certified.sum())
            # Answers not certified: a second round with many more candidates (the bounds are
            # already there), all such (scope, query) pairs at once, then a full search for
            # whatever is still not certified.
            pairs = torch.nonzero(~certified)
            n_more = min(n_train, self.second_round * n_cand)
            for lo in range(0, len(pairs), self.pairs_per_round):
                s_ix, b_ix = pairs[lo:lo + self.pairs_per_round].unbind(1)
                val, more = torch.topk(bound[s_ix, b_ix], n_more, dim=-1, largest=False,
                                       sorted=False)
                d, i = _nearest_candidates(train, q[s_ix, b_ix].unsqueeze(1), more.unsqueeze(1),
                                           k, scope_ix=s_ix)
                d, i = d[:, 0], i[:, 0]
                ok = left_out_above(val, q_sqnorm[s_ix, b_ix], slack[s_ix, b_ix], d[:, -1])
                if n_more == n_train:
                    ok[:] = True  # every vector was measured
                s_ok, b_ok = s_ix[ok].numpy(), b_ix[ok].numpy()
                dist_out[s_ok, b_ok], idx_out[s_ok, b_ok] = d[ok].numpy(), i[ok].numpy()
                self.second_round_ += len(s_ok)
                certified[s_ix[ok], b_ix[ok]] = True
            for s in torch.nonzero(~certified.all(dim=1)).flatten().tolist():
                rest = torch.nonzero(~certified[s]).flatten().numpy()
                self.fallback_ += len(rest)
                d, i = knn_stacked(queries[s:s + 1, rest], train[s:s + 1], k=k, device="cpu")
                dist_out[s, rest], idx_out[s, rest] = d[0], i[0]
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
