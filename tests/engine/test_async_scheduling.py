"""Async scheduling (``LaunchConfig.async_scheduling``): step N+1 is scheduled and launched
before step N's tokens reach the host. On the CPU a step computes at once, so what is tested
here is the bookkeeping: placeholders for tokens still "on the device", their device-side
feed into the next step, a step's extra token for a sequence that turned out finished, and
that every output equals the synchronous engine's and transformers'.

The engine-feature scenarios of ``test_engine_features.py`` are run again, unchanged, on an
engine with async scheduling on.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest

from lmport.engine.api import GenerationRequest, SamplingParams

HERE = Path(__file__).parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_async_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


features = _load("test_engine_features")
parity = _load("test_engine_parity")


def request(rid: str, prompt: list[int], max_new: int = 8, **params) -> GenerationRequest:
    params.setdefault("ignore_eos", True)
    return GenerationRequest(rid, tuple(prompt), SamplingParams(max_new_tokens=max_new, **params))


def tokens_of(outputs) -> list[int]:
    return [t.token_id for o in outputs for t in o.tokens]


def summary(outputs) -> list[tuple]:
    """Everything a client sees of one request's outputs; logprobs apart (batches differ: float noise)."""
    return [
        (
            o.index,
            [(t.token_id, t.text, tuple(i for i, _, _ in t.top_tokens)) for t in o.tokens],
            o.text,
            o.finished,
            o.finish_reason,
            o.num_generated_tokens,
            o.error,
            None if o.prompt_tokens is None else [t.token_id for t in o.prompt_tokens],
        )
        for o in outputs
    ]


def logprobs(outputs) -> list[float]:
    values = []
    for o in outputs:
        for t in o.tokens:
            values += [t.logprob] + [lp for _, lp, _ in t.top_tokens]
        values += [t.logprob for t in o.prompt_tokens or () if t.logprob == t.logprob]
    return values


def assert_same(got: dict, want: dict) -> None:
    """The same outputs, request by request (``n > 1`` sequences compared index by index)."""
    assert set(got) == set(want)
    for rid in want:
        a = sorted(got[rid], key=lambda o: o.index)
        b = sorted(want[rid], key=lambda o: o.index)
        assert summary(a) == summary(b), rid
        assert logprobs(a) == pytest.approx(logprobs(b), abs=1e-4), rid


@pytest.fixture
def make_async_engine(make_engine):
    def make(name: str = "llama", **settings):
        engine, hf_model = make_engine(name, async_scheduling=True, **settings)
        assert engine.async_scheduling
        return engine, hf_model

    return make


def spy_launches(engine) -> list:
    seen = []
    launch = engine.executor.launch

    def spy(step, feed=(), previous=None):
        seen.append(([(e.request_id, e.start, e.num_new_tokens, e.is_prefill) for e in step.entries], list(feed)))
        return launch(step, feed, previous)

    engine.executor.launch = spy
    return seen


# ---------------------------------------------------------------------- the setting


def test_async_scheduling_is_off_on_the_cpu_unless_asked_for(make_engine):
    engine, _ = make_engine("llama")
    assert not engine.async_scheduling
    engine, _ = make_engine("llama", async_scheduling=True)
    assert engine.async_scheduling
    engine, _ = make_engine("llama", async_scheduling=False)
    assert not engine.async_scheduling


# ---------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", parity.registered_tiny_models())
def test_async_greedy_equals_transformers_and_the_synchronous_engine(name, make_engine, make_async_engine, random_prompts, hf_greedy):
    engine, hf_model = make_async_engine(name, max_batch_prefill_tokens=parity.PREFILL_BUDGET)
    sync, _ = make_engine(name, max_batch_prefill_tokens=parity.PREFILL_BUDGET)
    longest = min(30, engine.limits.max_total_tokens - parity.MAX_NEW)
    prompts = random_prompts([min(n, longest) for n in (5, 30, 17, 9, 1)], seed=1)
    expected = [hf_greedy(hf_model, p, parity.MAX_NEW)[0] for p in prompts]
    launches = spy_launches(engine)

    alone = engine.generate([parity.greedy("alone", prompts[1])])["alone"]
    assert tokens_of(alone) == expected[1]

    requests = [parity.greedy(str(i), p) for i, p in enumerate(prompts)]
    together = parity.run_staggered(engine, requests, gap=2)
    reference = parity.run_staggered(sync, requests, gap=2)
    for i, tokens in enumerate(expected):
        assert tokens_of(together[str(i)]) == tokens, f"prompt {i} (length {len(prompts[i])})"
    assert_same(together, reference)
    # decode tokens were fed on the device from the step before, and prefill chunks mixed with decodes
    assert any(feed for _, feed in launches)
    assert any(any(p for *_, p in entries) and any(not p for *_, p in entries) for entries, _ in launches)
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished()
    # ``length`` is known ahead: no step ever computed a token past max_new_tokens
    assert all(
        start + n <= len(prompts[int(rid)]) + parity.MAX_NEW - 1
        for entries, _ in launches for rid, start, n, _ in entries if rid != "alone"
    )


# ---------------------------------------------------------------------- the feature scenarios, async


@pytest.mark.parametrize(
    "scenario",
    [
        "test_prefix_cache_hit_gives_identical_output_and_shows_in_stats",
        "test_abort_frees_all_blocks_at_once",
        "test_prompt_logprobs_and_top_tokens_match_transformers",
        "test_n_sequences_fan_out_with_seed_plus_index",
        "test_n_sequences_share_their_prompt_blocks",
        "test_stop_token_and_eos_end_generation",
        "test_requests_that_can_never_run_are_refused",
        "test_prompt_ids_outside_the_models_vocabulary_are_refused",
    ],
)
def test_engine_features_hold_with_async_scheduling(scenario, make_async_engine, random_prompts, hf_greedy):
    fn = getattr(features, scenario)
    args = {"make_engine": make_async_engine, "random_prompts": random_prompts, "hf_greedy": hf_greedy}
    fn(*[args[name] for name in inspect.signature(fn).parameters])


@pytest.mark.parametrize("caching", [True, False])
def test_preemption_under_a_tiny_kv_budget_with_async_scheduling(caching, make_engine, make_async_engine, random_prompts, hf_greedy):
    features.test_preemption_under_a_tiny_kv_budget_gives_identical_output(caching, make_async_engine, random_prompts, hf_greedy)
    settings = dict(max_batch_total_tokens=48, max_total_tokens=32, max_input_tokens=16, enable_prefix_caching=caching)
    prompts = random_prompts([10, 14, 7, 12], seed=4)
    reqs = [request(str(i), p, max_new=16) for i, p in enumerate(prompts)]
    fast, _ = make_async_engine("llama", **settings)
    sync, _ = make_engine("llama", **settings)
    assert_same(fast.generate(reqs), sync.generate(reqs))
    assert fast.stats().extra["preemptions"] > 0


# ---------------------------------------------------------------------- ending one step early


def test_stop_strings_and_eos_drop_the_extra_token_computed_in_flight(make_engine, make_async_engine, random_prompts, hf_greedy):
    engine, hf_model = make_async_engine("llama")
    sync, _ = make_engine("llama")
    (prompt,) = random_prompts([6], seed=8)
    expected = hf_greedy(hf_model, prompt, 12)[0]
    text = [engine.tokenizer.decode([t]) for t in expected]
    stop = next(s for s in text[2:] if s.strip())  # a piece of text the 3rd+ token produces
    launches = spy_launches(engine)
    reqs = [
        request("str", prompt, max_new=12, stop=(stop,)),
        request("tok", prompt, max_new=12, stop_token_ids=(expected[4],)),
    ]
    got = engine.generate(reqs)
    want = sync.generate(reqs)
    assert_same(got, want)
    assert got["str"][-1].finish_reason == got["tok"][-1].finish_reason == "stop_sequence"
    cut = expected.index(expected[4]) + 1
    assert tokens_of(got["tok"]) == expected[:cut]
    # the step after the stop token was launched already: it computed one token for "tok" that no output shows
    fed = [start for entries, _ in launches for rid, start, n, prefill in entries if rid == "tok" and not prefill]
    assert max(fed) == len(prompt) + cut - 1
    # eos, through the engine's own set, on the first token
    engine.outputs.eos_token_ids.add(expected[0])
    sync.outputs.eos_token_ids.add(expected[0])
    eos = [request("e", prompt, max_new=8, ignore_eos=False), request("f", prompt[1:], max_new=5)]
    assert_same(engine.generate(eos), sync.generate(eos))
    assert engine.stats().kv_blocks_used == 0 and not engine.has_unfinished()


# ---------------------------------------------------------------------- abort, failures


def test_abort_while_a_step_is_in_flight_drops_its_token_and_frees_blocks(make_async_engine, random_prompts, hf_greedy):
    engine, hf_model = make_async_engine("llama")
    keep, drop = random_prompts([7, 9], seed=21)
    engine.add_request(request("keep", keep, max_new=12))
    engine.add_request(request("drop", drop, max_new=12))
    outputs = {"keep": [], "drop": []}
    for _ in range(4):
        for out in engine.step():
            outputs[out.request_id].append(out)
    assert engine._in_flight is not None and any(e.seq.request_id == "drop" for e in engine._in_flight.step.entries)
    (aborted,) = engine.abort("drop")
    assert aborted.finished and aborted.finish_reason == "abort"
    assert aborted.num_generated_tokens == len(tokens_of(outputs["drop"]))  # the token in flight is not counted
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].append(out)
    assert tokens_of(outputs["keep"]) == hf_greedy(hf_model, keep, 12)[0]
    assert tokens_of(outputs["drop"]) == hf_greedy(hf_model, drop, 12)[0][: len(outputs["drop"])]
    assert engine.stats().kv_blocks_used == 0
    assert engine.step() == []


def test_a_failing_launch_fails_only_its_requests(make_async_engine, random_prompts, hf_greedy):
    """A failed launch is executed again synchronously (after the step in flight), where the
    culprit fails again, alone."""
    engine, hf_model = make_async_engine("llama", max_batch_size=1)
    bad_prompt, good_prompt = random_prompts([5, 9], seed=9)
    launch, execute = engine.executor.launch, engine.executor.execute

    def flaky(run):
        def call(step, *args):
            if any(e.request_id == "bad" for e in step.entries):
                raise RuntimeError("device fell over")
            return run(step, *args)

        return call

    engine.executor.launch, engine.executor.execute = flaky(launch), flaky(execute)
    engine.add_request(request("bad", bad_prompt))
    engine.add_request(request("good", good_prompt))
    (failed,) = engine.step()
    assert failed.request_id == "bad" and failed.finished and "device fell over" in failed.error
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    assert all(o.error is None for o in outputs)
    assert tokens_of(outputs) == hf_greedy(hf_model, good_prompt, 8)[0]
    assert engine.stats().kv_blocks_used == 0


def test_a_failing_result_fails_its_requests_and_the_rest_goes_on(make_async_engine, random_prompts, hf_greedy):
    engine, hf_model = make_async_engine("llama", max_batch_size=1)  # a failing step fails all its requests
    bad_prompt, good_prompt = random_prompts([5, 9], seed=10)
    launch = engine.executor.launch
    broken = {"once": True}

    def flaky(step, feed=(), previous=None):
        pending = launch(step, feed, previous)
        if any(e.request_id == "bad" and not e.is_prefill for e in step.entries) and broken.pop("once", False):
            def fail():
                raise RuntimeError("copy failed")

            pending.result = fail
        return pending

    engine.executor.launch = flaky
    outputs = engine.generate([request("bad", bad_prompt), request("good", good_prompt, max_new=10)])
    assert outputs["bad"][-1].finished and "copy failed" in outputs["bad"][-1].error
    assert all(o.error is None for o in outputs["good"])
    assert tokens_of(outputs["good"]) == hf_greedy(hf_model, good_prompt, 10)[0]
    assert engine.stats().kv_blocks_used == 0


# ---------------------------------------------------------------------- sampling


def test_seeded_sampling_and_penalties_equal_the_synchronous_engine(make_engine, make_async_engine, random_prompts):
    engine, _ = make_async_engine("llama")
    sync, _ = make_engine("llama")
    a, b, c = random_prompts([7, 11, 4], seed=12)
    reqs = [
        request("n", a, max_new=12, n=3, do_sample=True, temperature=1.5, seed=11, top_n_tokens=2),
        request("p", b, max_new=10, repetition_penalty=1.3, do_sample=True, seed=5, top_k=20),
        request("f", c, max_new=10, frequency_penalty=0.5, presence_penalty=0.3),
        request("g", b, max_new=9, do_sample=True, top_p=0.9, seed=3),
    ]
    got, want = engine.generate(reqs), sync.generate(reqs)

    assert_same(got, want)
    assert engine.stats().kv_blocks_used == 0



def test_async_scheduling_defaults_to_on_for_accelerators_only():
    """The launcher's default (``None``) resolves by device; an explicit setting always wins."""
    import torch

    from lmport.config import LaunchConfig
    from lmport.engine.factory import wants_async_scheduling

    assert LaunchConfig().async_scheduling is None
    assert wants_async_scheduling(LaunchConfig(), torch.device("cuda")) is True
    assert wants_async_scheduling(LaunchConfig(), torch.device("cpu")) is False
    assert wants_async_scheduling(LaunchConfig(async_scheduling=False), torch.device("cuda")) is False
    assert wants_async_scheduling(LaunchConfig(async_scheduling=True), torch.device("cpu")) is True
