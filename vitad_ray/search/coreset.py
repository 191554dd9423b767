"""Greedy k-center coreset per scope (PatchCore's subsampling).

Each step adds the vector farthest from the ones already chosen, so the kept set covers the
training set with the smallest radius it can greedily reach: nearest-neighbour distances to the
coreset stay close to those to the full set while the search shrinks to the kept fraction.
Distances for the selection are taken in a random projection (Johnson-Lindenstrauss), as
PatchCore does, which keeps the selection cheap at high dimension.
"""

from __future__ import annotations

import numpy as np


def kcenter_coreset(x: np.ndarray, size: int, proj_dim: int | None = 128, seed: int = 0,
                    device: str | None = None, scope_chunk: int = 64) -> np.ndarray:
    """Rows kept per scope: x [S, N, D] -> [S, size] (int64, in order of selection).

    The first row of each scope is drawn from ``seed``; every later one is the farthest from the
    rows already kept (ties: the lowest row).
    """
    import torch

    from .knn import _device

    x = np.asarray(x, np.float32)
    n_scopes, n, dim = x.shape
    if not 1 <= size <= n:
        raise ValueError(f"coreset size must be in 1..{n}, got {size}")
    dev = _device(device)
    gen = torch.Generator().manual_seed(seed)
    proj = None
    if proj_dim and proj_dim < dim:
        proj = (torch.randn(dim, proj_dim, generator=gen) / np.sqrt(proj_dim)).to(dev)
    first = torch.randint(0, n, (n_scopes,), generator=gen)
    out = np.empty((n_scopes, size), np.int64)
    with torch.inference_mode():
        for lo in range(0, n_scopes, scope_chunk):
            hi = min(n_scopes, lo + scope_chunk)
            v = torch.from_numpy(x[lo:hi]).to(dev)
            if proj is not None:
                v = v @ proj
            scope_ix = torch.arange(hi - lo, device=dev)
            chosen = first[lo:hi].to(dev)
            picked = [chosen]
            min_d = torch.linalg.vector_norm(v - v[scope_ix, chosen].unsqueeze(1), dim=-1)
            for _ in range(size - 1):
                chosen = torch.argmax(min_d, dim=1)
                picked.append(chosen)
                d = torch.linalg.vector_norm(v - v[scope_ix, chosen].unsqueeze(1), dim=-1)
                min_d = torch.minimum(min_d, d)
            out[lo:hi] = torch.stack(picked, dim=1).cpu().numpy()
    return out
