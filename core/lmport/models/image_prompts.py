"""A prompt with images -> token ids and :class:`~lmport.engine.api.ImageInputs`, through the
model's own transformers processor.

The processor (``AutoProcessor``, saved with the checkpoint: ``preprocessor_config.json`` and
``processor_config.json``) resizes and tiles the images and expands each image placeholder in
the text into as many image tokens as the model makes features for it. This module finds
those tokens' spans and keeps the pixel arrays as plain numpy data, so the request crosses the
engine-process pipe as data; the model encodes them inside the engine step.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lmport.engine.api import ImageInputs

log = logging.getLogger(__name__)

# architecture -> the processor outputs its model reads (the rest, e.g. attention_mask, are dropped)
IMAGE_ARRAYS = {
    "LlavaNextForConditionalGeneration": ("pixel_values", "image_sizes"),
    "IdeficsForVisionText2Text": ("pixel_values", "image_index"),
}


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
        # what the text carries where an image goes
        self.placeholder: str = getattr(processor, "image_token", None) or processor.tokenizer.convert_ids_to_tokens(image_token_id)
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
            token_id = getattr(hf_config, "image_token_index", None)
        if token_id is None:  # Idefics: the tokenizer's <image>
            token_id = processor.image_token_id
        log.info("image inputs through %s (%s)", type(processor).__name__, type(processor.image_processor).__name__)
        builder = IdeficsImagePrompts if architecture == "IdeficsForVisionText2Text" else cls
        return builder(processor, int(token_id), arrays)

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

    def cut_front(self, images: ImageInputs, cut: int) -> ImageInputs:
        """``images`` of a prompt whose first ``cut`` tokens were dropped (``truncate``; none of them an image's)."""
        spans = tuple((start - cut, end - cut) for start, end in images.spans)
        return dataclasses.replace(images, spans=spans)

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


class IdeficsImagePrompts(ImagePrompts):
    """Idefics v1 (``IdeficsProcessor``): the prompt goes to the processor as its list of text
    parts and images, which it joins as ``<s>text<fake_token_around_image><image><fake_token_around_image>...``
    (one ``<image>`` token per image: the images reach the model through cross-attention, not as
    embeddings). ``image_index`` keeps, per prompt position, the image its cross-attention reads
    (the processor's ``image_attention_mask``: the last image at or before it, -1 for none).

    The processor starts every prompt with the BOS token itself (a leading one in the text is
    dropped), strips spaces around each text part as it does, and would fetch any text part that
    looks like a URL: such a part is refused (422) so that no prompt text makes the server connect.
    """

    def build(self, text: str, images: Sequence[PromptImage], add_special_tokens: bool = True) -> tuple[list[int], ImageInputs | None]:
        import numpy as np
        from transformers.models.idefics.processing_idefics import is_url

        found = text.count(self.placeholder)
        if found != len(images) or not images:
            return super().build(text, images, add_special_tokens)
        bos = self.processor.tokenizer.bos_token
        if bos and text.startswith(bos):
            text = text[len(bos):]
        items: list[Any] = []
        for i, part in enumerate(text.split(self.placeholder)):
            if part.strip(" "):
                if is_url(part.strip(" ")):
                    raise ImagePromptError(
                        f"the text part {part.strip(' ')[:64]!r} is a bare URL, which the Idefics processor reads as an image "
                        "to fetch; pass images as markdown images or image_url parts"
                    )
                items.append(part)
            if i < len(images):
                items.append(images[i].image)
        try:
            out = self.processor(text=[items], return_tensors="pt")
        except Exception as exc:  # an image the processor cannot take (size, mode ...)
            raise ImagePromptError(f"image processor error: {exc}") from exc
        ids = [int(i) for i in out["input_ids"][0]]
        mask = out["image_attention_mask"][0].numpy().astype(bool)  # [positions, images]: one-hot or none
        image_index = np.where(mask.any(axis=-1), mask.argmax(axis=-1), -1).astype(np.int32)
        positions = [p for p, token in enumerate(ids) if token == self.image_token_id]
        if len(positions) != len(images):
            raise ImagePromptError("the processor's image tokens do not match its images")
        arrays = {"pixel_values": out["pixel_values"][0].numpy(), "image_index": image_index}
        spans = tuple((p, p + 1) for p in positions)
        return ids, ImageInputs(arrays=arrays, spans=spans, hashes=tuple(i.digest for i in images))

    def cut_front(self, images: ImageInputs, cut: int) -> ImageInputs:
        images = super().cut_front(images, cut)
        return dataclasses.replace(images, arrays={**images.arrays, "image_index": images.arrays["image_index"][cut:]})
