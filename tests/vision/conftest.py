"""Fixtures for image-text tests: tiny random Llava-next and Idefics checkpoints with their processors (built
once per session), images drawn in the test, and transformers' greedy ``generate`` on them.

- ``llava_next``: ``(path, hf_model)``.
- ``image_prompts``: the server's :class:`~lmport.models.image_prompts.ImagePrompts` for it.
- ``hf_image_greedy(text, images, max_new_tokens)``: HF's greedy new tokens and each step's
  float32 logits, the prompt built by HF's own processor (``text`` holds ``<image>`` per image).
- ``image_request(request_id, text, images, max_new_tokens, **params)``: an engine request.
- ``idefics``, ``idefics_prompts``, ``hf_idefics_greedy(items, max_new_tokens)``,
  ``idefics_request(request_id, items, ...)``: the same for Idefics (v1), a prompt being the
  processor's list of text parts and images.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from lmport.engine.api import GenerationRequest, SamplingParams
from lmport.models.image_prompts import ImagePrompts, PromptImage
from lmport.testing.tiny_vision import make_llava_next_checkpoint, pixel_digest
from lmport.testing.torch_threads import one_torch_thread  # noqa: F401  (autouse: one intra-op thread)


@contextmanager
def _live_server(path: Path, model_id: str) -> Iterator[Any]:
    """A server on a loopback port for the checkpoint at ``path``, its engine in its own process
    (so images cross the pipe as data); stopped on exit."""
    from lmport.config import LaunchConfig
    from lmport.engine.factory import build_engine
    from lmport.plugins import PluginHost
    from lmport.server.app import build_app
    from lmport.server.assemble import build_state
    from lmport.server.serve import ServerThread

    config = LaunchConfig(model_id=str(path), engine_process=True, block_size=4,
                          max_batch_total_tokens=8192, max_total_tokens=512)  # fmt: skip
    host = PluginHost(environ={}, load_entry_points=False).load()
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # the child copies the parent's count
    try:
        engine, tokenizer, info = build_engine(config, host)
    finally:
        torch.set_num_threads(saved)
    state = build_state(config, engine, tokenizer, info, host=host, model_id=model_id)
    thread = ServerThread(build_app(state)).start()
    try:
        yield thread
    finally:
        thread.stop()
        engine.shutdown()


@pytest.fixture(scope="session")
def live_server() -> Callable[[Path, str], Any]:
    """``live_server(path, model_id)``: a context manager serving that checkpoint (see :func:`_live_server`)."""
    return _live_server


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


# ---------------------------------------------------------------- Idefics (v1)
# A prompt is a list of text parts and images, as IdeficsProcessor takes it; the server's form
# of the same prompt is its text with one <image> per image (``idefics_text``).


def idefics_text(items: list[Any]) -> str:
    return "".join(item if isinstance(item, str) else "<image>" for item in items)


@pytest.fixture(scope="session")
def idefics(tmp_path_factory) -> tuple[Path, Any]:
    from lmport.testing.tiny_vision import make_idefics_checkpoint

    path = tmp_path_factory.mktemp("tiny-idefics")
    return path, make_idefics_checkpoint(path)


@pytest.fixture(scope="session")
def idefics_prompts(idefics) -> ImagePrompts:
    path, hf_model = idefics
    return ImagePrompts.load(path, hf_model.config, "IdeficsForVisionText2Text")


@pytest.fixture(scope="session")
def hf_idefics_greedy(idefics, idefics_prompts) -> Callable[..., tuple[list[int], list[torch.Tensor]]]:
    """``(items or token ids, max_new_tokens)`` -> HF's greedy tokens and per-step logits; a prompt
    of token ids (text only) runs with a zero image that its all-zero image mask hides."""
    hf_model = idefics[1]
    processor = idefics_prompts.processor

    @torch.inference_mode()
    def generate(prompt: list[Any], max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
        if prompt and all(isinstance(t, int) for t in prompt):
            ids = torch.tensor([prompt])
            side = processor.image_processor.image_size
            inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.zeros(1, 1, 3, side, side),
                          image_attention_mask=torch.zeros(1, ids.shape[1], 1, dtype=torch.long))  # fmt: skip
        else:
            inputs = processor(text=[prompt], return_tensors="pt")
        hf_model.generation_config.eos_token_id = None  # as the engine's ignore_eos
        out = hf_model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0,
                                output_logits=True, return_dict_in_generate=True)  # fmt: skip
        return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), [step[0].float() for step in out.logits]

    return generate


@pytest.fixture(scope="session")
def idefics_request(idefics_prompts) -> Callable[..., GenerationRequest]:
    def make(request_id: str, items: list[Any], max_new_tokens: int = 6, **params: Any) -> GenerationRequest:
        images = [PromptImage(i.convert("RGB"), pixel_digest(i.convert("RGB"))) for i in items if not isinstance(i, str)]
        ids, inputs = idefics_prompts.build(idefics_text(items), images)
        params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, **params)
        return GenerationRequest(request_id, tuple(ids), params, images=inputs)

    return make
