"""Tool calling without a server: the request plan and its 422s, the reply's schema and grammar,
the prompt (TGI's tool_prompt, templates that take ``tools``), and reading calls back from the
reply's text, whole or streamed in pieces of any size (lmport.server.tools, tool_stream)."""

from __future__ import annotations

import json

import pytest

from lmport.server.chat import message_dicts, render_chat, template_takes_tools
from lmport.server.errors import ValidationFailed
from lmport.server.schemas_openai import ChatMessage, ChatRequest
from lmport.server.tool_stream import CallArguments, CallStarted, ReplyText, ToolCallScanner, apply_events, read_tool_calls
from lmport.server.tools import DEFAULT_TOOL_PROMPT, plan_tools

jsonschema = pytest.importorskip("jsonschema")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                       "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
USER = [{"role": "user", "content": "Weather in Paris?"}]


def request(**fields) -> ChatRequest:
    return ChatRequest(messages=USER, **fields)


# ---------------------------------------------------------------------------- reading calls

REPLIES = [
    ('{"name": "get_weather", "arguments": {"city": "Paris", "n": [1, {"name": "x"}]}}',
     [("get_weather", '{"city": "Paris", "n": [1, {"name": "x"}]}')], None),
    ('  {"arguments": {"a": "}\\"{"}, "name": "f"}', [("f", '{"a": "}\\"{"}')], None),  # arguments first, braces in strings
    ('[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}]', [("a", "{}"), ("b", '{"x": 1}')], None),
    ('{"name": "f", "arguments": "{\\"a\\": 1}"}', [("f", '{"a": 1}')], None),  # arguments as a JSON string
    ('{"name": "f"}', [("f", "{}")], None),
    ('{"name": "f", "parameters": {"q": null}}', [("f", '{"q": null}')], None),  # TGI's prompt's key
    ('{"name": "f", "arguments": {"x": 1', [("f", '{"x": 1')], None),  # cut by max_tokens
    ("hello {\"name\": \"f\"}", [], 'hello {"name": "f"}'),
    ('{"a": 1}', [], '{"a": 1}'),  # JSON that names no call is text
    ("", [], ""),
]


@pytest.mark.parametrize("text,calls,content", REPLIES)
def test_calls_read_whole_and_streamed_agree(text, calls, content):
    found, found_content = read_tool_calls(text)
    assert [(c.name, c.arguments) for c in found] == calls
    assert found_content == content
    for size in (1, 2, 7):  # any split of the text gives the same calls
        scanner, streamed, streamed_text = ToolCallScanner(), [], []
        for i in range(0, len(text), size):
            apply_events(scanner.feed(text[i:i + size]), streamed, streamed_text)
        apply_events(scanner.finish(), streamed, streamed_text)
        assert [(c.name, c.arguments) for c in streamed] == calls
        assert "".join(streamed_text) == (content or "")


def test_the_name_comes_once_then_argument_fragments():
    scanner = ToolCallScanner()
    events = [e for ch in '{"name": "get_weather", "arguments": {"city": "P"}}' for e in scanner.feed(ch)]
    assert events[0] == CallStarted(0, "get_weather")
    assert all(isinstance(e, CallArguments) and e.index == 0 for e in events[1:])
    assert "".join(e.text for e in events[1:]) == '{"city": "P"}'
    assert scanner.is_tool_reply and scanner.finish() == []


def test_text_streams_at_once_when_text_is_allowed():
    scanner = ToolCallScanner(text_allowed=True)
    assert scanner.feed("  ") == []
    assert scanner.feed(" Hi") == [ReplyText("   Hi")]
    assert scanner.feed(" there") == [ReplyText(" there")]
    held = ToolCallScanner(text_allowed=False)  # required/named: text only when the reply ends
    assert held.feed("Hi") == [] and held.finish() == [ReplyText("Hi")]


# ---------------------------------------------------------------------------- the plan


def test_no_plan_without_tools_or_with_none():
    assert plan_tools(request()) is None
    assert plan_tools(request(tools=[WEATHER], tool_choice="none")) is None
    assert plan_tools(request(tool_choice="auto")) is None


@pytest.mark.parametrize("fields,message", [
    ({"tools": [WEATHER, WEATHER]}, "two functions named 'get_weather'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "must be a JSON Schema of type `object`"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope', which is not in `tools`"),
    ({"tool_choice": "required"}, "`tool_choice` needs `tools`"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "cannot be used together"),
    ({"functions": [{"name": "f"}]}, "`functions` and `function_call`"),
])
def test_unsupported_tool_features_name_themselves(fields, message):
    with pytest.raises(ValidationFailed) as caught:
        plan_tools(request(**fields))
    assert message in caught.value.message and caught.value.status_code == 422


def test_choices():
    auto = plan_tools(request(tools=[WEATHER, TIME]))
    assert auto.choice == "auto" and auto.text_allowed and [f.name for f in auto.callable] == ["get_weather", "get_time"]
    assert plan_tools(request(tools=[WEATHER, TIME], tool_choice="required")).choice == "required"
    for choice in ({"type": "function", "function": {"name": "get_time"}}, {"function": {"name": "get_time"}}, "get_time"):
        named = plan_tools(request(tools=[WEATHER, TIME], tool_choice=choice))
        assert named.choice == "named" and [f.name for f in named.callable] == ["get_time"] == [f.name for f in named.functions]
    assert auto.tool_prompt == DEFAULT_TOOL_PROMPT
    assert plan_tools(request(tools=[WEATHER], tool_prompt="Use JSON.")).tool_prompt == "Use JSON."


def test_reply_schema_accepts_calls_and_only_calls():
    plan = plan_tools(request(tools=[WEATHER, TIME], tool_choice="required"))
    kind, value = plan.constraint()
    schema = json.loads(value)
    assert kind == "json_schema"
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Paris"}}, schema)
    jsonschema.validate({"name": "get_time", "arguments": {}}, schema)
    for wrong in ({"name": "get_weather", "arguments": {}}, {"name": "other", "arguments": {}}, {"name": "get_time"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)
    parallel = json.loads(plan_tools(request(tools=[WEATHER], tool_choice="required", parallel_tool_calls=True)).constraint()[1])
    jsonschema.validate([{"name": "get_weather", "arguments": {"city": "a"}}] * 2, parallel)


def test_parameter_refs_still_resolve_inside_the_reply_schema():
    parameters = {
        "type": "object", "properties": {"item": {"$ref": "#/$defs/Item"}, "again": {"$ref": "#/properties/item"}},
        "required": ["item"], "$defs": {"Item": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}},
    }
    tools = [{"type": "function", "function": {"name": "put", "parameters": parameters}}, WEATHER]
    schema = json.loads(plan_tools(request(tools=tools, tool_choice="required")).constraint()[1])
    jsonschema.validate({"name": "put", "arguments": {"item": {"n": 1}, "again": {"n": 2}}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "put", "arguments": {"item": {"n": "one"}}}, schema)


def test_auto_grammar_allows_a_call_or_text():
    llguidance = pytest.importorskip("llguidance")
    import llguidance.hf

    from lmport.testing.tiny_tokenizer import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(chat=True)
    kind, grammar = plan_tools(request(tools=[WEATHER])).constraint()
    assert kind == "lark"
    compiled = llguidance.LLMatcher.grammar_from_lark(grammar)
    vocabulary = llguidance.hf.from_tokenizer(tokenizer)

    def accepts(text: str) -> bool:
        matcher = llguidance.LLMatcher(vocabulary, compiled, log_level=0)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()

    assert accepts('{"name":"get_weather","arguments":{"city":"Paris"}}')  # compact: no free whitespace
    assert accepts("It is sunny.") and accepts("") and accepts("  two spaces first")
    assert not accepts('{"name":"get_time","arguments":{}}') and not accepts('{"city": "Paris"}') and not accepts("[1]")


# ---------------------------------------------------------------------------- the prompt

TOOLS_TEMPLATE = (
    "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}"
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}[{{ c['function']['name'] }} {{ c['function']['arguments'] | tojson }}]{% endfor %}"
    "{% endfor %}<assistant>"
)


@pytest.fixture(scope="module")
def tokenizer():
    from lmport.testing.tiny_tokenizer import train_tiny_tokenizer

    return train_tiny_tokenizer(chat=True)


def test_tool_prompt_after_the_tools_json_for_a_template_without_tools(tokenizer):
    assert not template_takes_tools(tokenizer.chat_template) and template_takes_tools(TOOLS_TEMPLATE)
    plan = plan_tools(request(tools=[WEATHER], tool_prompt="Answer with JSON."))
    prompt = render_chat(tokenizer, [ChatMessage(**m) for m in USER], tools=plan)
    tools_json = json.dumps([WEATHER], ensure_ascii=False)
    assert f"Weather in Paris?\n---\n{tools_json}\nAnswer with JSON.<|im_end|>" in prompt


def test_a_template_that_takes_tools_receives_them(tokenizer):
    plan = plan_tools(request(tools=[WEATHER]))
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = TOOLS_TEMPLATE
        prompt = render_chat(tokenizer, [ChatMessage(**m) for m in USER], tools=plan)
    finally:
        tokenizer.chat_template = original
    assert prompt.startswith("<tools>") and '"get_weather"' in prompt
    assert prompt.endswith(f"Weather in Paris?\n---\n{DEFAULT_TOOL_PROMPT}<assistant>")  # no second copy of the tools


def test_assistant_calls_and_tool_results_reach_the_template():
    messages = [
        ChatMessage(**USER[0]),
        ChatMessage(role="assistant", content=None, tool_calls=[
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]),
        ChatMessage(role="tool", tool_call_id="call_1", content="sunny"),
    ]
    dicts = message_dicts(messages)
    assert dicts[1]["content"] == "" and dicts[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert dicts[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


def test_streamed_tool_chunks_are_the_documented_chunk_json():
    from lmport.server.tool_stream import StreamedCalls
    from lmport.server.schemas_openai import ChatCompletionChunk
    from lmport.server.streaming import ChunkTemplate

    calls = StreamedCalls(plan_tools(request(tools=[WEATHER], tool_choice="required")).text_allowed)
    template = ChunkTemplate("c", "chat.completion.chunk", 1, "m", "f")
    deltas = [calls.delta(0, piece, finished=False) for piece in ('{"name":"get_weather",', '"arguments":{"city":', '"Paris"}}')]
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert deltas[0]["tool_calls"][0]["id"].startswith("call_") and deltas[0]["tool_calls"][0]["type"] == "function"
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:]) == '{"city":"Paris"}'
    assert calls.called(0) and calls.delta(0, "", finished=True) == {}
    for delta in ({"role": "assistant", **deltas[0]}, deltas[1]):
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        model = ChatCompletionChunk(id="c", created=1, model="m", system_fingerprint="f", choices=[choice])
        event = template.event(choice)
        assert json.dumps(json.loads(event[len(b"data:"):-2])) == json.dumps(json.loads(model.model_dump_json()))
