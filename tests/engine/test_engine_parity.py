"""The engine's greedy tokens equal transformers' ``generate``, for every natively registered family.

Block size 4 (sequences span many blocks) and a prefill budget of 12 (longer prompts are
prefilled in chunks, mixed with other sequences' decodes). New families are covered as soon
as they are registered.
"""

from __future__ import annotations

import pytest
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lmport.engine.api import GenerationRequest, SamplingParams
from lmport.engine.detokenizer import IncrementalDetokenizer
from lmport.models.loader import model_registry
from lmport.plugins import PluginHost
from lmport.testing.engine_driver import run_staggered
from lmport.testing.tiny_models import TINY_MODELS

MAX_NEW = 10
PREFILL_BUDGET = 12


def registered_tiny_models() -> list[str]:
    host = PluginHost(environ={}, load_entry_points=False).load()
    host.select_backend("cpu")
    registered = set(model_registry(host).architectures())
    return [
        name for name, make_config in TINY_MODELS.items()
        if MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(make_config().model_type) in registered
    ]


def greedy(request_id: str, prompt: list[int], max_new: int = MAX_NEW) -> GenerationRequest:
    return GenerationRequest(request_id, tuple(prompt), SamplingParams(max_new_tokens=max_new, ignore_eos=True))


def detokenize(tokenizer, prompt: list[int], tokens: list[int]) -> str:
    """The text streamed for ``tokens``: every push, then the final flush."""
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    return "".join(detokenizer.push(t) for t in tokens) + detokenizer.flush()


def record_steps(engine) -> list:
    seen = []
    execute = engine.executor.execute

    def spy(step):
        seen.append([(e.start, e.num_new_tokens, e.is_prefill) for e in step.entries])
        return execute(step)

    engine.executor.execute = spy
    return seen


@pytest.mark.parametrize("name", registered_tiny_models())
def test_engine_greedy_equals_transformers(name, make_engine, random_prompts, hf_greedy):
    engine, hf_model = make_engine(name, max_batch_prefill_tokens=PREFILL_BUDGET)
    longest = min(30, engine.limits.max_total_tokens - MAX_NEW)  # some variants have 16 positions
    prompts = random_prompts([min(n, longest) for n in (5, 30, 17, 9, 1)], seed=1)
    expected = [hf_greedy(hf_model, p, MAX_NEW) for p in prompts]
    steps = record_steps(engine)

    alone = engine.generate([greedy("alone", prompts[1])])["alone"]
    assert [t.token_id for o in alone for t in o.tokens] == expected[1][0]

    together = run_staggered(engine, [greedy(str(i), p) for i, p in enumerate(prompts)], gap=2)
    for i, (tokens, logprobs) in enumerate(expected):
        outs = together[str(i)]
        got = [t for o in outs for t in o.tokens]
        assert [t.token_id for t in got] == tokens, f"prompt {i} (length {len(prompts[i])})"
        for k, token in enumerate(got):
            assert token.logprob == pytest.approx(logprobs[k][token.token_id].item(), abs=1e-4)
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert sum(o.finished for o in outs) == 1
        assert "".join(o.text for o in outs) == detokenize(engine.tokenizer, prompts[i], tokens)

    # the 30-token prompt was prefilled in chunks, some mixed with other sequences' decodes
    assert any(start > 0 and prefill for entries in steps for start, _, prefill in entries)
    assert any(
        any(p for _, _, p in entries) and any(not p for _, _, p in entries) for entries in steps
    )
    assert all(sum(n for _, n, p in entries if p) <= PREFILL_BUDGET for entries in steps)
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished()
