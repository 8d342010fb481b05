"""Phi-1/1.5/2 (``PhiForCausalLM``) on the paged KV cache.

One LayerNorm feeds attention and MLP in parallel: ``h + attn(ln(h)) + mlp(ln(h))``.
Partial rotary (``partial_rotary_factor`` of each head), biases everywhere, an optional
per-head LayerNorm on queries and keys (``qk_layernorm``), and a biased output head.
"""

from __future__ import annotations

import re
from typing import Any, Hashable, Iterable

import torch
from torch import nn

from lmport.layers.attention import AttentionMetadata, AttentionSpec, KVCache
from lmport.layers.embedding import LMHead
from lmport.layers.linear import Linear
from lmport.layers.mlp import PlainMLP
from lmport.layers.rotary import RotaryEmbedding, apply_rotary
from lmport.layers.weight_loading import load_checkpoint
from lmport.models.base import CausalLM, ModelContext

ARCHITECTURES = ["PhiForCausalLM"]

_QKV = re.compile(r"^(.*)\.self_attn\.(q|k|v)_proj\.(weight|bias)$")


class PhiAttention(nn.Module):
    def __init__(self, config: Any, ctx: ModelContext, layer_index: int):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // heads
        q_size, kv_size = heads * self.head_dim, self.num_kv_heads * self.head_dim
        quant = ctx.quantization
        self.qkv_proj = Linear(hidden, {"q": q_size, "k": kv_size, "v": kv_size}, bias=True, quant=quant)
        self.dense = Linear(q_size, hidden, bias=True, quant=quant)
        self.qk_layernorm = bool(getattr(config, "qk_layernorm", False))
        if self.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
        spec = AttentionSpec(heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, dtype=ctx.dtype_name())
        self.attn = ctx.attention(spec, layer_index)

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_caches: list[KVCache], metadata: AttentionMetadata
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        if self.qk_layernorm:  # per head, before the rotation
            tokens = hidden.shape[0]
            q = self.q_layernorm(q.reshape(tokens, -1, self.head_dim)).reshape(tokens, -1)
            k = self.k_layernorm(k.reshape(tokens, -1, self.head_dim)).reshape(tokens, -1)
        q, k = apply_rotary(q, k, cos, sin, self.head_dim)
        return self.dense(self.attn(q, k, v, kv_caches, metadata))


class PhiDecoderLayer(nn.Module):
    def __init__(self, config: Any, ctx: ModelContext, layer_index: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = PhiAttention(config, ctx, layer_index)
        self.mlp = PlainMLP(
            config.hidden_size, config.intermediate_size, config.hidden_act, names=("fc1", "fc2"), quant=ctx.quantization
        )

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_caches: list[KVCache], metadata: AttentionMetadata
    ) -> torch.Tensor:
        normed = self.input_layernorm(hidden)
        return hidden + self.self_attn(normed, cos, sin, kv_caches, metadata) + self.mlp(normed)


class PhiBackbone(nn.Module):
    """The ``model.`` part of the checkpoint."""

    def __init__(self, config: Any, ctx: ModelContext):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(PhiDecoderLayer(config, ctx, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class PhiForCausalLM(CausalLM):
    """Phi with a biased ``lm_head`` (tied to the embedding only if the config says so)."""

    def __init__(self, config: Any, ctx: ModelContext):
        super().__init__()
        self.config = config
        self.model = PhiBackbone(config, ctx)
        attn = self.model.layers[0].self_attn
        self.rotary = RotaryEmbedding(config, attn.head_dim)
        tied = self.model.embed_tokens if getattr(config, "tie_word_embeddings", False) else None
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, bias=True, tied_to=tied)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], metadata: AttentionMetadata
    ) -> torch.Tensor:
        cos, sin = self.rotary.cos_sin(positions, metadata)
        hidden = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            hidden = layer(hidden, cos, sin, kv_caches, metadata)
        return self.model.final_layernorm(hidden)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def kv_cache_shape(self) -> tuple[int, int, int]:
        attn = self.model.layers[0].self_attn
        return len(self.model.layers), attn.num_kv_heads, attn.head_dim

    def map_weight_name(self, name: str) -> tuple[str, Hashable | None] | None:
        if name == "lm_head.weight" and self.lm_head.tied:
            return "model.embed_tokens.weight", None
        if m := _QKV.match(name):
            return f"{m[1]}.self_attn.qkv_proj.{m[3]}", m[2]
        return name, None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_checkpoint(self, weights, self.map_weight_name, ignore=[r"rotary_emb\.inv_freq$"])


def build_phi(config: Any, ctx: ModelContext) -> PhiForCausalLM:
    return PhiForCausalLM(config, ctx)


def register_models(register) -> None:
    register(ARCHITECTURES, build_phi)
