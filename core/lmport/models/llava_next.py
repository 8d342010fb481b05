"""Llava-next (LLaVA-1.6): a CLIP vision tower, a two-layer projector and a Llama-family text
model on the paged KV cache.

An image arrives as the processor made it (``pixel_values [images, tiles, 3, s, s]``,
``image_sizes [images, 2]``): with any-resolution tiling, tile 0 is the whole image at the
tower's size and the others cut the image resized to the best of ``image_grid_pinpoints``.
Each tile runs through the tower; the hidden states of ``vision_feature_layer`` (without the
class token for the ``default`` strategy) go through the projector; the grid tiles are
stitched back into one feature map, the padding the resize added is cut off, and an
``image_newline`` embedding ends every row. The features fill the prompt's image tokens,
which the processor expanded to exactly that count. The geometry helpers are transformers'
own, so the count and the layout agree with its processor by construction.
"""

from __future__ import annotations

import re
from typing import Any, Hashable, Iterable, Iterator

import torch
from torch import nn

from lmport.layers.activations import get_activation
from lmport.layers.attention import AttentionMetadata, KVCache
from lmport.layers.linear import Linear
from lmport.layers.weight_loading import load_checkpoint
from lmport.models.base import ImageTextLM, ModelContext
from lmport.models.clip_vision import CLIPVisionTower
from lmport.models.llama import LlamaForCausalLM

ARCHITECTURES = ["LlavaNextForConditionalGeneration"]

# Checkpoint layouts, all read as the hub's llava-hf one (``vision_tower.vision_model.``,
# ``multi_modal_projector.``, ``image_newline``, ``language_model.{model.,lm_head.}``): transformers 5
# names modules ``model.{vision_tower,multi_modal_projector,language_model,image_newline}`` with a
# top-level ``lm_head`` (and saves the hub layout, but with the tower's ``vision_model.`` dropped).
_CANONICAL_NAMES = [
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
    (re.compile(r"^model\.(vision_tower|multi_modal_projector|image_newline)"), r"\1"),
    (re.compile(r"^vision_tower\.(?!vision_model\.)"), "vision_tower.vision_model."),
]


def _text_model(text_config: Any, ctx: ModelContext) -> LlamaForCausalLM:
    """The Llama-family text model (Llama, Vicuna, Mistral) that takes ``inputs_embeds``."""
    model_type = getattr(text_config, "model_type", "llama")
    if model_type == "llama":
        return LlamaForCausalLM(text_config, ctx)
    if model_type == "mistral":
        return LlamaForCausalLM(text_config, ctx, sliding_window=getattr(text_config, "sliding_window", None) or None)
    raise NotImplementedError(
        f"Llava-next with a {model_type!r} text model: lmport's native Llava-next takes a Llama, Vicuna or Mistral one"
    )


class LlavaNextProjector(nn.Module):
    """Vision width -> text width, two layers (unquantized, as the tower)."""

    def __init__(self, config: Any, vision_width: int):
        super().__init__()
        hidden = config.text_config.hidden_size
        bias = bool(getattr(config, "multimodal_projector_bias", True))
        self.linear_1 = Linear(vision_width, hidden, bias=bias)
        self.act = get_activation(config.projector_hidden_act)
        self.linear_2 = Linear(hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaNextForConditionalGeneration(ImageTextLM):
    def __init__(self, config: Any, ctx: ModelContext):
        super().__init__()
        self.config = config
        layers = config.vision_feature_layer
        self.feature_layers = [layers] if isinstance(layers, int) else list(layers)
        self.select_strategy = config.vision_feature_select_strategy
        if self.select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {self.select_strategy!r} is neither 'default' nor 'full'")
        self.vision_tower = CLIPVisionTower(config.vision_config, self.feature_layers)
        vision_width = config.vision_config.hidden_size * len(self.feature_layers)
        self.multi_modal_projector = LlavaNextProjector(config, vision_width)
        self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size))
        self.language_model = _text_model(config.text_config, ctx)

    # ------------------------------------------------------------------ images

    @torch.inference_mode()
    def encode_images(self, images: Any) -> torch.Tensor:
        """Every image's packed features, concatenated in image order (see the module doc)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = self.config
        device, dtype = self.image_newline.device, self.image_newline.dtype
        sizes = [tuple(int(v) for v in size) for size in images.arrays["image_sizes"]]
        pixels = torch.as_tensor(images.arrays["pixel_values"])
        counts = [
            image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size) for size in sizes
        ]
        # the processor pads every image to the most tiles of the batch: keep each image's own
        tiles = torch.cat([pixels[i, :n] for i, n in enumerate(counts)]).to(device, dtype)
        hidden = torch.cat(self.vision_tower(tiles), dim=-1)
        if self.select_strategy == "default":
            hidden = hidden[:, 1:]
        rows, patches, width = hidden.shape
        projected = self.multi_modal_projector(hidden.reshape(rows * patches, width)).view(rows, patches, -1)
        features = projected.split(counts)
        return torch.cat([self._pack(f, size) for f, size in zip(features, sizes)])

    def _pack(self, features: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """``[tiles, patches, hidden]`` -> ``[image tokens, hidden]`` as transformers' ``pack_image_features``."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        newline = self.image_newline
        if features.shape[0] == 1:
            return torch.cat([features[0], newline[None]])
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        base, grid = features[0], features[1:]
        rows, cols = get_anyres_image_grid_shape(list(image_size), self.config.image_grid_pinpoints, vision.image_size)
        grid = grid.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
        grid = unpad_image(grid, list(image_size))
        grid = torch.cat([grid, newline[:, None, None].expand(*grid.shape[:-1], 1)], dim=-1)
        return torch.cat([base, grid.flatten(1, 2).transpose(0, 1)])

    # ------------------------------------------------------------------ text

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        metadata: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.language_model(input_ids, positions, kv_caches, metadata, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden_states)

    def kv_cache_shape(self) -> tuple[int, int, int]:
        return self.language_model.kv_cache_shape()

    # ------------------------------------------------------------------ loading

    def map_weight_name(self, name: str) -> tuple[str, Hashable | None] | None:
        for pattern, repl in _CANONICAL_NAMES:
            name = pattern.sub(repl, name)
        for prefix, part in (("language_model.", self.language_model), ("vision_tower.", self.vision_tower)):
            if name.startswith(prefix):
                mapped = part.map_weight_name(name[len(prefix):])
                return None if mapped is None else (prefix + mapped[0], mapped[1])
        return name, None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        mapped: dict[str, tuple[str, Hashable | None] | None] = {}

        def used(pairs: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in pairs:  # drop the tower's layers past the feature layer and its post-norm
                mapped[name] = self.map_weight_name(name)
                if mapped[name] is not None:
                    yield name, tensor

        load_checkpoint(self, used(weights), lambda name: mapped[name], ignore=[r"rotary_emb\.inv_freq$"])


def build_llava_next(config: Any, ctx: ModelContext) -> LlavaNextForConditionalGeneration:
    return LlavaNextForConditionalGeneration(config, ctx)


def register_models(register) -> None:
    register(ARCHITECTURES, build_llava_next)
