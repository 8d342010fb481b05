"""T5 and FLAN-T5 (``T5ForConditionalGeneration``) on the paged KV cache.

The encoder runs once per request, inside the engine step that admits it: its sequences'
inputs are padded into one batch (bidirectional attention with T5's relative position
buckets, torch's SDPA) and every decoder layer's cross-attention K/V of the encoder output
are written into the cross-attention KV group. The decoder runs on the flat batch like any
decoder-only model: its self-attention is paged (a causal position-bias table per head and
distance, precomputed from the buckets), its cross-attention reads the cross group.

T5's quirks, as transformers computes them: no ``1/sqrt(d)`` in attention (scale 1), one
relative-position embedding in the first layer of each stack shared by all its layers, an
RMS norm without mean or bias, ``relu`` (T5) or gated ``gelu_new`` (T5 v1.1, FLAN-T5) in the
MLP, and a tied head that scales the decoder output by ``d_model ** -0.5`` first.
"""

from __future__ import annotations

import re
from typing import Any, Hashable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from lmport.engine.prefix_cache import hash_block
from lmport.layers.activations import get_activation
from lmport.layers.attention import CROSS, FULL, AttentionMetadata, AttentionSpec, KVCache, KVCacheGroupSpec
from lmport.layers.embedding import LMHead
from lmport.layers.linear import Linear
from lmport.layers.norms import RMSNorm
from lmport.layers.weight_loading import load_checkpoint, rename_rules
from lmport.models.base import EncoderBatch, EncoderDecoderLM, ModelContext

ARCHITECTURES = ["T5ForConditionalGeneration"]

_SELF_QKV = re.compile(r"^(encoder|decoder)\.block\.(\d+)\.layer\.0\.SelfAttention\.(q|k|v)\.weight$")
_CROSS_KV = re.compile(r"^decoder\.block\.(\d+)\.layer\.1\.EncDecAttention\.(k|v)\.weight$")
_GATED = re.compile(r"^(encoder|decoder)\.block\.(\d+)\.layer\.(\d)\.DenseReluDense\.wi_(0|1)\.weight$")


# checkpoint names -> this module's, after the merged q/k/v, cross k/v and gated wi_0/wi_1
_rename = rename_rules(
    [
        (r"^(encoder|decoder)\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.", r"\1_bias."),
        (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.o\.", r"encoder_layers.\1.o."),
        (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.", r"encoder_layers.\1.layer_norm."),
        (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.", r"encoder_layers.\1.ff."),
        (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"encoder_layers.\1.ff.layer_norm."),
        (r"^encoder\.final_layer_norm\.", "encoder_norm."),
        (r"^decoder\.block\.(\d+)\.layer\.0\.SelfAttention\.o\.", r"decoder_layers.\1.o."),
        (r"^decoder\.block\.(\d+)\.layer\.0\.layer_norm\.", r"decoder_layers.\1.self_norm."),
        (r"^decoder\.block\.(\d+)\.layer\.1\.EncDecAttention\.q\.", r"decoder_layers.\1.cross_q."),
        (r"^decoder\.block\.(\d+)\.layer\.1\.EncDecAttention\.o\.", r"decoder_layers.\1.cross_o."),
        (r"^decoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"decoder_layers.\1.cross_norm."),
        (r"^decoder\.block\.(\d+)\.layer\.2\.DenseReluDense\.", r"decoder_layers.\1.ff."),
        (r"^decoder\.block\.(\d+)\.layer\.2\.layer_norm\.", r"decoder_layers.\1.ff.layer_norm."),
        (r"^decoder\.final_layer_norm\.", "decoder_norm."),
    ]
)


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of ``key_pos - query_pos``: transformers' own function, the one checkpoints were trained with."""
    from transformers.models.t5.modeling_t5 import T5Attention

    return T5Attention._relative_position_bucket(
        relative_position, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )


class T5FeedForward(nn.Module):
    """``x + wo(act(wi(norm(x))))``, or gated: ``wo(act(wi_0(.)) * wi_1(.))`` (one merged matmul)."""

    def __init__(self, config: Any, quant: Any = None):
        super().__init__()
        self.gated = bool(getattr(config, "is_gated_act", False))
        self.wi = Linear(config.d_model, {"0": config.d_ff, "1": config.d_ff} if self.gated else config.d_ff, quant=quant)
        self.wo = Linear(config.d_ff, config.d_model, quant=quant)
        self.act = get_activation(config.dense_act_fn)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.wi(self.layer_norm(hidden))
        if self.gated:
            gate, up = self.wi.split(h)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return hidden + self.wo(h)


class T5EncoderLayer(nn.Module):
    def __init__(self, config: Any, quant: Any = None):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.d_kv
        inner = config.num_heads * config.d_kv
        self.qkv = Linear(config.d_model, {"q": inner, "k": inner, "v": inner}, quant=quant)
        self.o = Linear(inner, config.d_model, quant=quant)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.ff = T5FeedForward(config, quant)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[batch, length, d_model]``; ``bias`` ``[batch, heads, length, length]`` (padding: -inf)."""
        batch, length, _ = hidden.shape
        q, k, v = self.qkv.split(self.qkv(self.layer_norm(hidden)))
        q, k, v = (t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        out = out.transpose(1, 2).reshape(batch, length, -1)
        return self.ff(hidden + self.o(out))


class T5DecoderLayer(nn.Module):
    """Paged causal self-attention (with the position-bias table), cross-attention, feed-forward."""

    def __init__(self, config: Any, ctx: ModelContext, layer_index: int, num_layers: int, bias_len: int):
        super().__init__()
        heads, head_dim = config.num_heads, config.d_kv
        inner = heads * head_dim
        dtype, quant = ctx.dtype_name(), ctx.quantization
        self.qkv = Linear(config.d_model, {"q": inner, "k": inner, "v": inner}, quant=quant)
        self.o = Linear(inner, config.d_model, quant=quant)
        self.self_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self_spec = AttentionSpec(heads, heads, head_dim, scale=1.0, dtype=dtype, position_bias_len=bias_len)
        self.self_attn = ctx.attention(self_spec, layer_index)
        self.cross_q = Linear(config.d_model, inner, quant=quant)
        self.cross_kv = Linear(config.d_model, {"k": inner, "v": inner}, quant=quant)
        self.cross_o = Linear(inner, config.d_model, quant=quant)
        self.cross_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        cross_spec = AttentionSpec(heads, heads, head_dim, scale=1.0, dtype=dtype, causal=False, kind="cross")
        self.cross_attn = ctx.attention(cross_spec, num_layers + layer_index, kv_group=1)
        self.ff = T5FeedForward(config, quant)

    def write_cross_kv(self, encoder_out: torch.Tensor, kv_caches: list[KVCache], slot_mapping: torch.Tensor) -> None:
        k, v = self.cross_kv.split(self.cross_kv(encoder_out))
        self.cross_attn.write_cross_kv(k, v, kv_caches, slot_mapping)

    def forward(self, hidden, kv_caches, metadata, position_bias) -> torch.Tensor:
        q, k, v = self.qkv.split(self.qkv(self.self_norm(hidden)))
        hidden = hidden + self.o(self.self_attn(q, k, v, kv_caches, metadata, position_bias))
        q = self.cross_q(self.cross_norm(hidden))
        hidden = hidden + self.cross_o(self.cross_attn(q, None, None, kv_caches, metadata))
        return self.ff(hidden)


class T5ForConditionalGeneration(EncoderDecoderLM):
    """The whole encoder-decoder; parameter names are this module's (see ``map_weight_name``)."""

    def __init__(self, config: Any, ctx: ModelContext):
        super().__init__()
        self.config = config
        start = getattr(config, "decoder_start_token_id", None)
        if start is None:
            raise ValueError("T5 config has no decoder_start_token_id")
        self.decoder_start_token_id = int(start)
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        num_decoder = getattr(config, "num_decoder_layers", None) or config.num_layers
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder_bias = nn.Embedding(self.num_buckets, config.num_heads)
        self.decoder_bias = nn.Embedding(self.num_buckets, config.num_heads)
        self.encoder_layers = nn.ModuleList(T5EncoderLayer(config, ctx.quantization) for _ in range(config.num_layers))
        self.encoder_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        # distances past max_distance all share the last bucket: the table stops there
        self.bias_len = self.max_distance + 1
        self.decoder_layers = nn.ModuleList(
            T5DecoderLayer(config, ctx, i, num_decoder, self.bias_len) for i in range(num_decoder)
        )
        self.decoder_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        self.lm_head = LMHead(config.d_model, config.vocab_size, tied_to=self.shared if self.tied else None)
        self.register_buffer("position_bias_table", torch.zeros(config.num_heads, self.bias_len), persistent=False)

    # ------------------------------------------------------------------ the engine's contract

    def kv_cache_specs(self) -> list[KVCacheGroupSpec]:
        n, heads, head_dim = len(self.decoder_layers), self.config.num_heads, self.config.d_kv
        return [
            KVCacheGroupSpec(FULL, tuple(range(n)), heads, head_dim, name="decoder"),
            KVCacheGroupSpec(CROSS, tuple(range(n, 2 * n)), heads, head_dim, name="cross"),
        ]

    def kv_cache_shape(self) -> tuple[int, int, int]:
        return len(self.decoder_layers), self.config.num_heads, self.config.d_kv

    def prepare_sequence(self, seq: Any) -> None:
        """The prompt becomes the encoder's input; the decoder starts from its start token."""
        encoder_input = list(seq.prompt_token_ids)
        seq.encoder_input = encoder_input
        seq.cross_kv_len = len(encoder_input)
        seq.hash_seed = hash_block(None, encoder_input)
        seq.prompt_token_ids = [self.decoder_start_token_id]
        seq.token_ids = [self.decoder_start_token_id]

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        metadata: AttentionMetadata,
        encoder: EncoderBatch | None = None,
    ) -> torch.Tensor:
        if encoder is not None:
            encoder_out = self.encode(encoder)
            for layer in self.decoder_layers:
                layer.write_cross_kv(encoder_out, kv_caches, encoder.slot_mapping)
        hidden = self.shared(input_ids)
        for layer in self.decoder_layers:
            hidden = layer(hidden, kv_caches, metadata, self.position_bias_table)
        hidden = self.decoder_norm(hidden)
        if self.tied:
            hidden = hidden * (self.config.d_model**-0.5)
        return hidden

    def encode(self, encoder: EncoderBatch) -> torch.Tensor:
        """The encoder's output for the packed inputs, packed the same way ``[tokens, d_model]``."""
        starts = encoder.query_start_loc_host
        lengths = [b - a for a, b in zip(starts, starts[1:])]
        batch, length = len(lengths), max(lengths)
        device = encoder.input_ids.device
        lens = torch.tensor(lengths, device=device)
        offsets = torch.arange(length, device=device)
        valid = offsets[None, :] < lens[:, None]  # [batch, length]
        flat_index = (torch.tensor(starts[:-1], device=device)[:, None] + offsets[None, :]).clamp(max=max(starts[-1] - 1, 0))
        hidden = self.shared(encoder.input_ids)[flat_index]  # [batch, length, d]
        relative = offsets[None, :] - offsets[:, None]  # key - query
        buckets = relative_position_bucket(relative, True, self.num_buckets, self.max_distance)
        bias = self.encoder_bias(buckets).permute(2, 0, 1).float()[None]  # [1, heads, length, length]
        bias = bias.masked_fill(~valid[:, None, None, :], float("-inf"))
        for layer in self.encoder_layers:
            hidden = layer(hidden, bias)
        return self.encoder_norm(hidden[valid])

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    # ------------------------------------------------------------------ weights

    def map_weight_name(self, name: str) -> tuple[str, Hashable | None] | None:
        if name == "lm_head.weight":
            return ("shared.weight", None) if self.tied else ("lm_head.weight", None)
        if m := _SELF_QKV.match(name):
            stack = "encoder_layers" if m[1] == "encoder" else "decoder_layers"
            return f"{stack}.{m[2]}.qkv.weight", m[3]
        if m := _CROSS_KV.match(name):
            return f"decoder_layers.{m[1]}.cross_kv.weight", m[2]
        if m := _GATED.match(name):
            stack = "encoder_layers" if m[1] == "encoder" else "decoder_layers"
            return f"{stack}.{m[2]}.ff.wi.weight", m[4]
        return _rename(name), None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_checkpoint(self, weights, self.map_weight_name, ignore=[r"^(encoder|decoder)\.embed_tokens\.weight$"])
        self._build_position_bias_table()

    @torch.no_grad()
    def _build_position_bias_table(self) -> None:
        distance = torch.arange(self.bias_len, device=self.decoder_bias.weight.device)
        buckets = relative_position_bucket(-distance, False, self.num_buckets, self.max_distance)
        self.position_bias_table = self.decoder_bias(buckets).t().float().contiguous()  # [heads, bias_len]


def build_t5(config: Any, ctx: ModelContext) -> T5ForConditionalGeneration:
    return T5ForConditionalGeneration(config, ctx)


def register_models(register) -> None:
    register(ARCHITECTURES, build_t5)
