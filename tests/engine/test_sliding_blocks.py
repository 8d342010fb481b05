"""Blocks that leave every layer's sliding window go back to the pool (a model whose every
self-attention layer is windowed: Mistral), with and without the prefix cache; tokens stay
transformers', and every block comes back in the end."""

from __future__ import annotations

import itertools

import pytest

from lmport.engine.api import GenerationRequest, SamplingParams
from lmport.engine.block_manager import BlockManager
from lmport.engine.sequence import Sequence

_ids = itertools.count()


def live_blocks(seq: Sequence) -> int:
    return len(seq.block_table) - seq.num_dropped_blocks


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_blocks_out_of_the_window_are_given_back(prefix_caching):
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=prefix_caching, sliding_window=6)
    seq = Sequence(next(_ids), "r", 0, list(range(10, 20)), SamplingParams(), 0.0)
    assert bm.allocate(seq, 10) and len(seq.block_table) == 3
    seq.num_computed_tokens = 10
    bm.commit_computed(seq)
    # the next query (position 10) sees keys 5.. : block 0 (positions 0-3) goes, block 1 stays
    assert bm.allocate(seq, 1)
    assert seq.num_dropped_blocks == 1 and bm.num_available_blocks == 16 - 2
    for n in range(11, 30):
        seq.append_token(7)
        seq.num_computed_tokens = n
        bm.commit_computed(seq)
        assert bm.allocate(seq, 1)
        assert live_blocks(seq) <= 3  # a 6-token window over 4-token blocks, plus the block being filled
        assert bm.num_used_blocks == live_blocks(seq)
    assert seq.num_dropped_blocks == (29 - 6 + 1) // 4
    bm.free(seq)
    assert bm.num_used_blocks == 0 and seq.num_dropped_blocks == 0
    assert sorted(bm.pool.ref_counts) == [0] * 16


def test_a_model_with_full_attention_layers_keeps_its_blocks(make_engine):
    engine, _ = make_engine("llama")
    assert engine.executor.kv_window is None and engine.block_manager.sliding_window is None


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_mistral_gives_back_blocks_and_matches_transformers(make_engine, random_prompts, hf_greedy, async_scheduling):
    engine, hf_model = make_engine("mistral", async_scheduling=async_scheduling, max_batch_prefill_tokens=8)
    assert hf_model.config.sliding_window == 7 and engine.block_manager.sliding_window == 7
    prompts = random_prompts([9, 13, 5])
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(GenerationRequest(f"r{i}", tuple(prompt), params))
    tokens = {f"r{i}": [] for i in range(len(prompts))}
    most = 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(t.token_id for t in out.tokens)
        most = max([most] + [live_blocks(s) for s in engine.scheduler.running])
    assert most <= 4  # a 7-token window over 4-token blocks + the block being filled (+ one in flight)
    for i, prompt in enumerate(prompts):
        assert tokens[f"r{i}"] == hf_greedy(hf_model, prompt, 24)[0]
    assert engine.block_manager.num_used_blocks == 0
