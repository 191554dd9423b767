"""Chroma layout of a model: one store per shard, one collection per scope.

A collection ``<backbone>.<scope>`` holds one record per training frame: id = frame_id, the
embedding, and metadata ``cluster`` and ``loc_dens``. A store is either a folder (embedded
PersistentClient: one writer process per folder) or the URL of a ``chroma run`` server.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

GLOBAL = "global"


def scope_names(num_patches: int) -> list[str]:
    width = max(3, len(str(num_patches - 1)))
    return [GLOBAL] + [f"patch-{i:0{width}d}" for i in range(num_patches)]


def collection_name(backbone: str, scope: str) -> str:
    return f"{backbone}.{scope}"


def shard_of(scope_index: int, n_scopes: int, n_shards: int) -> int:
    """Contiguous ranges of scopes per shard, so a shard serves neighbouring patches."""
    return scope_index * n_shards // n_scopes


def shard_location(model_dir: str | os.PathLike, shard: int, server_url: str | None = None) -> str:
    if server_url:
        return server_url
    return str(Path(model_dir) / "chroma" / f"shard-{shard:02d}")


def open_client(location: str):
    """A Chroma client for a store folder or an ``http://host:port`` server."""
    import chromadb
    from chromadb.config import Settings

    settings = Settings(anonymized_telemetry=False, allow_reset=False)
    if location.startswith(("http://", "https://")):
        url = urlparse(location)
        return chromadb.HttpClient(host=url.hostname, port=url.port or 8000,
                                   ssl=url.scheme == "https", settings=settings)
    Path(location).mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=location, settings=settings)


class ScopeStore:
    """Reads and writes scope collections in one Chroma store."""

    def __init__(self, location: str, hnsw_ef_search: int = 200):
        self.location = location
        self.client = open_client(location)
        self.hnsw_ef_search = hnsw_ef_search
        self._max_batch = self.client.get_max_batch_size()
        self._collections: dict[str, object] = {}

    def _collection(self, name: str):
        if name not in self._collections:
            self._collections[name] = self.client.get_collection(name, embedding_function=None)
        return self._collections[name]

    def write_scope(self, name: str, ids: list[str], vectors: np.ndarray, cluster: np.ndarray,
                    loc_dens: np.ndarray) -> None:
        """(Re)write one scope's collection; a half-written earlier attempt is replaced."""
        from chromadb.errors import NotFoundError

        # Delete by name, not after listing every collection: a listing grows with the store
        # and made a 257-scope fit quadratic in the number of scopes.
        with contextlib.suppress(NotFoundError):
            self.client.delete_collection(name)
        self._collections.pop(name, None)
        coll = self.client.create_collection(
            name, embedding_function=None,
            configuration={"hnsw": {"space": "l2", "ef_search": self.hnsw_ef_search,
                                    "ef_construction": 200}})
        vectors = np.asarray(vectors, np.float32)
        for lo in range(0, len(ids), self._max_batch):
            hi = min(len(ids), lo + self._max_batch)
            # `row` is the vector's position in the fit order, which HDBSCAN's state indexes.
            coll.add(ids=list(ids[lo:hi]), embeddings=vectors[lo:hi],
                     metadatas=[{"row": lo + j, "cluster": int(c), "loc_dens": float(d)}
                                for j, (c, d) in enumerate(zip(cluster[lo:hi], loc_dens[lo:hi]))])
        self._collections[name] = coll

    def close(self) -> None:
        """Release this client; the last one of a store frees Chroma's cache of its segments
        (and lets another process be its writer)."""
        self._collections.clear()
        self.client.close()

    def count(self, name: str) -> int:
        try:
            return self._collection(name).count()
        except Exception:
            return 0

    def read_scope(self, name: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """(ids, vectors [N, D], cluster [N], loc_dens [N]) in the fit order."""
        coll = self._collection(name)
        ids, vecs, metas = [], [], []
        total = coll.count()
        page = self._max_batch
        for offset in range(0, total, page):
            got = coll.get(include=["embeddings", "metadatas"], limit=page, offset=offset)
            ids.extend(got["ids"])
            vecs.append(np.asarray(got["embeddings"], np.float32))
            metas.extend(got["metadatas"])
        order = np.argsort(np.asarray([m["row"] for m in metas]))
        vectors = np.concatenate(vecs)[order] if vecs else np.zeros((0, 0), np.float32)
        cluster = np.asarray([m["cluster"] for m in metas], np.int32)[order]
        loc_dens = np.asarray([m["loc_dens"] for m in metas], np.float32)[order]
        return [ids[i] for i in order], vectors, cluster, loc_dens

    def query_nearest(self, name: str, queries: np.ndarray, k: int = 1
                      ) -> tuple[np.ndarray, np.ndarray]:
        """HNSW search: (Euclidean distance [B, k], fit-order row [B, k]) for every query."""
        res = self._collection(name).query(query_embeddings=np.asarray(queries, np.float32),
                                           n_results=k, include=["distances", "metadatas"])
        # Chroma's "l2" space returns squared distances.
        dist = np.sqrt(np.maximum(np.asarray(res["distances"], np.float64), 0.0))
        rows = np.asarray([[m["row"] for m in metas] for metas in res["metadatas"]], np.int64)
        return dist.astype(np.float32), rows


def verify_store(store: ScopeStore, expected: dict[str, int]) -> dict[str, dict]:
    """Per collection: expected and found record counts, and whether it is complete.

    A writer killed mid-write leaves a collection short (or missing): this says so, by name.
    """
    out = {}
    for name, n in expected.items():
        found = store.count(name)
        out[name] = {"expected": int(n), "found": int(found), "complete": found == n}
    return out
