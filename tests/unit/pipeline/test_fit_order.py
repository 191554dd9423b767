"""The order a fit takes its scopes in: every shard's writer gets work from the start."""

from vitad_ray.pipeline.fit import _round_robin
from vitad_ray.storage.store import shard_of


def test_scopes_alternate_between_shards_and_each_comes_once():
    n, shards = 257, 3
    shard = [shard_of(i, n, shards) for i in range(n)]
    todo = [i for i in range(n) if i % 5]  # some scopes already done
    order = _round_robin(todo, shard)
    assert sorted(order) == todo
    assert [shard[i] for i in order[:6]] == [0, 1, 2, 0, 1, 2]
    # Within a shard the scopes keep their order.
    for s in range(shards):
        mine = [i for i in order if shard[i] == s]
        assert mine == sorted(mine)
    assert _round_robin(todo, [0] * n) == todo  # one shard: scope order
