"""IBM Granite (3.x): the Llama architecture with four multipliers from its config.

``embedding_multiplier`` scales the embeddings, ``attention_multiplier`` replaces
``head_dim ** -0.5`` as the attention scale, ``residual_multiplier`` scales the attention and
MLP outputs before each joins the residual stream, and the logits are divided by
``logits_scaling``; each is applied where transformers applies it, so the rounding matches.
"""

from __future__ import annotations

from typing import Any

import torch

from lmport.models.base import ModelContext
from lmport.models.llama import LlamaForCausalLM

ARCHITECTURES = ["GraniteForCausalLM"]


class GraniteForCausalLM(LlamaForCausalLM):
    def __init__(self, config: Any, ctx: ModelContext):
        options = {"residual_multiplier": config.residual_multiplier, "attention": {"scale": config.attention_multiplier}}
        super().__init__(config, ctx, layer_options=lambda _: options)
        self.embedding_multiplier = config.embedding_multiplier
        self.logits_scaling = config.logits_scaling

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().embed(input_ids) * self.embedding_multiplier

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().compute_logits(hidden_states) / self.logits_scaling


def build_granite(config: Any, ctx: ModelContext) -> GraniteForCausalLM:
    return GraniteForCausalLM(config, ctx)


def register_models(register) -> None:
    register(ARCHITECTURES, build_granite)
