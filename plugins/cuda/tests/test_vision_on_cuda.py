"""Llava-next on a CUDA GPU, through the whole engine, against transformers (tests/vision on the CPU).

- fp32: the engine's greedy tokens for image prompts (wide and tall images: any-resolution
  tiling and unpadding; two images in one prompt), batched with a text-only prompt, equal
  transformers' ``generate`` (fp32, on the CPU) token for token — with the CUDA backend's
  kernels and decode graphs, eagerly, and with ``--disable-custom-kernels``. A 12-token prefill
  budget cuts every image over several steps.
- bf16: the native image features (tower, projector, packing) on the GPU stay close to
  transformers' bf16 ``get_image_features`` on the GPU, and the engine's first token's logprob
  to transformers' bf16 one.

Needs a CUDA GPU (skipped otherwise).
"""

from __future__ import annotations

import pytest
import torch

from lmport.config import LaunchConfig
from lmport.engine.api import GenerationRequest, SamplingParams
from lmport.engine.factory import build_llm_engine
from lmport.models.image_prompts import ImagePrompts, PromptImage
from lmport.models.loader import build_native_model, resolve_model_info
from lmport.plugins import PluginHost
from lmport.testing.tiny_vision import make_llava_next_checkpoint, pixel_digest, tiny_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = "cuda"
MAX_NEW = 8
WIDE, TALL, SQUARE = tiny_image(0, 70, 40), tiny_image(1, 30, 64), tiny_image(2, 32, 32)
PROMPTS = [("Describe <image> please", [WIDE]), ("A <image> and <image>: compare", [TALL, SQUARE]), ("The quick brown fox", [])]


def cuda_host(custom_kernels: bool = True) -> PluginHost:
    host = PluginHost(environ={})
    assert host.select_backend(DEVICE).backend.name == DEVICE
    host.set_custom_kernels(custom_kernels)
    return host


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = tmp_path_factory.mktemp("cuda-llava-next")
    hf_model = make_llava_next_checkpoint(path)
    prompts = ImagePrompts.load(path, hf_model.config, "LlavaNextForConditionalGeneration")
    return path, hf_model, prompts


def requests(prompts: ImagePrompts, max_new: int = MAX_NEW) -> list[GenerationRequest]:
    out = []
    for i, (text, images) in enumerate(PROMPTS):
        ids, inputs = prompts.build(text, [PromptImage(im, pixel_digest(im)) for im in images])
        params = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
        out.append(GenerationRequest(f"r{i}", tuple(ids), params, images=inputs))
    return out


def engine_outputs(path, host: PluginHost, prompts: ImagePrompts, max_new: int = MAX_NEW, **settings) -> list[list]:
    config = LaunchConfig(model_id=str(path), block_size=16, max_batch_total_tokens=4096, max_batch_prefill_tokens=12,
                          max_input_tokens=400, max_total_tokens=420, **{"dtype": "float32", **settings})  # fmt: skip
    engine, _, _ = build_llm_engine(config, host)
    outputs = engine.generate(requests(prompts, max_new))
    return [[t for out in outputs[f"r{i}"] for t in out.tokens] for i in range(len(PROMPTS))]


@torch.inference_mode()
def hf_generate(hf_model, prompts: ImagePrompts, text: str, images: list, device: str = "cpu") -> list[int]:
    inputs = prompts.processor(text=[text], images=images or None, return_tensors="pt").to(device)
    hf_model.generation_config.eos_token_id = None
    out = hf_model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_fp32_greedy_equals_transformers(llava):
    path, hf_model, prompts = llava
    expected = [hf_generate(hf_model, prompts, text, images) for text, images in PROMPTS]
    with_graphs = engine_outputs(path, cuda_host(), prompts, cuda_graphs=(1, 2, 4))
    assert [[t.token_id for t in seq] for seq in with_graphs] == expected, "CUDA kernels + graphs"
    eager = engine_outputs(path, cuda_host(), prompts, cuda_graphs=())
    assert [[t.token_id for t in seq] for seq in eager] == expected, "eager"
    reference = engine_outputs(path, cuda_host(custom_kernels=False), prompts)
    assert [[t.token_id for t in seq] for seq in reference] == expected, "--disable-custom-kernels"


def test_bf16_image_features_and_first_logprob_close_to_transformers(llava):
    from transformers import LlavaNextForConditionalGeneration

    path, _, prompts = llava
    host = cuda_host()
    model = build_native_model(resolve_model_info(path), host, torch.bfloat16, torch.device(DEVICE))
    hf = LlavaNextForConditionalGeneration.from_pretrained(path, torch_dtype=torch.bfloat16).to(DEVICE).eval()
    text, images = PROMPTS[1]
    request = requests(prompts)[1]
    pixels = prompts.processor(text=[text], images=images, return_tensors="pt").to(DEVICE)
    with torch.inference_mode():
        ours = model.encode_images(request.images).float()
        out = hf.model.get_image_features(pixels["pixel_values"], pixels["image_sizes"])
        theirs = torch.cat(list(getattr(out, "pooler_output", out))).float()
    assert ours.shape == theirs.shape
    cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
    assert cosine.min().item() > 0.995, f"bf16 image features direction, cosine min {cosine.min().item()}"
    del model
    first = engine_outputs(path, host, prompts, max_new=1, dtype="bfloat16")
    with torch.inference_mode():
        for (text, images), seq in zip(PROMPTS, first):
            inputs = prompts.processor(text=[text], images=images or None, return_tensors="pt").to(DEVICE)
            logprobs = torch.log_softmax(hf(**inputs).logits[0, -1].float(), -1)
            assert abs(seq[0].logprob - logprobs[seq[0].token_id].item()) < 0.1, text
            assert logprobs.max().item() - logprobs[seq[0].token_id].item() < 0.1, f"{text}: not (nearly) HF's argmax"
