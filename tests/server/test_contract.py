"""The HTTP contract over a real socket: the OpenAPI document lists every error status a route
answers (with the right error body), 405 keeps `Allow`, /health is the JSON it documents,
/info's sizes, idle gauges, disconnect counting, and what strict JSON refuses."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from lmport.server.openapi import ROUTE_ERRORS
from lmport.testing.http_checks import error_of, metric_value, post, wait_until_idle

GEN = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 3}}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def spec(server):
    return httpx.get(f"{server.url}/api-doc/openapi.json").json()


def test_every_documented_operation_is_in_the_error_table(spec):
    operations = {(method, path) for path, ops in spec["paths"].items() for method in ops}
    assert operations == set(ROUTE_ERRORS)


def test_error_statuses_and_bodies_per_route(spec):
    for (method, path), statuses in ROUTE_ERRORS.items():
        responses = spec["paths"][path][method]["responses"]
        errors = {int(code) for code in responses if not code.startswith("2")}
        assert errors == set(statuses), (method, path)
        shape = "OpenAIErrorResponse" if path.startswith("/v1/") else "ErrorResponse"
        for code in errors:
            assert responses[str(code)]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{shape}"}
        assert "security" not in spec["paths"][path][method]  # no --api-key on this server
    schemas = spec["components"]["schemas"]
    assert set(schemas["ErrorResponse"]["required"]) == {"error", "error_type"}
    detail = schemas["OpenAIErrorDetail"]
    assert set(detail["properties"]) == {"message", "type", "param", "code"}
    assert "HTTPValidationError" not in schemas  # FastAPI's 422 body is never what we answer


def test_documented_statuses_are_the_ones_answered(server, spec):
    """One real request per documented error status the server can be made to answer here."""
    for path in ("/generate", "/generate_stream", "/", "/tokenize", "/chat_tokenize", "/v1/chat/completions", "/v1/completions"):
        assert "400" in spec["paths"][path]["post"]["responses"]
        response = post(server, path, b"{not json")
        assert response.status_code == 400
        error_of(response)
        response = post(server, path, {"inputs": 5, "messages": 5, "prompt": {}})
        assert response.status_code == 422
        error_of(response)


def test_405_keeps_allow_and_404_is_json(server):
    with httpx.Client(base_url=server.url) as client:
        response = client.delete("/generate")
        assert response.status_code == 405 and response.headers["allow"] == "POST"
        assert error_of(response)[1] == "method_not_allowed"
        response = client.put("/v1/completions")
        assert response.status_code == 405 and response.headers["allow"] == "POST"
        assert response.json()["error"]["code"] == "method_not_allowed"
        missing = client.get("/v1/nothing-here")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
        assert error_of(client.get("/nothing-here"))[1] == "not_found"


def test_health_answers_the_documented_json(server, spec):
    with httpx.Client(base_url=server.url) as client:
        for path in ("/health", "/", "/ping"):
            response = client.get(path)
            assert response.status_code == 200 and response.json() == {"status": "ok"}
            assert response.headers["content-type"] == "application/json"
    ok = spec["paths"]["/health"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/HealthResponse"}


def test_info_reports_the_kv_cache_size_the_engine_settled_on(start_server):
    server = start_server(max_batch_total_tokens=None)  # sized at start, as most users run it
    info = httpx.get(f"{server.url}/info").json()
    stats = server.state.engine.stats()
    assert info["max_batch_total_tokens"] == stats.kv_blocks_total * server.state.model.block_size > 0
    assert httpx.get(f"{server.url}/info").json()["max_batch_total_tokens"] == info["max_batch_total_tokens"]


def test_batch_gauge_returns_to_zero_when_idle(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        with client.stream("POST", "/generate_stream", json={"inputs": "The quick", "parameters": {"max_new_tokens": 200}}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    assert metric_value(client.get("/metrics").text, "tgi_batch_current_size") >= 1
                    break
        wait_until_idle(server)
        assert client.post("/generate", json=GEN).status_code == 200
        wait_until_idle(server)
        assert metric_value(client.get("/metrics").text, "tgi_batch_current_size") == 0


@pytest.mark.parametrize("path, body", [
    ("/generate_stream", {"inputs": "The quick", "parameters": {"max_new_tokens": 300}}),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 300, "stream": True}),
    ("/v1/completions", {"prompt": "The quick", "max_tokens": 300, "stream": True}),
])
def test_stream_disconnects_are_counted(server, path, body):
    name = 'tgi_request_failure{err="disconnected"}'
    with httpx.Client(base_url=server.url, timeout=60) as client:
        before = metric_value(client.get("/metrics").text, name)
        with client.stream("POST", path, json=body) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    break  # leave mid-stream
        wait_until_idle(server)
        deadline = time.monotonic() + 10
        while metric_value(client.get("/metrics").text, name) < before + 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert metric_value(client.get("/metrics").text, name) == before + 1
        # a stream read to its end is not a disconnect
        with client.stream("POST", path, json={**body, "max_tokens": 2, "parameters": {"max_new_tokens": 2}}) as stream:
            assert stream.status_code == 200
            list(stream.iter_lines())
        assert metric_value(client.get("/metrics").text, name) == before + 1


NON_FINITE = [
    ("/generate", '{"inputs": "x", "parameters": {"temperature": NaN}}', "parameters.temperature"),
    ("/generate", '{"inputs": "x", "parameters": {"top_p": Infinity}}', "parameters.top_p"),
    ("/generate", '{"inputs": "x", "parameters": {"repetition_penalty": -Infinity}}', "parameters.repetition_penalty"),
    ("/generate_stream", '{"inputs": "x", "parameters": {"frequency_penalty": 1e999}}', "parameters.frequency_penalty"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "temperature"),
    ("/v1/completions", '{"prompt": "x", "presence_penalty": Infinity}', "presence_penalty"),
    ("/v1/completions", '{"prompt": "x", "logit_bias": {"5": NaN}}', "logit_bias.5"),
]


@pytest.mark.parametrize("path, body, field", NON_FINITE)
def test_non_finite_numbers_are_422(server, path, body, field):
    response = post(server, path, body)
    assert response.status_code == 422, response.text
    message, kind = error_of(response)
    assert kind == "validation" and message.startswith(f"{field}: ") and "not a finite number" in message
    if path.startswith("/v1/"):
        assert response.json()["error"]["param"] == field


@pytest.mark.parametrize("path, body", [
    ("/tokenize", '{"inputs": "a\\ud800b"}'),
    ("/chat_tokenize", '{"messages": [{"role": "user", "content": "\\udfff"}]}'),
    ("/generate", '{"inputs": "\\ud800"}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}'),
    ("/v1/completions", '{"prompt": ["ok", "\\udc00"]}'),
    ("/generate", '{"inputs": "x", "parameters": {"\\ud800": 1}}'),
])
def test_lone_surrogates_are_422_not_500(server, path, body):
    response = post(server, path, body)
    assert response.status_code == 422, response.text
    message, kind = error_of(response)
    assert kind == "validation" and "lone surrogate" in message
    # a real astral character, escaped as a surrogate pair, is fine
    assert post(server, "/tokenize", '{"inputs": "\\ud83d\\ude00"}').status_code == 200


def test_deep_nesting_and_huge_numbers_are_422(server):
    deep = '{"inputs": "x", "parameters": {"grammar": {"type": "json", "value": ' + "[" * 200 + "]" * 200 + "}}}"
    response = post(server, "/generate", deep)
    assert response.status_code == 422 and "nests deeper than 64 levels" in error_of(response)[0]
    response = post(server, "/generate", '{"inputs": "x", "parameters": {"seed": ' + "9" * 5000 + "}}")
    assert response.status_code == 422 and error_of(response)[1] == "validation"
    response = post(server, "/v1/completions", json.dumps({"prompt": "x", "stop": [[[["a"]]]]}))
    assert response.status_code == 422  # wrong shape, shallow: pydantic's own message
    assert post(server, "/generate", GEN).status_code == 200


LIMITS = [  # (route, body, message start, where the document states the limit)
    ("/generate", {"inputs": "x", "parameters": {"stop": ["a"] * 5}}, "`stop` supports up to 4 stop sequences. Given: 5",
     ("GenerateParameters", "stop", "maxItems", 4)),
    ("/generate", {"inputs": "x", "parameters": {"stop": ["s" * 513]}}, "`stop` sequences must be at most 512 characters long. Given: 513",
     ("GenerateParameters", "stop", "items.maxLength", 512)),
    ("/v1/chat/completions", {**CHAT, "stop": "s" * 600}, "`stop` sequences must be at most 512 characters long. Given: 600",
     ("ChatRequest", "stop", "maxLength", 512)),
    ("/v1/chat/completions", {**CHAT, "n": 129}, "`n` must be >= 1 and <= 128. Given: 129", ("ChatRequest", "n", "maximum", 128)),
    ("/generate", {"inputs": "x", "parameters": {"best_of": 3, "do_sample": True}}, "`best_of` must be > 0 and <= 2. Given: 3",
     ("GenerateParameters", "best_of", "maximum", 2)),
    ("/generate", {"inputs": "x", "parameters": {"top_n_tokens": 6}}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6",
     ("GenerateParameters", "top_n_tokens", "maximum", 5)),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, "`logprobs` must be >= 0 and <= 5. Given: 6",
     ("CompletionRequest", "logprobs", "maximum", 5)),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6",
     ("ChatRequest", "top_logprobs", "maximum", 5)),
]


def documented(spec, component: str, field: str, keyword: str):
    schema = spec["components"]["schemas"][component]["properties"][field]
    for branch in schema.get("anyOf", [schema]):
        node = branch
        for part in keyword.split(".")[:-1]:
            node = node.get(part, {})
        if keyword.split(".")[-1] in node:
            return node[keyword.split(".")[-1]]
    return None


@pytest.mark.parametrize("path, body, message, where", LIMITS, ids=[f"{c[3][0]}.{c[3][1]}.{c[3][2]}" for c in LIMITS])
def test_request_limits_answer_422_and_are_documented(server, spec, path, body, message, where):
    response = post(server, path, body)
    assert response.status_code == 422, response.text
    text, kind = error_of(response)
    assert kind == "validation" and text.startswith(message), text
    component, field, keyword, value = where
    assert documented(spec, component, field, keyword) == value
