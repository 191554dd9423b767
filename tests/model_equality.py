"""Comparing two model directories: same per-scope summary, same stored records."""

import numpy as np

from vitad_ray.storage.modeldir import read_model_json, shard_locations
from vitad_ray.storage.store import ScopeStore


def _stores_by_scope(model_dir, doc, opened: list) -> dict:
    owner = {}
    for location, owned in shard_locations(model_dir, doc):
        store = ScopeStore(location)
        opened.append(store)
        owner.update({scope: store for scope in owned})
    return owner


def assert_same_model(dir_a, dir_b, scopes) -> None:
    """model.json scopes equal; for each scope, ids, vectors, clusters and loc_dens identical."""
    a, b = read_model_json(dir_a), read_model_json(dir_b)
    assert a["scopes"] == b["scopes"]
    opened: list = []
    try:
        owner_a = _stores_by_scope(dir_a, a, opened)
        owner_b = _stores_by_scope(dir_b, b, opened)
        for scope in scopes:
            name = f"{a['backbone']}.{scope}"
            ra, rb = owner_a[scope].read_scope(name), owner_b[scope].read_scope(name)
            assert ra[0] == rb[0]
            for x, y in zip(ra[1:], rb[1:]):
                np.testing.assert_array_equal(x, y)
    finally:
        for store in opened:
            store.close()
