"""Server-sent events: TGI's wire format (``data:{json}\\n\\n``), the per-token event
encoders, and a response that always closes its generator, so a client that leaves aborts its
request at once.

Token events are the server's hot path (one per streamed token, hundreds per engine step), so
they are built as plain dicts and serialized by the stdlib's C encoder, with the part of a
chunk that never changes within a stream serialized once (:class:`ChunkTemplate`). The
pydantic response models in ``schemas_*`` stay the documented shape; tests check that these
encoders write the same JSON as those models.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from lmport.engine.api import RequestOutput, TokenInfo

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# ensure_ascii off, as pydantic writes JSON: non-ASCII text goes as UTF-8, not \u escapes
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False).encode


def sse_data(payload: BaseModel | dict[str, Any] | str) -> bytes:
    """One SSE event. JSON goes as TGI (axum's ``json_data``) writes it, ``data:{...}``; a
    plain string such as ``[DONE]`` gets ``data: [DONE]``, which huggingface_hub matches
    literally (SSE readers drop that one space, so both spellings read the same)."""
    if isinstance(payload, BaseModel):
        return f"data:{payload.model_dump_json()}\n\n".encode()
    if isinstance(payload, dict):
        return f"data:{_encode(payload)}\n\n".encode()
    return f"data: {payload}\n\n".encode()


class ChunkTemplate:
    """An OpenAI stream's chunks: ``{id, object, created, model, system_fingerprint, choices: [choice]}``.

    Everything but the choice is the same for every chunk of a stream, so it is serialized
    once; a token's event is then that prefix, one small dict through the C encoder, and the
    closing brackets (the layout of ``ChatCompletionChunk`` / ``Completion`` without usage).
    """

    __slots__ = ("_prefix",)

    def __init__(self, completion_id: str, object_type: str, created: int, model: str, system_fingerprint: str):
        head = {"id": completion_id, "object": object_type, "created": created, "model": model, "system_fingerprint": system_fingerprint}
        self._prefix = f"data:{_encode(head)[:-1]},\"choices\":[".encode()

    def event(self, choice: dict[str, Any]) -> bytes:
        return self._prefix + _encode(choice).encode() + b"]}\n\n"


def tgi_event(
    index: int, token: dict[str, Any], top_tokens: list[dict[str, Any]] | None,
    generated_text: str | None = None, details: dict[str, Any] | None = None,
) -> bytes:
    """One ``/generate_stream`` event, laid out as ``StreamResponse`` (``top_tokens`` left out when empty)."""
    event: dict[str, Any] = {"index": index, "token": token}
    if top_tokens:
        event["top_tokens"] = top_tokens
    event["generated_text"] = generated_text
    event["details"] = details
    return b"data:" + _encode(event).encode() + b"\n\n"


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` response that closes its body iterator however it ends.

    Starlette cancels the sending task when the client disconnects; closing the iterator here
    runs the generator's ``finally`` (which aborts the engine request) right away rather than
    whenever the generator is garbage collected. A stream the client left before its end is
    counted as ``tgi_request_failure{err="disconnected"}`` in the app's metrics.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], headers: dict[str, str] | None = None):
        super().__init__(self._until_end(content), headers={**SSE_HEADERS, **(headers or {})}, media_type=self.media_type)
        self._events = content
        self._complete = False
        self._scope: Scope | None = None

    async def _until_end(self, content: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in content:
            yield chunk
        self._complete = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._scope = scope
        await super().__call__(scope, receive, send)

    async def stream_response(self, send: Send) -> None:
        failed = False
        try:
            await super().stream_response(send)
        except OSError:  # the send to a closed connection (ASGI 2.4)
            raise
        except Exception:
            failed = True  # a server error, not a client that left
            raise
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self._events, "aclose", None)
                if aclose is not None:
                    await aclose()
            if not self._complete and not failed:
                self._count_disconnect()

    def _count_disconnect(self) -> None:
        app = (self._scope or {}).get("app")  # Starlette puts the app in the scope
        metrics = getattr(getattr(getattr(app, "state", None), "lmport", None), "metrics", None)
        if metrics is not None:
            metrics.failure("disconnected")


def token_texts(output: RequestOutput) -> list[str]:
    """The text each new token of ``output`` contributes, summing to ``output.text``.

    The engine's ``output.text`` is the authority (it holds back partial UTF-8 and cuts stop
    sequences); a token's own ``text`` is used where the two agree. Special tokens keep their
    own text (TGI shows ``</s>`` with ``special: true``) and add nothing to the text.
    """
    tokens = output.tokens
    if len(tokens) == 1:  # a decode step's output: the one token carries the step's text
        token = tokens[0]
        return [token.text if token.special else output.text]
    if not tokens:
        return []
    plain = [t for t in tokens if not t.special]
    if len(plain) <= 1:
        return [t.text if t.special else output.text for t in tokens]
    if "".join(t.text for t in plain) == output.text:
        return [t.text for t in tokens]
    last_plain = max(i for i, t in enumerate(tokens) if not t.special)
    return [t.text if t.special else (output.text if i == last_plain else "") for i, t in enumerate(tokens)]


def token_json(token: TokenInfo, text: str) -> dict[str, Any]:
    return {"id": token.token_id, "text": text, "logprob": finite_or_none(token.logprob), "special": token.special}


def top_tokens_json(token: TokenInfo, special_ids: frozenset[int]) -> list[dict[str, Any]]:
    return [
        {"id": tid, "text": ttext, "logprob": finite_or_none(lp), "special": tid in special_ids}
        for tid, lp, ttext in token.top_tokens
    ]


def finite_or_none(value: float | None) -> float | None:
    if value is None or value - value != 0.0:  # inf - inf and nan - nan are nan
        return None
    return float(value)
