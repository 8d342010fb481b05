"""Native Llava-next through the engine against transformers' ``generate``: images of several
shapes (any-resolution tiling, unpadding, newline tokens), several images per prompt, batched
with text-only requests, chunked prefill through an image, and the prefix cache keyed by image
content."""

from __future__ import annotations

import pytest
import torch

from lmport.config import LaunchConfig
from lmport.engine.errors import RequestValidationError
from lmport.engine.factory import build_llm_engine
from lmport.plugins import PluginHost
from lmport.testing.tiny_vision import tiny_image

WIDE, TALL, SQUARE = tiny_image(0, 70, 40), tiny_image(1, 30, 64), tiny_image(2, 32, 32)
PROMPTS = [
    ("Describe <image> please", [WIDE]),
    ("A <image> and <image>: compare", [TALL, SQUARE]),
    ("<image><image> side by side", [SQUARE, WIDE]),  # adjacent images: one run of image tokens, two spans
]


def make_engine(path, **settings):
    host = PluginHost(environ={}, load_entry_points=False).load()
    host.select_backend()
    settings.setdefault("block_size", 4)
    settings.setdefault("max_batch_total_tokens", 4096)
    engine, _, _ = build_llm_engine(LaunchConfig(model_id=str(path), **settings), host)
    return engine


def tokens_of(outputs):
    return {rid: [t.token_id for out in outs for t in out.tokens] for rid, outs in outputs.items()}


@pytest.fixture(scope="module")
def engine(llava_next):
    return make_engine(llava_next[0])


def test_llava_next_is_native_and_takes_images(engine):
    from lmport.models.llava_next import LlavaNextForConditionalGeneration

    assert isinstance(engine.executor.model, LlavaNextForConditionalGeneration)
    assert engine.executor.accepts_images


def test_greedy_matches_transformers_batched_with_text(engine, image_request, hf_image_greedy, image_prompts):
    requests = [image_request(f"img{i}", text, images, max_new_tokens=6) for i, (text, images) in enumerate(PROMPTS)]
    text_ids = image_prompts.processor.tokenizer("The quick brown fox")["input_ids"]
    from lmport.engine.api import GenerationRequest, SamplingParams

    requests.append(GenerationRequest("text", tuple(text_ids), SamplingParams(max_new_tokens=6, ignore_eos=True)))
    assert [r.images.num_images for r in requests[:3]] == [1, 2, 2]
    outputs = engine.generate(requests)
    got = tokens_of(outputs)
    for i, (text, images) in enumerate(PROMPTS):
        expected, logits = hf_image_greedy(text, images, 6)
        assert got[f"img{i}"] == expected, text
        logprobs = [t.logprob for out in outputs[f"img{i}"] for t in out.tokens]
        hf_logprobs = [float(torch.log_softmax(step, -1)[tok]) for step, tok in zip(logits, expected)]
        assert logprobs == pytest.approx(hf_logprobs, abs=1e-4)
    expected_text, _ = hf_image_greedy("The quick brown fox", [], 6)
    assert got["text"] == expected_text


def test_images_change_the_output(hf_image_greedy):
    """Guard: the tiny model's next-token logits depend on the image, so equal tokens above mean something."""
    _, with_wide = hf_image_greedy("Describe <image> please", [WIDE], 1)
    _, with_tall = hf_image_greedy("Describe <image> please", [TALL], 1)
    assert (with_wide[0] - with_tall[0]).abs().max() > 1e-2


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_chunked_prefill_through_an_image(llava_next, image_request, hf_image_greedy, async_scheduling):
    """A prefill budget of 16 tokens cuts every image span over several steps (features cached per
    sequence), beside a text request that decodes meanwhile; with async scheduling too."""
    engine = make_engine(llava_next[0], max_batch_prefill_tokens=16, max_input_tokens=400, max_total_tokens=420,
                         async_scheduling=async_scheduling)
    text, images = PROMPTS[1]
    request = image_request("chunked", text, images, max_new_tokens=5)
    assert max(end - start for start, end in request.images.spans) > 16
    from lmport.engine.api import GenerationRequest, SamplingParams

    text_request = GenerationRequest("text", (5, 6, 7, 8), SamplingParams(max_new_tokens=12, ignore_eos=True))
    got = tokens_of(engine.generate([text_request, request]))
    assert got["chunked"] == hf_image_greedy(text, images, 5)[0]
    from lmport.testing.hf_oracle import hf_greedy_generate

    assert got["text"] == hf_greedy_generate(llava_next[1], [5, 6, 7, 8], 12)[0]
    assert not engine.executor._image_features  # dropped once the last image token was fed


def test_prefix_cache_keys_on_image_content(llava_next, image_request, hf_image_greedy):
    """Same text, different image: only the blocks before the image are shared; same image: all full blocks."""
    engine = make_engine(llava_next[0])
    stats = engine.block_manager.prefix_cache
    text = "Some shared words before the picture <image> then after"
    first = tokens_of(engine.generate([image_request("a", text, [WIDE])]))["a"]
    hits_before = stats.hit_tokens
    second = tokens_of(engine.generate([image_request("b", text, [TALL])]))["b"]
    request = image_request("c", text, [TALL])
    image_start = request.images.spans[0][0]
    assert stats.hit_tokens - hits_before == image_start // 4 * 4  # blocks wholly before the image
    assert second == hf_image_greedy(text, [TALL], 6)[0]
    assert first == hf_image_greedy(text, [WIDE], 6)[0]
    hits_before = stats.hit_tokens
    third = tokens_of(engine.generate([request]))["c"]
    assert third == second
    assert stats.hit_tokens - hits_before == (len(request.prompt_token_ids) - 1) // 4 * 4


def test_text_only_engine_refuses_images(tmp_path, image_request):
    from lmport.testing.tiny_models import make_checkpoint
    from lmport.testing.tiny_tokenizer import train_tiny_tokenizer

    make_checkpoint("llama", tmp_path)
    train_tiny_tokenizer().save_pretrained(tmp_path)
    engine = make_engine(tmp_path)
    request = image_request("x", "look <image>", [WIDE])
    with pytest.raises(RequestValidationError, match="takes no images"):
        engine.add_request(request)


def test_image_spans_are_checked(engine, image_request):
    import dataclasses

    request = image_request("bad", "Describe <image> please", [WIDE])
    start, _ = request.images.spans[0]
    broken = dataclasses.replace(request.images, spans=((start, len(request.prompt_token_ids) + 1),))
    with pytest.raises(RequestValidationError, match="inside the prompt"):
        engine.add_request(dataclasses.replace(request, images=broken))


def test_unsupported_llava_next_parts_are_refused_by_name(tmp_path):
    """A text model or vision tower the native module lacks is a start-up error that names it."""
    from transformers import LlavaNextConfig

    from lmport.models.base import ModelContext
    from lmport.models.llava_next import build_llava_next
    from lmport.testing.tiny_vision import llava_next_config

    config = llava_next_config(400, 399)
    qwen = LlavaNextConfig(vision_config=config.vision_config.to_dict(), text_config=dict(model_type="qwen2", vocab_size=400),
                           image_grid_pinpoints=config.image_grid_pinpoints)
    host = PluginHost(environ={}, load_entry_points=False).load()
    host.select_backend()
    ctx = ModelContext(torch.float32, torch.device("cpu"), host.capabilities(), host.attention_backend)
    with pytest.raises(NotImplementedError, match="'qwen2' text model"):
        build_llava_next(qwen, ctx)
    siglip = LlavaNextConfig(vision_config=dict(model_type="siglip_vision_model"), text_config=config.text_config.to_dict(),
                             image_grid_pinpoints=config.image_grid_pinpoints)
    with pytest.raises(NotImplementedError, match="siglip_vision_model"):
        build_llava_next(siglip, ctx)


def test_engine_rules_cap_images_per_request(engine, image_request):
    """The engine's rule (the server checks the same limit before fetching anything)."""
    assert engine.limits.accepts_images and engine.limits.max_images_per_request == 4
    request = image_request("many", " ".join(["<image>"] * 5), [SQUARE] * 5)
    with pytest.raises(RequestValidationError, match="at most 4 images. Given: 5"):
        engine.add_request(request)
