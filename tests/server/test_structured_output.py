"""Structured output through HTTP with the real clients: TGI's ``grammar`` (``text_generation``,
``huggingface_hub.InferenceClient``) and OpenAI's ``response_format`` (the ``openai`` SDK,
including ``chat.completions.parse`` with a pydantic model). Every finished output parses and
validates against its schema; regex outputs fullmatch; what cannot be compiled answers 422
naming the feature; a client leaving mid-constraint frees everything."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from lmport.testing.http_checks import error_of, post, wait_until_idle

openai = pytest.importorskip("openai")
text_generation = pytest.importorskip("text_generation")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}
REGEX = r"(cat|dog)-[0-9]{2}"
MESSAGES = [{"role": "user", "content": "Describe a person."}]
BUDGET = 64


class Person(BaseModel):
    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=99)
    color: Literal["red", "green", "blue"]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60, max_retries=0)


def test_tgi_client_json_grammar_and_streamed_regex(server):
    from text_generation.types import Grammar, GrammarType

    tgi = text_generation.Client(server.url, timeout=60)
    response = tgi.generate("The quick brown fox", max_new_tokens=BUDGET, grammar=Grammar(type=GrammarType.Json, value=PERSON))
    assert response.details.finish_reason.value == "eos_token"
    jsonschema.validate(json.loads(response.generated_text), PERSON)
    text = "".join(
        r.token.text for r in tgi.generate_stream("Servers", max_new_tokens=BUDGET, grammar=Grammar(type=GrammarType.Regex, value=REGEX))
        if not r.token.special
    )
    assert re.fullmatch(REGEX, text), text


def test_generate_takes_the_schema_as_json_text_and_tgi3s_json_schema_form(server):
    for grammar in ({"type": "json", "value": json.dumps(PERSON)}, {"type": "json_schema", "value": {"name": "p", "schema": PERSON}}):
        response = post(server, "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": BUDGET, "grammar": grammar}})
        assert response.status_code == 200, response.text
        jsonschema.validate(json.loads(response.json()["generated_text"]), PERSON)


def test_inference_client_grammar_and_response_format(server):
    from huggingface_hub import InferenceClient

    hub = InferenceClient(server.url, timeout=60)
    text = hub.text_generation("Hello", max_new_tokens=BUDGET, grammar={"type": "json", "value": PERSON}, return_full_text=False)
    jsonschema.validate(json.loads(text), PERSON)
    out = hub.chat_completion(
        MESSAGES, max_tokens=BUDGET, temperature=0.0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
    )
    assert out.choices[0].finish_reason == "stop", out.choices[0].message.content
    jsonschema.validate(json.loads(out.choices[0].message.content), PERSON)


def test_openai_json_schema_json_object_and_completions(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    chat = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=BUDGET, temperature=1.0, seed=3, n=2, response_format=fmt)
    assert len(chat.choices) == 2
    for choice in chat.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    obj = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=BUDGET, temperature=0, response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":  # any object may run past the budget with a random model
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:
        assert obj.choices[0].message.content.startswith("{")
    done = client.completions.create(model="m", prompt="Hello", max_tokens=BUDGET, temperature=0, extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(done.choices[0].text), PERSON)


def test_openai_stream_with_a_json_schema(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=BUDGET, temperature=0, stream=True, response_format=fmt))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_openai_parse_with_a_pydantic_model(client):
    parsed = client.chat.completions.parse(model="m", messages=MESSAGES, max_tokens=BUDGET, temperature=0, response_format=Person)
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person) and 0 <= person.age <= 99
    beta = getattr(getattr(client, "beta", None), "chat", None)
    if beta is not None and hasattr(beta.completions, "parse"):  # older SDKs: the beta path
        again = beta.completions.parse(model="m", messages=MESSAGES, max_tokens=BUDGET, temperature=0, response_format=Person)
        assert again.choices[0].message.parsed == person


def test_unsupported_schemas_answer_422_naming_the_feature(server, client):
    bad = {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}
    with pytest.raises(openai.UnprocessableEntityError, match='Unimplemented keys: \\["not"\\]'):
        client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4,
                                       response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}})  # fmt: skip
    response = post(server, "/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 4, "grammar": {"type": "regex", "value": "(a"}}})
    message, kind = error_of(response)
    assert response.status_code == 422 and kind == "validation" and "regex" in message
    response = post(server, "/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "xml"}})
    assert response.status_code == 422
    assert server.state.engine.stats().extra["requests"] == 0  # nothing reached the engine


def test_disable_grammar_support_refuses_grammars(start_server):
    server = start_server(disable_grammar_support=True)
    response = post(server, "/generate", {"inputs": "Hi", "parameters": {"grammar": {"type": "regex", "value": "a+"}}})
    assert response.status_code == 422 and error_of(response)[0] == "grammar is not supported"
    response = post(server, "/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_object"}})
    assert response.status_code == 422 and error_of(response)[0] == "grammar is not supported"
    assert httpx.get(f"{server.url}/info").json()["grammar_support"] is False


def test_leaving_a_constrained_stream_frees_everything(server):
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 200, "grammar": {"type": "json", "value": {"type": "array", "items": {"type": "integer"}}}}}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/generate_stream", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data:"):
                    break  # leave after the first token
    wait_until_idle(server)


def test_the_openapi_document_lists_grammar_and_response_format(server):
    doc = httpx.get(f"{server.url}/api-doc/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert "grammar" in schemas["GenerateParameters"]["properties"]
    assert {"JsonGrammar", "JsonSchemaGrammar", "RegexGrammar", "ResponseFormatJsonSchema", "ResponseFormatJsonObject"} <= set(schemas)
    for request in ("ChatRequest", "CompletionRequest"):
        assert "response_format" in schemas[request]["properties"]
    answer = doc["paths"]["/generate"]["post"]["responses"]["422"]
    assert "grammar" in answer["description"] and "response_format" in answer["description"]
