"""A minimal greedy generator over the paged cache, without the engine.

Used to test a model (or an attention backend) in isolation: all prompts run as one flat
batch, prefill optionally in chunks, then decode together. Blocks are handed out in order.
"""

from __future__ import annotations

import torch

from lmport.layers.attention import AttentionMetadata, KVCacheSpec
from lmport.models.base import CausalLM


def build_metadata(
    cached: list[int], new: list[int], block_tables: list[list[int]], block_size: int, device: torch.device
) -> tuple[AttentionMetadata, torch.Tensor]:
    """Metadata for sequences with ``cached[i]`` tokens already in cache and ``new[i]`` new ones.

    Returns the metadata and the positions of the new tokens.
    """
    starts = [0]
    for n in new:
        starts.append(starts[-1] + n)
    seq_lens = [c + n for c, n in zip(cached, new)]
    slots, positions = [], []
    for c, n, table in zip(cached, new, block_tables):
        for pos in range(c, c + n):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
            positions.append(pos)
    width = max(len(t) for t in block_tables)
    tables = [t + [0] * (width - len(t)) for t in block_tables]
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc_host=starts,
        seq_lens_host=seq_lens,
        max_query_len=max(new),
        max_seq_len=max(seq_lens),
        block_size=block_size,
    )
    return meta, torch.tensor(positions, dtype=torch.int64, device=device)


@torch.inference_mode()
def greedy_generate(
    model: CausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    host=None,
    block_size: int = 4,
    prefill_chunk: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[list[int]]:
    """Greedy tokens for each prompt (exactly ``max_new_tokens`` each, no EOS stop)."""
    device = torch.device(device)
    num_layers, num_kv_heads, head_dim = model.kv_cache_shape()
    blocks_per_seq = -(-(max(map(len, prompts)) + max_new_tokens) // block_size)
    spec = KVCacheSpec(num_layers, num_kv_heads, head_dim, block_size, dtype)
    num_blocks = blocks_per_seq * len(prompts) + 1
    if host is not None:
        kv_caches = host.allocate_kv_cache(spec, num_blocks, device)
    else:
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        kv_caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)) for _ in range(num_layers)]
    # block 0 stays unused so that a wrong (zero-padded) table entry shows up as wrong output
    tables = [list(range(1 + i * blocks_per_seq, 1 + (i + 1) * blocks_per_seq)) for i in range(len(prompts))]
    cached = [0] * len(prompts)
    pending = [list(p) for p in prompts]  # tokens not yet fed
    outputs: list[list[int]] = [[] for _ in prompts]
    while any(len(o) < max_new_tokens for o in outputs):
        active = [i for i in range(len(prompts)) if len(outputs[i]) < max_new_tokens]
        feed = {i: pending[i][: prefill_chunk or len(pending[i])] for i in active}
        meta, positions = build_metadata(
            [cached[i] for i in active], [len(feed[i]) for i in active], [tables[i] for i in active], block_size, device
        )
        input_ids = torch.tensor([t for i in active for t in feed[i]], dtype=torch.int64, device=device)
        hidden = model(input_ids, positions, kv_caches, meta)
        last_rows = torch.tensor(meta.query_start_loc_host[1:], device=device) - 1
        next_tokens = model.compute_logits(hidden[last_rows]).argmax(dim=-1).tolist()
        for row, i in enumerate(active):
            cached[i] += len(feed[i])
            pending[i] = pending[i][len(feed[i]) :]
            if not pending[i]:  # the whole prompt is in: this step's token is generated
                outputs[i].append(next_tokens[row])
                pending[i] = [next_tokens[row]]
    return outputs
