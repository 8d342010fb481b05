"""Tiny random Llava-next and Idefics checkpoints with their processors, and images drawn in the test.

The checkpoint folder holds everything ``lmport launch`` reads: ``config.json`` and safetensors,
the byte-level BPE of :mod:`lmport.testing.tiny_tokenizer` with an ``<image>`` token added
(ChatML turn tokens and template too), and the processor's configs (a 32-pixel CLIP tower with
8-pixel patches, any-resolution tiling over 32x64, 64x32 and 64x64 grids).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

IMAGE_SIZE = 32
GRID_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def tiny_image(seed: int, width: int = 70, height: int = 40) -> Any:
    """A noise RGB image (PIL) of the given size."""
    import numpy as np
    from PIL import Image

    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_bytes(image: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(image: Any) -> str:
    """A PNG ``data:`` URI of ``image`` (what a client puts in markdown or an ``image_url``)."""
    import base64

    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def pixel_digest(image: Any) -> bytes:
    """What the server hashes for the prefix cache (see ``lmport.server.images``)."""
    from lmport.server.images import image_digest

    return image_digest(image)


def llava_next_config(vocab_size: int, image_token_id: int, text_model: str = "llama") -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, MistralConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=8, projection_dim=32)
    text_class = {"llama": LlamaConfig, "mistral": MistralConfig}[text_model]
    text = text_class(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                           image_grid_pinpoints=GRID_PINPOINTS, vision_feature_layer=-2,
                           vision_feature_select_strategy="default")


def make_llava_next_checkpoint(path: str | Path, *, std: float = 0.08, seed: int = 0, text_model: str = "llama") -> Any:
    """Save the tiny model, tokenizer and processor to ``path``; return the HF model (eval, float32)."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    from lmport.testing.tiny_models import widen_init
    from lmport.testing.tiny_tokenizer import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(chat=True)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>"]})
    config = llava_next_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"), text_model)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    widen_init(model, std=std, seed=seed)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    processor = LlavaNextProcessor(
        image_processor=_image_processor(), tokenizer=tokenizer, patch_size=8,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    processor.save_pretrained(path)
    return model


def _image_processor() -> Any:
    """transformers' Llava-next image processor: the PIL one where this transformers has both."""
    try:
        from transformers import LlavaNextImageProcessorPil as ImageProcessor  # transformers 5
    except ImportError:
        from transformers import LlavaNextImageProcessor as ImageProcessor  # 4.x: PIL/numpy already
    return ImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                          image_grid_pinpoints=GRID_PINPOINTS)


def idefics_config(vocab_size: int, additional: int, tokenizer: Any, *, use_resampler: bool = True) -> Any:
    """A tiny Idefics: 4 decoder layers with a gated cross-attention layer before every second,
    qk norms, a 2-layer 32-pixel vision tower (8-pixel patches) and a 4-latent perceiver."""
    from transformers import IdeficsConfig

    return IdeficsConfig(
        vocab_size=vocab_size, additional_vocab_size=additional, hidden_size=64, intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, cross_layer_interval=2, qk_layer_norms=True,
        use_resampler=use_resampler, max_position_embeddings=512, alpha_type="vector",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        vision_config=dict(embed_dim=32, image_size=IMAGE_SIZE, patch_size=8, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64),
        perceiver_config=dict(resampler_n_latents=4, resampler_depth=2, resampler_n_heads=2, resampler_head_dim=8,
                              qk_layer_norms_perceiver=True),
    )  # fmt: skip


def make_idefics_checkpoint(path: str | Path, *, std: float = 0.08, seed: int = 0, use_resampler: bool = True) -> Any:
    """Save a tiny Idefics (v1), its tokenizer (ChatML template; ``<fake_token_around_image>`` and
    ``<image>`` as the additional vocabulary) and ``IdeficsProcessor`` to ``path``; return the HF
    model (eval, float32).
    The gates are drawn near one (tanh 0.6 .. 0.9) so the images steer the tokens."""
    from transformers import IdeficsForVisionText2Text, IdeficsProcessor

    from lmport.testing.tiny_models import widen_init
    from lmport.testing.tiny_tokenizer import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(chat=True)
    base = len(tokenizer)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>"]}
    )
    config = idefics_config(base, len(tokenizer) - base, tokenizer, use_resampler=use_resampler)
    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(config).eval()
    widen_init(model, std=std, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".alpha_" in name:
                param.copy_(0.7 + 0.5 * torch.rand(param.shape, generator=gen))
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    processor = IdeficsProcessor(image_processor=_idefics_image_processor(), tokenizer=tokenizer)
    processor.save_pretrained(path)
    return model


def _idefics_image_processor() -> Any:
    try:
        from transformers import IdeficsImageProcessorPil as ImageProcessor  # transformers 5
    except ImportError:
        from transformers import IdeficsImageProcessor as ImageProcessor
    return ImageProcessor(image_size=IMAGE_SIZE)
