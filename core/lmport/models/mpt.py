"""MPT (``MptForCausalLM``) on the paged KV cache, as transformers implements it.

ALiBi instead of position embeddings (MPT's own slope formula, ``layers/alibi.py``), LayerNorms
without bias, bias-free linears, one fused ``Wqkv`` split as ``[q | k | v]``, optional
``clip_qkv`` and ``softmax_scale``. Module names mirror transformers' (``transformer.blocks.N.…``).

Where transformers' MPT differs from MosaicML's remote code we follow transformers (the
oracle), except for ``alibi_bias_max``: transformers always uses 8, we read the config (all
released MPTs use 8). Settings transformers does not implement (``qk_ln``, learned positions
instead of ALiBi, biases, multi-query attention) are refused rather than silently ignored.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from lmport.layers.alibi import mpt_alibi_slopes
from lmport.layers.attention import AttentionMetadata, AttentionSpec, KVCache
from lmport.layers.embedding import LMHead
from lmport.layers.linear import Linear
from lmport.layers.weight_loading import load_base_prefixed_checkpoint
from lmport.models.base import CausalLM, ModelContext


def attn_setting(config, key: str, default: Any = None) -> Any:
    """One ``attn_config`` entry, whether the config holds it as an object or a plain dict."""
    attn = getattr(config, "attn_config", None)
    if isinstance(attn, dict):
        return attn.get(key, default)
    return getattr(attn, key, default)


def check_supported(config) -> None:
    unsupported = []
    if attn_setting(config, "qk_ln", False):
        unsupported.append("qk_ln=True")
    if not attn_setting(config, "alibi", True):
        unsupported.append("alibi=False (learned positions)")
    if attn_setting(config, "attn_type", "multihead_attention") != "multihead_attention":
        unsupported.append(f"attn_type={attn_setting(config, 'attn_type')}")
    if not getattr(config, "no_bias", True):
        unsupported.append("no_bias=False")
    if unsupported:
        raise NotImplementedError(f"MPT with {', '.join(unsupported)} is not supported (transformers' MPT lacks it too)")


class MptAttention(nn.Module):
    def __init__(self, config, ctx: ModelContext, layer_index: int):
        super().__init__()
        hidden = config.d_model
        self.num_heads = config.n_heads
        self.head_dim = hidden // self.num_heads
        self.clip_qkv = attn_setting(config, "clip_qkv")
        self.Wqkv = Linear(hidden, 3 * hidden, bias=False, quant=ctx.quantization)
        self.out_proj = Linear(hidden, hidden, bias=False, quant=ctx.quantization)
        scale = attn_setting(config, "softmax_scale") or self.head_dim**-0.5
        spec = AttentionSpec(
            num_heads=self.num_heads,
            num_kv_heads=self.num_heads,
            head_dim=self.head_dim,
            scale=scale,
            dtype=ctx.dtype_name(),
            # the bias is added after scaling, so the slopes go in unscaled
            alibi_slopes=mpt_alibi_slopes(self.num_heads, attn_setting(config, "alibi_bias_max", 8)),
        )
        self.attn = ctx.attention(spec, layer_index)

    def forward(self, hidden: torch.Tensor, kv_caches: list[KVCache], metadata: AttentionMetadata) -> torch.Tensor:
        qkv = self.Wqkv(hidden)
        if self.clip_qkv:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        query, key, value = qkv.chunk(3, dim=-1)
        out = self.attn(query.contiguous(), key.contiguous(), value.contiguous(), kv_caches, metadata)
        return self.out_proj(out)


class MptMLP(nn.Module):
    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        # transformers sizes the MLP 4 * d_model whatever expansion_ratio says (all released MPTs use 4)
        self.up_proj = Linear(config.d_model, 4 * config.d_model, bias=False, quant=ctx.quantization)
        self.down_proj = Linear(4 * config.d_model, config.d_model, bias=False, quant=ctx.quantization)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.gelu(self.up_proj(hidden)))


class MptBlock(nn.Module):
    def __init__(self, config, ctx: ModelContext, layer_index: int):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.norm_1 = nn.LayerNorm(config.d_model, eps=eps, bias=False)
        self.attn = MptAttention(config, ctx, layer_index)
        self.norm_2 = nn.LayerNorm(config.d_model, eps=eps, bias=False)
        self.ffn = MptMLP(config, ctx)

    def forward(self, hidden: torch.Tensor, kv_caches: list[KVCache], metadata: AttentionMetadata) -> torch.Tensor:
        hidden = hidden + self.attn(self.norm_1(hidden), kv_caches, metadata)
        return hidden + self.ffn(self.norm_2(hidden))


class MptModel(nn.Module):
    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(MptBlock(config, ctx, i) for i in range(config.n_layers))
        self.norm_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon, bias=False)

    def forward(self, input_ids, kv_caches, metadata) -> torch.Tensor:
        hidden = self.wte(input_ids)
        for block in self.blocks:
            hidden = block(hidden, kv_caches, metadata)
        return self.norm_f(hidden)


class MptForCausalLM(CausalLM):
    """MPT with its LM head (tied to the token embedding unless the config says not)."""

    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        check_supported(config)
        self.config = config
        self.transformer = MptModel(config, ctx)
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        self.lm_head = LMHead(config.d_model, config.vocab_size, tied_to=self.transformer.wte if self.tied else None)

    def forward(self, input_ids, positions, kv_caches, metadata) -> torch.Tensor:
        # positions are implicit in ALiBi: the backend knows each token's place from the metadata
        return self.transformer(input_ids, kv_caches, metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_base_prefixed_checkpoint(self, weights, "transformer.", tied_head=self.tied)

    def kv_cache_shape(self) -> tuple[int, int, int]:
        return self.config.n_layers, self.config.n_heads, self.config.d_model // self.config.n_heads


def register_models(register) -> None:
    register(["MptForCausalLM", "MPTForCausalLM"], MptForCausalLM)
