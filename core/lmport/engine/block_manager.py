"""Logical KV blocks: the physical pool, per-sequence block tables and slot mapping.

The pool hands out fixed-size blocks (the attention backend's block size) and counts
references; the prefix cache (optional) keeps released full blocks findable by content.
A block is in exactly one of three states: referenced by sequences (ref count > 0), cached
and unreferenced (evictable, in the prefix cache), or empty (on the free list).
"""

from __future__ import annotations

from collections import deque

from lmport.engine.block_table_rows import BlockTableRows
from lmport.engine.prefix_cache import PrefixCache, hash_block
from lmport.engine.sequence import Sequence


class BlockPool:
    """Physical block ids with reference counts, and the free list of empty blocks."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def pop_free(self) -> int | None:
        return self._free.popleft() if self._free else None

    def push_free(self, block: int) -> None:
        self._free.append(block)


class BlockManager:
    """Gives sequences the blocks their tokens need and takes them back.

    ``block_table`` of a sequence lists its blocks in token order; token ``p`` lives in
    block ``block_table[p // block_size]`` at offset ``p % block_size``. That table serves
    every full and sliding KV group; a sequence with ``cross_kv_len`` positions of a cross
    group gets ``cross_block_table`` too, all at once when it is admitted, from the same pool
    (so a cross group costs blocks, not memory of its own), freed with the rest. The prefix
    cache hashes the token groups' blocks, chained on ``seq.hash_seed`` (the encoder's input
    for T5: equal decoder tokens after different inputs have different K/V); cross blocks
    are not cached. ``rows`` mirrors each
    sequence's table in its row ``seq.block_row`` (held while the sequence is allocated), for
    the batch builder.

    ``sliding_window``: set when every token group of the model is windowed (Mistral, the 4k
    Phi-3s): a sequence's leading blocks that no later query can see (their last position is a
    window or more before its next token) are given back as it goes on (once offered to the
    prefix cache, when there is one). Their ids stay in the table, never read again (the
    attention masks or skips them), so positions still index the table directly;
    ``seq.num_dropped_blocks`` counts them. A model with any full-attention layer keeps them all.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None) -> None:  # fmt: skip
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.pool = BlockPool(num_blocks)
        self.prefix_cache = PrefixCache() if enable_prefix_caching else None
        self.rows = BlockTableRows()

    # ------------------------------------------------------------------ accounting

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_available_blocks(self) -> int:
        """Blocks a new allocation can take: empty ones plus evictable cached ones."""
        evictable = self.prefix_cache.num_evictable if self.prefix_cache else 0
        return self.pool.num_free + evictable

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - self.num_available_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ prefix matching

    def peek_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks that hold a prefix of ``seq``'s tokens; takes nothing.

        At least the last token is always left to compute, since its logits are needed.
        """
        if self.prefix_cache is None or seq.block_table:
            return []
        self._hash_full_blocks(seq)
        limit = (seq.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for block_hash in seq.block_hashes[:limit]:
            block = self.prefix_cache.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix: list[int] | None = None) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``seq``, first taking ``prefix``.

        ``prefix`` is what :meth:`peek_prefix` just returned for a sequence without blocks;
        its tokens count as computed. All or nothing: False (and no change) if the pool is
        short of blocks.
        """
        if self.sliding_window and seq.block_table:
            self._drop_out_of_window(seq)
        if not prefix and seq.block_row is not None:
            # the usual decode step: the last block still has room, nothing to take or count
            if self.blocks_for(seq.num_computed_tokens + num_new_tokens) <= len(seq.block_table):
                return True
        prefix = prefix or []
        reclaimed = sum(1 for b in prefix if self.pool.ref_counts[b] == 0)  # leave the evictable set
        computed = len(prefix) * self.block_size if prefix else seq.num_computed_tokens
        have = len(prefix) if prefix else len(seq.block_table)
        needed = self.blocks_for(computed + num_new_tokens) - have
        cross = self.blocks_for(seq.cross_kv_len) if seq.cross_kv_len and not seq.cross_block_table else 0
        if needed + cross + reclaimed > self.num_available_blocks:
            return False
        if not seq.block_table and self.prefix_cache is not None:  # an admission: count the lookup
            self.prefix_cache.record_query(seq.num_tokens, len(prefix) * self.block_size)
        if seq.block_row is None:
            seq.block_row = self.rows.take_row()
        if prefix:
            for block in prefix:
                self._take(block)
            seq.block_table = list(prefix)
            seq.num_committed_blocks = len(prefix)
            seq.num_computed_tokens = computed
            self.rows.write(seq.block_row, 0, prefix)
        if needed > 0:
            first = len(seq.block_table)
            new_blocks = [self._allocate_block() for _ in range(needed)]
            seq.block_table.extend(new_blocks)
            self.rows.write(seq.block_row, first, new_blocks)
        if cross:  # the cross group's table, its whole fixed length at once (after the prefix is taken)
            seq.cross_block_table = [self._allocate_block() for _ in range(cross)]
        return True

    def commit_computed(self, seq: Sequence) -> None:
        """Offer the sequence's newly computed full blocks to the prefix cache."""
        if self.prefix_cache is None:
            return
        # only blocks of known tokens (async scheduling: not a placeholder) can be named by content
        full = min(min(seq.num_computed_tokens, seq.num_known_tokens) // self.block_size, len(seq.block_table))
        if full <= seq.num_committed_blocks:
            return
        self._hash_full_blocks(seq)
        for i in range(seq.num_committed_blocks, full):
            # a block computed twice at once (two equal prompts in one step) stays uncached
            self.prefix_cache.insert(seq.block_hashes[i], seq.block_table[i])
        seq.num_committed_blocks = full

    # ------------------------------------------------------------------ release

    def rewind(self, seq: Sequence) -> None:
        """Give back the blocks past ``seq.num_computed_tokens`` (speculative decoding's rollback).

        A verify step allocates room for every draft token; the rejected ones leave blocks with
        K/V of tokens the sequence never had. Those blocks were never offered to the prefix cache
        (only blocks of known, computed tokens are), so they go straight back to the pool; K/V
        left in a kept block past the computed length is overwritten before it is read.
        """
        keep = self.blocks_for(seq.num_computed_tokens)
        if keep < seq.num_committed_blocks:
            raise RuntimeError(f"sequence {seq.seq_id}: cannot rewind into its {seq.num_committed_blocks} cached blocks")
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())


    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; its computed tokens must be recomputed to be used again.

        Blocks are released last-first, so that a prefix's tail is evicted before its head.
        """
        for block in reversed(seq.block_table[seq.num_dropped_blocks :]):
            self._release(block)
        seq.num_dropped_blocks = 0
        for block in seq.cross_block_table:  # never in the prefix cache: straight back to the pool
            self._release(block)
        seq.cross_block_table = []
        seq.block_table = []
        seq.num_committed_blocks = 0
        seq.num_computed_tokens = 0
        if seq.block_row is not None:
            self.rows.release_row(seq.block_row)
            seq.block_row = None

    # ------------------------------------------------------------------ internals

    def _drop_out_of_window(self, seq: Sequence) -> None:
        """Release the leading blocks no query from ``num_computed_tokens`` on sees: block ``i``
        ends before ``num_computed_tokens - window + 1``, the first key the next query reads."""
        gone = max(0, seq.num_computed_tokens - self.sliding_window + 1) // self.block_size
        if self.prefix_cache is not None:
            gone = min(gone, seq.num_committed_blocks)  # offered to the cache first, so that it can be found again
        for i in range(seq.num_dropped_blocks, gone):
            self._release(seq.block_table[i])
        seq.num_dropped_blocks = max(seq.num_dropped_blocks, gone)

    def _hash_full_blocks(self, seq: Sequence) -> None:
        bs = self.block_size
        hashes = seq.block_hashes
        images = seq.images
        for i in range(len(hashes), seq.num_known_tokens // bs):
            extra = b""
            if images is not None:  # the images whose features fill part of this block
                begin, end = i * bs, (i + 1) * bs
                extra = b"".join(h for (s, e), h in zip(images.spans, images.hashes) if s < end and e > begin)
            hashes.append(hash_block(hashes[i - 1] if i else seq.hash_seed, seq.token_ids[i * bs : (i + 1) * bs], extra))

    def _allocate_block(self) -> int:
        block = self.pool.pop_free()
        if block is None and self.prefix_cache is not None:
            block = self.prefix_cache.evict()
        if block is None:  # callers check availability first
            raise RuntimeError("KV cache out of blocks")
        self.pool.ref_counts[block] = 1
        return block

    def _take(self, block: int) -> None:
        if self.pool.ref_counts[block] == 0 and self.prefix_cache is not None:
            self.prefix_cache.reclaim(block)
        self.pool.ref_counts[block] += 1

    def _release(self, block: int) -> None:
        counts = self.pool.ref_counts
        if counts[block] <= 0:
            raise RuntimeError(f"block {block} released more often than taken")
        counts[block] -= 1
        if counts[block] == 0:
            if self.prefix_cache is not None and self.prefix_cache.holds(block):
                self.prefix_cache.release(block)
            else:
                self.pool.push_free(block)


def slot_mapping(block_table: list[int], start: int, count: int, block_size: int) -> list[int]:
    """Flat cache slots (``block * block_size + offset``) of positions ``start .. start+count-1``."""
    slots = []
    for pos in range(start, start + count):
        slots.append(block_table[pos // block_size] * block_size + pos % block_size)
    return slots
