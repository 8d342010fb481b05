"""Quantized tiny checkpoints and the oracle: the same model in transformers holding the dequantized weights.

- ``quantized(fmt, model="llama", **opts)``: ``(path, oracle)``: the tiny checkpoint quantized by
  :func:`lmport.testing.quantize_checkpoint.quantize_checkpoint` in its real on-disk layout, and a
  transformers model with the dequantized float32 weights (cached per arguments).
- ``load_quantized(path, quantize=None)``: the native model through the engine factory's own
  quantization check (``--quantize`` given as ``quantize``) on the CPU backend.
- ``assert_serves_like(oracle, model)``: greedy tokens equal transformers', logits close.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from lmport.config import LaunchConfig
from lmport.engine.factory import check_quantization
from lmport.models.loader import build_native_model, resolve_model_info
from lmport.plugins import PluginHost
from lmport.testing import cached_logits
from lmport.testing.hf_oracle import hf_greedy_generate
from lmport.testing.model_driver import greedy_generate
from lmport.testing.quantize_checkpoint import input_square_sums, quantize_checkpoint
from lmport.testing.tiny_models import COMMON, VOCAB, make_checkpoint

PROMPTS = [[5, 17, 99, 240, 7, 31], [300, 12, 8], [44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54]]


def tiny_config(model: str):
    """Tiny configs whose projections split into groups of 32/64/128 (K = 128 or 256)."""
    from transformers import LlamaConfig, MixtralConfig

    if model == "llama":
        return LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, **COMMON)
    if model == "mixtral":
        return MixtralConfig(hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, num_local_experts=4,
                             num_experts_per_tok=2, sliding_window=None, **COMMON)
    raise ValueError(model)


@pytest.fixture(scope="session")
def cpu_host() -> PluginHost:
    host = PluginHost(environ={}, load_entry_points=False).load()
    host.select_backend()
    return host


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory) -> Callable[[str], tuple[Path, Any]]:
    built: dict[str, tuple[Path, Any]] = {}

    def build(model: str) -> tuple[Path, Any]:
        if model not in built:
            path = tmp_path_factory.mktemp(f"src-{model}")
            built[model] = (path, make_checkpoint(model, path, config=tiny_config(model)))
        return built[model]

    return build


@pytest.fixture(scope="session")
def quantized(tmp_path_factory, tiny_source) -> Callable[..., tuple[Path, Any]]:
    built: dict[tuple, tuple[Path, Any]] = {}

    def build(fmt: str, model: str = "llama", **opts: Any) -> tuple[Path, Any]:
        key = (fmt, model, tuple(sorted(opts.items())))
        if key not in built:
            src, hf_model = tiny_source(model)
            diags = None
            if opts.get("act_order"):
                calibration = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
                diags = input_square_sums(hf_model, calibration)
            dst = tmp_path_factory.mktemp(f"{fmt}-{model}")
            dequantized = quantize_checkpoint(src, dst, fmt, hessian_diags=diags, **opts)
            oracle = copy.deepcopy(hf_model)
            missing, unexpected = oracle.load_state_dict(dequantized, strict=False)
            assert not unexpected and all("lm_head" in name for name in missing), (missing, unexpected)
            built[key] = (dst, oracle.eval())
        return built[key]

    return build


@pytest.fixture
def load_quantized(cpu_host) -> Callable[..., Any]:
    def load(path: Path, quantize: str | None = None, dtype: torch.dtype = torch.float32):
        info = resolve_model_info(path)
        method, quantization = check_quantization(LaunchConfig(model_id=str(path), quantize=quantize), info, cpu_host)
        model = build_native_model(
            info, cpu_host, dtype, torch.device("cpu"), quant_method=method, quantization=quantization
        )
        assert model is not None
        return model

    return load


@pytest.fixture
def assert_serves_like(cpu_host) -> Callable[..., None]:
    def check(oracle: Any, model: Any, max_new_tokens: int = 8, atol: float = 1e-4) -> None:
        expected, logits = zip(*(hf_greedy_generate(oracle, p, max_new_tokens) for p in PROMPTS))
        got = greedy_generate(model, PROMPTS, max_new_tokens, host=cpu_host, block_size=4)
        assert got == [list(t) for t in expected]
        native = cached_logits.native_last_logits(model, PROMPTS, cpu_host, 4)
        torch.testing.assert_close(native, torch.stack([step[0] for step in logits]), atol=atol, rtol=0)

    return check
