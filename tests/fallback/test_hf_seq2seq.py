"""Encoder-decoder models through transformers as a ModelExecutor: greedy tokens equal
transformers' ``generate``; partial prompt chunks, preemption and seeded sampling behave."""

from __future__ import annotations

import pytest
import torch

from lmport.engine.api import SamplingParams
from lmport.engine.batch import ScheduledSequence, ScheduledStep
from lmport.executor import ModelExecutor
from lmport.engine.sequence import Sequence
from lmport.models.hf_fallback import load_fallback
from lmport.models.hf_seq2seq import HFSeq2SeqExecutor
from lmport.models.loader import resolve_model_info
from lmport.testing.hf_oracle import hf_greedy_generate


@pytest.fixture
def t5(cpu_host, fallback_checkpoint):
    path, oracle = fallback_checkpoint("t5")
    executor = load_fallback(resolve_model_info(path), cpu_host, torch.float32, torch.device("cpu"), False)
    return executor, oracle


def make_seq(seq_id: int, prompt: list[int], params: SamplingParams | None = None) -> Sequence:
    params = params or SamplingParams(max_new_tokens=8, ignore_eos=True)
    return Sequence(seq_id, f"r{seq_id}", 0, list(prompt), params, 0.0, seed=params.seed)


def run(executor, seqs: list[Sequence], steps: int, chunk: int | None = None):
    """Drive the executor the way the engine does: prompts (optionally in chunks), then decodes.
    Returns the last step's output."""
    out = None
    for _ in range(steps):
        entries = []
        for seq in seqs:
            todo = seq.num_tokens - seq.num_computed_tokens
            n = min(todo, chunk) if chunk and seq.num_output_tokens == 0 else todo
            entries.append(ScheduledSequence(seq, seq.num_computed_tokens, n, sample=seq.num_computed_tokens + n == seq.num_tokens))
        out = executor.execute(ScheduledStep(entries))
        for entry, sampled in zip(entries, out.sampled):
            entry.seq.num_computed_tokens += entry.num_new_tokens
            if sampled is not None:
                entry.seq.append_token(sampled.token_id)
        assert out.prompt_logprobs == [None] * len(entries)
    return out


def test_greedy_matches_transformers(t5):
    executor, oracle = t5
    assert isinstance(executor, HFSeq2SeqExecutor) and isinstance(executor, ModelExecutor)
    prompts = [[5, 9, 33, 4], [100, 7], [8, 8, 8, 120, 43, 19, 3, 77, 6]]
    seqs = [make_seq(i, p) for i, p in enumerate(prompts)]
    run(executor, seqs, steps=10, chunk=3)  # the longest prompt needs 3 chunks before its first token
    for seq, prompt in zip(seqs, prompts):
        assert seq.output_token_ids == hf_greedy_generate(oracle, prompt, len(seq.output_token_ids))[0]
    assert len(seqs[2].output_token_ids) == 10 - 2


def test_preempted_sequence_is_rebuilt(t5):
    executor, oracle = t5
    seq = make_seq(0, [5, 9, 33, 4])
    run(executor, [seq], steps=3)
    # the engine preempts it: blocks freed, state released, everything recomputed later
    executor.execute(ScheduledStep([], released_seq_ids=[seq.seq_id]))
    assert seq.seq_id not in executor.states
    seq.num_computed_tokens = 0
    run(executor, [seq], steps=3)
    assert seq.output_token_ids == hf_greedy_generate(oracle, [5, 9, 33, 4], 6)[0]


def test_seeded_sampling_is_reproducible_with_top_tokens(t5):
    executor, _ = t5
    params = SamplingParams(max_new_tokens=8, do_sample=True, temperature=1.5, seed=3, top_n_tokens=2)
    first, second = make_seq(1, [5, 9], params), make_seq(2, [5, 9], params)
    run(executor, [first], steps=6)
    last = run(executor, [make_seq(3, [44, 45, 46]), second], steps=6)
    assert first.output_token_ids == second.output_token_ids
    top = last.sampled[1].top_tokens
    assert len(top) == 2 and top[0][1] >= top[1][1]
    assert last.sampled[1].logprob <= top[0][1] + 1e-6


def test_kv_cache_spec_prices_the_decoder(t5):
    executor, _ = t5
    spec = executor.kv_cache_spec()
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (2, 4, 16)
