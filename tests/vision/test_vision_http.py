"""Images over HTTP on a live server (the engine in its own process, so images cross the pipe
as data): TGI's markdown images through ``text_generation.Client``, OpenAI ``image_url`` parts
through the ``openai`` SDK, batched with text-only requests; the 422s for bad images."""

from __future__ import annotations

import asyncio
import base64

import httpx
import pytest
import torch

from lmport.models.image_prompts import PromptImage
from lmport.server.images import MARKDOWN_IMAGE, image_digest
from lmport.testing.tiny_vision import data_uri, tiny_image

text_generation = pytest.importorskip("text_generation")
openai = pytest.importorskip("openai")

WIDE, TALL = tiny_image(0, 70, 40), tiny_image(1, 30, 64)
MAX_NEW = 6


@pytest.fixture(scope="module")
def server(llava_next, live_server):
    with live_server(llava_next[0], "tiny-llava-next") as thread:
        yield thread


def test_info_and_models_tell_the_modality(server):
    info = httpx.get(f"{server.url}/info").json()
    assert info["modality"] == "image-text"
    assert info["max_images_per_request"] == 4 and info["allow_remote_images"] is False
    assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["modality"] == "image-text"


def test_tgi_client_markdown_images_equal_transformers(server, hf_image_greedy):
    client = text_generation.Client(server.url, timeout=60)
    inputs = f"A ![]({data_uri(WIDE)}) and ![]({data_uri(TALL)}) compared"
    response = client.generate(inputs, max_new_tokens=MAX_NEW)
    expected, _ = hf_image_greedy("A <image> and <image> compared", [WIDE, TALL], MAX_NEW)
    assert [t.id for t in response.details.tokens] == expected
    events = list(client.generate_stream(inputs, max_new_tokens=MAX_NEW))
    assert [e.token.id for e in events] == expected


def test_images_batched_with_text_requests(server, hf_image_greedy):
    async def run():
        client = text_generation.AsyncClient(server.url, timeout=60)
        return await asyncio.gather(
            client.generate(f"Describe ![]({data_uri(WIDE)})", max_new_tokens=MAX_NEW),
            client.generate("The quick brown fox", max_new_tokens=MAX_NEW),
            client.generate(f"Describe ![]({data_uri(TALL)})", max_new_tokens=MAX_NEW),
        )

    wide, text, tall = asyncio.run(run())
    assert [t.id for t in wide.details.tokens] == hf_image_greedy("Describe <image>", [WIDE], MAX_NEW)[0]
    assert [t.id for t in tall.details.tokens] == hf_image_greedy("Describe <image>", [TALL], MAX_NEW)[0]
    assert [t.id for t in text.details.tokens] == hf_image_greedy("The quick brown fox", [], MAX_NEW)[0]


def test_openai_chat_image_url_parts_equal_transformers(server, hf_image_greedy, image_prompts):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60)
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What is in "},
        {"type": "image_url", "image_url": {"url": data_uri(TALL)}},
        {"type": "text", "text": " this picture?"},
    ]}]
    tokenizer = image_prompts.processor.tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is in <image> this picture?"}], tokenize=False, add_generation_prompt=True
    )
    expected, _ = hf_image_greedy(prompt, [TALL], MAX_NEW)
    reply = client.chat.completions.create(model="tiny-llava-next", messages=messages, max_tokens=MAX_NEW, temperature=0)
    assert reply.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert reply.usage.completion_tokens == MAX_NEW
    assert reply.usage.prompt_tokens == len(image_prompts.processor(text=[prompt], images=[TALL])["input_ids"][0])
    chunks = client.chat.completions.create(
        model="tiny-llava-next", messages=messages, max_tokens=MAX_NEW, temperature=0, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content


def test_openai_completions_read_markdown_images(server, hf_image_greedy, image_prompts):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60)
    reply = client.completions.create(
        model="tiny-llava-next", prompt=[f"Describe ![]({data_uri(WIDE)})", "The quick brown fox"], max_tokens=MAX_NEW, temperature=0
    )
    tokenizer = image_prompts.processor.tokenizer
    texts = [c.text for c in sorted(reply.choices, key=lambda c: c.index)]
    assert texts[0] == tokenizer.decode(hf_image_greedy("Describe <image>", [WIDE], MAX_NEW)[0], skip_special_tokens=True)
    assert texts[1] == tokenizer.decode(hf_image_greedy("The quick brown fox", [], MAX_NEW)[0], skip_special_tokens=True)


@pytest.mark.parametrize(
    "image, message",
    [
        ("data:image/png;base64,@@not-base64@@", "invalid base64"),
        ("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(), "could not be decoded"),
        ("data:text/plain;base64,aGVsbG8=", "image/*"),
        ("https://example.com/cat.png", "--allow-remote-images"),
        ("file:///etc/passwd", "--allow-remote-images"),
    ],
)
def test_bad_images_answer_422(server, image, message):
    response = httpx.post(f"{server.url}/generate", json={"inputs": f"look ![]({image})", "parameters": {"max_new_tokens": 2}})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error_type"] == "validation"
    assert message in body["error"]


def test_too_many_images_answer_422(server):
    inputs = " ".join(f"![]({data_uri(WIDE)})" for _ in range(5))
    response = httpx.post(f"{server.url}/generate", json={"inputs": inputs, "parameters": {"max_new_tokens": 2}})
    assert response.status_code == 422
    assert "at most 4 images" in response.json()["error"]


def test_placeholder_without_an_image_answers_422(server):
    response = httpx.post(f"{server.url}/generate", json={"inputs": "a bare <image> token", "parameters": {"max_new_tokens": 2}})
    assert response.status_code == 422
    assert "1 image placeholders" in response.json()["error"]


def test_a_bad_image_does_not_harm_the_next_request(server, hf_image_greedy):
    bad = httpx.post(f"{server.url}/generate", json={"inputs": "![](data:image/png;base64,AAAA)", "parameters": {"max_new_tokens": 2}})
    assert bad.status_code == 422
    client = text_generation.Client(server.url, timeout=60)
    good = client.generate(f"Describe ![]({data_uri(WIDE)})", max_new_tokens=MAX_NEW)
    assert [t.id for t in good.details.tokens] == hf_image_greedy("Describe <image>", [WIDE], MAX_NEW)[0]


def test_truncate_keeps_the_images_or_answers_422(server, llava_next, image_prompts):
    inputs = f"Some words to cut away before ![]({data_uri(WIDE)}) and after"
    ids, images = image_prompts.build(
        MARKDOWN_IMAGE.sub(image_prompts.placeholder, inputs), [PromptImage(WIDE.convert("RGB"), image_digest(WIDE.convert("RGB")))]
    )
    start, _ = images.spans[0]
    keep = len(ids) - start + 2  # drops all but two tokens before the image
    response = httpx.post(f"{server.url}/generate", json={
        "inputs": inputs, "parameters": {"max_new_tokens": MAX_NEW, "truncate": keep, "details": True}})
    assert response.status_code == 200, response.text
    _, hf_model = llava_next
    pixels = image_prompts.processor(text=[image_prompts.placeholder], images=[WIDE], return_tensors="pt")
    with torch.inference_mode():
        hf_model.generation_config.eos_token_id = None
        out = hf_model.generate(input_ids=torch.tensor([ids[-keep:]]), pixel_values=pixels["pixel_values"],
                                image_sizes=pixels["image_sizes"], do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=0)
    assert [t["id"] for t in response.json()["details"]["tokens"]] == out[0, keep:].tolist()
    cut = httpx.post(f"{server.url}/generate", json={"inputs": inputs, "parameters": {"max_new_tokens": 2, "truncate": keep - 5}})
    assert cut.status_code == 422 and "cut into the prompt's images" in cut.json()["error"]
