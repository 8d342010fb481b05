"""The prefix cache: full KV blocks found again by their content.

A full block is named by a hash of (its parent block's hash, its token ids), so a block hash
names the whole prefix up to the block's end. When a sequence's blocks are released, cached
blocks are not returned to the pool's free list: they stay findable here, unreferenced, and
are evicted least-recently-released first when the pool runs out of empty blocks. This class
holds no ref counts and owns no blocks; :class:`lmport.engine.block_manager.BlockManager`
decides when a block enters or leaves it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Sequence

BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], extra: bytes = b"") -> BlockHash:
    """The content hash of one full block, chained on its parent's hash.

    ``extra`` is content the token ids do not show: the hashes of the images whose features
    fill some of the block's positions (an image's tokens are one placeholder id repeated).
    blake2b with a 16-byte digest: collisions are negligible, and it is stable across
    processes (Python's ``hash`` is salted per process).
    """
    digest = hashlib.blake2b(digest_size=16)
    if parent is not None:
        digest.update(parent)
    digest.update(array("q", token_ids).tobytes())
    if extra:
        digest.update(extra)
    return digest.digest()


class PrefixCache:
    """Maps block hashes to physical blocks and keeps unreferenced cached blocks in LRU order."""

    def __init__(self) -> None:
        self._block_of: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}
        # cached blocks that no sequence references: reusable, evicted oldest first
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.queried_tokens = 0
        self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._block_of)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self._block_of.get(block_hash)

    def holds(self, block: int) -> bool:
        return block in self._hash_of

    def is_evictable(self, block: int) -> bool:
        return block in self._evictable

    def insert(self, block_hash: BlockHash, block: int) -> bool:
        """Cache ``block`` under ``block_hash``; False if that content is cached already."""
        if block_hash in self._block_of or block in self._hash_of:
            return False
        self._block_of[block_hash] = block
        self._hash_of[block] = block_hash
        return True

    def release(self, block: int) -> None:
        """The last reference to a cached block is gone: keep it, most recently used."""
        self._evictable[block] = None

    def reclaim(self, block: int) -> None:
        """A sequence takes an unreferenced cached block back (a prefix hit)."""
        self._evictable.pop(block, None)

    def evict(self) -> int | None:
        """Forget the least recently released block and hand it back for reuse."""
        if not self._evictable:
            return None
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._hash_of.pop(block)]
        return block

    def record_query(self, queried_tokens: int, hit_tokens: int) -> None:
        self.queried_tokens += queried_tokens
        self.hit_tokens += hit_tokens
