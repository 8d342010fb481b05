"""Prompt-lookup proposals and the block manager's rewind of rejected tokens' blocks."""

from __future__ import annotations

import itertools

import pytest

from lmport.engine.api import SamplingParams
from lmport.engine.block_manager import BlockManager
from lmport.engine.sequence import Sequence
from lmport.engine.speculative.ngram import NgramProposer

_ids = itertools.count()


def test_longest_suffix_and_most_recent_occurrence():
    proposer = NgramProposer(max_n=3, min_n=1)
    # suffix [7, 8] occurred twice; the most recent one was followed by 4, 5
    tokens = [7, 8, 1, 2, 9, 7, 8, 4, 5, 6, 7, 8]
    assert proposer.propose(tokens, 2) == [4, 5]
    # the 3-gram [6, 7, 8] beats the 2-gram: never seen, so the 2-gram decides
    assert proposer.propose([1, 2, 3, 9, 2, 3, 5, 1, 2, 3], 3) == [9, 2, 3]  # [1, 2, 3] at 0 wins over [2, 3] at 4
    assert proposer.propose([1, 2, 3, 4], 3) == []  # nothing repeats
    assert proposer.propose([5], 3) == []
    assert proposer.propose([5, 5], 0) == []


def test_cycles_shorter_than_k_continue_periodically():
    proposer = NgramProposer()
    assert proposer.propose([1, 2, 3, 1, 2, 3, 1, 2], 5) == [3, 1, 2, 3, 1]
    assert proposer.propose([4, 4, 4], 4) == [4, 4, 4, 4]


def test_min_n_bounds_the_match():
    assert NgramProposer(max_n=3, min_n=2).propose([1, 9, 2, 1], 2) == []
    assert NgramProposer(max_n=3, min_n=1).propose([1, 9, 2, 1], 2) == [9, 2]
    with pytest.raises(ValueError):
        NgramProposer(max_n=1, min_n=2)


def seq_of(tokens: list[int]) -> Sequence:
    return Sequence(next(_ids), "r", 0, list(tokens), SamplingParams(), 0.0)


@pytest.mark.parametrize("caching", [True, False])
def test_rewind_frees_the_blocks_of_rejected_tokens(caching):
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=caching)
    seq = seq_of(list(range(10, 17)))  # 7 tokens
    assert bm.allocate(seq, 7)
    seq.num_computed_tokens = 6  # the last prompt token is fed by the next (verify) step
    bm.commit_computed(seq)
    assert bm.allocate(seq, 1 + 5)  # a verify step: the last token and 5 drafts -> 12 positions, 3 blocks
    assert len(seq.block_table) == 3
    free_before = bm.num_available_blocks
    seq.num_computed_tokens = 6 + 1 + 1  # one draft kept
    seq.append_token(20)
    seq.append_token(21)
    bm.commit_computed(seq)
    bm.rewind(seq)
    assert len(seq.block_table) == 2  # 8 computed positions
    assert bm.num_available_blocks == free_before + 1
    assert sum(bm.pool.ref_counts) == 2
    if caching:
        assert seq.num_committed_blocks == 2 and len(bm.prefix_cache) == 2  # known and computed: cached
    bm.free(seq)
    assert bm.num_available_blocks == bm.num_blocks


def test_rewind_never_drops_cached_blocks():
    bm = BlockManager(num_blocks=4, block_size=2)
    seq = seq_of([3, 4, 5, 6, 7])
    assert bm.allocate(seq, 5)
    seq.num_computed_tokens = 5
    bm.commit_computed(seq)
    seq.num_computed_tokens = 1
    with pytest.raises(RuntimeError):
        bm.rewind(seq)
