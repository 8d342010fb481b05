"""One request fails alone: a setting the model cannot run is refused at start, and a step
that raises fails only the sequence that makes it raise (the rest keep the tokens they get
when they run uncontended).

The culprit is real, not simulated: tiny GPT-2 has 512 learned positions, and a 721-token
prompt indexes its position table out of range inside the step, as it did when
``--max-total-tokens 2048`` was accepted on GPT-2 and all 20 concurrent requests got 424.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmport.engine.api import GenerationRequest, SamplingParams

LONG = 721  # past GPT-2's 512 positions
# waiting_served_ratio 0: a newcomer joins the running batch at once (TGI's default 1.2 holds it back)
SETTINGS = dict(block_size=16, max_batch_total_tokens=4096, max_total_tokens=512, waiting_served_ratio=0.0)


def request(rid: str, prompt: list[int], max_new: int = 10) -> GenerationRequest:
    return GenerationRequest(rid, tuple(prompt), SamplingParams(max_new_tokens=max_new, ignore_eos=True))


def prompts(lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 384, (n,), generator=gen).tolist() for n in lengths]


def run(engine, requests: list[GenerationRequest], join_late: list[GenerationRequest] = (), after_steps: int = 2):
    """Every output per request; ``join_late`` is added after ``after_steps`` steps."""
    outputs: dict[str, list] = {r.request_id: [] for r in [*requests, *join_late]}
    for r in requests:
        engine.add_request(r)
    steps = 0
    while engine.has_unfinished() or join_late:
        if steps == after_steps:
            for r in join_late:
                engine.add_request(r)
            join_late = []
        for out in engine.step():
            outputs[out.request_id].append(out)
        steps += 1
    return outputs


def spy_on_steps_with(executor, request_id: str) -> list[int]:
    """The sizes of the steps ``executor`` is asked to run that hold ``request_id`` (in call order)."""
    sizes: list[int] = []
    for name in ("execute", "launch"):
        original = getattr(executor, name)

        def watched(step, *args, _original=original):
            if any(e.request_id == request_id for e in step.entries):
                sizes.append(len(step.entries))
            return _original(step, *args)

        setattr(executor, name, watched)
    return sizes


def tokens(outputs) -> list[int]:
    return [t.token_id for o in outputs for t in o.tokens]


def test_max_total_tokens_past_the_models_positions_is_refused_at_start(build_engine_for):
    with pytest.raises(ValueError, match=r"max_total_tokens \(2048\) is larger than the model's max_position_embeddings \(512\)"):
        build_engine_for("gpt2", max_total_tokens=2048)
    # the default stays within the positions
    assert build_engine_for("gpt2", block_size=16).limits.max_total_tokens == 512


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_step_failure_fails_only_the_request_that_caused_it(async_scheduling, build_engine_for):
    engine = build_engine_for("gpt2", async_scheduling=async_scheduling, **SETTINGS)
    # as if the old, unchecked limit had let the culprit in (validation is what stops it now)
    widened = dataclasses.replace(engine.limits, max_total_tokens=2048, max_input_tokens=2047, max_batch_prefill_tokens=4096)
    engine.limits = engine.scheduler.limits = widened
    good = [request(f"r{i}", p, max_new=12) for i, p in enumerate(prompts([5 + 3 * i for i in range(19)], seed=1))]
    culprit = request("long", prompts([LONG], seed=2)[0])
    shared = spy_on_steps_with(engine.executor, "long")

    outputs = run(engine, good, join_late=[culprit])

    assert shared[0] == 20  # the culprit's first step held every good request too

    (failed,) = outputs["long"]
    assert failed.finished and failed.error and "IndexError" in failed.error
    for r in good:
        assert all(o.error is None for o in outputs[r.request_id]), r.request_id
        assert outputs[r.request_id][-1].finish_reason == "length"
    assert engine.stats().kv_blocks_used == 0 and not engine.has_unfinished()
    # each good request alone gets the tokens it got next to the culprit
    for r in good:
        alone = run(engine, [dataclasses.replace(r, request_id=r.request_id + "-alone")])
        assert tokens(alone[r.request_id + "-alone"]) == tokens(outputs[r.request_id]), r.request_id
