"""Falcon (``FalconForCausalLM``, and the older ``RWForCausalLM`` exports) on the paged KV cache.

Three layouts, told apart by the config, each with its own fused ``query_key_value`` order
(as transformers' ``FalconAttention._split_heads`` reads it):

- 7B: multi-query (one K/V head), parallel attention + MLP off one LayerNorm; fused rows are
  ``[q_0 … q_{n-1}, k, v]``.
- 40B (``new_decoder_architecture``): grouped K/V heads, attention and MLP in parallel off
  ``ln_attn``/``ln_mlp`` (or off one ``input_layernorm`` when ``num_ln_in_parallel_attn`` is 1);
  fused rows are grouped per K/V head, ``[q … q, k, v]`` for each group.
- RW (falcon-rw): one K/V head per query head, sequential blocks; fused rows are per head,
  ``[q, k, v]`` for each head.

Positions are rotary unless ``alibi`` is set (falcon-rw-1b); Falcon adds its ALiBi bias
before the ``1/sqrt(head_dim)`` scaling and rounds the slopes to bfloat16, so the slopes
passed to attention are scaled and rounded the same way.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from lmport.layers.activations import get_activation
from lmport.layers.alibi import bloom_alibi_slopes
from lmport.layers.attention import AttentionMetadata, AttentionSpec, KVCache
from lmport.layers.embedding import LMHead
from lmport.layers.linear import Linear
from lmport.layers.rotary import RotaryEmbedding, apply_rotary
from lmport.layers.weight_loading import load_checkpoint, rename_rules
from lmport.models.base import CausalLM, ModelContext


@dataclass(frozen=True)
class FalconLayout:
    """The shape facts of one Falcon checkpoint, read from either config spelling.

    ``FalconConfig`` names them ``num_attention_heads``/``num_kv_heads``/...; the older
    RefinedWeb remote-code configs ``n_head``/``n_head_kv``/``n_layer``, and their 40B type
    (``model_type == "RefinedWeb"``) implies the new decoder architecture.
    """

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    num_layers: int
    new_decoder_architecture: bool
    multi_query: bool
    parallel_attn: bool
    num_ln_in_parallel_attn: int | None
    alibi: bool
    bias: bool
    ffn_hidden_size: int
    activation: str
    layer_norm_epsilon: float
    vocab_size: int
    tie_word_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def two_layernorms(self) -> bool:
        """ln_attn + ln_mlp (40B) rather than one input_layernorm."""
        return self.parallel_attn and self.num_ln_in_parallel_attn == 2

    @classmethod
    def from_config(cls, config) -> "FalconLayout":
        def first(*names, default=None):
            for name in names:
                value = getattr(config, name, None)
                if value is not None:
                    return value
            return default

        hidden = first("hidden_size", "n_embed")
        num_heads = first("num_attention_heads", "n_head")
        new_arch = bool(first("new_decoder_architecture", default=False)) or config.model_type == "RefinedWeb"
        multi_query = bool(first("multi_query", default=True))
        if new_arch:
            num_kv = first("num_kv_heads", "n_head_kv", default=num_heads)
        else:  # the 7B and RW layouts ignore num_kv_heads
            num_kv = 1 if multi_query else num_heads
        num_ln = first("num_ln_in_parallel_attn")
        if num_ln is None and new_arch:
            num_ln = 2
        return cls(
            hidden_size=hidden,
            num_heads=num_heads,
            num_kv_heads=num_kv,
            num_layers=first("num_hidden_layers", "n_layer"),
            new_decoder_architecture=new_arch,
            multi_query=multi_query,
            parallel_attn=bool(first("parallel_attn", default=True)),
            num_ln_in_parallel_attn=num_ln,
            alibi=bool(first("alibi", default=False)),
            bias=bool(first("bias", default=False)),
            ffn_hidden_size=first("ffn_hidden_size", default=4 * hidden),
            activation=first("activation", default="gelu"),
            layer_norm_epsilon=first("layer_norm_epsilon", default=1e-5),
            vocab_size=config.vocab_size,
            tie_word_embeddings=bool(first("tie_word_embeddings", default=True)),
        )


def rotary_config(config):
    """The config for rotary, with FalconConfig's default length where RefinedWeb configs have none."""
    if getattr(config, "max_position_embeddings", None) is not None:
        return config
    patched = copy.copy(config)  # never mutate the caller's config
    patched.max_position_embeddings = 2048
    return patched


def falcon_alibi_slopes(num_heads: int, head_dim: int) -> tuple[float, ...]:
    """BLOOM's slopes rounded to bfloat16 (as Falcon builds them), times Falcon's post-bias scaling."""
    rounded = torch.tensor(bloom_alibi_slopes(num_heads)).bfloat16().float()
    return tuple((rounded / math.sqrt(head_dim)).tolist())


class FalconAttention(nn.Module):
    def __init__(self, layout: FalconLayout, ctx: ModelContext, layer_index: int):
        super().__init__()
        self.layout = layout
        heads, kv_heads, head_dim = layout.num_heads, layout.num_kv_heads, layout.head_dim
        quant = ctx.quantization
        self.query_key_value = Linear(layout.hidden_size, (heads + 2 * kv_heads) * head_dim, bias=layout.bias, quant=quant)
        self.dense = Linear(layout.hidden_size, layout.hidden_size, bias=layout.bias, quant=quant)
        spec = AttentionSpec(
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            scale=head_dim**-0.5,
            dtype=ctx.dtype_name(),
            alibi_slopes=falcon_alibi_slopes(heads, head_dim) if layout.alibi else None,
        )
        self.attn = ctx.attention(spec, layer_index)

    def split_qkv(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[tokens, fused]`` -> q ``[tokens, heads * d]``, k and v ``[tokens, kv_heads * d]``."""
        layout, tokens = self.layout, fused.shape[0]
        heads, kv_heads, d = layout.num_heads, layout.num_kv_heads, layout.head_dim
        if layout.new_decoder_architecture:  # per K/V group: its queries, then k, then v
            grouped = fused.view(tokens, kv_heads, heads // kv_heads + 2, d)
            q, k, v = grouped[:, :, :-2], grouped[:, :, -2], grouped[:, :, -1]
        elif layout.multi_query:  # all queries, then the one k, then the one v
            rows = fused.view(tokens, heads + 2, d)
            q, k, v = rows[:, :heads], rows[:, heads], rows[:, heads + 1]
        else:  # per head: q, k, v
            per_head = fused.view(tokens, heads, 3, d)
            q, k, v = per_head[:, :, 0], per_head[:, :, 1], per_head[:, :, 2]
        return q.reshape(tokens, -1), k.reshape(tokens, -1), v.reshape(tokens, -1)

    def forward(self, hidden, cos_sin, kv_caches: list[KVCache], metadata: AttentionMetadata) -> torch.Tensor:
        query, key, value = self.split_qkv(self.query_key_value(hidden))
        if cos_sin is not None:
            query, key = apply_rotary(query, key, *cos_sin, self.layout.head_dim)
        return self.dense(self.attn(query, key, value, kv_caches, metadata))


class FalconMLP(nn.Module):
    def __init__(self, layout: FalconLayout, ctx: ModelContext):
        super().__init__()
        quant = ctx.quantization
        self.dense_h_to_4h = Linear(layout.hidden_size, layout.ffn_hidden_size, bias=layout.bias, quant=quant)
        self.dense_4h_to_h = Linear(layout.ffn_hidden_size, layout.hidden_size, bias=layout.bias, quant=quant)
        self.act = get_activation(layout.activation)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(hidden)))


class FalconDecoderLayer(nn.Module):
    def __init__(self, layout: FalconLayout, ctx: ModelContext, layer_index: int):
        super().__init__()
        self.layout = layout
        hidden, eps = layout.hidden_size, layout.layer_norm_epsilon
        self.self_attention = FalconAttention(layout, ctx, layer_index)
        self.mlp = FalconMLP(layout, ctx)
        if layout.two_layernorms:
            self.ln_attn = nn.LayerNorm(hidden, eps=eps)
            self.ln_mlp = nn.LayerNorm(hidden, eps=eps)
        else:
            self.input_layernorm = nn.LayerNorm(hidden, eps=eps)
            if not layout.parallel_attn:
                self.post_attention_layernorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, hidden, cos_sin, kv_caches: list[KVCache], metadata: AttentionMetadata) -> torch.Tensor:
        layout = self.layout
        residual = hidden
        if layout.two_layernorms:
            attn_in, mlp_in = self.ln_attn(hidden), self.ln_mlp(hidden)
        else:
            attn_in = mlp_in = self.input_layernorm(hidden)
        attn_out = self.self_attention(attn_in, cos_sin, kv_caches, metadata)
        if not layout.parallel_attn:  # sequential: the MLP sees the attention's output
            residual = residual + attn_out
            return residual + self.mlp(self.post_attention_layernorm(residual))
        return residual + attn_out + self.mlp(mlp_in)


class FalconModel(nn.Module):
    def __init__(self, layout: FalconLayout, ctx: ModelContext):
        super().__init__()
        self.word_embeddings = nn.Embedding(layout.vocab_size, layout.hidden_size)
        self.h = nn.ModuleList(FalconDecoderLayer(layout, ctx, i) for i in range(layout.num_layers))
        self.ln_f = nn.LayerNorm(layout.hidden_size, eps=layout.layer_norm_epsilon)

    def forward(self, input_ids, cos_sin, kv_caches, metadata) -> torch.Tensor:
        hidden = self.word_embeddings(input_ids)
        for layer in self.h:
            hidden = layer(hidden, cos_sin, kv_caches, metadata)
        return self.ln_f(hidden)


class FalconForCausalLM(CausalLM):
    """Falcon (7B, 40B and RW layouts) with its LM head (tied unless the config says not)."""

    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        layout = FalconLayout.from_config(config)
        if layout.new_decoder_architecture and not layout.parallel_attn:
            raise NotImplementedError("Falcon with new_decoder_architecture and parallel_attn=False has no defined block")
        self.config, self.layout = config, layout
        self.transformer = FalconModel(layout, ctx)
        self.rotary = None if layout.alibi else RotaryEmbedding(rotary_config(config), layout.head_dim)
        tied = self.transformer.word_embeddings if layout.tie_word_embeddings else None
        self.lm_head = LMHead(layout.hidden_size, layout.vocab_size, tied_to=tied)

    def forward(self, input_ids, positions, kv_caches, metadata) -> torch.Tensor:
        cos_sin = None if self.rotary is None else self.rotary.cos_sin(positions, metadata)
        return self.transformer(input_ids, cos_sin, kv_caches, metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        rename = rename_rules([(r"^(?!transformer\.|lm_head\.)", "transformer.")])
        ignore = [r"rotary_emb\.inv_freq$"]  # a buffer some RW exports saved
        if self.layout.tie_word_embeddings:
            ignore.append(r"^lm_head\.weight$")  # a tied head is the embedding, loaded by its own name
        load_checkpoint(self, weights, lambda name: (rename(name), None), ignore=ignore)

    def kv_cache_shape(self) -> tuple[int, int, int]:
        return self.layout.num_layers, self.layout.num_kv_heads, self.layout.head_dim


def register_models(register) -> None:
    register(["FalconForCausalLM", "RWForCausalLM"], FalconForCausalLM)
