"""Which tensor-parallel shard the model being built is, read by the layers that split.

The loader builds a model inside ``with sharding(shard):``; a :class:`~lmport.layers.linear.Linear`
made with ``parallel="column"`` (or ``"row"``), a :class:`~lmport.layers.embedding.VocabEmbedding`
and an :class:`~lmport.layers.embedding.LMHead` then hold this rank's slice and reduce through
``shard.comm``. Outside it (one process) every layer holds everything and no collective runs.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

from lmport.distributed import UNSHARDED, ShardInfo

_CURRENT: contextvars.ContextVar[ShardInfo] = contextvars.ContextVar("lmport_shard", default=UNSHARDED)


def current_shard() -> ShardInfo:
    return _CURRENT.get()


@contextlib.contextmanager
def sharding(shard: ShardInfo) -> Iterator[ShardInfo]:
    token = _CURRENT.set(shard)
    try:
        yield shard
    finally:
        _CURRENT.reset(token)


def heads_per_rank(num_heads: int, shard: ShardInfo | None = None, *, kv: bool = False) -> int:
    """This rank's share of ``num_heads`` attention heads; KV heads fewer than the ranks are
    replicated (each rank holds one), so ``world % num_kv_heads`` must be 0 then."""
    shard = shard or current_shard()
    world = shard.world_size
    if num_heads % world == 0:
        return num_heads // world
    if kv and world % num_heads == 0:
        return 1
    raise ValueError(f"{num_heads} {'KV ' if kv else ''}heads do not split over {world} shards")
