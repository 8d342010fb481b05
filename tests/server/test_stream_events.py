"""The per-token SSE encoders write what the documented pydantic response models write.

Streamed chunks are built as dicts (the models cost tens of microseconds a token); these tests
hold them to the models' JSON: the same keys in the same order, the same omissions, and the
same values for awkward text (quotes, control characters, non-ASCII, emoji).
"""

from __future__ import annotations

import json

import pytest

from lmport.engine.api import RequestOutput, TokenInfo
from lmport.server.schemas_openai import (
    ChatCompletionChunk,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    ChoiceLogprobs,
    TokenLogprob,
    TopLogprob,
)
from lmport.server.schemas_tgi import StreamDetails, StreamResponse, Token
from lmport.server.streaming import ChunkTemplate, finite_or_none, tgi_event, token_json, token_texts, top_tokens_json

TEXTS = ["", "plain", ' "quoted" \\ back', "line\nbreak\ttab\r\x00\x1f\x7f", "héllo wörld ☃", "emoji 🙂", "</s>", "\u2028sep"]


def parse(event: bytes) -> object:
    """The JSON of one ``data:{...}\\n\\n`` event, checked to be framed as TGI frames it."""
    assert event.startswith(b"data:{") and event.endswith(b"\n\n") and event.count(b"\n\n") == 1
    return json.loads(event[len(b"data:") : -2])


def same_json(event: bytes, model: object) -> None:
    """Equal values and the same key order (dicts keep the order they were read in)."""
    ours = parse(event)
    theirs = json.loads(model.model_dump_json())
    assert ours == theirs
    assert json.dumps(ours) == json.dumps(theirs)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("finished", [False, True])
def test_chat_chunk_matches_the_model(text: str, finished: bool) -> None:
    template = ChunkTemplate("chatcmpl-1", "chat.completion.chunk", 1700000000, "tiny/llama ✓", "0.1.0-lmport")
    for delta in ({"role": "assistant", "content": text}, {"content": text}):
        choice = {"index": 3, "delta": delta, "logprobs": None, "finish_reason": "length" if finished else None}
        model = ChatCompletionChunk(id="chatcmpl-1", created=1700000000, model="tiny/llama ✓", system_fingerprint="0.1.0-lmport",
                                    choices=[choice])  # fmt: skip
        same_json(template.event(choice), model)


def test_chat_chunk_with_logprobs_matches_the_model() -> None:
    logprobs = ChoiceLogprobs(content=[TokenLogprob(token="é", logprob=-0.25, bytes=list("é".encode()),
                                                    top_logprobs=[TopLogprob(token="a", logprob=-1e-7, bytes=[97])])])  # fmt: skip
    choice = {"index": 0, "delta": {"content": "é"}, "logprobs": logprobs.model_dump(), "finish_reason": None}
    model = ChatCompletionChunk(id="c", created=1, model="m", system_fingerprint="f", choices=[choice])
    same_json(ChunkTemplate("c", "chat.completion.chunk", 1, "m", "f").event(choice), model)


@pytest.mark.parametrize("text", TEXTS)
def test_completion_chunk_matches_the_model(text: str) -> None:
    template = ChunkTemplate("cmpl-9", "text_completion", 5, "m", "f")
    logprobs = CompletionLogprobs(tokens=[text], token_logprobs=[-0.5], top_logprobs=[{text: -0.5, "x": -2.0}], text_offset=[0])
    for choice in (
        {"index": 1, "text": text, "logprobs": None, "finish_reason": None},
        {"index": 0, "text": text, "logprobs": logprobs.model_dump(), "finish_reason": "stop"},
    ):
        model = Completion(id="cmpl-9", created=5, model="m", system_fingerprint="f", choices=[CompletionChoice(**choice)])
        same_json(template.event(choice), model)


@pytest.mark.parametrize("text", TEXTS)
def test_tgi_event_matches_stream_response(text: str) -> None:
    token = TokenInfo(token_id=7, logprob=-0.125, text=text, special=text == "</s>", top_tokens=((7, -0.125, text), (9, float("-inf"), "b")))
    special = frozenset({7})
    details = {"finish_reason": "eos_token", "generated_tokens": 4, "seed": None, "input_length": 12}
    cases = [  # (top tokens, generated_text, details): a middle event, the last one, with top tokens
        (None, None, None),
        (None, "prompt " + text, details),
        (top_tokens_json(token, special), None, None),
    ]
    for top, generated_text, event_details in cases:
        model = StreamResponse(
            index=4, token=Token(**token_json(token, text)), top_tokens=[Token(**t) for t in top or []],
            generated_text=generated_text, details=StreamDetails(**event_details) if event_details else None,
        )
        same_json(tgi_event(4, token_json(token, text), top, generated_text, event_details), model)


def test_non_finite_logprobs_are_null() -> None:
    assert [finite_or_none(v) for v in (None, float("nan"), float("inf"), float("-inf"), -0.5, 0, -3)] == [None, None, None, None, -0.5, 0.0, -3.0]
    event = tgi_event(1, token_json(TokenInfo(token_id=1, logprob=float("nan"), text="a"), "a"), None)
    assert parse(event)["token"]["logprob"] is None


def test_token_texts_of_one_token_take_the_steps_text() -> None:
    """A decode step's one token reads as the step's text (the engine may hold back partial UTF-8)."""
    held = RequestOutput("r", 0, [TokenInfo(token_id=5, logprob=0.0, text="\ufffd")], text="")
    assert token_texts(held) == [""]
    special = RequestOutput("r", 0, [TokenInfo(token_id=2, logprob=0.0, text="</s>", special=True)], text="")
    assert token_texts(special) == ["</s>"]
    several = RequestOutput("r", 0, [TokenInfo(token_id=5, logprob=0.0, text="a"), TokenInfo(token_id=6, logprob=0.0, text="b")], text="ab")
    assert token_texts(several) == ["a", "b"]
