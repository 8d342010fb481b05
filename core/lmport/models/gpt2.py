"""GPT-2 on the paged KV cache; StarCoder/SantaCoder (:mod:`lmport.models.gpt_bigcode`) build on it.

Learned absolute positions, pre-LayerNorm blocks, one fused ``c_attn`` projection, GELU MLP,
output head tied to the token embedding. GPT-2 checkpoints store projections as ``Conv1D``
(``[in, out]``); they are transposed into ``Linear``'s ``[out, in]`` at load time.
"""

from __future__ import annotations

import re
from typing import Any, Hashable, Iterable, Iterator

import torch
from torch import nn

from lmport.layers.attention import AttentionMetadata, AttentionSpec, KVCache
from lmport.layers.embedding import LMHead
from lmport.layers.linear import Linear, per_head_qkv_order
from lmport.layers.mlp import PlainMLP
from lmport.layers.weight_loading import load_checkpoint
from lmport.models.base import CausalLM, ModelContext

ARCHITECTURES = ["GPT2LMHeadModel"]

_CONV1D = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")
# causal-mask buffers that old exports saved with the weights
IGNORED = [r"\.attn\.(bias|masked_bias)$"]


class GPT2Attention(nn.Module):
    """Fused ``c_attn`` -> attention -> ``c_proj``; ``num_kv_heads`` < heads is StarCoder's multi-query form.

    ``per_head_qkv``: the checkpoint's ``c_attn`` rows run per head (``[h0: q k v, ...]``, multi-head StarCoder).
    """

    def __init__(self, config: Any, ctx: ModelContext, layer_index: int, num_kv_heads: int, per_head_qkv: bool = False):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.head_dim = hidden // heads
        kv_size = num_kv_heads * self.head_dim
        order = per_head_qkv_order(heads, self.head_dim) if per_head_qkv else None
        quant = ctx.quantization
        self.c_attn = Linear(hidden, {"q": hidden, "k": kv_size, "v": kv_size}, bias=True, quant=quant, output_order=order)
        self.c_proj = Linear(hidden, hidden, bias=True, quant=quant)
        scale = self.head_dim**-0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer_index + 1)
        spec = AttentionSpec(heads, num_kv_heads, self.head_dim, scale, dtype=ctx.dtype_name())
        self.attn = ctx.attention(spec, layer_index)

    def forward(self, hidden: torch.Tensor, kv_caches: list[KVCache], metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn.split(self.c_attn(hidden))
        return self.c_proj(self.attn(q, k, v, kv_caches, metadata))


class GPT2Block(nn.Module):
    def __init__(self, config: Any, ctx: ModelContext, layer_index: int, num_kv_heads: int, per_head_qkv: bool):
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_epsilon
        inner = getattr(config, "n_inner", None) or 4 * hidden
        self.ln_1 = nn.LayerNorm(hidden, eps=eps)
        self.attn = GPT2Attention(config, ctx, layer_index, num_kv_heads, per_head_qkv)
        self.ln_2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = PlainMLP(
            hidden, inner, config.activation_function, bias=True, names=("c_fc", "c_proj"), quant=ctx.quantization
        )

    def forward(self, hidden: torch.Tensor, kv_caches: list[KVCache], metadata: AttentionMetadata) -> torch.Tensor:
        hidden = hidden + self.attn(self.ln_1(hidden), kv_caches, metadata)
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2Backbone(nn.Module):
    """The ``transformer.`` part of the checkpoint."""

    def __init__(self, config: Any, ctx: ModelContext, num_kv_heads: int, per_head_qkv: bool):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(
            GPT2Block(config, ctx, i, num_kv_heads, per_head_qkv) for i in range(config.num_hidden_layers)
        )
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)


class GPT2LMHeadModel(CausalLM):
    """GPT-2; subclasses set ``num_kv_heads`` and how checkpoint tensors are laid out."""

    conv1d_weights = True  # GPT-2's Conv1D stores [in, out]

    def __init__(self, config: Any, ctx: ModelContext, num_kv_heads: int | None = None, per_head_qkv: bool = False):
        super().__init__()
        self.config = config
        self.num_kv_heads = num_kv_heads or config.num_attention_heads
        self.transformer = GPT2Backbone(config, ctx, self.num_kv_heads, per_head_qkv)
        tied = self.transformer.wte if getattr(config, "tie_word_embeddings", True) else None
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, tied_to=tied)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], metadata: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        for block in self.transformer.h:
            hidden = block(hidden, kv_caches, metadata)
        return self.transformer.ln_f(hidden)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def kv_cache_shape(self) -> tuple[int, int, int]:
        return len(self.transformer.h), self.num_kv_heads, self.config.hidden_size // self.config.num_attention_heads

    def map_weight_name(self, name: str) -> tuple[str, Hashable | None] | None:
        if name == "lm_head.weight":
            return ("transformer.wte.weight" if self.lm_head.tied else name), None
        if not name.startswith("transformer."):  # bare base-model exports (``h.0.…``)
            name = "transformer." + name
        return name, None

    def prepare_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Bring one checkpoint tensor into this model's layout."""
        if self.conv1d_weights and _CONV1D.search(name):
            return tensor.t().contiguous()
        return tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def prepared() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                yield name, self.prepare_tensor(name, tensor)

        load_checkpoint(self, prepared(), self.map_weight_name, ignore=IGNORED)


def build_gpt2(config: Any, ctx: ModelContext) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(config, ctx)


def register_models(register) -> None:
    register(ARCHITECTURES, build_gpt2)
