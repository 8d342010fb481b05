"""StarCoder and SantaCoder (``GPTBigCodeForCausalLM``): GPT-2 with multi-query attention.

With ``multi_query`` one K/V head serves every query head and ``c_attn`` is ``[q | k | v]``;
without it ``c_attn`` is laid out per head (``[h0: q k v, h1: ...]``) and is reordered at
load time. Weights are ``[out, in]`` as ``Linear`` holds them, unlike GPT-2's Conv1D.
"""

from __future__ import annotations

from typing import Any

from lmport.models.base import ModelContext
from lmport.models.gpt2 import GPT2LMHeadModel

ARCHITECTURES = ["GPTBigCodeForCausalLM"]


class GPTBigCodeForCausalLM(GPT2LMHeadModel):
    """GPT-2 blocks with one shared K/V head (``multi_query``) or per-head K/V."""

    conv1d_weights = False

    def __init__(self, config: Any, ctx: ModelContext):
        multi_query = bool(getattr(config, "multi_query", True))
        # multi-head checkpoints lay c_attn out per head; its Linear reorders the rows after loading
        heads = config.num_attention_heads
        super().__init__(config, ctx, num_kv_heads=1 if multi_query else heads, per_head_qkv=not multi_query)
        self.multi_query = multi_query


def build_gpt_bigcode(config: Any, ctx: ModelContext) -> GPTBigCodeForCausalLM:
    return GPTBigCodeForCausalLM(config, ctx)


def register_models(register) -> None:
    register(ARCHITECTURES, build_gpt_bigcode)
