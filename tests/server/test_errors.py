"""Every error the server answers, over a real socket: TGI's status codes, ``error_type`` and
messages (router/src/validation.rs), and never a 500 for a malformed body."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from lmport.testing.http_checks import error_of, post

GEN = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 4}}


def with_params(**params):
    return {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 4, **params}}


VALIDATION_CASES = [
    (with_params(temperature=0.0), "`temperature` must be strictly positive"),
    (with_params(temperature=-1.0), "`temperature` must be strictly positive"),
    (with_params(repetition_penalty=0.0), "`repetition_penalty` must be strictly positive"),
    (with_params(frequency_penalty=2.5), "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    (with_params(top_p=1.0), "`top_p` must be > 0.0 and < 1.0"),
    (with_params(top_p=0.0), "`top_p` must be > 0.0 and < 1.0"),
    (with_params(typical_p=1.0), "`typical_p` must be > 0.0 and < 1.0"),
    (with_params(top_k=0), "`top_k` must be strictly positive"),
    (with_params(top_k=-3), "`top_k` must be strictly positive"),
    (with_params(max_new_tokens=0), "`max_new_tokens` must be strictly positive"),
    (with_params(stop=["a", "b", "c", "d", "e"]), "`stop` supports up to 4 stop sequences. Given: 5"),
    (with_params(top_n_tokens=6), "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    (with_params(truncate=0), "`truncate` must be strictly positive and less than 511. Given: 0"),
    (with_params(truncate=600), "`truncate` must be strictly positive and less than 511. Given: 600"),
    (with_params(best_of=2), "you must use sampling when `best_of` is > 1"),
    (with_params(best_of=3, do_sample=True), "`best_of` must be > 0 and <= 2. Given: 3"),
    (with_params(best_of=2, do_sample=True, seed=1), "`seed` must not be set when `best_of` > 1"),
    (with_params(max_new_tokens=600), "`inputs` tokens + `max_new_tokens` must be <= 512. Given: "),
    ({"inputs": "", "parameters": {"max_new_tokens": 4}}, "`inputs` cannot be empty"),
    (with_params(grammar={"type": "regex", "value": "[a-z"}), "the regex cannot be used for constrained decoding"),
    (with_params(grammar={"type": "json", "value": {"not": {}}}), "the JSON schema cannot be used for constrained decoding"),
]


@pytest.mark.parametrize("body, message", VALIDATION_CASES, ids=[c[1][:40] for c in VALIDATION_CASES])
def test_validation_errors_match_tgi(server, body, message):
    response = post(server, "/generate", body)
    assert response.status_code == 422
    assert response.json()["error_type"] == "validation"
    assert response.json()["error"].startswith(message)


def test_input_too_long(server, tiny_llama):
    tokenizer = tiny_llama[2]
    prompt = "fox " * 600
    n = len(tokenizer(prompt)["input_ids"])
    response = post(server, "/generate", {"inputs": prompt, "parameters": {"max_new_tokens": 1}})
    assert response.status_code == 422
    assert response.json()["error"] == f"`inputs` tokens + `max_new_tokens` must be <= 512. Given: {n} `inputs` tokens and 1 `max_new_tokens`"
    prompt_tokens = len(tokenizer("The quick brown fox")["input_ids"])
    response = post(server, "/generate", with_params(max_new_tokens=600))
    assert response.json()["error"].endswith(f"Given: {prompt_tokens} `inputs` tokens and 600 `max_new_tokens`")


def test_streaming_refuses_best_of_and_prefill_details(server):
    response = post(server, "/generate_stream", with_params(best_of=2, do_sample=True))
    assert response.status_code == 422
    assert response.json()["error"] == "`best_of` != 1 is not supported when streaming tokens"
    response = post(server, "/generate_stream", with_params(decoder_input_details=True))
    assert response.json()["error"] == "`decoder_input_details` == true is not supported when streaming tokens"


def test_openai_routes_refuse_grammar_features(server):
    base = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    response = post(server, "/v1/chat/completions", {**base, "response_format": {"type": "xml"}})
    assert response.status_code == 422 and error_of(response)[1] == "validation"
    assert response.json()["error"]["type"] == "invalid_request_error"
    response = post(server, "/v1/completions", {"prompt": "x", "suffix": "y"})
    assert response.status_code == 422 and error_of(response)[1] == "suffix not supported"
    response = post(server, "/v1/completions", {"prompt": ["a"] * 5})
    assert response.status_code == 422 and "maximum allowed batch size of 4" in error_of(response)[0]


NOT_JSON = [b"{broken", "\u2603 not json".encode(), b'{"inputs": "x",}', b"\xff\xfe{}"]
MALFORMED = [
    b"",
    b"[1, 2, 3]",
    b'{"parameters": {"max_new_tokens": 4}}',
    b'{"inputs": 42}',
    b'{"inputs": "x", "parameters": {"max_new_tokens": "many"}}',
    b'{"inputs": "x", "parameters": {"max_new_tokens": -1}}',
    b'{"inputs": "x", "parameters": {"stop": "not-a-list"}}',
    b'{"inputs": "x", "parameters": {"seed": -5}}',
    b'{"inputs": "x", "parameters": {"top_k": 1.5}}',
    b'{"inputs": "x", "parameters": {"top_k": true}}',  # serde takes no bool for a number; pydantic's lax int did
    b'{"inputs": "x", "parameters": {"repetition_penalty": true}}',
    b'{"inputs": "x", "parameters": {"temperature": "0.5"}}',
    b'{"prompt": "x", "messages": [{"role": "user", "content": "x"}], "max_tokens": true}',
    b'{"prompt": "x", "messages": [{"role": "user", "content": "x"}], "temperature": "0.5"}',
    b'{"inputs": "x", "parameters": {"grammar": {"type": "xml", "value": 1}}}',
    b'{"inputs": "x", "parameters": []}',
]
BODY_ROUTES = ["/generate", "/generate_stream", "/", "/tokenize", "/v1/chat/completions", "/v1/completions", "/chat_tokenize"]


@pytest.mark.parametrize("path", BODY_ROUTES)
@pytest.mark.parametrize("body", NOT_JSON, ids=range(len(NOT_JSON)))
def test_bodies_that_are_not_json_are_400(server, path, body):
    """TGI's router answers a JSON syntax error 400 (axum's JsonSyntaxError), wrong JSON 422."""
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    message, kind = error_of(response)
    assert kind == "validation" and message.startswith("request body is not valid JSON")


@pytest.mark.parametrize("path", BODY_ROUTES)
@pytest.mark.parametrize("body", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_bodies_are_422_never_500(server, path, body):
    response = post(server, path, body)
    if path == "/tokenize" and body.startswith(b'{"inputs": "x", "parameters": {'):
        assert response.status_code == 200, response.text  # /tokenize ignores `parameters` (as TGI)
        return
    if path == "/chat_tokenize" and b'"messages"' in body:
        assert response.status_code == 200, response.text  # it reads `messages` alone
        return
    assert response.status_code == 422, response.text
    message, kind = error_of(response)
    assert kind == "validation" and message


def test_chat_with_wrong_message_types(server):
    for messages in ([], [{"content": "no role"}], [{"role": "user", "content": 5}], "hello"):
        response = post(server, "/v1/chat/completions", {"messages": messages})
        assert response.status_code == 422, response.text


def test_unknown_route_and_method_are_json(server):
    with httpx.Client(base_url=server.url) as client:
        assert client.get("/nope").json()["error_type"] == "not_found"
        assert client.get("/generate").status_code == 405


def test_overloaded_is_429(start_server):
    server = start_server(max_concurrent_requests=1)
    started = threading.Event()
    finished: list[int] = []

    def hold_one_stream():
        with httpx.Client(base_url=server.url, timeout=120) as client:
            with client.stream("POST", "/generate_stream", json=with_params(max_new_tokens=200)) as response:
                for _ in response.iter_lines():
                    started.set()
                finished.append(response.status_code)

    holder = threading.Thread(target=hold_one_stream)
    holder.start()
    assert started.wait(60)
    response = post(server, "/generate", GEN)
    holder.join(120)
    assert response.status_code == 429
    assert response.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    assert finished == [200]
    assert post(server, "/generate", GEN).status_code == 200  # the permit came back


@pytest.mark.parametrize("path, body", [
    ("/generate", GEN), ("/generate_stream", GEN), ("/", GEN), ("/tokenize", GEN),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
])
def test_api_key(start_server, path, body):
    server = start_server(api_key="s3cret")
    assert post(server, path, body).status_code == 401
    wrong = post(server, path, body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and error_of(wrong)[1] == "authentication"
    ok = post(server, path, body, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200, ok.text
    with httpx.Client(base_url=server.url) as client:  # probes and scrapers need no key
        assert client.get("/health").status_code == 200
        assert client.get("/info").status_code == 200


def test_input_longer_than_max_input_tokens(start_server, tiny_llama):
    server = start_server(payload_limit=1000, max_input_tokens=16)
    prompt = "fox " * 20
    n = len(tiny_llama[2](prompt)["input_ids"])
    assert n > 16
    response = post(server, "/generate", {"inputs": prompt, "parameters": {"max_new_tokens": 2}})
    assert response.status_code == 422
    assert response.json() == {"error": f"`inputs` must have less than 16 tokens. Given: {n}", "error_type": "validation"}
    # truncate keeps the prompt's last tokens, so the same prompt passes
    response = post(server, "/generate", {"inputs": prompt, "parameters": {"max_new_tokens": 2, "truncate": 10, "details": True}})
    assert response.status_code == 200
    assert response.headers["x-prompt-tokens"] == "10"


def test_payload_limit_is_413(start_server):
    server = start_server(payload_limit=1000, max_input_tokens=16)
    big = {"inputs": "x" * 2000, "parameters": {"max_new_tokens": 1}}
    response = post(server, "/generate", big)
    assert response.status_code == 413
    assert response.json()["error_type"] == "payload_limit"

    def chunks():  # no content-length: the limit applies as the body streams in
        data = json.dumps(big).encode()
        for i in range(0, len(data), 256):
            yield data[i:i + 256]

    with httpx.Client(base_url=server.url) as client:
        streamed = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    assert post(server, "/generate", GEN).status_code == 200


def test_generation_failure_is_424(start_server):
    server = start_server(max_best_of=3)  # a server of its own: its executor gets a fault
    runner = server.state.engine.engine.executor
    execute = runner.execute
    poison = server.state.tokenizer("poison pill")["input_ids"]

    def flaky(step):
        if any(e.num_prompt_tokens == len(poison) and e.token_ids == poison[e.start : e.start + e.num_new_tokens] for e in step.entries):
            raise RuntimeError("device fell over")
        return execute(step)

    runner.execute = flaky
    try:
        response = post(server, "/generate", {"inputs": "poison pill", "parameters": {"max_new_tokens": 3}})
        assert response.status_code == 424
        assert response.json()["error_type"] == "generation"
        assert response.json()["error"].startswith("Request failed during generation:")
        assert "device fell over" in response.json()["error"]
        with httpx.Client(base_url=server.url, timeout=60) as client:
            with client.stream("POST", "/generate_stream", json={"inputs": "poison pill", "parameters": {"max_new_tokens": 3}}) as stream:
                events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
        assert events[-1]["error_type"] == "generation"
        assert post(server, "/generate", GEN).status_code == 200  # other requests still run
    finally:
        runner.execute = execute


def test_dead_engine_fails_health_and_requests(start_server):
    server = start_server(max_best_of=4)  # a server of its own: its engine is shut down
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.get("/health").status_code == 200
        server.state.engine.shutdown()
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["error_type"] == "healthcheck"
        response = client.post("/generate", json=GEN)
    assert response.status_code == 424 and response.json()["error_type"] == "generation"


def test_token_id_prompts_outside_the_vocabulary_are_422_and_harm_no_one(server):
    """/v1/completions takes token ids: a negative one made the tokenizer's decode raise (500),
    one past the embedding failed the engine step of every request batched with it (424)."""
    vocab = server.state.engine.vocab_size
    for prompt in ([vocab, 3], [-1, 3], [[5, 6], [10**12]]):
        response = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 3})
        assert response.status_code == 422, response.text
        message, kind = error_of(response)
        assert kind == "validation" and "out of the vocabulary" in message
    assert post(server, "/v1/completions", {"prompt": [5, vocab - 1], "max_tokens": 3}).status_code == 200
    assert post(server, "/generate", GEN).status_code == 200
