"""The default KV cache size: TGI's free-memory rule on accelerators (with
``--cuda-memory-fraction``), a few full-length sequences within a quarter of the RAM on CPU.

Each expected block count is worked out by hand from the reported memory and the cache shape.
"""

from __future__ import annotations

import pytest
import torch

from lmport.config import LaunchConfig
from lmport.engine.kv_cache_sizing import size_kv_cache
from lmport.hookspecs import hookimpl
from lmport.layers.attention import KVCacheSpec
from lmport.memory import MemoryInfo
from lmport.plugins import PluginHost

GiB = 2**30
MiB = 2**20
# 16 layers x (K+V) x 16 tokens x 4 kv heads x 64 dims x 2 bytes = 256 KiB per block, 16 KiB per token
SPEC = KVCacheSpec(num_layers=16, num_kv_heads=4, head_dim=64, block_size=16, dtype=torch.bfloat16)
BLOCK = 256 * 1024
CUDA = torch.device("cuda")  # only a name here: nothing is allocated on it
CPU = torch.device("cpu")


def host_reporting(free: int, total: int, devices: tuple[str, ...] = ("cuda", "cpu")) -> PluginHost:
    asked = []

    class Memory:
        @hookimpl
        def lmport_memory_info(self, device):
            asked.append(torch.device(device).type)
            return MemoryInfo(free_bytes=free, total_bytes=total) if torch.device(device).type in devices else None

    host = PluginHost(environ={}, load_entry_points=False).load()
    host.register(Memory(), "memory")
    host.select_backend("cpu")
    host.asked = asked
    return host


def test_spec_block_bytes():
    assert SPEC.bytes_per_block() == BLOCK


def test_accelerator_takes_the_free_memory_less_headroom():
    host = host_reporting(free=5 * GiB, total=80 * GiB)
    blocks = size_kv_cache(LaunchConfig(model_id="m"), host, SPEC, CUDA, max_positions=4096)
    assert host.asked == ["cuda"]
    # 18 432 blocks: fewer than the 32 768 that 128 requests x 4096 tokens could fill
    assert blocks == int(5 * GiB * 0.9) // BLOCK


def test_accelerator_honours_cuda_memory_fraction():
    host = host_reporting(free=44 * GiB, total=80 * GiB)
    config = LaunchConfig(model_id="m", cuda_memory_fraction=0.5)
    # half of the 80 GiB is off-limits: 44 - 40 = 4 GiB may be used, less the headroom
    assert size_kv_cache(config, host, SPEC, CUDA, max_positions=4096) == int(4 * GiB * 0.9) // BLOCK
    # a quarter leaves nothing: 60 GiB are off-limits and only 44 GiB are free
    with pytest.raises(MemoryError, match="not enough memory for one sequence of 4096 tokens"):
        size_kv_cache(config.replace(cuda_memory_fraction=0.25), host, SPEC, CUDA, max_positions=4096)


def test_accelerator_never_exceeds_what_the_scheduler_can_fill():
    host = host_reporting(free=70 * GiB, total=80 * GiB)
    config = LaunchConfig(model_id="m", max_concurrent_requests=4, max_total_tokens=1000)
    assert size_kv_cache(config, host, SPEC, CUDA, max_positions=4096) == -(-4 * 1000 // 16)  # 250 blocks


def test_cpu_holds_a_few_full_length_sequences():
    host = host_reporting(free=16 * GiB, total=24 * GiB)
    blocks = size_kv_cache(LaunchConfig(model_id="m"), host, SPEC, CPU, max_positions=32768)
    assert host.asked == ["cpu"]
    assert blocks * 16 == 8 * 4096  # 8 sequences of min(4096, positions): 512 MiB of the 16 GiB free
    config = LaunchConfig(model_id="m", max_total_tokens=1000)
    assert size_kv_cache(config, host, SPEC, CPU, max_positions=32768) == 500  # 8 x 1000 tokens
    config = LaunchConfig(model_id="m", max_total_tokens=1000, max_concurrent_requests=3)
    assert size_kv_cache(config, host, SPEC, CPU, max_positions=32768) == 188  # ceil(3 x 1000 / 16)


def test_cpu_cache_fits_one_full_prefill_step():
    host = host_reporting(free=16 * GiB, total=24 * GiB)
    config = LaunchConfig(model_id="m", max_total_tokens=1000, max_batch_prefill_tokens=20_000)
    assert size_kv_cache(config, host, SPEC, CPU, max_positions=32768) == 1250  # 20 000 tokens > 8 x 1000


def test_cpu_cache_takes_at_most_a_quarter_of_the_free_memory():
    host = host_reporting(free=2 * GiB, total=24 * GiB)
    # 8 x 32768 tokens x 16 KiB = 4 GiB wanted; a quarter of 2 GiB = 512 MiB = 2048 blocks
    config = LaunchConfig(model_id="m", max_total_tokens=32768)
    assert size_kv_cache(config, host, SPEC, CPU, max_positions=32768) == 2048


def test_cpu_cache_still_holds_one_sequence_where_memory_allows():
    host = host_reporting(free=1 * GiB, total=24 * GiB)
    # one 32768-token sequence is 512 MiB: above the quarter (256 MiB), within the 90% usable
    config = LaunchConfig(model_id="m", max_total_tokens=32768)
    assert size_kv_cache(config, host, SPEC, CPU, max_positions=32768) == 2048
    with pytest.raises(MemoryError, match="not enough memory for one sequence of 32768 tokens"):
        size_kv_cache(config, host_reporting(free=512 * MiB, total=24 * GiB), SPEC, CPU, max_positions=32768)


def test_cuda_memory_fraction_does_not_apply_to_cpu():
    host = host_reporting(free=16 * GiB, total=24 * GiB)
    config = LaunchConfig(model_id="m", cuda_memory_fraction=0.1)
    assert size_kv_cache(config, host, SPEC, CPU, max_positions=32768) == 8 * 4096 // 16


def test_max_batch_total_tokens_wins_and_no_memory_info_sizes_for_the_scheduler():
    config = LaunchConfig(model_id="m", max_batch_total_tokens=1000)
    host = host_reporting(free=0, total=0)
    assert size_kv_cache(config, host, SPEC, CPU, max_positions=4096) == 63 and host.asked == []
    silent = host_reporting(free=0, total=0, devices=())  # nobody reports a "cuda" device
    assert size_kv_cache(LaunchConfig(model_id="m"), silent, SPEC, CUDA, max_positions=4096) == 128 * 4096 // 16


def test_launch_help_states_the_cpu_rule():
    from lmport.commands.launch_flags import FLAGS
    from lmport.engine.kv_cache_sizing import CPU_KV_MEMORY_SHARE, CPU_KV_SEQUENCES, KV_MEMORY_HEADROOM

    (flag,) = [f for f in FLAGS if f.dest == "max_batch_total_tokens"]
    assert f"room for {CPU_KV_SEQUENCES} sequences" in flag.help
    assert CPU_KV_MEMORY_SHARE == 0.25 and "a quarter of the free RAM" in flag.help
    assert f"less {KV_MEMORY_HEADROOM:.0%}%" in flag.help  # argparse's escaped percent sign


def test_a_draft_models_cache_shares_the_memory():
    """Speculative decoding: every block also costs the draft model's cache of the same block."""
    host = host_reporting(free=5 * GiB, total=80 * GiB)
    blocks = size_kv_cache(LaunchConfig(model_id="m"), host, SPEC, CUDA, max_positions=4096, extra_bytes_per_block=BLOCK // 2)
    assert blocks == int(5 * GiB * 0.9) // (BLOCK + BLOCK // 2)
