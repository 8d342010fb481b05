"""Idefics (v1) over HTTP on a live server (the engine in its own process): TGI's markdown images
through ``text_generation.Client``, OpenAI ``image_url`` parts through the ``openai`` SDK, several
images per prompt, batched with text-only requests, against transformers' ``generate`` on the
processor's own prompt list; a text part that is a bare URL (which the processor would fetch)
answers 422."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from lmport.testing.tiny_vision import data_uri, tiny_image

text_generation = pytest.importorskip("text_generation")
openai = pytest.importorskip("openai")

WIDE, TALL = tiny_image(0, 70, 40), tiny_image(1, 30, 64)
MAX_NEW = 6


@pytest.fixture(scope="module")
def server(idefics, live_server):
    with live_server(idefics[0], "tiny-idefics") as thread:
        yield thread


def test_info_and_models_tell_the_modality(server):
    assert httpx.get(f"{server.url}/info").json()["modality"] == "image-text"
    assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["modality"] == "image-text"


def test_tgi_client_images_batched_with_text_equal_transformers(server, hf_idefics_greedy, idefics_prompts):
    async def run():
        client = text_generation.AsyncClient(server.url, timeout=60)
        return await asyncio.gather(
            client.generate(f"A ![]({data_uri(WIDE)}) and ![]({data_uri(TALL)}) compared", max_new_tokens=MAX_NEW),
            client.generate("The quick brown fox", max_new_tokens=MAX_NEW),
            client.generate(f"Describe ![]({data_uri(TALL)})", max_new_tokens=MAX_NEW),
        )

    two, text, one = asyncio.run(run())
    assert [t.id for t in two.details.tokens] == hf_idefics_greedy(["A", WIDE, "and", TALL, "compared"], MAX_NEW)[0]
    assert [t.id for t in one.details.tokens] == hf_idefics_greedy(["Describe", TALL], MAX_NEW)[0]
    text_ids = idefics_prompts.processor.tokenizer("The quick brown fox")["input_ids"]
    assert [t.id for t in text.details.tokens] == hf_idefics_greedy(list(text_ids), MAX_NEW)[0]
    client = text_generation.Client(server.url, timeout=60)
    events = list(client.generate_stream(f"Describe ![]({data_uri(TALL)})", max_new_tokens=MAX_NEW))
    assert [e.token.id for e in events] == [t.id for t in one.details.tokens]


def test_openai_chat_image_url_parts_equal_transformers(server, hf_idefics_greedy, idefics_prompts):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60)
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What is in "},
        {"type": "image_url", "image_url": {"url": data_uri(TALL)}},
        {"type": "text", "text": " and "},
        {"type": "image_url", "image_url": {"url": data_uri(WIDE)}},
        {"type": "text", "text": "?"},
    ]}]  # fmt: skip
    tokenizer = idefics_prompts.processor.tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is in <image> and <image>?"}], tokenize=False, add_generation_prompt=True
    )
    prompt = prompt.removeprefix(tokenizer.bos_token)  # the processor starts the prompt with BOS itself
    first, second, last = prompt.split("<image>")
    items = [first, TALL, second, WIDE, last]
    expected, _ = hf_idefics_greedy(items, MAX_NEW)
    reply = client.chat.completions.create(model="tiny-idefics", messages=messages, max_tokens=MAX_NEW, temperature=0)
    assert reply.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert reply.usage.prompt_tokens == len(idefics_prompts.processor(text=[items])["input_ids"][0])
    assert reply.usage.completion_tokens == MAX_NEW


def test_a_text_part_that_is_a_bare_url_answers_422(server):
    response = httpx.post(f"{server.url}/generate", json={
        "inputs": f"![]({data_uri(WIDE)}) https://example.com/cat.png", "parameters": {"max_new_tokens": 2}})  # fmt: skip
    assert response.status_code == 422, response.text
    assert "is a bare URL" in response.json()["error"]
