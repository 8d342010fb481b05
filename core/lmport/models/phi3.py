"""Phi-3, Phi-3.5 and Phi-4(-mini): the Llama architecture as Microsoft lays out its checkpoints.

The checkpoints store q/k/v as one ``qkv_proj`` ([q | k | v] rows) and gate/up as one
``gate_up_proj`` ([gate | up]), which is exactly the fused layout of Llama's projections
here, so they load whole. The long-context variants use LongRoPE (``rope_scaling`` of type
``longrope``, spelled ``su`` in early exports): short factors up to
``original_max_position_embeddings``, long ones past it, per sequence (see
:mod:`lmport.layers.rotary`). A ``sliding_window`` in the config applies to every layer
(Phi-3-mini-4k: 2047), as transformers applies it.
"""

from __future__ import annotations

from typing import Any

from lmport.models.base import ModelContext
from lmport.models.llama import LlamaForCausalLM

ARCHITECTURES = ["Phi3ForCausalLM"]


def build_phi3(config: Any, ctx: ModelContext) -> LlamaForCausalLM:
    return LlamaForCausalLM(config, ctx, sliding_window=getattr(config, "sliding_window", None) or None)


def register_models(register) -> None:
    register(ARCHITECTURES, build_phi3)
