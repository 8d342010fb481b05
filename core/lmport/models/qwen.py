"""Qwen2 / Qwen2.5 and Qwen3: the Llama architecture with two changes each.

- Qwen2 (and 2.5, which is the same architecture) biases the q/k/v projections but not the
  output projection.
- Qwen3 drops those biases (``attention_bias``, off by default) and norms queries and keys per
  head before RoPE (QK-norm, a Llama-style RMSNorm over ``head_dim``); its ``head_dim`` is
  explicit (128 on every size, not ``hidden / heads``).

Both may put the layers from ``max_window_layers`` on in a sliding window
(``use_sliding_window``, off in the released checkpoints); ``config.layer_types`` says which.
"""

from __future__ import annotations

from typing import Any

from lmport.layers.norms import RMSNorm
from lmport.models.base import ModelContext
from lmport.models.llama import LlamaForCausalLM

ARCHITECTURES = ["Qwen2ForCausalLM", "Qwen3ForCausalLM"]


def sliding_window_of_layer(config: Any, index: int) -> int | None:
    """The window of layer ``index``: ``layer_types`` where the config has them (transformers
    4.53+), else the older rule (windowed from ``max_window_layers`` on when enabled)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return window if types[index] == "sliding_attention" else None
    if not getattr(config, "use_sliding_window", False) or not window:
        return None
    return window if index >= getattr(config, "max_window_layers", 0) else None


def build_qwen2(config: Any, ctx: ModelContext) -> LlamaForCausalLM:
    attention = {"qkv_bias": True, "o_bias": False}
    return LlamaForCausalLM(
        config, ctx, layer_options=lambda i: {"sliding_window": sliding_window_of_layer(config, i), "attention": attention}
    )


def build_qwen3(config: Any, ctx: ModelContext) -> LlamaForCausalLM:
    attention = {"qk_norm": lambda dim: RMSNorm(dim, config.rms_norm_eps)}
    return LlamaForCausalLM(
        config, ctx, layer_options=lambda i: {"sliding_window": sliding_window_of_layer(config, i), "attention": attention}
    )


def register_models(register) -> None:
    register("Qwen2ForCausalLM", build_qwen2)
    register("Qwen3ForCausalLM", build_qwen3)
