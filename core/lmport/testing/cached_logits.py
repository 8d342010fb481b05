"""Last-token logits of a native model over the paged cache, prompts fed in chunks.

Greedy tokens alone can hide a wrong cache read (random tiny models often repeat one token);
logits after a prompt fed one token per step compare every decode step's attention over
the cache with a reference. Used by the model-family tests next to the greedy check.
"""

from __future__ import annotations

import torch

from lmport.layers.attention import KVCacheSpec
from lmport.models.base import CausalLM
from lmport.testing.model_driver import build_metadata


@torch.inference_mode()
def native_last_logits(
    model: CausalLM, prompts: list[list[int]], host, block_size: int = 4, chunk: int | None = None
) -> torch.Tensor:
    """Logits at each prompt's last token, all prompts fed together as one flat batch per step.

    ``chunk`` feeds each prompt that many tokens per step (``1``: every step is a decode step
    over the cache); ``None`` prefills whole prompts at once.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    num_layers, num_kv_heads, head_dim = model.kv_cache_shape()
    blocks_per_seq = -(-max(map(len, prompts)) // block_size)
    spec = KVCacheSpec(num_layers, num_kv_heads, head_dim, block_size, dtype)
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
        input_ids = torch.tensor([t for i in active for t in feed[i]], dtype=torch.int64, device=device)
        hidden = model(input_ids, positions, kv_caches, meta)
        logits = model.compute_logits(hidden[torch.tensor(meta.query_start_loc_host[1:], device=device) - 1])
        for row, i in enumerate(active):
            cached[i] += len(feed[i])
            last[i] = logits[row]
    return torch.stack(last)


@torch.inference_mode()
def assert_stepwise_logits_match(hf_model, model: CausalLM, prompts: list[list[int]], host, atol: float = 1e-4) -> None:
    """Each prompt fed one token per step (all decode steps over the cache) ends at the logits of
    ``hf_model``'s own uncached forward over the whole prompt."""
    reference = torch.stack([hf_model(torch.tensor([p])).logits[0, -1] for p in prompts])
    torch.testing.assert_close(native_last_logits(model, prompts, host, chunk=1), reference, atol=atol, rtol=0)
