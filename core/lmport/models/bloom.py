"""BLOOM (``BloomForCausalLM``) on the paged KV cache.

No position embeddings: ALiBi biases the attention scores (slopes in ``layers/alibi.py``,
applied by the attention backend). The token embedding is layer-normed before the first
block; Q, K and V come from one fused projection laid out per head as ``[q, k, v]``; the MLP
uses Megatron's tanh GELU. Module names mirror transformers' (``transformer.h.N.…``).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from lmport.layers.alibi import bloom_alibi_slopes
from lmport.layers.attention import AttentionMetadata, AttentionSpec, KVCache
from lmport.layers.embedding import LMHead
from lmport.layers.linear import Linear
from lmport.layers.weight_loading import load_base_prefixed_checkpoint
from lmport.models.base import CausalLM, ModelContext


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    """The tanh GELU with Megatron's rounded constant, as BLOOM was trained."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class BloomAttention(nn.Module):
    def __init__(self, config, ctx: ModelContext, layer_index: int):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.n_head
        self.head_dim = hidden // self.num_heads
        self.query_key_value = Linear(hidden, 3 * hidden, bias=True, quant=ctx.quantization)
        self.dense = Linear(hidden, hidden, bias=True, quant=ctx.quantization)
        spec = AttentionSpec(
            num_heads=self.num_heads,
            num_kv_heads=self.num_heads,
            head_dim=self.head_dim,
            scale=self.head_dim**-0.5,
            dtype=ctx.dtype_name(),
            alibi_slopes=bloom_alibi_slopes(self.num_heads),  # BLOOM adds the bias unscaled
        )
        self.attn = ctx.attention(spec, layer_index)

    def forward(self, hidden: torch.Tensor, kv_caches: list[KVCache], metadata: AttentionMetadata) -> torch.Tensor:
        tokens = hidden.shape[0]
        qkv = self.query_key_value(hidden).view(tokens, self.num_heads, 3, self.head_dim)
        query, key, value = (qkv[:, :, i].reshape(tokens, -1) for i in range(3))
        return self.dense(self.attn(query, key, value, kv_caches, metadata))


class BloomMLP(nn.Module):
    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        self.dense_h_to_4h = Linear(config.hidden_size, 4 * config.hidden_size, bias=True, quant=ctx.quantization)
        self.dense_4h_to_h = Linear(4 * config.hidden_size, config.hidden_size, bias=True, quant=ctx.quantization)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(bloom_gelu(self.dense_h_to_4h(hidden)))


class BloomBlock(nn.Module):
    def __init__(self, config, ctx: ModelContext, layer_index: int):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.self_attention = BloomAttention(config, ctx, layer_index)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = BloomMLP(config, ctx)
        # some BLOOM variants take the residual after the norm rather than before it
        self.residual_after_norm = config.apply_residual_connection_post_layernorm

    def forward(self, hidden: torch.Tensor, kv_caches: list[KVCache], metadata: AttentionMetadata) -> torch.Tensor:
        normed = self.input_layernorm(hidden)
        residual = normed if self.residual_after_norm else hidden
        hidden = residual + self.self_attention(normed, kv_caches, metadata)
        normed = self.post_attention_layernorm(hidden)
        residual = normed if self.residual_after_norm else hidden
        return residual + self.mlp(normed)


class BloomModel(nn.Module):
    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.word_embeddings_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.h = nn.ModuleList(BloomBlock(config, ctx, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=eps)

    def forward(self, input_ids, kv_caches, metadata) -> torch.Tensor:
        hidden = self.word_embeddings_layernorm(self.word_embeddings(input_ids))
        for block in self.h:
            hidden = block(hidden, kv_caches, metadata)
        return self.ln_f(hidden)


class BloomForCausalLM(CausalLM):
    """BLOOM with its LM head (tied to the token embedding unless the config says not)."""

    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        self.config = config
        self.transformer = BloomModel(config, ctx)
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        tied = self.transformer.word_embeddings if self.tied else None
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, tied_to=tied)

    def forward(self, input_ids, positions, kv_caches, metadata) -> torch.Tensor:
        # positions are implicit in ALiBi: the backend knows each token's place from the metadata
        return self.transformer(input_ids, kv_caches, metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # bigscience/bloom-* exports name the base model's tensors without "transformer."
        load_base_prefixed_checkpoint(self, weights, "transformer.", tied_head=self.tied)

    def kv_cache_shape(self) -> tuple[int, int, int]:
        return self.config.n_layer, self.config.n_head, self.config.hidden_size // self.config.n_head


def register_models(register) -> None:
    register(["BloomForCausalLM"], BloomForCausalLM)
