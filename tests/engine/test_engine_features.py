"""Engine behaviour beyond plain greedy parity: prefix cache, preemption, abort, prompt
logprobs, n > 1, stops, validation and failure isolation (tiny Llama, transformers as oracle)."""

from __future__ import annotations

import pytest
import torch

from lmport.engine.api import GenerationRequest, SamplingParams
from lmport.engine.detokenizer import token_text
from lmport.engine.errors import RequestValidationError


def request(rid: str, prompt: list[int], max_new: int = 8, **params) -> GenerationRequest:
    params.setdefault("ignore_eos", True)
    return GenerationRequest(rid, tuple(prompt), SamplingParams(max_new_tokens=max_new, **params))


def tokens_of(outputs) -> list[int]:
    return [t.token_id for o in outputs for t in o.tokens]


def test_prefix_cache_hit_gives_identical_output_and_shows_in_stats(make_engine, random_prompts, hf_greedy):
    engine, hf_model = make_engine("llama", max_batch_prefill_tokens=16)
    prefix, tail_a, tail_b = random_prompts([26, 5, 3], seed=3)
    a, b = prefix + tail_a, prefix + tail_b
    first = tokens_of(engine.generate([request("a", a)])["a"])
    assert engine.stats().prefix_cache_hits == 0
    second = tokens_of(engine.generate([request("b", b)])["b"])
    hits_b = engine.stats().prefix_cache_hits
    assert hits_b == 24  # the 6 full blocks of the shared 26-token prefix
    again = tokens_of(engine.generate([request("a2", a)])["a2"])
    stats = engine.stats()
    assert stats.prefix_cache_hits - hits_b == 28  # all of a's 31 tokens but the last block
    assert stats.prefix_cache_queries == 3 * 31 - 2
    assert first == again == hf_greedy(hf_model, a, 8)[0]
    assert second == hf_greedy(hf_model, b, 8)[0]
    assert stats.kv_blocks_used == 0


@pytest.mark.parametrize("caching", [True, False])
def test_preemption_under_a_tiny_kv_budget_gives_identical_output(caching, make_engine, random_prompts, hf_greedy):
    # 12 blocks of 4 tokens for four sequences that end at 22-30 tokens each
    engine, hf_model = make_engine(
        "llama", max_batch_total_tokens=48, max_total_tokens=32, max_input_tokens=16, enable_prefix_caching=caching
    )
    prompts = random_prompts([10, 14, 7, 12], seed=4)
    outputs = engine.generate([request(str(i), p, max_new=16) for i, p in enumerate(prompts)])
    stats = engine.stats()
    assert stats.extra["preemptions"] > 0
    for i, p in enumerate(prompts):
        assert tokens_of(outputs[str(i)]) == hf_greedy(hf_model, p, 16)[0]
        assert outputs[str(i)][-1].finish_reason == "length"
    assert stats.kv_blocks_used == 0 and engine.block_manager.num_available_blocks == 12


def test_abort_frees_all_blocks_at_once(make_engine, random_prompts):
    engine, _ = make_engine("llama", max_batch_size=2)
    prompts = random_prompts([9, 13, 6], seed=5)
    for i, p in enumerate(prompts):
        engine.add_request(request(str(i), p, max_new=50))
    for _ in range(3):
        engine.step()
    assert engine.stats().running == 2 and engine.stats().waiting == 1
    used = engine.stats().kv_blocks_used
    (out,) = engine.abort("0")
    assert out.finished and out.finish_reason == "abort" and out.request_id == "0"
    assert engine.stats().kv_blocks_used < used
    (out,) = engine.abort("2")  # still waiting
    assert out.finish_reason == "abort"
    engine.abort("1")
    assert engine.abort("1") == [] and engine.abort("unknown") == []
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.running == stats.waiting == 0 and not engine.has_unfinished()
    assert engine.step() == []


@torch.inference_mode()
def test_prompt_logprobs_and_top_tokens_match_transformers(make_engine, random_prompts):
    engine, hf_model = make_engine("llama", max_batch_prefill_tokens=8)  # the prompt spans 3 chunks
    (prompt,) = random_prompts([20], seed=6)
    outs = engine.generate([request("p", prompt, max_new=4, prompt_logprobs=True, top_n_tokens=3)])["p"]
    logits = hf_model(torch.tensor([prompt + tokens_of(outs)[:-1]])).logits[0].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    prompt_tokens = outs[0].prompt_tokens
    assert [t.token_id for t in prompt_tokens] == prompt
    assert all(o.prompt_tokens is None for o in outs[1:])
    assert prompt_tokens[0].logprob != prompt_tokens[0].logprob  # NaN: nothing predicts the first token
    for pos in range(1, len(prompt)):
        assert prompt_tokens[pos].logprob == pytest.approx(log_probs[pos - 1, prompt[pos]].item(), abs=1e-4)
    for k, token in enumerate(t for o in outs for t in o.tokens):
        row = log_probs[len(prompt) - 1 + k]
        top_lp, top_ids = torch.topk(row, 3)
        assert [tid for tid, _, _ in token.top_tokens] == top_ids.tolist()
        assert [lp for _, lp, _ in token.top_tokens] == pytest.approx(top_lp.tolist(), abs=1e-4)
        assert token.top_tokens[0][0] == token.token_id  # greedy picks the best
        assert token.top_tokens[0][2] == token.text == token_text(engine.tokenizer, token.token_id)


def test_n_sequences_fan_out_with_seed_plus_index(make_engine, random_prompts):
    engine, _ = make_engine("llama")
    (prompt,) = random_prompts([7], seed=7)
    sampled = dict(do_sample=True, temperature=1.5, seed=11)
    fanned = engine.generate([request("n", prompt, max_new=12, n=3, **sampled)])["n"]
    by_index = {i: [o for o in fanned if o.index == i] for i in range(3)}
    assert all(outs[-1].finished for outs in by_index.values())
    assert [outs[-1].seed for outs in by_index.values()] == [11, 12, 13]
    for i in range(3):
        alone = engine.generate([request(f"s{i}", prompt, max_new=12, **{**sampled, "seed": 11 + i})])[f"s{i}"]
        assert tokens_of(by_index[i]) == tokens_of(alone)
    assert len({tuple(tokens_of(outs)) for outs in by_index.values()}) > 1
    assert engine.stats().kv_blocks_used == 0


def test_n_sequences_share_their_prompt_blocks(make_engine, random_prompts, hf_greedy):
    engine, hf_model = make_engine("llama", max_batch_prefill_tokens=12)
    (prompt,) = random_prompts([21], seed=14)
    outs = engine.generate([request("g", prompt, max_new=6, n=3)])["g"]
    expected = hf_greedy(hf_model, prompt, 6)[0]
    assert all(tokens_of([o for o in outs if o.index == i]) == expected for i in range(3))
    # the 5 full prompt blocks were computed once; the two other sequences found them cached
    assert engine.stats().prefix_cache_hits == 2 * 20
    assert engine.stats().kv_blocks_used == 0


def test_stop_token_and_eos_end_generation(make_engine, random_prompts, hf_greedy):
    engine, hf_model = make_engine("llama")
    (prompt,) = random_prompts([6], seed=8)
    expected = hf_greedy(hf_model, prompt, 8)[0]
    stop_at = expected[3]
    cut = expected.index(stop_at) + 1
    outs = engine.generate([request("s", prompt, max_new=8, stop_token_ids=(stop_at,))])["s"]
    assert tokens_of(outs) == expected[:cut]
    assert outs[-1].finish_reason == "stop_sequence" and outs[-1].num_generated_tokens == cut
    # the checkpoint's eos id is 2: make it the first generated token's id through the engine's own set
    engine.outputs.eos_token_ids.add(expected[0])
    outs = engine.generate([request("e", prompt, max_new=8, ignore_eos=False)])["e"]
    assert tokens_of(outs) == expected[:1] and outs[-1].finish_reason == "eos_token"


def test_requests_that_can_never_run_are_refused(make_engine):
    engine, _ = make_engine("llama", max_input_tokens=10, max_total_tokens=16)
    with pytest.raises(RequestValidationError, match="less than 10"):
        engine.add_request(request("long", list(range(3, 14)), max_new=4))  # only the prompt is too long
    with pytest.raises(RequestValidationError, match="<= 16"):
        engine.add_request(request("total", list(range(3, 13)), max_new=7))
    with pytest.raises(RequestValidationError):
        engine.add_request(request("empty", []))
    engine.add_request(request("ok", [5, 6, 7]))
    with pytest.raises(RequestValidationError, match="already in flight"):
        engine.add_request(request("ok", [5, 6, 7]))
    assert engine.num_requests == 1


def test_prompt_ids_outside_the_models_vocabulary_are_refused(make_engine):
    """One id past the embedding would fail the whole batch's step (on CUDA: the device), so
    the engine refuses it up front; the bound is the model's vocab_size, read from its config."""
    engine, hf_model = make_engine("llama")
    vocab = hf_model.config.vocab_size
    assert engine.vocab_size == vocab
    for bad in ([5, vocab], [-1, 5], [5, 10**12]):
        with pytest.raises(RequestValidationError, match="out of the vocabulary"):
            engine.add_request(request("bad", bad))
    engine.add_request(request("edge", [0, vocab - 1], max_new=2))
    assert engine.num_requests == 1
    while engine.has_unfinished():
        assert not any(out.error for out in engine.step())


def test_a_failing_step_fails_only_its_requests(make_engine, random_prompts, hf_greedy):
    engine, hf_model = make_engine("llama", max_batch_size=1)
    bad_prompt, good_prompt = random_prompts([5, 9], seed=9)
    execute = engine.executor.execute

    def flaky(step):
        if any(e.request_id == "bad" for e in step.entries):
            raise RuntimeError("device fell over")
        return execute(step)

    engine.executor.execute = flaky
    engine.add_request(request("bad", bad_prompt))
    engine.add_request(request("good", good_prompt))  # waits: one sequence at a time
    (failed,) = engine.step()
    assert failed.request_id == "bad" and failed.finished and "device fell over" in failed.error
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    assert all(o.error is None for o in outputs)
    assert tokens_of(outputs) == hf_greedy(hf_model, good_prompt, 8)[0]
    assert engine.stats().kv_blocks_used == 0


def test_a_stop_string_s_position_comes_with_the_last_output(make_engine, random_prompts):
    """The engine says where the stop string that ended a sequence begins in its whole text,
    so the OpenAI routes cut there instead of searching the text again."""
    engine, _ = make_engine("llama")
    prompt = random_prompts([6], seed=3)[0]
    free = engine.generate([request("free", prompt, max_new=12)])["free"]
    text = "".join(o.text for o in free)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"the tiny model's text has no usable middle: {text!r}"
    outs = engine.generate([request("stopped", prompt, max_new=12, stop=(stop,))])["stopped"]
    stopped_text = "".join(o.text for o in outs)
    assert outs[-1].finish_reason == "stop_sequence"
    assert outs[-1].stop_text_offset == text.find(stop) == stopped_text.find(stop)
    assert all(o.stop_text_offset is None for o in outs[:-1]) and free[-1].stop_text_offset is None
