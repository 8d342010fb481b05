"""The ROCm backend's code path on an NVIDIA GPU, forced with ``LMPORT_ROCM_FORCE=1``.

No AMD GPU is reachable from lmport's CI; the lent NVIDIA H200 is. Torch addresses both as
``"cuda"`` and Triton compiles lmport-cuda's kernels for both, so forcing the ROCm backend on
the H200 runs everything the ROCm plugin decides: its flags (GPTQ only, no sliding-window
kernel, no fused layer norm, no graphs), lmport-cuda's Triton paged attention through the
ROCm plugin's hook, the GPTQ ``linear_wq`` kernel, the sliding-window fallback to the
reference with one warning, AWQ refused. What it does not prove: that Triton's AMD backend
compiles these kernels for gfx90a (that needs an MI210/MI250).

Each test: fp32 greedy tokens through the whole engine equal transformers' (on the CPU).
Needs a CUDA GPU (skipped otherwise).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from lmport.capabilities import CapabilityError
from lmport.config import LaunchConfig
from lmport.engine.factory import build_llm_engine
from lmport.layers.attention import Attention
from lmport.layers.reference_attention import ReferenceAttention
from lmport.plugins import PluginHost
from lmport.testing.engine_driver import engine_greedy
from lmport.testing.hf_oracle import hf_greedy_generate
from lmport.testing.quantize_checkpoint import quantize_checkpoint
from lmport.testing.tiny_models import COMMON, VOCAB, make_checkpoint
from lmport.testing.tiny_tokenizer import train_tiny_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the ROCm path is forced on it)")

MAX_NEW = 8
FORCE = {"LMPORT_ROCM_FORCE": "1"}


def rocm_host() -> PluginHost:
    host = PluginHost(environ=FORCE)
    selection = host.select_backend("rocm")
    assert selection.backend.name == "rocm" and selection.backend.detail("forced")
    return host


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (5, 17, 9, 1)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer()


def _checkpoint(name, path, tokenizer, **kwargs):
    hf_model = make_checkpoint(name, path, **kwargs)
    tokenizer.save_pretrained(path)
    return hf_model


def test_llama_runs_lmport_cudas_triton_attention_through_the_rocm_hooks(tmp_path, tokenizer):
    from lmport_cuda.attention import TritonPagedAttention

    hf_model = _checkpoint("llama", tmp_path, tokenizer)
    host = rocm_host()
    expected = [hf_greedy_generate(hf_model, p, MAX_NEW)[0] for p in prompts()]
    config = LaunchConfig(model_id=str(tmp_path), dtype="float32", block_size=16, max_batch_total_tokens=4096,
                          max_batch_prefill_tokens=12, max_input_tokens=32, max_total_tokens=64)
    engine, _, _ = build_llm_engine(config, host)
    layers = [m for m in engine.executor.model.modules() if isinstance(m, Attention)]
    assert layers and all(type(layer.backend) is TritonPagedAttention for layer in layers)
    assert engine.executor.graph_runner is None  # the ROCm plugin flags no graph capture
    assert host.layer_ops().overridden() == ("linear_wq",)
    assert engine_greedy(tmp_path, rocm_host(), prompts(), MAX_NEW) == expected


def test_mistral_falls_back_to_the_reference_windowed_path_with_one_warning(tmp_path, tokenizer, caplog):
    hf_model = _checkpoint("mistral", tmp_path, tokenizer)
    expected = [hf_greedy_generate(hf_model, p, MAX_NEW)[0] for p in prompts()]
    host = rocm_host()
    with caplog.at_level(logging.WARNING, logger="lmport.plugins"):
        tokens = engine_greedy(tmp_path, host, prompts(), MAX_NEW)
    assert tokens == expected
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "lmport.plugins"]
    assert len(warnings) == 1 and "sliding_window" in warnings[0] and warnings[0].startswith("backend 'rocm'")
    assert host.fallbacks == warnings
    assert all(type(b) is ReferenceAttention for b in host._attention_cache.values())


def test_gptq_runs_the_shared_linear_wq_kernel(tmp_path, tokenizer):
    from transformers import LlamaConfig

    src, dst = tmp_path / "src", tmp_path / "gptq"
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, **COMMON)
    hf_model = _checkpoint("llama", src, tokenizer, config=config)
    dequantized = quantize_checkpoint(src, dst, "gptq", bits=4, group_size=32, sym=True)
    oracle = copy.deepcopy(hf_model)
    oracle.load_state_dict(dequantized, strict=False)
    expected = [hf_greedy_generate(oracle.eval(), p, MAX_NEW)[0] for p in prompts()]
    assert engine_greedy(dst, rocm_host(), prompts(), MAX_NEW) == expected


def test_awq_is_refused_before_loading(tmp_path, tokenizer):
    src, dst = tmp_path / "src", tmp_path / "awq"
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, **COMMON)
    _checkpoint("llama", src, tokenizer, config=config)
    quantize_checkpoint(src, dst, "awq", group_size=64)
    with pytest.raises(CapabilityError, match="backend 'rocm' does not support 'awq'"):
        build_llm_engine(LaunchConfig(model_id=str(dst), max_batch_total_tokens=512), rocm_host())
