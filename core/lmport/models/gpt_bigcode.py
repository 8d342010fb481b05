"""StarCoder and SantaCoder (``GPTBigCodeForCausalLM``): GPT-2 with multi-query attention.

With ``multi_query`` one K/V head serves every query head and ``c_attn`` is ``[q | k | v]``;
without it ``c_attn`` is laid out per head (``[h0: q k v, h1: ...]``) and is reordered at
load time. Weights are ``nn.Linear`` (``[out, in]``), unlike GPT-2's Conv1D.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from lmport.layers.merged_linear import per_head_qkv_to_stacked
from lmport.models.base import ModelContext
from lmport.models.gpt2 import GPT2LMHeadModel

ARCHITECTURES = ["GPTBigCodeForCausalLM"]

_C_ATTN = re.compile(r"\.attn\.c_attn\.(weight|bias)$")


class GPTBigCodeForCausalLM(GPT2LMHeadModel):
    """GPT-2 blocks with one shared K/V head (``multi_query``) or per-head K/V."""

    conv1d_weights = False

    def __init__(self, config: Any, ctx: ModelContext):
        multi_query = bool(getattr(config, "multi_query", True))
        super().__init__(config, ctx, num_kv_heads=1 if multi_query else config.num_attention_heads)
        self.multi_query = multi_query

    def prepare_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not self.multi_query and _C_ATTN.search(name):
            heads = self.config.num_attention_heads
            return per_head_qkv_to_stacked(tensor, heads, self.config.hidden_size // heads)
        return tensor


def build_gpt_bigcode(config: Any, ctx: ModelContext) -> GPTBigCodeForCausalLM:
    return GPTBigCodeForCausalLM(config, ctx)


def register_models(register) -> None:
    register(ARCHITECTURES, build_gpt_bigcode)
