"""Native Idefics (v1) through the engine against transformers' ``generate``: one and several
images per prompt (adjacent ones too), text after an end-of-document token (which attends no
image), batched with text-only requests, chunked prefill (async scheduling too), and a
checkpoint without the perceiver resampler."""

from __future__ import annotations

import pytest
import torch

from lmport.config import LaunchConfig
from lmport.engine.api import GenerationRequest, SamplingParams
from lmport.engine.factory import build_llm_engine
from lmport.plugins import PluginHost
from lmport.testing.tiny_vision import tiny_image

WIDE, TALL, SQUARE = tiny_image(0, 70, 40), tiny_image(1, 30, 64), tiny_image(2, 32, 32)
PROMPTS = [
    ["Describe", WIDE, "please"],
    ["A", TALL, "and", SQUARE, "compared"],
    [WIDE, TALL, "side by side"],  # adjacent images, the prompt starts with one
    ["One", SQUARE, "done</s>then some more words"],  # after </s> no token attends an image
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
def engine(idefics):
    return make_engine(idefics[0])


def test_idefics_is_native_and_takes_images(engine):
    from lmport.models.idefics import IdeficsForVisionText2Text

    assert isinstance(engine.executor.model, IdeficsForVisionText2Text)
    assert engine.executor.accepts_images and engine.limits.accepts_images
    groups = [g.kind for g in engine.executor.kv_groups]
    assert groups == ["full", "cross"]


def test_greedy_matches_transformers_batched_with_text(engine, idefics_request, hf_idefics_greedy, idefics_prompts):
    requests = [idefics_request(f"img{i}", items, max_new_tokens=6) for i, items in enumerate(PROMPTS)]
    assert [r.images.num_images for r in requests] == [1, 2, 2, 1]
    text_ids = idefics_prompts.processor.tokenizer("The quick brown fox")["input_ids"]
    requests.append(GenerationRequest("text", tuple(text_ids), SamplingParams(max_new_tokens=6, ignore_eos=True)))
    outputs = engine.generate(requests)
    got = tokens_of(outputs)
    for i, items in enumerate(PROMPTS):
        expected, logits = hf_idefics_greedy(items, 6)
        assert got[f"img{i}"] == expected, i
        logprobs = [t.logprob for out in outputs[f"img{i}"] for t in out.tokens]
        hf_logprobs = [float(torch.log_softmax(step, -1)[tok]) for step, tok in zip(logits, expected)]
        assert logprobs == pytest.approx(hf_logprobs, abs=1e-4)
    assert got["text"] == hf_idefics_greedy(list(text_ids), 6)[0]


def test_images_change_the_output(hf_idefics_greedy):
    """Guard: the tiny model's logits depend on the image before the token, so equal tokens mean something."""
    _, with_wide = hf_idefics_greedy(["Describe", WIDE, "please"], 1)
    _, with_tall = hf_idefics_greedy(["Describe", TALL, "please"], 1)
    assert (with_wide[0] - with_tall[0]).abs().max() > 1e-2


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_chunked_prefill_beside_a_decoding_text_request(idefics, idefics_request, hf_idefics_greedy, async_scheduling):
    """Prompt chunks of at most 8 tokens (an image's token and the text after it in separate
    steps, the images encoded at the first chunk), beside a text request that decodes meanwhile."""
    engine = make_engine(idefics[0], max_batch_prefill_tokens=8, async_scheduling=async_scheduling)
    items = PROMPTS[1]
    requests = [GenerationRequest("text", (5, 6, 7), SamplingParams(max_new_tokens=12, ignore_eos=True)),
                idefics_request("img", items, max_new_tokens=5)]  # fmt: skip
    got = tokens_of(engine.generate(requests))
    assert got["img"] == hf_idefics_greedy(items, 5)[0]
    assert got["text"] == hf_idefics_greedy([5, 6, 7], 12)[0]


def test_without_the_perceiver_resampler(tmp_path, hf_idefics_greedy):
    """``use_resampler=False``: the tower's hidden states (class token and patches) are the cross K/V."""
    from lmport.models.image_prompts import ImagePrompts, PromptImage
    from lmport.testing.tiny_vision import make_idefics_checkpoint, pixel_digest

    hf_model = make_idefics_checkpoint(tmp_path, use_resampler=False)
    prompts = ImagePrompts.load(tmp_path, hf_model.config, "IdeficsForVisionText2Text")
    items = ["A", TALL, "and", WIDE, "again"]
    ids, images = prompts.build("A<image>and<image>again", [PromptImage(i, pixel_digest(i)) for i in (TALL, WIDE)])
    engine = make_engine(tmp_path)
    assert engine.executor.model.image_seq_len == 17  # (32 / 8) ** 2 patches + the class token
    got = tokens_of(engine.generate([GenerationRequest("r", tuple(ids), SamplingParams(max_new_tokens=5, ignore_eos=True),
                                                       images=images)]))  # fmt: skip
    hf_model.generation_config.eos_token_id = None
    with torch.inference_mode():
        inputs = prompts.processor(text=[items], return_tensors="pt")
        out = hf_model.generate(**inputs, do_sample=False, max_new_tokens=5, pad_token_id=0)
    assert got["r"] == out[0, len(ids):].tolist()


def test_prefix_cache_keys_on_image_content(idefics, idefics_request, hf_idefics_greedy):
    """Same text, different image: only the blocks before the image's token are shared; same
    image: every full block, and the image's latents are still written for the tokens left."""
    engine = make_engine(idefics[0])
    stats = engine.block_manager.prefix_cache
    wide, tall = (["Some shared words before the picture", image, "then after it"] for image in (WIDE, TALL))
    first = tokens_of(engine.generate([idefics_request("a", wide)]))["a"]
    hits_before = stats.hit_tokens
    second = tokens_of(engine.generate([idefics_request("b", tall)]))["b"]
    request = idefics_request("c", tall)
    image_start = request.images.spans[0][0]
    assert stats.hit_tokens - hits_before == image_start // 4 * 4  # blocks wholly before the image
    assert first == hf_idefics_greedy(wide, 6)[0]
    assert second == hf_idefics_greedy(tall, 6)[0]
    hits_before = stats.hit_tokens
    assert tokens_of(engine.generate([request]))["c"] == second
    assert stats.hit_tokens - hits_before == (len(request.prompt_token_ids) - 1) // 4 * 4


def test_a_prompt_cut_at_its_front_keeps_each_tokens_image(engine, idefics_request, idefics_prompts, idefics):
    """``truncate`` drops the prompt's first tokens (none of them an image's): ``cut_front`` cuts the
    per-position image index with them, so each token still attends its own image, as transformers
    does on the cut ids with the cut ``image_attention_mask``."""
    items = ["Some words to cut away first", WIDE, "and", TALL, "after"]
    full = idefics_request("full", items)
    cut = full.images.spans[0][0] - 2
    images = idefics_prompts.cut_front(full.images, cut)
    assert images.spans[0][0] == 2 and len(images.arrays["image_index"]) == len(full.prompt_token_ids) - cut
    request = GenerationRequest("cut", full.prompt_token_ids[cut:], full.params, images=images)
    got = tokens_of(engine.generate([request]))["cut"]
    inputs = idefics_prompts.processor(text=[items], return_tensors="pt")
    hf_model = idefics[1]
    hf_model.generation_config.eos_token_id = None
    with torch.inference_mode():
        ids = inputs["input_ids"][:, cut:]
        out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                                image_attention_mask=inputs["image_attention_mask"][:, cut:], do_sample=False,
                                max_new_tokens=6, pad_token_id=0)  # fmt: skip
    assert got == out[0, ids.shape[1]:].tolist()
