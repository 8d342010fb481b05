"""Llama 1/2/3 and Code Llama on the paged KV cache; the base of Mistral and Mixtral.

Pre-norm decoder: RMSNorm -> attention with RoPE (any scaling variant, see
:mod:`lmport.layers.rotary`) and grouped KV heads -> RMSNorm -> SwiGLU MLP. q/k/v and
gate/up are each one :class:`~lmport.layers.linear.Linear` with named output shards; parameter
names otherwise mirror the Hugging Face checkpoint, so loading is a short rename. Projections
take the checkpoint's quantization from ``ctx.quantization``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Hashable, Iterable

import torch
from torch import nn

from lmport.layers.attention import AttentionMetadata, AttentionSpec, KVCache
from lmport.layers.embedding import LMHead, VocabEmbedding
from lmport.layers.linear import Linear
from lmport.layers.mlp import GatedMLP
from lmport.layers.norms import RMSNorm
from lmport.layers.ops import UsesLayerOps
from lmport.layers.parallel import heads_per_rank
from lmport.layers.rotary import RotaryEmbedding
from lmport.layers.weight_loading import load_checkpoint
from lmport.models.base import CausalLM, ModelContext

ARCHITECTURES = ["LlamaForCausalLM", "LLaMAForCausalLM"]

_QKV = re.compile(r"^(.*)\.self_attn\.(q|k|v)_proj\.(weight|bias)$")
_GATE_UP = re.compile(r"^(.*)\.mlp\.(gate|up)_proj\.(weight|bias)$")


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(UsesLayerOps, nn.Module):
    """Self-attention with fused q/k/v, RoPE (``layer_ops.rotary``) and grouped KV heads.

    The options are what the Llama-like families change: ``qkv_bias``/``o_bias`` (Qwen2 biases
    q/k/v only; default: the config's ``attention_bias``), ``scale`` (Granite's
    ``attention_multiplier``, Gemma's ``query_pre_attn_scalar ** -0.5``), ``soft_cap`` (Gemma 2's
    attention logit soft-cap) and ``qk_norm``, a per-head norm of queries and keys before RoPE
    (Qwen3, Gemma 3), built as ``qk_norm(head_dim)``.
    """

    def __init__(
        self,
        config: Any,
        ctx: ModelContext,
        layer_index: int,
        sliding_window: int | None = None,
        *,
        qkv_bias: bool | None = None,
        o_bias: bool | None = None,
        scale: float | None = None,
        soft_cap: float | None = None,
        qk_norm: Callable[[int], nn.Module] | None = None,
    ):
        super().__init__()
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        # this rank's heads (tensor parallel: q/k/v column-parallel, o row-parallel)
        self.num_heads = heads_per_rank(num_heads)
        self.num_kv_heads = heads_per_rank(num_kv_heads, kv=True)
        self.head_dim = head_dim_of(config)
        bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = bias if qkv_bias is None else qkv_bias
        o_bias = bias if o_bias is None else o_bias
        q_size, kv_size = num_heads * self.head_dim, num_kv_heads * self.head_dim
        quant = ctx.quantization
        self.qkv_proj = Linear(config.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, bias=qkv_bias, quant=quant,
                               parallel="column", shard_heads={"q": num_heads, "k": num_kv_heads, "v": num_kv_heads})  # fmt: skip
        self.o_proj = Linear(q_size, config.hidden_size, bias=o_bias, quant=quant, parallel="row")
        self.q_norm = qk_norm(self.head_dim) if qk_norm else None
        self.k_norm = qk_norm(self.head_dim) if qk_norm else None
        spec = AttentionSpec(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            scale=self.head_dim**-0.5 if scale is None else scale,
            dtype=ctx.dtype_name(),
            sliding_window=sliding_window,
            logits_soft_cap=soft_cap or None,
        )
        self.attn = ctx.attention(spec, layer_index)

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_caches: list[KVCache], metadata: AttentionMetadata
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        if self.q_norm is not None:  # per head: [tokens, heads * head_dim] seen as [tokens * heads, head_dim]
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(hidden.shape[0], -1)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(hidden.shape[0], -1)
        q, k = self.layer_ops.rotary(q, k, cos, sin, self.head_dim)
        return self.o_proj(self.attn(q, k, v, kv_caches, metadata))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: ``h + attn(norm(h))``, then ``h + mlp(norm(h))``.

    As in vLLM, a layer returns its MLP output and the residual stream apart, and the next
    norm adds them (``norm(x, residual)``): each residual add runs inside the norm, one fused
    kernel where the backend has one. The sums and their rounding are those of the plain form.
    ``residual_multiplier`` scales both branches before they join the stream (Granite);
    ``attention`` holds :class:`LlamaAttention`'s options.
    """

    def __init__(
        self,
        config: Any,
        ctx: ModelContext,
        layer_index: int,
        mlp: nn.Module,
        sliding_window: int | None,
        residual_multiplier: float = 1.0,
        attention: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.self_attn = LlamaAttention(config, ctx, layer_index, sliding_window, **(attention or {}))
        self.mlp = mlp
        self.residual_multiplier = residual_multiplier
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_caches: list[KVCache],
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mlp output, residual)``; their sum is the plain block's output. ``residual`` is ``None`` for the first layer."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, cos, sin, kv_caches, metadata)
        if self.residual_multiplier != 1.0:
            hidden = hidden * self.residual_multiplier
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        hidden = self.mlp(hidden)
        if self.residual_multiplier != 1.0:
            hidden = hidden * self.residual_multiplier
        return hidden, residual


class LlamaBackbone(nn.Module):
    """The ``model.`` part of the checkpoint: embeddings, decoder layers, final norm.

    ``layer_options(i)``: extra :class:`LlamaDecoderLayer` arguments of layer ``i`` (a per-layer
    ``sliding_window``, the ``attention`` options ...), overriding the shared ``sliding_window``.
    """

    def __init__(
        self,
        config: Any,
        ctx: ModelContext,
        mlp_factory: Callable[[int], nn.Module],
        sliding_window: int | None,
        layer_options: Callable[[int], dict[str, Any]] | None = None,
    ):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        options = layer_options or (lambda _: {})
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, ctx, i, mlp_factory(i), **{"sliding_window": sliding_window, **options(i)})
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(CausalLM):
    """Llama-architecture causal LM; ``mlp_factory``, ``sliding_window`` and ``layer_options``
    (see :class:`LlamaBackbone`) let Mistral, Mixtral, Qwen, Phi-3 and Granite reuse it."""

    supports_sharding = True  # tensor parallel: heads, MLP/experts, vocabulary split over ranks

    def __init__(
        self,
        config: Any,
        ctx: ModelContext,
        *,
        mlp_factory: Callable[[int], nn.Module] | None = None,
        sliding_window: int | None = None,
        layer_options: Callable[[int], dict[str, Any]] | None = None,
    ):
        super().__init__()
        self.config = config
        if mlp_factory is None:
            mlp_bias = bool(getattr(config, "mlp_bias", False))
            mlp_factory = lambda _: GatedMLP(  # noqa: E731
                config.hidden_size, config.intermediate_size, config.hidden_act, mlp_bias, quant=ctx.quantization
            )
        self.model = LlamaBackbone(config, ctx, mlp_factory, sliding_window, layer_options)
        self.rotary = RotaryEmbedding(config, head_dim_of(config))
        tied = self.model.embed_tokens if getattr(config, "tie_word_embeddings", False) else None
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, tied_to=tied)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        metadata: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,  # an image-text model's embeddings (Llava-next)
    ) -> torch.Tensor:
        cos, sin = self.rotary.cos_sin(positions, metadata)
        hidden = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer in self.model.layers:
            hidden, residual = layer(hidden, residual, cos, sin, kv_caches, metadata)
        if residual is None:  # a model of zero layers
            return self.model.norm(hidden)
        return self.model.norm(hidden, residual)[0]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def kv_cache_shape(self) -> tuple[int, int, int]:
        attn = self.model.layers[0].self_attn
        return len(self.model.layers), attn.num_kv_heads, attn.head_dim

    def map_weight_name(self, name: str) -> tuple[str, Hashable | None] | None:
        """Checkpoint name -> (parameter, shard); subclasses extend it for their MLPs."""
        if name == "lm_head.weight" and self.lm_head.tied:
            return "model.embed_tokens.weight", None  # some exporters save the tied copy too
        if m := _QKV.match(name):
            return f"{m[1]}.self_attn.qkv_proj.{m[3]}", m[2]
        if m := _GATE_UP.match(name):
            return f"{m[1]}.mlp.gate_up_proj.{m[3]}", m[2]
        return name, None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_checkpoint(self, weights, self.map_weight_name, ignore=[r"rotary_emb\.inv_freq$"])


def build_llama(config: Any, ctx: ModelContext) -> LlamaForCausalLM:
    return LlamaForCausalLM(config, ctx)


def register_models(register) -> None:
    register(ARCHITECTURES, build_llama)
