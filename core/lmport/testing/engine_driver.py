"""Driving a whole engine (``build_llm_engine``, scheduler, runner) in tests: greedy tokens of a
checkpoint or of a built engine, and requests that join a batch already decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def engine_greedy(path: str | Path, host: Any, prompts: list[list[int]], max_new_tokens: int, **settings: Any) -> list[list[int]]:
    """Each prompt's ``max_new_tokens`` greedy tokens (EOS ignored), all prompts submitted together.

    fp32, 16-token blocks and a 12-token prefill budget unless ``settings`` say otherwise, so
    prompts prefill in chunks mixed with decodes; explicit limits, at most the model's sequence
    limit (some tiny configs name few positions, stretched by their rope scaling).
    """
    from transformers import AutoConfig

    from lmport.config import LaunchConfig
    from lmport.engine.factory import build_llm_engine
    from lmport.engine.limits import model_sequence_limit

    # a tiny config naming few positions (dynamic rope scaling past them) caps the sequence length
    longest = min(64, model_sequence_limit(AutoConfig.from_pretrained(path)) or 64)
    defaults = dict(dtype="float32", block_size=16, max_batch_total_tokens=4096, max_batch_prefill_tokens=12,
                    max_input_tokens=min(32, longest - max_new_tokens), max_total_tokens=longest)  # fmt: skip
    engine, _, _ = build_llm_engine(LaunchConfig(model_id=str(path), **{**defaults, **settings}), host)
    return greedy_tokens(engine, prompts, max_new_tokens)


def greedy_tokens(engine: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Each prompt's ``max_new_tokens`` greedy tokens (EOS ignored) from ``engine``, all prompts
    submitted together and stepped until done."""
    from lmport.engine.api import GenerationRequest, SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(GenerationRequest(f"r{i}", tuple(prompt), params))
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(t.token_id for t in out.tokens)
    return [tokens[f"r{i}"] for i in range(len(prompts))]


def run_staggered(engine: Any, requests: list[Any], gap: int = 2) -> dict[str, list]:
    """Add request ``i`` before step ``i * gap`` (requests join a batch that is decoding); outputs per request."""
    outputs: dict[str, list] = {r.request_id: [] for r in requests}
    pending = list(requests)
    step = 0
    while pending or engine.has_unfinished():
        while pending and step >= (len(requests) - len(pending)) * gap:
            engine.add_request(pending.pop(0))
        for out in engine.step():
            outputs[out.request_id].append(out)
        step += 1
    return outputs
