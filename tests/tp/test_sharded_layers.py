"""Sharded layers on the CPU: every rank of a 2-process gloo group runs its own engine over its
slice of the model (the same requests, so the same plans); rank 0's greedy tokens equal the
unsharded engine's. Covers GQA with KV heads split and replicated, biases, QK-norm, merged
QKV/gate-up tensors (Phi-3), sliding windows, MoE experts, tied and untied vocab-parallel heads."""

from __future__ import annotations

import pytest

from lmport.distributed import Communicator, ShardInfo
from lmport.plugins import PluginHost
from lmport.testing.engine_driver import engine_greedy
from lmport.testing.sharded import run_ranks
from lmport.testing.tiny_models import TINY_MODELS, make_checkpoint
from lmport.testing.tiny_tokenizer import train_tiny_tokenizer

FAMILIES = ["llama", "llama-kv1", "mistral", "mixtral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "granite"]
PROMPTS = [[5, 9, 33, 17, 80, 12, 7], [100, 3, 44], list(range(20, 45))]
MAX_NEW = 6


def _config(name):
    if name == "llama-kv1":  # one KV head for two ranks: replicated
        config = TINY_MODELS["llama"]()
        config.num_key_value_heads = 1
        return config
    return TINY_MODELS[name]()


def _greedy_on_every_rank(shard: ShardInfo, paths: dict[str, str]) -> dict[str, list[list[int]]]:
    from lmport.config import LaunchConfig
    from lmport.engine.api import GenerationRequest, SamplingParams
    from lmport.engine.factory import build_llm_engine

    out = {}
    host = PluginHost(environ={}, load_entry_points=False).load()
    for name, path in paths.items():
        config = LaunchConfig(model_id=path, dtype="float32", block_size=16, max_batch_total_tokens=4096,
                              max_batch_prefill_tokens=12, max_input_tokens=32, max_total_tokens=64)  # fmt: skip
        engine, _, _ = build_llm_engine(config, host, shard=shard)
        params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(GenerationRequest(f"r{i}", tuple(prompt), params))
        tokens = {f"r{i}": [] for i in range(len(PROMPTS))}
        while engine.has_unfinished():
            for o in engine.step():
                tokens[o.request_id].extend(t.token_id for t in o.tokens)
        out[name] = [tokens[f"r{i}"] for i in range(len(PROMPTS))]
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-models")
    tokenizer = train_tiny_tokenizer()
    paths = {}
    for name in FAMILIES:
        path = root / name
        make_checkpoint(name, path, config=_config(name))
        tokenizer.save_pretrained(path)
        paths[name] = str(path)
    return paths


def test_sharded_greedy_tokens_equal_unsharded_for_every_family(checkpoints):
    host = PluginHost(environ={}, load_entry_points=False).load()
    expected = {name: engine_greedy(path, host, PROMPTS, MAX_NEW) for name, path in checkpoints.items()}
    ranks = run_ranks(_greedy_on_every_rank, 2, checkpoints, timeout=240)
    assert ranks[0] == ranks[1]  # every rank samples the same tokens from the gathered logits
    for name in FAMILIES:
        assert ranks[0][name] == expected[name], name


def test_a_family_without_sharded_layers_refuses_with_its_name(tmp_path):
    from lmport.models.loader import build_native_model
    from lmport.models.resolve import resolve_model_info
    import torch

    make_checkpoint("gpt2", tmp_path)
    host = PluginHost(environ={}, load_entry_points=False).load()
    host.select_backend()
    info = resolve_model_info(str(tmp_path))
    with pytest.raises(ValueError, match=r"--num-shard 2: the GPT2.* family \(GPT2LMHeadModel\) has no tensor-parallel layers"):
        build_native_model(info, host, torch.float32, torch.device("cpu"), shard=ShardInfo(0, 2, Communicator(0, 2)))
