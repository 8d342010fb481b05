"""How many KV blocks the engine allocates when ``--max-batch-total-tokens`` is not given.

Never more than the scheduler could fill: ``--max-concurrent-requests`` sequences of
``max_total_tokens`` each. Within that:

- **Accelerators** (dedicated memory, TGI's rule): the free bytes reported after loading the
  weights, less the share ``--cuda-memory-fraction`` keeps off-limits
  (``(1 - fraction) * total``), less a 10% headroom for activations and the sampler.
- **CPU** (``device.type == "cpu"``): the cache is ordinary RAM, shared with the OS, the page
  cache and the server itself, and a CPU step is compute-bound well before a big batch, so a
  cache for hundreds of long sequences only costs memory and start-up time (zeroing 9 GiB took
  35 s here). The default holds ``CPU_KV_SEQUENCES`` full-length sequences, or one full prefill
  step if ``--max-batch-prefill-tokens`` asks for more, and at most ``CPU_KV_MEMORY_SHARE`` of
  the free memory; never less than one full-length sequence while memory allows it. Requests
  shorter than ``max_total_tokens`` only take the blocks they use, so more of them run at once.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from lmport.config import LaunchConfig
from lmport.layers.attention import KVCacheSpec

log = logging.getLogger(__name__)

KV_MEMORY_HEADROOM = 0.10  # of the memory left after the weights: activations, sampler, fragmentation
CPU_KV_SEQUENCES = 8  # full-length sequences the default CPU cache holds
CPU_KV_MEMORY_SHARE = 0.25  # of the free RAM, at most, for the default CPU cache


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def size_kv_cache(config: LaunchConfig, host: Any, spec: KVCacheSpec, device: torch.device, max_positions: int,
                  extra_bytes_per_block: int = 0) -> int:  # fmt: skip
    """Blocks for the KV cache: ``max_batch_total_tokens`` if set, else the rule in the module doc.

    ``extra_bytes_per_block``: memory each block costs besides ``spec``'s (a draft model's own
    cache of the same blocks, for speculative decoding).
    """
    block_size = spec.block_size
    if config.max_batch_total_tokens:
        return max(1, _blocks(config.max_batch_total_tokens, block_size))
    max_total = config.max_total_tokens or min(4096, max_positions)
    one_sequence = _blocks(max_total, block_size)
    wanted = _blocks(config.max_concurrent_requests * max_total, block_size)
    on_cpu = device.type == "cpu"
    if on_cpu:
        cpu_tokens = max(CPU_KV_SEQUENCES * max_total, config.max_batch_prefill_tokens or 0)
        wanted = min(wanted, _blocks(cpu_tokens, block_size))
    info = host.memory_info(device)
    if info is None:
        log.warning("backend reports no memory info: sizing the KV cache for the largest batch the scheduler can fill")
        return wanted
    bytes_per_block = spec.bytes_per_block() + extra_bytes_per_block
    reserved = 0.0 if on_cpu else (1.0 - config.cuda_memory_fraction) * info.total_bytes
    usable_blocks = int(max(0.0, info.free_bytes - reserved) * (1.0 - KV_MEMORY_HEADROOM) // bytes_per_block)
    blocks = min(wanted, usable_blocks)
    if on_cpu:
        share_blocks = int(info.free_bytes * CPU_KV_MEMORY_SHARE // bytes_per_block)
        blocks = min(usable_blocks, max(one_sequence, min(wanted, share_blocks)))
    if blocks < one_sequence:
        raise MemoryError(
            f"not enough memory for one sequence of {max_total} tokens: the KV cache fits {blocks * block_size} "
            f"tokens ({info.free_bytes / 2**30:.1f} GiB free); lower --max-total-tokens or use a smaller model"
        )
    return blocks
