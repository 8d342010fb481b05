"""Gemma 2 and Gemma 3 (text) on the paged KV cache.

What sets them apart from Llama, each as transformers computes it:

- layers alternate between local sliding-window and global attention (``config.layer_types``;
  Gemma 3 270M: five local layers of window 512, then one global), and Gemma 3 gives each
  kind its own RoPE (base 10k locally, 1M plus any scaling globally): cos/sin are computed
  once per forward for each kind;
- "sandwich" norms: the attention and MLP outputs are normed again before they join the
  residual stream (``post_attention_layernorm``, ``pre_/post_feedforward_layernorm``);
- every norm is Gemma's ``(1 + weight)`` RMSNorm (:class:`~lmport.layers.norms.GemmaRMSNorm`),
  Gemma 3 norms queries and keys per head (QK-norm) before RoPE;
- the embedding is scaled by ``sqrt(hidden_size)`` (rounded to the model dtype first);
- attention scales by ``query_pre_attn_scalar ** -0.5``; Gemma 2 soft-caps attention scores
  (``attn_logit_softcapping``, the attention backend's ``logits_soft_cap``) and final logits
  (``final_logit_softcapping``: ``cap * tanh(logits / cap)``);
- the MLP is gated with GELU (tanh approximation), and the LM head is the embedding.

Projections and loading are Llama's (fused q/k/v and gate/up).
"""

from __future__ import annotations

from typing import Any, Hashable, Iterable

import torch
from torch import nn

from lmport.layers.attention import AttentionMetadata, KVCache
from lmport.layers.embedding import LMHead, VocabEmbedding
from lmport.layers.norms import GemmaRMSNorm
from lmport.layers.rotary import RotaryEmbedding, rope_parameters
from lmport.layers.weight_loading import load_checkpoint
from lmport.models.base import CausalLM, ModelContext
from lmport.layers.mlp import GatedMLP
from lmport.models.llama import LlamaAttention, LlamaForCausalLM, head_dim_of

ARCHITECTURES = ["Gemma2ForCausalLM", "Gemma3ForCausalLM"]

SLIDING, FULL = "sliding_attention", "full_attention"


def layer_types(config: Any) -> list[str]:
    """Each layer's attention kind; configs from before ``layer_types`` existed (transformers < 4.53)
    spell it as Gemma 2's even/odd alternation or Gemma 3's ``sliding_window_pattern``."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    n = config.num_hidden_layers
    pattern = getattr(config, "sliding_window_pattern", None)
    if pattern:
        return [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n)]
    return [SLIDING if i % 2 == 0 else FULL for i in range(n)]


class GemmaDecoderLayer(nn.Module):
    """``h + post_norm(attn(norm(h)))``, then ``h + post_ffw_norm(mlp(pre_ffw_norm(h)))``.

    Like :class:`~lmport.models.llama.LlamaDecoderLayer` it returns its branch output and the
    residual stream apart, and the next norm adds them.
    """

    def __init__(self, config: Any, ctx: ModelContext, layer_index: int, layer_type: str, qk_norm: bool):
        super().__init__()
        eps = config.rms_norm_eps
        self.layer_type = layer_type
        window = config.sliding_window if layer_type == SLIDING else None
        self.self_attn = LlamaAttention(
            config, ctx, layer_index, window,
            scale=config.query_pre_attn_scalar**-0.5,
            soft_cap=getattr(config, "attn_logit_softcapping", None),
            qk_norm=(lambda dim: GemmaRMSNorm(dim, eps)) if qk_norm else None,
        )  # fmt: skip
        activation = getattr(config, "hidden_activation", None) or config.hidden_act
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, activation, quant=ctx.quantization)
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_caches: list[KVCache],
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, *cos_sin, kv_caches, metadata)
        hidden, residual = self.pre_feedforward_layernorm(self.post_attention_layernorm(hidden), residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class GemmaBackbone(nn.Module):
    """The ``model.`` part of the checkpoint: embeddings, decoder layers, final norm."""

    def __init__(self, config: Any, ctx: ModelContext, qk_norm: bool):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(config, ctx, i, kind, qk_norm) for i, kind in enumerate(layer_types(config))
        )
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)


class GemmaForCausalLM(CausalLM):
    """Gemma 2 (``qk_norm=False``) and Gemma 3 text (``qk_norm=True``)."""

    supports_sharding = True

    def __init__(self, config: Any, ctx: ModelContext, *, qk_norm: bool):
        super().__init__()
        self.config = config
        self.model = GemmaBackbone(config, ctx, qk_norm)
        head_dim = head_dim_of(config)
        # one RoPE per layer kind, shared when the kinds' settings agree (Gemma 2)
        ropes: dict[str, RotaryEmbedding] = {}
        for kind in sorted(set(layer_types(config))):
            same = next((k for k in ropes if rope_parameters(config, k) == rope_parameters(config, kind)), None)
            ropes[kind] = ropes[same] if same else RotaryEmbedding(config, head_dim, layer_type=kind)
        self.rotary = ropes  # plain dict: RotaryEmbedding holds no parameters
        self.embed_scale = config.hidden_size**0.5
        self.final_soft_cap = getattr(config, "final_logit_softcapping", None)
        tied = self.model.embed_tokens if getattr(config, "tie_word_embeddings", True) else None
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, tied_to=tied)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], metadata: AttentionMetadata
    ) -> torch.Tensor:
        cos_sin: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        by_kind = {}
        for kind, rope in self.rotary.items():
            if id(rope) not in cos_sin:
                cos_sin[id(rope)] = rope.cos_sin(positions, metadata)
            by_kind[kind] = cos_sin[id(rope)]
        hidden = self.model.embed_tokens(input_ids)
        hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)  # as transformers rounds it
        residual = None
        for layer in self.model.layers:
            hidden, residual = layer(hidden, residual, by_kind[layer.layer_type], kv_caches, metadata)
        if residual is None:  # a model of zero layers
            return self.model.norm(hidden)
        return self.model.norm(hidden, residual)[0]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden_states)
        if self.final_soft_cap:
            logits = torch.tanh(logits / self.final_soft_cap) * self.final_soft_cap
        return logits

    def kv_cache_shape(self) -> tuple[int, int, int]:
        attn = self.model.layers[0].self_attn
        return len(self.model.layers), attn.num_kv_heads, attn.head_dim

    def map_weight_name(self, name: str) -> tuple[str, Hashable | None] | None:
        return LlamaForCausalLM.map_weight_name(self, name)  # Llama's names and fusions

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_checkpoint(self, weights, self.map_weight_name, ignore=[r"rotary_emb\.", r"embed_scale$"])


def build_gemma2(config: Any, ctx: ModelContext) -> GemmaForCausalLM:
    return GemmaForCausalLM(config, ctx, qk_norm=False)


def build_gemma3(config: Any, ctx: ModelContext) -> GemmaForCausalLM:
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("Gemma 3 with bidirectional attention (EmbeddingGemma) is an encoder, not a causal LM")
    return GemmaForCausalLM(config, ctx, qk_norm=True)


def register_models(register) -> None:
    register("Gemma2ForCausalLM", build_gemma2)
    register("Gemma3ForCausalLM", build_gemma3)
