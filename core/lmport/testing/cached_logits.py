"""Compare a native model with transformers on a tiny checkpoint: greedy tokens and logits.

The oracle is ``transformers`` run per prompt, unpadded; the native side runs all prompts as
one flat batch over the paged cache (small blocks, so sequences span many), optionally with
chunked prefill. Used by the model-family tests.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmport.layers.attention import KVCacheSpec
from lmport.models.base import CausalLM
from lmport.models.loader import build_native_model, resolve_model_info
from lmport.testing.model_driver import build_metadata


def cpu_host():
    """A PluginHost with the CPU backend selected (entry-point plugins are not loaded)."""
    from lmport.plugins import PluginHost

    host = PluginHost(environ={}, load_entry_points=False)
    host.select_backend()
    return host


def load_native(path: str | Path, host, dtype: torch.dtype = torch.float32) -> CausalLM:
    """Build the registered native model for the checkpoint at ``path``; fail if none claims it."""
    info = resolve_model_info(path)
    model = build_native_model(info, host, dtype, torch.device("cpu"))
    if model is None:
        raise AssertionError(f"no native model registered for {info.architecture}")
    return model


def sample_prompts(lengths: list[int], vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Random prompts of the given lengths, avoiding the low special ids (pad/bos/eos)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in lengths]


@torch.inference_mode()
def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one unpadded prompt, never stopping early at EOS."""
    config = hf_model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = None  # the native driver does not stop either
    try:
        out = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=hf_model.config.pad_token_id if hf_model.config.pad_token_id is not None else 0,
        )
    finally:
        config.eos_token_id = saved
    return out[0, len(prompt) :].tolist()


@torch.inference_mode()
def hf_last_logits(hf_model, prompt: list[int]) -> torch.Tensor:
    return hf_model(torch.tensor([prompt])).logits[0, -1].float()


@torch.inference_mode()
def native_last_logits(
    model: CausalLM, prompts: list[list[int]], host, block_size: int = 4, chunk: int | None = None
) -> torch.Tensor:
    """Logits at each prompt's last token, all prompts fed together as one flat batch per step.

    ``chunk`` feeds each prompt that many tokens per step (``1``: every step is a decode step
    over the cache); ``None`` prefills whole prompts at once.
    """
    device = torch.device("cpu")
    num_layers, num_kv_heads, head_dim = model.kv_cache_shape()
    blocks_per_seq = -(-max(map(len, prompts)) // block_size)
    spec = KVCacheSpec(num_layers, num_kv_heads, head_dim, block_size, torch.float32)
    kv_caches = host.allocate_kv_cache(spec, blocks_per_seq * len(prompts) + 1, device)
    tables = [list(range(1 + i * blocks_per_seq, 1 + (i + 1) * blocks_per_seq)) for i in range(len(prompts))]
    cached = [0] * len(prompts)
    last = [None] * len(prompts)
    while any(c < len(p) for c, p in zip(cached, prompts)):
        active = [i for i, p in enumerate(prompts) if cached[i] < len(p)]
        feed = {i: prompts[i][cached[i] : cached[i] + (chunk or len(prompts[i]))] for i in active}
        meta, positions = build_metadata(
            [cached[i] for i in active], [len(feed[i]) for i in active], [tables[i] for i in active], block_size, device
        )
        input_ids = torch.tensor([t for i in active for t in feed[i]], dtype=torch.int64)
        hidden = model(input_ids, positions, kv_caches, meta)
        logits = model.compute_logits(hidden[torch.tensor(meta.query_start_loc_host[1:]) - 1])
        for row, i in enumerate(active):
            cached[i] += len(feed[i])
            last[i] = logits[row]
    return torch.stack(last)

def assert_native_matches_transformers(
    hf_model,
    checkpoint: str | Path,
    prompt_lengths: tuple[int, ...] = (5, 11, 1, 8),
    max_new_tokens: int = 8,
    logits_atol: float = 1e-4,
) -> None:
    """The definition of done for a native family on one tiny checkpoint.

    Greedy tokens equal transformers' token for token (all prompts in one batch, block size 4,
    whole-prompt and chunked prefill), and the logits at each prompt's last token agree
    within ``logits_atol`` (float32), prefilled whole and fed one token per step.
    """
    from lmport.testing.model_driver import greedy_generate

    host = cpu_host()
    model = load_native(checkpoint, host)
    prompts = sample_prompts(list(prompt_lengths), hf_model.config.vocab_size)
    expected = [hf_greedy(hf_model, p, max_new_tokens) for p in prompts]
    for chunk in (None, 3):
        got = greedy_generate(model, prompts, max_new_tokens, host=host, block_size=4, prefill_chunk=chunk)
        assert got == expected, f"prefill_chunk={chunk}: native {got} != transformers {expected}"
    reference = torch.stack([hf_last_logits(hf_model, p) for p in prompts])
    for chunk in (None, 1):
        native = native_last_logits(model, prompts, host, chunk=chunk)
        torch.testing.assert_close(native, reference, atol=logits_atol, rtol=0, msg=lambda m: f"chunk={chunk}: {m}")
