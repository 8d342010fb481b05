"""Idefics (v1, ``IdeficsForVisionText2Text``) on the paged KV cache.

A Llama decoder with a gated cross-attention layer before every ``cross_layer_interval``-th
decoder layer. Its images run once per request inside the engine step (the "encoder" of the
cross-attention contract, :class:`~lmport.models.base.EncoderDecoderLM`): a CLIP-style vision
transformer (Idefics' own copy of CLIP, read up to its last layer, without the post-norm), then
the perceiver resampler (``use_resampler``: each image becomes ``resampler_n_latents`` latents)
or, without one, the tower's hidden states as they are. Every gated layer projects those states
to K/V once and writes them into the cross-attention KV group; text tokens attend them on every
later step.

Each text token attends only the image before it (transformers' ``image_attention_mask`` from
the processor: the last ``<image>`` token at or before it, none before the first image or
after an end-of-document token), which the attention sees as a per-token key range
(``AttentionSpec.key_ranges``); a token that attends no image gets zeros from its
cross-attention, as transformers' ``cross_attention_gate`` gives. Generated tokens take the
last prompt token's range, as ``generate`` does.

The gate: ``h + tanh(alpha_cross_attn) * o(attn(norm(h)))``, then ``h + tanh(alpha_dense) *
mlp(norm(h))``; optional per-head RMS norms of the cross queries and keys (``qk_layer_norms``).
Decoupled embeddings and head (``additional_vocab_size``: the image tokens' trainable rows) are
one embedding and one head of ``vocab_size + additional_vocab_size`` rows here.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Hashable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from lmport.layers.attention import CROSS, FULL, AttentionMetadata, AttentionSpec, KVCache, KVCacheGroupSpec
from lmport.layers.embedding import LMHead
from lmport.layers.linear import Linear
from lmport.layers.mlp import GatedMLP
from lmport.layers.norms import RMSNorm
from lmport.layers.weight_loading import load_checkpoint
from lmport.models.base import EncoderBatch, EncoderDecoderLM, ModelContext
from lmport.models.clip_vision import CLIPVisionTower
from lmport.models.llama import LlamaForCausalLM

ARCHITECTURES = ["IdeficsForVisionText2Text"]

_CROSS_KV = re.compile(r"^model\.gated_cross_attn_layers\.(\d+)\.cross_attn\.(k|v)_proj\.weight$")
_GATE_UP = re.compile(r"^model\.gated_cross_attn_layers\.(\d+)\.mlp\.(gate|up)_proj\.weight$")
_PERCEIVER_QKV = re.compile(r"^model\.perceiver_resampler\.blocks\.(\d+)\.0\.(k|v)_proj\.weight$")


class DecoupledEmbedding(nn.Embedding):
    """``vocab_size + additional`` rows, loaded from the checkpoint's two tensors (shards ``base``/``additional``)."""

    def __init__(self, vocab_size: int, additional: int, dim: int):
        super().__init__(vocab_size + additional, dim)
        self.vocab_size, self.additional = vocab_size, additional

    def shard_keys(self, local: str) -> tuple[str, ...] | None:
        return ("base", "additional") if self.additional and local == "weight" else None

    def shard_view(self, local: str, key: Hashable | None) -> torch.Tensor:
        weight = getattr(self, local).data
        if key is None:
            return weight
        return weight[: self.vocab_size] if key == "base" else weight[self.vocab_size :]


class SplitLMHead(Linear):
    """The head over ``vocab_size + additional`` rows (shards ``base``/``additional``), float32 logits."""

    def __init__(self, hidden: int, vocab_size: int, additional: int):
        super().__init__(hidden, {"base": vocab_size, "additional": additional}, quantizable=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states).float()


class PerceiverAttention(nn.Module):
    """Latents attend the image's states and themselves (``[context, latents]`` as keys)."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norms: bool):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.context_layer_norm = nn.LayerNorm(dim)
        self.latents_layer_norm = nn.LayerNorm(dim)
        inner = heads * head_dim
        self.q_proj = Linear(dim, inner)
        self.kv_proj = Linear(dim, {"k": inner, "v": inner})
        self.output_proj = Linear(inner, dim)
        self.q_layer_norm = nn.LayerNorm(head_dim) if qk_norms else None
        self.k_layer_norm = nn.LayerNorm(head_dim) if qk_norms else None

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        context = self.context_layer_norm(context)
        latents = self.latents_layer_norm(latents)
        batch, n_latents, dim = latents.shape
        both = torch.cat([context, latents], dim=1)
        q = self.q_proj(latents.reshape(-1, dim)).view(batch, n_latents, self.heads, self.head_dim).transpose(1, 2)
        k, v = (
            t.reshape(batch, both.shape[1], self.heads, self.head_dim).transpose(1, 2)
            for t in self.kv_proj.split(self.kv_proj(both.reshape(-1, dim)))
        )
        if self.q_layer_norm is not None:
            q, k = self.q_layer_norm(q), self.k_layer_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.output_proj(out.transpose(1, 2).reshape(batch * n_latents, -1)).view(batch, n_latents, dim)


class PerceiverMLP(nn.Module):
    def __init__(self, dim: int, intermediate: int):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.fc = Linear(dim, intermediate)
        self.c_proj = Linear(intermediate, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self.c_proj(torch.relu(self.fc(self.ln(x).reshape(-1, shape[-1])))).view(shape)


class PerceiverResampler(nn.Module):
    """``[images, states, dim]`` -> ``[images, n_latents, dim]``."""

    def __init__(self, config: Any):
        super().__init__()
        perceiver, dim = config.perceiver_config, config.vision_config.hidden_size
        self.latents = nn.Parameter(torch.empty(perceiver.resampler_n_latents, dim))
        qk = bool(perceiver.qk_layer_norms_perceiver)
        self.blocks = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(dim, perceiver.resampler_n_heads, perceiver.resampler_head_dim, qk),
                    PerceiverMLP(dim, 4 * dim),
                ]
            )
            for _ in range(perceiver.resampler_depth)
        )
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(context.shape[0], -1, -1)
        for attn, ff in self.blocks:
            latents = attn(context, latents) + latents
            latents = ff(latents) + latents
        return self.layer_norm(latents)


class GatedCrossAttentionLayer(nn.Module):
    """Cross-attention from the text to the image before each token, gated by ``tanh(alpha)``."""

    def __init__(self, config: Any, ctx: ModelContext, layer_index: int):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.head_dim = hidden // heads
        inner = heads * self.head_dim
        quant = ctx.quantization
        self.q_proj = Linear(hidden, inner, quant=quant)
        self.kv_proj = Linear(config.vision_config.hidden_size, {"k": inner, "v": inner}, quant=quant)
        self.o_proj = Linear(inner, hidden, quant=quant)
        norms = bool(config.qk_layer_norms)
        self.q_layer_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if norms else None
        self.k_layer_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if norms else None
        self.mlp = GatedMLP(hidden, config.intermediate_size, config.hidden_act, quant=quant)
        self.input_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        alpha_shape = (1, 1, hidden) if config.alpha_type == "vector" else (1,)
        self.alpha_cross_attn = nn.Parameter(torch.zeros(alpha_shape))
        self.alpha_dense = nn.Parameter(torch.zeros(alpha_shape))
        spec = AttentionSpec(heads, heads, self.head_dim, scale=self.head_dim**-0.5, dtype=ctx.dtype_name(),
                             causal=False, kind="cross", key_ranges=True)  # fmt: skip
        self.cross_attn = ctx.attention(spec, layer_index, kv_group=1)

    def _head_norm(self, norm: RMSNorm | None, x: torch.Tensor) -> torch.Tensor:
        return x if norm is None else norm(x.reshape(-1, self.head_dim)).view(x.shape)

    def write_cross_kv(self, states: torch.Tensor, kv_caches: list[KVCache], slot_mapping: torch.Tensor) -> None:
        k, v = self.kv_proj.split(self.kv_proj(states))
        self.cross_attn.write_cross_kv(self._head_norm(self.k_layer_norm, k), v, kv_caches, slot_mapping)

    def forward(self, hidden: torch.Tensor, kv_caches: list[KVCache], metadata: AttentionMetadata) -> torch.Tensor:
        q = self._head_norm(self.q_layer_norm, self.q_proj(self.input_layernorm(hidden)))
        attended = self.o_proj(self.cross_attn(q, None, None, kv_caches, metadata))
        hidden = hidden + torch.tanh(self.alpha_cross_attn).reshape(-1).to(hidden.dtype) * attended
        dense = self.mlp(self.post_attention_layernorm(hidden))
        return hidden + torch.tanh(self.alpha_dense).reshape(-1).to(hidden.dtype) * dense


class IdeficsForVisionText2Text(EncoderDecoderLM):
    accepts_images = True

    def __init__(self, config: Any, ctx: ModelContext):
        super().__init__()
        self.config = config
        vision = config.vision_config
        self.vocab_size = config.vocab_size
        self.additional = int(getattr(config, "additional_vocab_size", 0) or 0)
        text_config = copy.deepcopy(config)
        text_config.vocab_size = self.vocab_size + self.additional  # one embedding and head over both parts
        # the Llama decoder: its layers, rotary, final norm (the embedding and head are replaced below)
        self.text = LlamaForCausalLM(text_config, ctx)
        self.text.model.embed_tokens = DecoupledEmbedding(self.vocab_size, self.additional, config.hidden_size)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        if self.tied or not self.additional:
            tied = self.text.model.embed_tokens if self.tied else None
            self.text.lm_head = LMHead(config.hidden_size, self.vocab_size + self.additional, tied_to=tied)
        else:
            self.text.lm_head = SplitLMHead(config.hidden_size, self.vocab_size, self.additional)
        self.interval = config.cross_layer_interval
        num_layers = config.num_hidden_layers
        self.cross_layers = nn.ModuleList(
            GatedCrossAttentionLayer(config, ctx, num_layers + i) for i in range(num_layers // self.interval)
        )
        self.vision_model = CLIPVisionTower(vision, [-1])  # its last hidden states, before the post-norm
        self.perceiver_resampler = PerceiverResampler(config) if config.use_resampler else None
        if self.perceiver_resampler is not None:
            self.image_seq_len = config.perceiver_config.resampler_n_latents
        else:
            self.image_seq_len = (vision.image_size // vision.patch_size) ** 2 + 1

    # ------------------------------------------------------------------ the engine's contract

    def kv_cache_specs(self) -> list[KVCacheGroupSpec]:
        n, m = self.config.num_hidden_layers, len(self.cross_layers)
        heads, head_dim = self.config.num_attention_heads, self.config.hidden_size // self.config.num_attention_heads
        return [
            KVCacheGroupSpec(FULL, tuple(range(n)), heads, head_dim, name="decoder"),
            KVCacheGroupSpec(CROSS, tuple(range(n, n + m)), heads, head_dim, name="images"),
        ]

    def kv_cache_shape(self) -> tuple[int, int, int]:
        return self.text.kv_cache_shape()

    def prepare_sequence(self, seq: Any) -> None:
        """The images become the encoder's input; each prompt token's cross range is its image's latents."""
        images = seq.images
        if images is None:  # text only: every token attends nothing, its gated layers add their MLP only
            seq.cross_key_ranges = [(0, 0)]
            return
        seq.encoder_input = images
        seq.cross_kv_len = images.num_images * self.image_seq_len
        seq.cross_key_ranges = image_ranges(images.arrays["image_index"], self.image_seq_len)

    # ------------------------------------------------------------------ forward

    def encode_images(self, encoder: EncoderBatch) -> torch.Tensor:
        """Every new sequence's image states, packed as their cross positions ``[positions, vision dim]``."""
        device, dtype = self.vision_model.vision_model.pre_layrnorm.weight.device, self.text.model.norm.weight.dtype
        pixels = torch.cat([torch.as_tensor(images.arrays["pixel_values"]) for images in encoder.inputs])
        (states,) = self.vision_model(pixels.to(device, dtype))
        if self.perceiver_resampler is not None:
            states = self.perceiver_resampler(states)
        return states.reshape(-1, states.shape[-1])

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        metadata: AttentionMetadata,
        encoder: EncoderBatch | None = None,
    ) -> torch.Tensor:
        if encoder is not None:
            states = self.encode_images(encoder)
            for layer in self.cross_layers:
                layer.write_cross_kv(states, kv_caches, encoder.slot_mapping)
        text = self.text
        cos, sin = text.rotary.cos_sin(positions, metadata)
        hidden = text.model.embed_tokens(input_ids)
        for i, layer in enumerate(text.model.layers):
            if i % self.interval == 0 and i // self.interval < len(self.cross_layers):
                hidden = self.cross_layers[i // self.interval](hidden, kv_caches, metadata)
            out, residual = layer(hidden, None, cos, sin, kv_caches, metadata)
            hidden = out + residual
        return text.model.norm(hidden)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.text.lm_head(hidden_states)

    # ------------------------------------------------------------------ weights

    def map_weight_name(self, name: str) -> tuple[str, Hashable | None] | None:
        if name.startswith("model.vision_model."):
            mapped = self.vision_model.map_weight_name(name[len("model."):])
            return None if mapped is None else ("vision_model." + mapped[0], mapped[1])
        if name == "model.embed_tokens.weight":
            return "text.model.embed_tokens.weight", "base" if self.additional else None
        if name == "model.embed_tokens.additional_embedding.weight":
            return "text.model.embed_tokens.weight", "additional"
        if name in ("lm_head.weight", "lm_head.additional_fc.weight"):
            if self.tied:
                return None  # the embedding's rows
            part = "additional" if "additional_fc" in name else "base"
            return "text.lm_head.weight", part if self.additional else None
        if m := _CROSS_KV.match(name):
            return f"cross_layers.{m[1]}.kv_proj.weight", m[2]
        if m := _GATE_UP.match(name):
            return f"cross_layers.{m[1]}.mlp.gate_up_proj.weight", m[2]
        if m := _PERCEIVER_QKV.match(name):
            return f"perceiver_resampler.blocks.{m[1]}.0.kv_proj.weight", m[2]
        if name.startswith("model.gated_cross_attn_layers."):
            name = "cross_layers." + name[len("model.gated_cross_attn_layers."):].replace(".cross_attn.", ".", 1)
            return name, None
        if name.startswith("model.perceiver_resampler."):
            return name[len("model."):], None
        return self.text.map_weight_name("text." + name if name.startswith("model.") else name)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        mapped: dict[str, tuple[str, Hashable | None] | None] = {}

        def used(pairs: Iterable[tuple[str, torch.Tensor]]):
            for name, tensor in pairs:  # drop the tower's post-norm and the tied head's copies
                mapped[name] = self.map_weight_name(name)
                if mapped[name] is not None:
                    yield name, tensor

        load_checkpoint(self, used(weights), lambda name: mapped[name], ignore=[r"rotary_emb\.inv_freq$", r"embeddings\.position_ids$"])


def image_ranges(image_index: Any, image_seq_len: int) -> list[tuple[int, int]]:
    """Per prompt position, its image's cross positions (``image_index[p]``: that image, -1 for none)."""
    return [(i * image_seq_len, (i + 1) * image_seq_len) if i >= 0 else (0, 0) for i in (int(v) for v in image_index)]


def build_idefics(config: Any, ctx: ModelContext) -> IdeficsForVisionText2Text:
    return IdeficsForVisionText2Text(config, ctx)


def register_models(register) -> None:
    register(ARCHITECTURES, build_idefics)
