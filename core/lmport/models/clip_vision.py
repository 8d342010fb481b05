"""CLIP's vision transformer, the image encoder of Llava-next (``clip_vision_model``) and of
Idefics (``idefics_vision``, transformers' copy of CLIP's).

Patch embedding (a stride-``patch`` convolution) + a class token + learned positions, a
pre-norm, then pre-norm encoder layers (LayerNorm -> bidirectional attention -> LayerNorm ->
MLP, quick-GELU), every projection a :class:`~lmport.layers.linear.Linear` (unquantized: the
quantized Llava checkpoints in use keep their tower in full precision). Llava-next reads the hidden states *before* the last layer(s)
(``vision_feature_layer``, usually -2), so only the layers up to that one are built; the
unused last layers and CLIP's post-norm are skipped at load. Tiles of all the step's images run
as one batch; attention over a tile is plain SDPA (the tiles are short, 577 tokens at 336 px,
and need no KV cache).
"""

from __future__ import annotations

import re
from typing import Any, Hashable

import torch
from torch import nn
from torch.nn import functional as F

from lmport.layers.linear import Linear
from lmport.layers.mlp import PlainMLP

_QKV = re.compile(r"^(.*)\.self_attn\.(q|k|v)_proj\.(weight|bias)$")
_LAYER = re.compile(r"\.encoder\.layers\.(\d+)\.")


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.patch_size = config.patch_size
        self.image_size = config.image_size
        self.class_embedding = nn.Parameter(torch.empty(config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(num_positions, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"image tiles of {tuple(pixel_values.shape[-2:])}, expected {self.image_size}x{self.image_size}")
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPAttention(nn.Module):
    """Bidirectional multi-head attention over each tile's tokens, q/k/v one merged projection."""

    def __init__(self, config: Any):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.qkv_proj = Linear(hidden, {"q": hidden, "k": hidden, "v": hidden}, bias=True)
        self.out_proj = Linear(hidden, hidden, bias=True)

    def forward(self, x: torch.Tensor, tiles: int) -> torch.Tensor:
        """``x [tiles * length, hidden]`` (the projections see 2-D rows, as every kernel does)."""
        length = x.shape[0] // tiles
        q, k, v = (
            t.view(tiles, length, self.num_heads, self.head_dim).transpose(1, 2)
            for t in self.qkv_proj.split(self.qkv_proj(x))
        )
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.out_proj(out.transpose(1, 2).reshape(x.shape))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = PlainMLP(config.hidden_size, config.intermediate_size, config.hidden_act, names=("fc1", "fc2"))

    def forward(self, x: torch.Tensor, tiles: int) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), tiles)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: Any, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(num_layers))


class CLIPVisionTransformer(nn.Module):
    """The ``vision_model.`` part of the checkpoint, cut after ``num_layers`` encoder layers."""

    def __init__(self, config: Any, num_layers: int):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # (sic: the checkpoint's name)
        self.encoder = CLIPEncoder(config, num_layers)


class CLIPVisionTower(nn.Module):
    """``hidden_states(pixel_values, layers)``: transformers' ``output_hidden_states`` entries
    (0 = the embeddings after the pre-norm, ``i`` = after encoder layer ``i``) for ``layers``."""

    def __init__(self, config: Any, feature_layers: list[int]):
        super().__init__()
        if getattr(config, "model_type", "clip_vision_model") not in ("clip_vision_model", "idefics_vision"):
            raise NotImplementedError(
                f"vision tower {config.model_type!r}: lmport's native Llava-next has a CLIP vision tower only"
            )
        self.total_layers = config.num_hidden_layers
        # hidden_states has total_layers + 1 entries; a negative index counts from its end
        self.feature_layers = [i if i >= 0 else self.total_layers + 1 + i for i in feature_layers]
        if not all(0 <= i <= self.total_layers for i in self.feature_layers):
            raise ValueError(f"vision_feature_layer {feature_layers} is outside a tower of {self.total_layers} layers")
        self.vision_model = CLIPVisionTransformer(config, max(self.feature_layers))

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """``[tiles, 3, h, w]`` -> the hidden states of ``feature_layers``, each ``[tiles, 1 + patches, hidden]``."""
        model = self.vision_model
        hidden = model.pre_layrnorm(model.embeddings(pixel_values))
        tiles, length, width = hidden.shape
        hidden = hidden.reshape(tiles * length, width)
        states = [hidden]
        for layer in model.encoder.layers:
            hidden = layer(hidden, tiles)
            states.append(hidden)
        return [states[i].view(tiles, length, width) for i in self.feature_layers]

    def map_weight_name(self, name: str) -> tuple[str, Hashable | None] | None:
        """A ``vision_model.*`` name -> (parameter, shard); None for a tensor this cut tower does not use."""
        if name.startswith("vision_model.post_layernorm."):
            return None
        if (m := _LAYER.search(name)) and int(m[1]) >= len(self.vision_model.encoder.layers):
            return None
        if m := _QKV.match(name):
            return f"{m[1]}.self_attn.qkv_proj.{m[3]}", m[2]
        return name, None
