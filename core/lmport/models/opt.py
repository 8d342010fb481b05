"""OPT and Galactica (``OPTForCausalLM``) on the paged KV cache.

Learned absolute positions with OPT's offset of 2 (fairseq reserved the first two rows),
pre- or post-LayerNorm blocks (``do_layer_norm_before``; opt-350m is post-LN and has no
final norm), and, when ``word_embed_proj_dim`` differs from ``hidden_size``, projections
between the embedding width and the model width. Galactica is the same architecture with
GELU. Module names mirror transformers' so checkpoint names load as they are.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from lmport.layers.activations import get_activation
from lmport.layers.attention import AttentionMetadata, AttentionSpec, KVCache
from lmport.layers.embedding import LMHead
from lmport.layers.linear import Linear
from lmport.layers.weight_loading import load_base_prefixed_checkpoint
from lmport.models.base import CausalLM, ModelContext

# fairseq's learned positions start after the padding and an unused row
POSITION_OFFSET = 2


class OPTAttention(nn.Module):
    def __init__(self, config, ctx: ModelContext, layer_index: int):
        super().__init__()
        hidden, bias = config.hidden_size, config.enable_bias
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        quant = ctx.quantization
        self.q_proj = Linear(hidden, hidden, bias=bias, quant=quant)
        self.k_proj = Linear(hidden, hidden, bias=bias, quant=quant)
        self.v_proj = Linear(hidden, hidden, bias=bias, quant=quant)
        self.out_proj = Linear(hidden, hidden, bias=bias, quant=quant)
        spec = AttentionSpec(
            num_heads=self.num_heads,
            num_kv_heads=self.num_heads,
            head_dim=self.head_dim,
            scale=self.head_dim**-0.5,
            dtype=ctx.dtype_name(),
        )
        self.attn = ctx.attention(spec, layer_index)

    def forward(self, hidden: torch.Tensor, kv_caches: list[KVCache], metadata: AttentionMetadata) -> torch.Tensor:
        out = self.attn(self.q_proj(hidden), self.k_proj(hidden), self.v_proj(hidden), kv_caches, metadata)
        return self.out_proj(out)


class OPTDecoderLayer(nn.Module):
    def __init__(self, config, ctx: ModelContext, layer_index: int):
        super().__init__()
        hidden, affine = config.hidden_size, config.layer_norm_elementwise_affine
        self.pre_norm = config.do_layer_norm_before
        self.self_attn = OPTAttention(config, ctx, layer_index)
        self.self_attn_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.fc1 = Linear(hidden, config.ffn_dim, bias=config.enable_bias, quant=ctx.quantization)
        self.fc2 = Linear(config.ffn_dim, hidden, bias=config.enable_bias, quant=ctx.quantization)
        self.final_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.activation = get_activation(config.activation_function)

    def forward(self, hidden: torch.Tensor, kv_caches: list[KVCache], metadata: AttentionMetadata) -> torch.Tensor:
        residual = hidden
        if self.pre_norm:
            hidden = self.self_attn_layer_norm(hidden)
        hidden = residual + self.self_attn(hidden, kv_caches, metadata)
        if not self.pre_norm:
            hidden = self.self_attn_layer_norm(hidden)

        residual = hidden
        if self.pre_norm:
            hidden = self.final_layer_norm(hidden)
        hidden = residual + self.fc2(self.activation(self.fc1(hidden)))
        if not self.pre_norm:
            hidden = self.final_layer_norm(hidden)
        return hidden


class OPTDecoder(nn.Module):
    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        hidden, embed_dim = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(config.vocab_size, embed_dim)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, hidden)
        projected = embed_dim != hidden
        # quantizers leave the embedding projections in full precision, as they do the head
        self.project_in = Linear(embed_dim, hidden, quantizable=False) if projected else None
        self.project_out = Linear(hidden, embed_dim, quantizable=False) if projected else None
        has_final_norm = config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)
        self.final_layer_norm = (
            nn.LayerNorm(hidden, elementwise_affine=config.layer_norm_elementwise_affine) if has_final_norm else None
        )
        self.layers = nn.ModuleList(OPTDecoderLayer(config, ctx, i) for i in range(config.num_hidden_layers))

    def forward(self, input_ids, positions, kv_caches, metadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        hidden = hidden + self.embed_positions(positions + POSITION_OFFSET)
        for layer in self.layers:
            hidden = layer(hidden, kv_caches, metadata)
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden


class OPTModel(nn.Module):
    """Holds the decoder only, so parameter names read ``model.decoder.…`` as in transformers."""

    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        self.decoder = OPTDecoder(config, ctx)


class OPTForCausalLM(CausalLM):
    """OPT / Galactica decoder with its LM head (tied to the token embedding unless the config says not)."""

    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        self.config = config
        self.model = OPTModel(config, ctx)
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        tied = self.model.decoder.embed_tokens if self.tied else None
        self.lm_head = LMHead(config.word_embed_proj_dim, config.vocab_size, tied_to=tied)

    def forward(self, input_ids, positions, kv_caches, metadata) -> torch.Tensor:
        return self.model.decoder(input_ids, positions, kv_caches, metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # facebook/opt-* exports name the base model's tensors "decoder.…", newer ones "model.decoder.…"
        load_base_prefixed_checkpoint(self, weights, "model.", tied_head=self.tied)

    def kv_cache_shape(self) -> tuple[int, int, int]:
        heads = self.config.num_attention_heads
        return self.config.num_hidden_layers, heads, self.config.hidden_size // heads


def register_models(register) -> None:
    register(["OPTForCausalLM"], OPTForCausalLM)
