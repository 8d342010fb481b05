"""Native T5 on the paged engine: greedy tokens equal transformers' ``generate``, alone and batched."""

from __future__ import annotations

import pytest

from lmport.config import LaunchConfig
from lmport.engine.api import GenerationRequest, SamplingParams
from lmport.engine.factory import build_llm_engine
from lmport.models.t5 import T5ForConditionalGeneration
from lmport.plugins import PluginHost
from lmport.testing.hf_oracle import hf_greedy_generate

PROMPTS = [[5, 9, 33, 4, 80, 81, 82, 90, 91, 92, 7, 8, 9, 10], [100, 7], [8, 8, 8, 120, 43, 19], [300, 301, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
MAX_NEW = 7


def engine_for(path, **overrides):
    config = LaunchConfig(model_id=str(path), **{"block_size": 4, "max_batch_total_tokens": 512, **overrides})
    engine, tokenizer, _ = build_llm_engine(config, PluginHost(environ={}, load_entry_points=False).load())
    return engine, tokenizer


def tokens_of(outputs, request_id):
    return [t.token_id for out in outputs[request_id] for t in out.tokens]


@pytest.mark.parametrize("name", ["t5", "flan-t5"])
def test_native_t5_matches_transformers_alone_and_batched(name, t5_checkpoint):
    path, oracle = t5_checkpoint(name)
    engine, tokenizer = engine_for(path)
    assert isinstance(engine.executor.model, T5ForConditionalGeneration)
    expected = [hf_greedy_generate(oracle, p, MAX_NEW)[0] for p in PROMPTS]
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    alone = engine.generate([GenerationRequest("alone", tuple(PROMPTS[0]), params)])
    assert tokens_of(alone, "alone") == expected[0]
    requests = [GenerationRequest(f"r{i}", tuple(p), params) for i, p in enumerate(PROMPTS)]
    outputs = engine.generate(requests)
    for i, want in enumerate(expected):
        assert tokens_of(outputs, f"r{i}") == want
        last = outputs[f"r{i}"][-1]
        assert last.finished and last.num_prompt_tokens == len(PROMPTS[i])
        assert "".join(o.text for o in outputs[f"r{i}"]) == tokenizer.decode(want, skip_special_tokens=True)
    assert engine.block_manager.num_used_blocks == 0  # decoder and cross blocks all freed


def test_preempted_sequences_are_encoded_again(t5_checkpoint):
    """A cache too small for all of them: sequences are preempted (cross and decoder blocks freed)
    and recomputed, their encoder run again; tokens stay transformers'."""
    path, oracle = t5_checkpoint("flan-t5")
    engine, _ = engine_for(path, max_batch_total_tokens=48, max_total_tokens=40)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    outputs = engine.generate([GenerationRequest(f"r{i}", tuple(p), params) for i, p in enumerate(PROMPTS)])
    assert engine.scheduler.num_preemptions > 0
    for i, prompt in enumerate(PROMPTS):
        assert tokens_of(outputs, f"r{i}") == hf_greedy_generate(oracle, prompt, 12)[0]
    assert engine.block_manager.num_used_blocks == 0


def test_async_scheduling_and_n_sequences(t5_checkpoint):
    """The async step path (the next step launched before this one's tokens are read), and ``n``
    sequences of one request sharing its encoder input (their decoder blocks shared by the prefix cache)."""
    path, oracle = t5_checkpoint("t5")
    engine, _ = engine_for(path, async_scheduling=True)
    assert engine.async_scheduling
    greedy = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, n=2, do_sample=True, seed=5)
    requests = [GenerationRequest(f"g{i}", tuple(p), greedy) for i, p in enumerate(PROMPTS[:3])]
    outputs = engine.generate([*requests, GenerationRequest("n", tuple(PROMPTS[3]), sampled)])
    for i, prompt in enumerate(PROMPTS[:3]):
        assert tokens_of(outputs, f"g{i}") == hf_greedy_generate(oracle, prompt, MAX_NEW)[0]
    by_index: dict[int, list[int]] = {}
    for out in outputs["n"]:
        by_index.setdefault(out.index, []).extend(t.token_id for t in out.tokens)
    assert sorted(by_index) == [0, 1] and all(len(t) == MAX_NEW for t in by_index.values())


def test_encoder_tokens_count_in_the_prefill_budget(t5_checkpoint):
    """An encoder input runs whole in the step that admits it, so it counts in that step's prefill
    budget: with 20 tokens, a 14-token input (+ the decoder's start token) leaves no room for an
    18-token one, which comes in the next step; tokens stay transformers'."""
    path, oracle = t5_checkpoint("t5")
    engine, _ = engine_for(path, max_batch_prefill_tokens=20, max_input_tokens=19, max_total_tokens=40)
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    for i in (0, 3):
        engine.add_request(GenerationRequest(f"r{i}", tuple(PROMPTS[i]), params))
    tokens: dict[str, list[int]] = {"r0": [], "r3": []}
    admitted = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(t.token_id for t in out.tokens)
        admitted.append(sorted(s.request_id for s in engine.scheduler.running))
    assert admitted[:2] == [["r0"], ["r0", "r3"]]
    for i in (0, 3):
        assert tokens[f"r{i}"] == hf_greedy_generate(oracle, PROMPTS[i], MAX_NEW)[0]
