"""Fixtures for image-text tests: a tiny random Llava-next checkpoint with its processor (built
once per session), images drawn in the test, and transformers' greedy ``generate`` on them.

- ``llava_next``: ``(path, hf_model)``.
- ``image_prompts``: the server's :class:`~lmport.models.image_prompts.ImagePrompts` for it.
- ``hf_image_greedy(text, images, max_new_tokens)``: HF's greedy new tokens and each step's
  float32 logits, the prompt built by HF's own processor (``text`` holds ``<image>`` per image).
- ``image_request(request_id, text, images, max_new_tokens, **params)``: an engine request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from lmport.engine.api import GenerationRequest, SamplingParams
from lmport.models.image_prompts import ImagePrompts, PromptImage
from lmport.testing.tiny_vision import make_llava_next_checkpoint, pixel_digest
from lmport.testing.torch_threads import one_torch_thread  # noqa: F401  (autouse: one intra-op thread)


@pytest.fixture(scope="session")
def llava_next(tmp_path_factory) -> tuple[Path, Any]:
    path = tmp_path_factory.mktemp("tiny-llava-next")
    return path, make_llava_next_checkpoint(path)


@pytest.fixture(scope="session")
def image_prompts(llava_next) -> ImagePrompts:
    path, hf_model = llava_next
    prompts = ImagePrompts.load(path, hf_model.config, "LlavaNextForConditionalGeneration")
    assert prompts is not None
    return prompts


@pytest.fixture(scope="session")
def hf_image_greedy(llava_next, image_prompts) -> Callable[..., tuple[list[int], list[torch.Tensor]]]:
    _, hf_model = llava_next
    processor = image_prompts.processor

    @torch.inference_mode()
    def generate(text: str, images: list[Any], max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
        inputs = processor(text=[text], images=images or None, return_tensors="pt")
        hf_model.generation_config.eos_token_id = None  # as the engine's ignore_eos
        out = hf_model.generate(
            **inputs, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0,
            output_logits=True, return_dict_in_generate=True,
        )
        tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        return tokens, [step[0].float() for step in out.logits]

    return generate


@pytest.fixture(scope="session")
def image_request(image_prompts) -> Callable[..., GenerationRequest]:
    def make(request_id: str, text: str, images: list[Any], max_new_tokens: int = 6, **params: Any) -> GenerationRequest:
        ids, inputs = image_prompts.build(text, [PromptImage(i.convert("RGB"), pixel_digest(i.convert("RGB"))) for i in images])
        params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, **params)
        return GenerationRequest(request_id, tuple(ids), params, images=inputs)

    return make
