"""A prompt with images -> token ids and :class:`~lmport.engine.api.ImageInputs`, through the
model's own transformers processor.

The processor (``AutoProcessor``, saved with the checkpoint: ``preprocessor_config.json`` and
``processor_config.json``) resizes and tiles the images and expands each image placeholder in
the text into as many image tokens as the model makes features for it. This module finds
those tokens' spans and keeps the pixel arrays as plain numpy data, so the request crosses the
engine-process pipe as data; the model encodes them inside the engine step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lmport.engine.api import ImageInputs

log = logging.getLogger(__name__)

# architecture -> the processor outputs its model reads (the rest, e.g. attention_mask, are dropped)
IMAGE_ARRAYS = {"LlavaNextForConditionalGeneration": ("pixel_values", "image_sizes")}


class ImagePromptError(ValueError):
    """The prompt and its images do not fit together (the message says how): the client's 422."""


@dataclass(frozen=True)
class PromptImage:
    """One decoded image and a digest of its pixels (the prefix cache's key for it)."""

    image: Any  # PIL.Image.Image, RGB
    digest: bytes


class ImagePrompts:
    """Builds image prompts for one model; :meth:`load` returns None for a text-only model."""

    def __init__(self, processor: Any, image_token_id: int, arrays: Sequence[str]):
        self.processor = processor
        self.image_token_id = image_token_id
        self.placeholder: str = processor.image_token  # what the text carries where an image goes
        self.arrays = tuple(arrays)

    @classmethod
    def load(cls, path: str | Path, hf_config: Any, architecture: str, trust_remote_code: bool = False) -> "ImagePrompts | None":
        arrays = IMAGE_ARRAYS.get(architecture)
        if arrays is None:
            return None
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        token_id = getattr(hf_config, "image_token_id", None)
        if token_id is None:
            token_id = getattr(hf_config, "image_token_index")
        log.info("image inputs through %s (%s)", type(processor).__name__, type(processor.image_processor).__name__)
        return cls(processor, int(token_id), arrays)

    def build(self, text: str, images: Sequence[PromptImage], add_special_tokens: bool = True) -> tuple[list[int], ImageInputs | None]:
        """``text`` holds one :attr:`placeholder` per image, in order."""
        found = text.count(self.placeholder)
        if found != len(images):
            raise ImagePromptError(f"the prompt has {found} image placeholders ({self.placeholder}) for {len(images)} images")
        if not images:
            ids = self.processor.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
            return list(ids), None
        try:
            out = self.processor(
                text=[text], images=[i.image for i in images], return_tensors="np", add_special_tokens=add_special_tokens
            )
        except Exception as exc:  # an image the processor cannot take (size, mode ...)
            raise ImagePromptError(f"image processor error: {exc}") from exc
        ids = [int(i) for i in out["input_ids"][0]]
        spans = self._spans(ids, [i.image.size for i in images])
        arrays = {name: out[name] for name in self.arrays}
        return ids, ImageInputs(arrays=arrays, spans=tuple(spans), hashes=tuple(i.digest for i in images))

    def _spans(self, ids: list[int], sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Each image's run of image tokens; adjacent images split by the processor's own counts."""
        counts = self._token_counts(sizes)
        spans: list[tuple[int, int]] = []
        pos = 0
        for count in counts:
            while pos < len(ids) and ids[pos] != self.image_token_id:
                pos += 1
            end = pos
            while end < len(ids) and ids[end] == self.image_token_id and (count is None or end - pos < count):
                end += 1
            if end == pos or (count is not None and end - pos != count):
                raise ImagePromptError("the processor's image tokens do not match its images")
            spans.append((pos, end))
            pos = end
        if self.image_token_id in ids[pos:]:
            raise ImagePromptError("the prompt holds more image tokens than its images fill")
        return spans

    def _token_counts(self, sizes: list[tuple[int, int]]) -> list[int | None]:
        """Image tokens per image (PIL sizes are (width, height)); None per image where the
        processor cannot say (then each run of image tokens is one image)."""
        counter = getattr(self.processor, "_get_num_multimodal_tokens", None)
        if counter is None:
            return [None] * len(sizes)
        data = counter(image_sizes=[(h, w) for w, h in sizes])
        counts = getattr(data, "num_image_tokens", None)
        if counts is None and isinstance(data, dict):
            counts = data.get("num_image_tokens")
        return [int(c) for c in counts] if counts is not None else [None] * len(sizes)
