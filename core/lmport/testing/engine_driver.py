"""Greedy tokens through the whole engine (``build_llm_engine``, scheduler, runner) for the GPU tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def engine_greedy(path: str | Path, host: Any, prompts: list[list[int]], max_new_tokens: int, **settings: Any) -> list[list[int]]:
    """Each prompt's ``max_new_tokens`` greedy tokens (EOS ignored), all prompts submitted together.

    fp32, 16-token blocks and a 12-token prefill budget unless ``settings`` say otherwise, so
    prompts prefill in chunks mixed with decodes; explicit limits, at most the model's sequence
    limit (some tiny configs name few positions, stretched by their rope scaling).
    """
    from lmport.config import LaunchConfig
    from lmport.engine.api import GenerationRequest, SamplingParams
    from lmport.engine.factory import build_llm_engine

    from transformers import AutoConfig

    from lmport.engine.limits import model_sequence_limit

    # a tiny config naming few positions (dynamic rope scaling past them) caps the sequence length
    longest = min(64, model_sequence_limit(AutoConfig.from_pretrained(path)) or 64)
    defaults = dict(dtype="float32", block_size=16, max_batch_total_tokens=4096, max_batch_prefill_tokens=12,
                    max_input_tokens=min(32, longest - max_new_tokens), max_total_tokens=longest)  # fmt: skip
    engine, _, _ = build_llm_engine(LaunchConfig(model_id=str(path), **{**defaults, **settings}), host)
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(GenerationRequest(f"r{i}", tuple(prompt), params))
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(t.token_id for t in out.tokens)
    return [tokens[f"r{i}"] for i in range(len(prompts))]
