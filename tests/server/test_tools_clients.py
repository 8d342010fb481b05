"""Tool calling through HTTP with the real clients (the ``openai`` SDK, its stream helper, and
``huggingface_hub.InferenceClient``) against the tiny llama: calls validate against their
function's parameters (``jsonschema``), a named function is always the one called, streamed
deltas assemble to the non-streamed reply's call, ``tool_choice: "none"`` is plain text, and
unsupported tool features answer 422 naming them.

The tiny model's weights are random: what it calls comes from the constraint, so the
parameters here bound every value (enums, small integers) and replies stay short.
"""

from __future__ import annotations

import json
import shutil

import pytest

from lmport.testing.http_checks import error_of, post, start_server_thread
from lmport.testing.tiny_tokenizer import CHATML_TEMPLATE

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")


WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False,
}
TIME_PARAMETERS = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a zone", "parameters": TIME_PARAMETERS}},
]
PARAMETERS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
MAX_TOKENS = 120
NAMED = {"type": "function", "function": {"name": "get_time"}}


# A ChatML template that reads `tools` (and shows only their names: the tiny model has 512
# positions), so the prompt gets TGI's tool_prompt without the tools' JSON.
TOOLS_TEMPLATE = CHATML_TEMPLATE.replace(
    "{{ bos_token }}", "{{ bos_token }}{% if tools %}Tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}{% endif %}")


@pytest.fixture(scope="module")
def tools_server(tiny_llama, tmp_path_factory):
    """The tiny llama with :data:`TOOLS_TEMPLATE`."""
    path, _, tokenizer = tiny_llama
    folder = tmp_path_factory.mktemp("tiny-llama-tools")
    shutil.copytree(path, folder, dirs_exist_ok=True)
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = TOOLS_TEMPLATE
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.chat_template = original
    thread = start_server_thread(folder, "tiny-tools", max_batch_total_tokens=16384, max_total_tokens=512)
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def client(tools_server):
    return openai.OpenAI(base_url=f"{tools_server.url}/v1", api_key="unused", timeout=60)


def check_call(name: str, arguments: str, expected_name: str | None = None) -> None:
    assert name in PARAMETERS and (expected_name is None or name == expected_name)
    jsonschema.validate(json.loads(arguments), PARAMETERS[name])


def assemble(chunks) -> tuple[dict[int, dict], list]:
    """Plain iteration's way: fold each choice-0 ``delta.tool_calls`` entry into its call by index."""
    calls: dict[int, dict] = {}
    finish = []
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        for entry in choice.delta.tool_calls or []:
            call = calls.setdefault(entry.index, {"id": None, "name": None, "arguments": "", "names": 0})
            if entry.id:
                assert call["id"] is None, "the id comes once"
                call["id"] = entry.id
            if entry.function.name:
                call["names"] += 1
                call["name"] = entry.function.name
            call["arguments"] += entry.function.arguments or ""
        if choice.finish_reason:
            finish.append(choice.finish_reason)
    return calls, finish


def test_named_function_streamed_equals_non_streamed(client):
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=NAMED, temperature=0, max_tokens=MAX_TOKENS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    check_call(call.function.name, call.function.arguments, "get_time")

    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=NAMED, temperature=0, max_tokens=MAX_TOKENS, stream=True)
    calls, finish = assemble(stream)
    assert list(calls) == [0] and finish == ["tool_calls"]
    streamed = calls[0]
    assert streamed["names"] == 1 and streamed["id"].startswith("call_")
    assert (streamed["name"], streamed["arguments"]) == (call.function.name, call.function.arguments)


def test_the_sdk_helpers_parse_strict_tools(client):
    from typing import Literal

    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        city: Literal["Paris", "Oslo"]
        days: int = Field(ge=1, le=3)

    helpers = [client.chat.completions.stream]
    beta = getattr(getattr(getattr(client, "beta", None), "chat", None), "completions", None)
    if beta is not None and hasattr(beta, "stream"):
        helpers.append(beta.stream)
    for helper in helpers:
        with helper(model="tiny", messages=MESSAGES, tools=[openai.pydantic_function_tool(Weather)],
                    tool_choice={"type": "function", "function": {"name": "Weather"}}, temperature=0, max_tokens=MAX_TOKENS) as stream:
            kinds = [event.type for event in stream]
            final = stream.get_final_completion()
        assert "tool_calls.function.arguments.delta" in kinds and "tool_calls.function.arguments.done" in kinds
        (call,) = final.choices[0].message.tool_calls
        assert call.function.name == "Weather" and isinstance(call.function.parsed_arguments, Weather)
        assert final.choices[0].finish_reason == "tool_calls"
    parsed = client.chat.completions.parse(  # the non-streamed helper reads the same call
        model="tiny", messages=MESSAGES, tools=[openai.pydantic_function_tool(Weather)],
        tool_choice={"type": "function", "function": {"name": "Weather"}}, temperature=0, max_tokens=MAX_TOKENS)
    assert parsed.choices[0].message.tool_calls[0].function.parsed_arguments == call.function.parsed_arguments


def test_required_calls_one_of_the_tools_with_n_and_a_seed(client):
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", temperature=1.0, seed=5, n=2, max_tokens=MAX_TOKENS)
    assert sorted(c.index for c in reply.choices) == [0, 1]
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        check_call(call.function.name, call.function.arguments)
    again = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", temperature=1.0, seed=5, n=2, max_tokens=MAX_TOKENS)
    assert [c.message.tool_calls[0].function.arguments for c in reply.choices] == [
        c.message.tool_calls[0].function.arguments for c in again.choices]


def test_parallel_tool_calls_are_indexed(client):
    kwargs = dict(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", parallel_tool_calls=True,
                  temperature=0, max_tokens=MAX_TOKENS)
    reply = client.chat.completions.create(**kwargs)
    if reply.choices[0].finish_reason == "length":
        pytest.skip("the random model kept adding calls up to max_tokens")
    calls = reply.choices[0].message.tool_calls
    assert calls and len({c.id for c in calls}) == len(calls)
    for call in calls:
        check_call(call.function.name, call.function.arguments)
    streamed, _ = assemble(client.chat.completions.create(**kwargs, stream=True))
    assert [(streamed[i]["name"], streamed[i]["arguments"]) for i in sorted(streamed)] == [
        (c.function.name, c.function.arguments) for c in calls]


def test_auto_answers_text_or_a_valid_call(client):
    for temperature, seed in ((0, None), (1.0, 1), (1.0, 2)):
        reply = client.chat.completions.create(
            model="tiny", messages=MESSAGES, tools=TOOLS, temperature=temperature, seed=seed, max_tokens=24)
        choice = reply.choices[0]
        if choice.message.tool_calls:
            assert choice.message.content is None
            if choice.finish_reason == "tool_calls":
                check_call(choice.message.tool_calls[0].function.name, choice.message.tool_calls[0].function.arguments)
        else:
            assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
            assert not choice.message.content.lstrip().startswith(("{", "["))


def test_tool_choice_none_is_plain_content(client):
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=12)
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=12)
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content == plain.choices[0].message.content
    assert reply.choices[0].finish_reason == plain.choices[0].finish_reason


def test_inference_client_assembles_the_same_call(tools_server):
    from huggingface_hub import InferenceClient

    hub = InferenceClient(base_url=tools_server.url, timeout=60)
    reply = hub.chat_completion(messages=MESSAGES, tools=TOOLS, tool_choice={"function": {"name": "get_weather"}},
                                temperature=0, max_tokens=MAX_TOKENS)
    (call,) = reply.choices[0].message.tool_calls
    check_call(call.function.name, call.function.arguments, "get_weather")
    assert reply.choices[0].finish_reason == "tool_calls"
    chunks = hub.chat_completion(messages=MESSAGES, tools=TOOLS, tool_choice={"function": {"name": "get_weather"}},
                                 temperature=0, max_tokens=MAX_TOKENS, stream=True)
    calls, finish = assemble(chunks)
    assert (calls[0]["name"], calls[0]["arguments"]) == (call.function.name, call.function.arguments)
    assert finish == ["tool_calls"]


def test_a_conversation_with_calls_and_results(client):
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    reply = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=4)
    assert isinstance(reply.choices[0].message.content, str)


@pytest.mark.parametrize("fields,param,message", [
    ({"tools": [{"type": "web_search"}]}, "tools.0.type", "tools of type 'web_search' are not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters", "must be a JSON Schema of type `object`"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "which is not in `tools`"),
    ({"tools": TOOLS, "tool_choice": {"type": "allowed_tools", "allowed_tools": {}}}, "tool_choice",
     "tool_choice of type 'allowed_tools' are not supported"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools.1.function.name", "two functions named 'get_weather'"),
    ({"functions": [{"name": "f"}], "function_call": "auto"}, "functions", "not supported: use `tools`"),
])
def test_unsupported_tool_features_are_422_naming_them(server, fields, param, message):
    response = post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, **fields})
    assert response.status_code == 422
    text, kind = error_of(response)
    assert kind == "validation" and message in text
    assert response.json()["error"]["param"].startswith(param.split(".")[0])


def test_the_openapi_document_lists_the_tool_fields(server):
    import httpx

    spec = httpx.get(f"{server.url}/api-doc/openapi.json").json()
    schemas = spec["components"]["schemas"]
    request = schemas["ChatRequest"]["properties"]
    assert {"tools", "tool_choice", "tool_prompt", "parallel_tool_calls"} <= set(request)
    assert schemas["ToolDefinition"]["properties"]["type"]["const"] == "function"
    assert "tool_calls" in schemas["AssistantMessage"]["properties"]
    responses = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" in responses


def test_chat_tokenize_renders_the_tools_as_a_chat_completion_does(server):
    tools = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]
    body = {"messages": MESSAGES, "tools": tools, "tool_prompt": "Reply with JSON."}  # short: the tiny tokenizer's tokens are short
    templated = post(server, "/chat_tokenize", body).json()["templated_text"]
    assert f"What is the weather in Paris?\n---\n{json.dumps(tools, ensure_ascii=False)}\nReply with JSON." in templated
    plain = post(server, "/chat_tokenize", {**body, "tool_choice": "none"}).json()["templated_text"]
    assert '"now"' not in plain and "Reply with JSON." not in plain


def test_a_template_that_reads_tools_receives_them(tools_server):
    templated = post(tools_server, "/chat_tokenize", {"messages": MESSAGES, "tools": TOOLS}).json()["templated_text"]
    assert templated.startswith("<s>Tools: get_weather get_time<|im_start|>user")
    assert "What is the weather in Paris?\n---\n" in templated and '"parameters"' not in templated  # the tool_prompt only


def test_without_grammar_support_replies_are_read_not_constrained(start_server):
    unconstrained = start_server(disable_grammar_support=True)
    body = {"messages": MESSAGES, "tools": TOOLS[1:], "tool_choice": NAMED, "temperature": 0, "max_tokens": 8}
    response = post(unconstrained, "/v1/chat/completions", body)
    assert response.status_code == 200  # no "grammar is not supported": the tools' constraint is left out
    message = response.json()["choices"][0]["message"]
    assert message["tool_calls"] is None and isinstance(message["content"], str)  # the random model wrote no call
