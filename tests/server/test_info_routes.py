"""/info, /health, /docs, /tokenize, /chat_tokenize and TGI's timing headers."""

from __future__ import annotations

import httpx
import pytest


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def test_info_has_tgi_fields_and_backend(client, server):
    info = client.get("/info").json()
    assert info["model_id"] == "tiny-llama"
    assert info["model_dtype"] == "float32" and info["model_device_type"] == "cpu"
    assert info["max_total_tokens"] == 512 and info["max_input_tokens"] == 511
    assert info["max_best_of"] == 2 and info["max_stop_sequences"] == 4 and info["max_concurrent_requests"] == 128
    assert info["version"] and info["router"] == "lmport"
    assert info["backend"]["name"] == "cpu"
    host = server.state.host
    assert info["capabilities"] == host.capabilities().to_dict()
    assert info["server_info"] == host.server_info()
    assert info["fallbacks"] == host.fallbacks
    assert info["modality"] == "text" and "max_images_per_request" not in info
    assert client.get("/v1/models").json()["data"][0]["modality"] == "text"


def test_health_and_docs(client):
    assert client.get("/health").status_code == 200
    assert client.get("/").status_code == 200  # TGI answers health on GET /
    assert client.get("/docs").status_code == 200
    spec = client.get("/api-doc/openapi.json").json()
    for path in ("/generate", "/generate_stream", "/", "/tokenize", "/chat_tokenize", "/info", "/health", "/metrics",
                 "/v1/chat/completions", "/v1/completions", "/v1/models"):
        assert path in spec["paths"], path


def test_health_is_503_until_warmed_up(server):
    server.state.ready = False
    try:
        response = httpx.get(f"{server.url}/health")
        assert response.status_code == 503
        assert response.json()["error_type"] == "healthcheck"
    finally:
        server.state.ready = True


def test_tokenize_offsets(client, tiny_llama):
    text = "The quick brown fox"
    tokens = client.post("/tokenize", json={"inputs": text}).json()
    assert [t["id"] for t in tokens] == tiny_llama[2](text)["input_ids"]
    assert "".join(t["text"] for t in tokens) == text
    assert all(text[t["start"]:t["stop"]] == t["text"] for t in tokens)


def test_chat_tokenize_applies_the_template(client, tiny_llama):
    messages = [{"role": "user", "content": "hi"}]
    body = client.post("/chat_tokenize", json={"messages": messages}).json()
    tokenizer = tiny_llama[2]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert body["templated_text"] == expected
    assert [t["id"] for t in body["tokenize_response"]] == tokenizer(expected, add_special_tokens=False)["input_ids"]


def test_generate_timing_headers(client, tiny_llama):
    response = client.post("/generate", json={"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 5}})
    headers = response.headers
    assert headers["x-prompt-tokens"] == str(len(tiny_llama[2]("The quick brown fox")["input_ids"]))
    generated = int(headers["x-generated-tokens"])
    assert 1 <= generated <= 5
    for name in ("x-total-time", "x-validation-time", "x-queue-time", "x-inference-time", "x-time-per-token"):
        assert int(headers[name]) >= 0, name
    assert int(headers["x-total-time"]) >= int(headers["x-inference-time"])
    assert float(headers["x-compute-time"]) * 1000 >= int(headers["x-total-time"])
    assert headers["x-compute-type"] and headers["x-compute-characters"] == str(len("The quick brown fox"))


def test_return_full_text_and_compat_list(client):
    body = {"inputs": "The quick", "parameters": {"max_new_tokens": 3}}
    plain = client.post("/generate", json=body).json()["generated_text"]
    full = client.post("/generate", json={**body, "parameters": {**body["parameters"], "return_full_text": True}}).json()
    assert full["generated_text"] == "The quick" + plain
    compat = client.post("/", json={**body, "parameters": {**body["parameters"], "return_full_text": False}}).json()
    assert compat == [{"generated_text": plain}]
