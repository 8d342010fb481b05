"""GPT-NeoX / Pythia on the paged KV cache.

Partial rotary (``rotary_pct`` of each head), LayerNorm with biases, and either the parallel
residual ``h + attn(ln1(h)) + mlp(ln2(h))`` (``use_parallel_residual``, the default) or the
sequential one. ``query_key_value`` is stored per head (``[h0: q k v, h1: ...]``) and is
reordered to ``[q | k | v]`` at load time, so the forward is a plain split.
"""

from __future__ import annotations

from typing import Any, Hashable, Iterable

import torch
from torch import nn

from lmport.layers.attention import AttentionMetadata, AttentionSpec, KVCache
from lmport.layers.embedding import LMHead
from lmport.layers.linear import Linear, per_head_qkv_order
from lmport.layers.mlp import PlainMLP
from lmport.layers.rotary import RotaryEmbedding, apply_rotary
from lmport.layers.weight_loading import load_checkpoint
from lmport.models.base import CausalLM, ModelContext

ARCHITECTURES = ["GPTNeoXForCausalLM"]

# causal-mask and rotary buffers that some exports saved with the weights
IGNORED = [r"\.attention\.(bias|masked_bias)$", r"rotary_emb\.inv_freq$"]


class GPTNeoXAttention(nn.Module):
    def __init__(self, config: Any, ctx: ModelContext, layer_index: int):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.head_dim = hidden // heads
        bias = bool(getattr(config, "attention_bias", True))
        quant = ctx.quantization
        # the checkpoint lays query_key_value out per head; the Linear reorders it to [q | k | v] after loading
        qkv = {"q": hidden, "k": hidden, "v": hidden}
        order = per_head_qkv_order(heads, self.head_dim)
        self.query_key_value = Linear(hidden, qkv, bias=bias, quant=quant, output_order=order)
        self.dense = Linear(hidden, hidden, bias=bias, quant=quant)
        spec = AttentionSpec(heads, heads, self.head_dim, self.head_dim**-0.5, dtype=ctx.dtype_name())
        self.attn = ctx.attention(spec, layer_index)

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_caches: list[KVCache], metadata: AttentionMetadata
    ) -> torch.Tensor:
        q, k, v = self.query_key_value.split(self.query_key_value(hidden))
        q, k = apply_rotary(q, k, cos, sin, self.head_dim)
        return self.dense(self.attn(q, k, v, kv_caches, metadata))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: Any, ctx: ModelContext, layer_index: int):
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.use_parallel_residual = bool(getattr(config, "use_parallel_residual", True))
        self.input_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.attention = GPTNeoXAttention(config, ctx, layer_index)
        self.mlp = PlainMLP(
            hidden, config.intermediate_size, config.hidden_act, names=("dense_h_to_4h", "dense_4h_to_h"),
            quant=ctx.quantization,
        )

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_caches: list[KVCache], metadata: AttentionMetadata
    ) -> torch.Tensor:
        attn = self.attention(self.input_layernorm(hidden), cos, sin, kv_caches, metadata)
        if self.use_parallel_residual:
            return hidden + attn + self.mlp(self.post_attention_layernorm(hidden))
        hidden = hidden + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class GPTNeoXBackbone(nn.Module):
    """The ``gpt_neox.`` part of the checkpoint."""

    def __init__(self, config: Any, ctx: ModelContext):
        super().__init__()
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GPTNeoXLayer(config, ctx, i) for i in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class GPTNeoXForCausalLM(CausalLM):
    """GPT-NeoX; the output head is ``embed_out`` (``lm_head`` in some exports), tied when the config says so."""

    def __init__(self, config: Any, ctx: ModelContext):
        super().__init__()
        self.config = config
        self.gpt_neox = GPTNeoXBackbone(config, ctx)
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.rotary = RotaryEmbedding(config, self.head_dim)
        tied = self.gpt_neox.embed_in if getattr(config, "tie_word_embeddings", False) else None
        self.embed_out = LMHead(config.hidden_size, config.vocab_size, tied_to=tied)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], metadata: AttentionMetadata
    ) -> torch.Tensor:
        cos, sin = self.rotary.cos_sin(positions, metadata)
        hidden = self.gpt_neox.embed_in(input_ids)
        for layer in self.gpt_neox.layers:
            hidden = layer(hidden, cos, sin, kv_caches, metadata)
        return self.gpt_neox.final_layer_norm(hidden)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.embed_out(hidden_states)

    def kv_cache_shape(self) -> tuple[int, int, int]:
        return len(self.gpt_neox.layers), self.config.num_attention_heads, self.head_dim

    def map_weight_name(self, name: str) -> tuple[str, Hashable | None] | None:
        if name in ("embed_out.weight", "lm_head.weight"):
            return ("gpt_neox.embed_in.weight" if self.embed_out.tied else "embed_out.weight"), None
        return name, None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_checkpoint(self, weights, self.map_weight_name, ignore=IGNORED)


def build_gpt_neox(config: Any, ctx: ModelContext) -> GPTNeoXForCausalLM:
    return GPTNeoXForCausalLM(config, ctx)


def register_models(register) -> None:
    register(ARCHITECTURES, build_gpt_neox)
