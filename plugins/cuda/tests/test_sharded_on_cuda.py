"""Tensor parallelism on CUDA with the GPUs this machine has (skipped without CUDA).

With one GPU: ``--sharded true --num-shard 1`` runs the worker path with world size 1 (NCCL
initialised, the sharded executor, plans through its control group, decode graphs captured):
greedy tokens equal the plain engine's. With two or more GPUs the same holds at
``--num-shard 2`` (rank 1 a worker process on cuda:1).
"""

from __future__ import annotations

import pytest
import torch

from lmport.config import LaunchConfig
from lmport.engine.factory import build_llm_engine
from lmport.plugins import PluginHost
from lmport.testing.engine_driver import engine_greedy, greedy_tokens
from lmport.testing.tiny_models import make_checkpoint
from lmport.testing.tiny_tokenizer import train_tiny_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [[5, 9, 33, 17, 80, 12, 7], [100, 3, 44], list(range(20, 45))]
LIMITS = dict(dtype="float32", block_size=16, max_batch_total_tokens=4096, max_batch_prefill_tokens=12,
              max_input_tokens=32, max_total_tokens=64)  # fmt: skip


def cuda_host() -> PluginHost:
    host = PluginHost(environ={}).load()
    assert host.select_backend("cuda").backend.name == "cuda"
    return host


@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen2"])
@pytest.mark.parametrize("world", [1, 2])
def test_sharded_engine_on_cuda_equals_one_gpu(tmp_path, family, world):
    if world > torch.cuda.device_count():
        pytest.skip(f"needs {world} GPUs")
    make_checkpoint(family, tmp_path)
    train_tiny_tokenizer().save_pretrained(tmp_path)
    expected = engine_greedy(tmp_path, cuda_host(), PROMPTS, 6)
    config = LaunchConfig(model_id=str(tmp_path), sharded=True, num_shard=world, num_shard_given=True,
                          async_scheduling=True, **LIMITS)  # fmt: skip
    engine, _, _ = build_llm_engine(config, cuda_host())
    try:
        assert engine.executor.world_size == world
        assert torch.distributed.get_backend() == "nccl"
        assert greedy_tokens(engine, PROMPTS, 6) == expected
        assert engine.executor.graph_runner is not None  # decode graphs captured on the sharded path
    finally:
        engine.close()
