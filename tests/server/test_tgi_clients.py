"""TGI's own clients against a live server: greedy outputs equal transformers' ``generate``.

``text_generation`` (sync and async, generate and generate_stream) posts to ``/``;
``huggingface_hub.InferenceClient.text_generation`` does too. Token ids are compared, not
only text, and the streamed tokens must add up to the final text.
"""

from __future__ import annotations

import asyncio

import pytest

text_generation = pytest.importorskip("text_generation")

PROMPTS = ["The quick brown fox", "Servers stream tokens", "héllo wörld ☃"]
MAX_NEW = 12


def prompt_ids(tiny_llama, prompt: str) -> list[int]:
    return tiny_llama[2](prompt)["input_ids"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_sync_generate_equals_transformers(server, tiny_llama, hf_reference, prompt):
    client = text_generation.Client(server.url, timeout=60)
    response = client.generate(prompt, max_new_tokens=MAX_NEW, decoder_input_details=True)
    expected_ids, expected_text = hf_reference(prompt_ids(tiny_llama, prompt), MAX_NEW)
    assert [t.id for t in response.details.tokens] == expected_ids
    assert response.generated_text == expected_text
    assert response.details.generated_tokens == len(expected_ids)
    assert response.details.finish_reason.value in ("length", "eos_token")
    assert [t.id for t in response.details.prefill] == prompt_ids(tiny_llama, prompt)
    assert response.details.prefill[0].logprob is None
    assert all(t.logprob is not None and t.logprob <= 0 for t in response.details.prefill[1:])


def test_sync_generate_stream_equals_transformers(server, tiny_llama, hf_reference):
    client = text_generation.Client(server.url, timeout=60)
    prompt = PROMPTS[0]
    events = list(client.generate_stream(prompt, max_new_tokens=MAX_NEW))
    expected_ids, expected_text = hf_reference(prompt_ids(tiny_llama, prompt), MAX_NEW)
    assert [e.token.id for e in events] == expected_ids
    assert all(e.generated_text is None for e in events[:-1])
    assert events[-1].generated_text == expected_text
    assert "".join(e.token.text for e in events if not e.token.special) == expected_text
    assert events[-1].details.generated_tokens == len(expected_ids)


def test_async_client_generate_and_stream(server, tiny_llama, hf_reference):
    client = text_generation.AsyncClient(server.url, timeout=60)
    prompt = PROMPTS[1]
    expected_ids, expected_text = hf_reference(prompt_ids(tiny_llama, prompt), MAX_NEW)

    async def run():
        response = await client.generate(prompt, max_new_tokens=MAX_NEW)
        streamed = [e async for e in client.generate_stream(prompt, max_new_tokens=MAX_NEW)]
        return response, streamed

    response, streamed = asyncio.run(run())
    assert [t.id for t in response.details.tokens] == expected_ids
    assert response.generated_text == expected_text
    assert [e.token.id for e in streamed] == expected_ids
    assert streamed[-1].generated_text == expected_text


def test_top_n_tokens_and_logprobs_are_consistent(server):
    client = text_generation.Client(server.url, timeout=60)
    response = client.generate(PROMPTS[0], max_new_tokens=4, top_n_tokens=3)
    assert len(response.details.top_tokens) == 4
    for token, top in zip(response.details.tokens, response.details.top_tokens):
        assert len(top) == 3
        assert top[0].id == token.id  # greedy: the chosen token is the most likely one
        assert top[0].logprob == pytest.approx(token.logprob, abs=1e-5)
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)


def test_seeded_sampling_is_reproducible(server):
    client = text_generation.Client(server.url, timeout=60)
    a = client.generate(PROMPTS[0], max_new_tokens=8, do_sample=True, temperature=1.5, seed=7)
    b = client.generate(PROMPTS[0], max_new_tokens=8, do_sample=True, temperature=1.5, seed=7)
    assert [t.id for t in a.details.tokens] == [t.id for t in b.details.tokens]
    assert a.details.seed == 7


def test_best_of_returns_the_other_sequences(server):
    client = text_generation.Client(server.url, timeout=60)
    response = client.generate(PROMPTS[0], max_new_tokens=5, best_of=2, do_sample=True)
    assert len(response.details.best_of_sequences) == 1
    other = response.details.best_of_sequences[0]
    best_sum = sum(t.logprob for t in response.details.tokens)
    other_sum = sum(t.logprob for t in other.tokens)
    assert best_sum >= other_sum - 1e-4


def test_stop_sequence_is_kept_in_tgi_text(server, tiny_llama, hf_reference):
    client = text_generation.Client(server.url, timeout=60)
    prompt = PROMPTS[0]
    _, full_text = hf_reference(prompt_ids(tiny_llama, prompt), MAX_NEW)
    stop = full_text[3:5]
    assert stop, "the reference continuation is too short to pick a stop string from"
    response = client.generate(prompt, max_new_tokens=MAX_NEW, stop_sequences=[stop])
    assert response.details.finish_reason.value == "stop_sequence"
    # TGI keeps the stop sequence: the text is the greedy text up to the token that completed it
    assert stop in response.generated_text
    assert full_text.startswith(response.generated_text)
    assert len(response.generated_text) < len(full_text)


def test_inference_client_text_generation(server, tiny_llama, hf_reference):
    from huggingface_hub import InferenceClient

    client = InferenceClient(model=server.url, timeout=60)
    prompt = PROMPTS[2]
    expected_ids, expected_text = hf_reference(prompt_ids(tiny_llama, prompt), MAX_NEW)
    text = client.text_generation(prompt, max_new_tokens=MAX_NEW, return_full_text=False)
    assert text == expected_text
    details = client.text_generation(prompt, max_new_tokens=MAX_NEW, details=True)
    assert [t.id for t in details.details.tokens] == expected_ids
    streamed = list(client.text_generation(prompt, max_new_tokens=MAX_NEW, stream=True, details=True))
    assert [e.token.id for e in streamed] == expected_ids
    assert streamed[-1].generated_text.endswith(expected_text)
    # POST / defaults to return_full_text=true for a model without a hub pipeline tag, like TGI
    assert client.text_generation(prompt, max_new_tokens=MAX_NEW) == prompt + expected_text
