"""The ``openai`` SDK and ``InferenceClient.chat_completion`` against a live server.

Chat prompts go through the tokenizer's chat template (``apply_chat_template``), so the
reference is transformers' greedy ``generate`` on the same templated ids. The tiny model's
``<|im_end|>`` ends a chat turn, so the reference stops on it too.
"""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox"}]
MAX_NEW = 10


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60)


@pytest.fixture(scope="module")
def chat_reference(tiny_llama, hf_reference):
    tokenizer = tiny_llama[2]
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    tokens, _ = hf_reference(list(ids), MAX_NEW)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if end_of_turn in tokens:  # the server also ends a chat reply on the end-of-turn token
        tokens = tokens[: tokens.index(end_of_turn) + 1]
    return list(ids), tokens, tokenizer.decode(tokens, skip_special_tokens=True)


def test_chat_completion_equals_transformers(client, chat_reference):
    prompt_ids, tokens, text = chat_reference
    response = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=MAX_NEW, temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == text
    assert choice.finish_reason in ("length", "stop")
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == len(tokens)
    assert response.usage.total_tokens == len(prompt_ids) + len(tokens)
    assert response.object == "chat.completion" and response.model == "tiny-llama"


def test_chat_stream_with_usage_and_logprobs(client, chat_reference):
    prompt_ids, tokens, text = chat_reference
    stream = client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=MAX_NEW, temperature=0, stream=True,
        stream_options={"include_usage": True}, logprobs=True, top_logprobs=2,
    )
    chunks = list(stream)
    content_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == text
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert content_chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)
    assert chunks[-1].usage.prompt_tokens == len(prompt_ids)
    logprobs = [lp for c in content_chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert len(logprobs) == len(tokens)
    for entry in logprobs:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)


def test_chat_n_and_seed(client):
    response = client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=6, n=3, seed=11, temperature=1.0
    )
    assert sorted(c.index for c in response.choices) == [0, 1, 2]
    again = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=6, n=3, seed=11, temperature=1.0)
    assert [c.message.content for c in response.choices] == [c.message.content for c in again.choices]


def test_completions_equal_transformers(client, tiny_llama, hf_reference):
    tokenizer = tiny_llama[2]
    prompts = ["The quick brown fox", "A chat template"]
    response = client.completions.create(model="tiny-llama", prompt=prompts, max_tokens=MAX_NEW, temperature=0)
    assert len(response.choices) == 2
    for prompt, choice in zip(prompts, sorted(response.choices, key=lambda c: c.index)):
        _, text = hf_reference(tokenizer(prompt)["input_ids"], MAX_NEW)
        assert choice.text == text


def test_completions_token_ids_echo_and_logprobs(client, tiny_llama, hf_reference):
    tokenizer = tiny_llama[2]
    ids = tokenizer("Servers stream tokens")["input_ids"]
    tokens, text = hf_reference(ids, MAX_NEW)
    response = client.completions.create(model="tiny-llama", prompt=ids, max_tokens=MAX_NEW, temperature=0, echo=True, logprobs=2)
    choice = response.choices[0]
    assert choice.text == tokenizer.decode(ids) + text
    assert len(choice.logprobs.tokens) == len(ids) + len(tokens)
    assert choice.logprobs.token_logprobs[0] is None
    assert all(lp is not None for lp in choice.logprobs.token_logprobs[1:])
    assert response.usage.prompt_tokens == len(ids)


def test_completions_stream(client, tiny_llama, hf_reference):
    tokenizer = tiny_llama[2]
    prompt = "The quick brown fox"
    _, text = hf_reference(tokenizer(prompt)["input_ids"], MAX_NEW)
    chunks = list(client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=MAX_NEW, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_openai_stop_sequence_is_cut(client, tiny_llama, hf_reference):
    tokenizer = tiny_llama[2]
    prompt = "The quick brown fox"
    _, full = hf_reference(tokenizer(prompt)["input_ids"], MAX_NEW)
    stop = full[4:6]
    expected = full[: full.find(stop)]
    response = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=MAX_NEW, temperature=0, stop=[stop])
    assert response.choices[0].text == expected
    assert response.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=MAX_NEW, temperature=0, stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]


def test_inference_client_chat_completion(server, chat_reference):
    from huggingface_hub import InferenceClient

    _, tokens, text = chat_reference
    client = InferenceClient(base_url=server.url, timeout=60)
    response = client.chat_completion(messages=MESSAGES, max_tokens=MAX_NEW, temperature=0)
    assert response.choices[0].message.content == text
    streamed = client.chat_completion(messages=MESSAGES, max_tokens=MAX_NEW, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text


def test_the_sdk_shows_the_servers_error_message(client, start_server):
    """OpenAI's error shape on /v1/*: the SDK's exception carries our message, not just the status."""
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=3, top_p=0.0)
    assert "`top_p` must be > 0.0 and < 1.0" in caught.value.message
    assert caught.value.body["code"] == "validation" and caught.value.body["type"] == "invalid_request_error"
    keyed = start_server(api_key="s3cret")
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="wrong", timeout=60).completions.create(
            model="tiny-llama", prompt="x", max_tokens=2)
    assert "Unauthorized" in caught.value.message and caught.value.body["type"] == "authentication_error"
    answer = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="s3cret", timeout=60).completions.create(
        model="tiny-llama", prompt="x", max_tokens=2)
    assert answer.choices[0].text is not None
