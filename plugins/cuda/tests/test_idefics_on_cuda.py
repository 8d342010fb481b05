"""Idefics (v1) on a CUDA GPU, through the whole engine, against transformers (tests/vision on the CPU).

- fp32: the engine's greedy tokens for image prompts (one image; two images, each text token
  attending only the image before it; text after ``</s>`` attending none), batched with a
  text-only prompt, equal transformers' ``generate`` (fp32, on the CPU) token for token — with
  the CUDA backend's kernels (the Triton kernel's per-token key ranges) and decode graphs
  (the ranges in the static decode metadata), eagerly, and with ``--disable-custom-kernels``.
  A 12-token prefill budget cuts the prompts into chunks.
- bf16: the engine's first token's logprob close to transformers' bf16 one on the GPU.

Needs a CUDA GPU (skipped otherwise).
"""

from __future__ import annotations

import pytest
import torch

from lmport.config import LaunchConfig
from lmport.engine.api import GenerationRequest, SamplingParams
from lmport.engine.factory import build_llm_engine
from lmport.models.image_prompts import ImagePrompts, PromptImage
from lmport.plugins import PluginHost
from lmport.testing.tiny_vision import make_idefics_checkpoint, pixel_digest, tiny_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = "cuda"
MAX_NEW = 8
WIDE, TALL, SQUARE = tiny_image(0, 70, 40), tiny_image(1, 30, 64), tiny_image(2, 32, 32)
# each prompt as IdeficsProcessor takes it: text parts and images
PROMPTS = [["Describe", WIDE, "please"], ["A", TALL, "and", SQUARE, "compared"], ["One", SQUARE, "done</s>then more"],
           ["The quick brown fox"]]  # fmt: skip


def cuda_host(custom_kernels: bool = True) -> PluginHost:
    host = PluginHost(environ={})
    assert host.select_backend(DEVICE).backend.name == DEVICE
    host.set_custom_kernels(custom_kernels)
    return host


@pytest.fixture(scope="module")
def idefics(tmp_path_factory):
    path = tmp_path_factory.mktemp("cuda-idefics")
    hf_model = make_idefics_checkpoint(path)
    prompts = ImagePrompts.load(path, hf_model.config, "IdeficsForVisionText2Text")
    return path, hf_model, prompts


def requests(prompts: ImagePrompts, max_new: int = MAX_NEW) -> list[GenerationRequest]:
    out = []
    for i, items in enumerate(PROMPTS):
        text = "".join(item if isinstance(item, str) else "<image>" for item in items)
        images = [PromptImage(im, pixel_digest(im)) for im in items if not isinstance(im, str)]
        ids, inputs = prompts.build(text, images)
        out.append(GenerationRequest(f"r{i}", tuple(ids), SamplingParams(max_new_tokens=max_new, ignore_eos=True), images=inputs))
    return out


def engine_outputs(path, host: PluginHost, prompts: ImagePrompts, max_new: int = MAX_NEW, **settings) -> list[list]:
    config = LaunchConfig(model_id=str(path), block_size=16, max_batch_total_tokens=4096, max_batch_prefill_tokens=12,
                          max_input_tokens=400, max_total_tokens=420, **{"dtype": "float32", **settings})  # fmt: skip
    engine, _, _ = build_llm_engine(config, host)
    outputs = engine.generate(requests(prompts, max_new))
    return [[t for out in outputs[f"r{i}"] for t in out.tokens] for i in range(len(PROMPTS))]


def hf_inputs(prompts: ImagePrompts, request: GenerationRequest, items: list, device: str):
    if request.images is not None:
        return prompts.processor(text=[items], return_tensors="pt").to(device)
    ids = torch.tensor([request.prompt_token_ids], device=device)
    side = prompts.processor.image_processor.image_size
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.zeros(1, 1, 3, side, side, device=device),
                image_attention_mask=torch.zeros(1, ids.shape[1], 1, dtype=torch.long, device=device))  # fmt: skip


@torch.inference_mode()
def hf_generate(hf_model, prompts: ImagePrompts, device: str = "cpu") -> list[list[int]]:
    hf_model.generation_config.eos_token_id = None
    out = []
    for request, items in zip(requests(prompts), PROMPTS):
        inputs = hf_inputs(prompts, request, items, device)
        seq = hf_model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=0)
        out.append(seq[0, inputs["input_ids"].shape[1]:].tolist())
    return out


def test_fp32_greedy_equals_transformers(idefics):
    path, hf_model, prompts = idefics
    expected = hf_generate(hf_model, prompts)
    with_graphs = engine_outputs(path, cuda_host(), prompts, cuda_graphs=(1, 2, 4))
    assert [[t.token_id for t in seq] for seq in with_graphs] == expected, "CUDA kernels + graphs"
    eager = engine_outputs(path, cuda_host(), prompts, cuda_graphs=())
    assert [[t.token_id for t in seq] for seq in eager] == expected, "eager"
    reference = engine_outputs(path, cuda_host(custom_kernels=False), prompts)
    assert [[t.token_id for t in seq] for seq in reference] == expected, "--disable-custom-kernels"


def test_bf16_first_logprob_close_to_transformers(idefics):
    from transformers import IdeficsForVisionText2Text

    path, _, prompts = idefics
    first = engine_outputs(path, cuda_host(), prompts, max_new=1, dtype="bfloat16")
    hf = IdeficsForVisionText2Text.from_pretrained(path, dtype=torch.bfloat16).to(DEVICE).eval()
    with torch.inference_mode():
        for request, items, seq in zip(requests(prompts), PROMPTS, first):
            logprobs = torch.log_softmax(hf(**hf_inputs(prompts, request, items, DEVICE)).logits[0, -1].float(), -1)
            assert abs(seq[0].logprob - logprobs[seq[0].token_id].item()) < 0.1, items
            assert logprobs.max().item() - logprobs[seq[0].token_id].item() < 0.1, f"{items}: not (nearly) HF's argmax"
