"""Block pool, block tables and the prefix cache: allocation, sharing, ref counts, eviction."""

from __future__ import annotations

import itertools

import pytest

from lmport.engine.api import SamplingParams
from lmport.engine.block_manager import BlockManager, slot_mapping
from lmport.engine.prefix_cache import hash_block
from lmport.engine.sequence import Sequence

_ids = itertools.count()


def seq_of(tokens: list[int]) -> Sequence:
    return Sequence(next(_ids), "r", 0, list(tokens), SamplingParams(), 0.0)


def prefill(bm: BlockManager, seq: Sequence) -> int:
    """Admit ``seq`` as the scheduler does, compute its whole prompt; return the cached tokens."""
    prefix = bm.peek_prefix(seq)
    cached = len(prefix) * bm.block_size
    assert bm.allocate(seq, seq.num_tokens - cached, prefix)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit_computed(seq)
    return cached


def assert_consistent(bm: BlockManager, seqs: list[Sequence]) -> None:
    """Ref counts equal the number of tables holding each block; every block is in one state."""
    expected = [0] * bm.num_blocks
    for s in seqs:
        for b in s.block_table:
            expected[b] += 1
    assert bm.pool.ref_counts == expected
    referenced = sum(1 for c in expected if c)
    assert bm.num_used_blocks == referenced
    assert bm.pool.num_free + (bm.prefix_cache.num_evictable if bm.prefix_cache else 0) + referenced == bm.num_blocks


def test_allocate_grows_block_table_and_slots_follow_it():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    seq = seq_of(list(range(10, 20)))
    assert bm.allocate(seq, 10)
    assert len(seq.block_table) == 3  # ceil(10 / 4)
    assert bm.num_available_blocks == 5
    slots = slot_mapping(seq.block_table, 0, 10, 4)
    assert slots == [seq.block_table[p // 4] * 4 + p % 4 for p in range(10)]
    assert len(set(slots)) == 10
    seq.num_computed_tokens = 10
    assert bm.allocate(seq, 2)  # positions 10, 11 still fit in block 3
    assert len(seq.block_table) == 3
    seq.num_computed_tokens = 12
    assert bm.allocate(seq, 1)
    assert len(seq.block_table) == 4
    assert_consistent(bm, [seq])


def test_allocation_is_all_or_nothing():
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    a, b = seq_of([5] * 8), seq_of([6] * 12)
    assert bm.allocate(a, 8)
    assert not bm.allocate(b, 12)  # needs 3, 2 left
    assert b.block_table == [] and bm.num_available_blocks == 2
    assert bm.allocate(b, 8)
    assert bm.num_available_blocks == 0
    assert_consistent(bm, [a, b])


def test_free_returns_every_block():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    seqs = [seq_of(list(range(n))) for n in (3, 9, 17)]
    for s in seqs:
        prefill(bm, s)
    assert bm.num_used_blocks == 1 + 3 + 5
    for s in seqs:
        bm.free(s)
        assert s.block_table == [] and s.num_computed_tokens == 0
    assert bm.num_used_blocks == 0 and bm.pool.num_free == 16


def test_double_release_is_detected():
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    seq = seq_of([1, 2, 3])
    assert bm.allocate(seq, 3)
    table = list(seq.block_table)
    bm.free(seq)
    seq.block_table = table
    with pytest.raises(RuntimeError, match="released more often"):
        bm.free(seq)


def test_hash_chains_on_the_parent():
    a = hash_block(None, [1, 2, 3, 4])
    assert a == hash_block(None, [1, 2, 3, 4])
    assert a != hash_block(None, [1, 2, 3, 5])
    assert hash_block(a, [9, 9, 9, 9]) != hash_block(hash_block(None, [1, 2, 3, 5]), [9, 9, 9, 9])


def test_common_prefix_shares_full_blocks_with_ref_counts():
    bm = BlockManager(num_blocks=32, block_size=4)
    prefix = list(range(100, 110))  # 2 full blocks + 2 tokens
    a = seq_of(prefix + [1, 2, 3])
    b = seq_of(prefix + [7, 8, 9, 10, 11])
    assert prefill(bm, a) == 0
    assert prefill(bm, b) == 8  # the two full blocks of the common prefix
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]  # the partial block is never shared
    assert [bm.pool.ref_counts[x] for x in a.block_table[:2]] == [2, 2]
    assert_consistent(bm, [a, b])
    assert bm.prefix_cache.hit_tokens == 8 and bm.prefix_cache.queried_tokens == a.num_tokens + b.num_tokens
    bm.free(a)
    assert [bm.pool.ref_counts[x] for x in b.block_table[:2]] == [1, 1]
    assert_consistent(bm, [b])
    bm.free(b)
    assert bm.num_used_blocks == 0


def test_a_fully_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq_of(list(range(8)))
    prefill(bm, a)
    bm.free(a)
    again = seq_of(list(range(8)))
    hits = bm.peek_prefix(again)
    assert len(hits) == 1  # (8 - 1) // 4: the second block is recomputed for the last token's logits
    assert prefill(bm, again) == 4
    assert again.num_computed_tokens == 8


def test_released_cached_blocks_are_reused_after_free_blocks_least_recent_first():
    bm = BlockManager(num_blocks=6, block_size=2)
    old, new = seq_of([1, 2, 3, 4, 5]), seq_of([6, 7, 8, 9, 10])  # 2 full blocks + 1 partial each
    prefill(bm, old)
    prefill(bm, new)
    bm.free(old)
    bm.free(new)
    assert bm.pool.num_free == 2 and bm.prefix_cache.num_evictable == 4
    assert bm.num_available_blocks == 6 and bm.num_used_blocks == 0
    # taking 2 blocks uses the empty ones first: both prefixes stay cached
    filler = seq_of([0] * 4)
    assert bm.allocate(filler, 4)
    assert len(bm.prefix_cache) == 4
    # the next block evicts the least recently released: old's tail (blocks go back last-first)
    filler2 = seq_of([0] * 2)
    assert bm.allocate(filler2, 2)
    assert len(bm.peek_prefix(seq_of([1, 2, 3, 4, 5]))) == 1
    assert len(bm.peek_prefix(seq_of([6, 7, 8, 9, 10]))) == 2
    assert_consistent(bm, [filler, filler2])


def test_a_hit_takes_an_evictable_block_back():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq_of([1, 2, 3, 4, 5])
    prefill(bm, a)
    bm.free(a)
    b = seq_of([1, 2, 3, 4, 9])
    assert prefill(bm, b) == 4
    assert bm.prefix_cache.num_evictable == 0  # both reused blocks are referenced again
    assert_consistent(bm, [b])
    # the pool has 1 block left: a prompt needing 2 cannot come in, and nothing is taken
    c = seq_of([7, 7, 7, 7])
    assert not bm.allocate(c, 4)
    assert_consistent(bm, [b])


def test_allocation_counts_reclaimed_prefix_blocks_against_the_pool():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = seq_of([1, 2, 3, 4, 5])  # 3 blocks: 2 cached when freed, 1 empty
    prefill(bm, a)
    bm.free(a)
    b = seq_of([1, 2, 3, 4, 6, 6, 6])  # hits 2 blocks, then needs 2 more: only 1 left
    prefix = bm.peek_prefix(b)
    assert len(prefix) == 2
    assert not bm.allocate(b, b.num_tokens - 4, prefix)
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert bm.prefix_cache.num_evictable == 2 and bm.num_available_blocks == 3


def test_decode_commits_blocks_as_they_fill():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq_of([1, 2, 3])
    prefill(bm, a)
    assert a.num_committed_blocks == 0
    for token in (4, 5):  # generate: the sampled token is computed one step later
        a.append_token(token)
        assert bm.allocate(a, 1)
        a.num_computed_tokens += 1
        bm.commit_computed(a)
    assert a.num_computed_tokens == 5 and a.num_committed_blocks == 1
    b = seq_of([1, 2, 3, 4, 5, 6])
    assert bm.peek_prefix(b) == a.block_table[:1]


def test_prefix_caching_off_shares_nothing():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a, b = seq_of([1, 2, 3, 4, 5]), seq_of([1, 2, 3, 4, 5])
    prefill(bm, a)
    assert prefill(bm, b) == 0
    assert set(a.block_table).isdisjoint(b.block_table)
    bm.free(a)
    bm.free(b)
    assert bm.pool.num_free == 8
