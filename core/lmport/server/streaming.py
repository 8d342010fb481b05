"""Server-sent events: TGI's wire format (``data:{json}\\n\\n``) and a response that always
closes its generator, so a client that leaves aborts its request at once.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Send

from lmport.engine.api import RequestOutput, TokenInfo

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_data(payload: BaseModel | dict[str, Any] | str) -> bytes:
    """One SSE event. JSON goes as TGI (axum's ``json_data``) writes it, ``data:{...}``; a
    plain string such as ``[DONE]`` gets ``data: [DONE]``, which huggingface_hub matches
    literally (SSE readers drop that one space, so both spellings read the same)."""
    if isinstance(payload, BaseModel):
        return f"data:{payload.model_dump_json()}\n\n".encode()
    if isinstance(payload, dict):
        return f"data:{json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n".encode()
    return f"data: {payload}\n\n".encode()


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` response that closes its body iterator however it ends.

    Starlette cancels the sending task when the client disconnects; closing the iterator here
    runs the generator's ``finally`` (which aborts the engine request) right away rather than
    whenever the generator is garbage collected.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], headers: dict[str, str] | None = None):
        super().__init__(content, headers={**SSE_HEADERS, **(headers or {})}, media_type=self.media_type)
        self._events = content

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


def token_texts(output: RequestOutput) -> list[str]:
    """The text each new token of ``output`` contributes, summing to ``output.text``.

    The engine's ``output.text`` is the authority (it holds back partial UTF-8 and cuts stop
    sequences); a token's own ``text`` is used where the two agree. Special tokens keep their
    own text (TGI shows ``</s>`` with ``special: true``) and add nothing to the text.
    """
    tokens = output.tokens
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
    if value is None or value != value or value in (float("inf"), float("-inf")):
        return None
    return float(value)
