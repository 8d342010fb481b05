"""Running one validated request through the engine: the stream of its outputs, the collected
result, its timings, and the abort when the client goes away.

The engine speaks :mod:`lmport.engine.api`; this module is the only place the HTTP layer
touches it (``generate``, ``abort``), so the routes stay about JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, TypeVar

import anyio
from starlette.requests import Request

from lmport.engine.api import GenerationRequest, RequestOutput, TokenInfo
from lmport.engine.errors import EngineDeadError, EngineOverloadedError, RequestValidationError
from lmport.server.errors import GenerationFailed, IncompleteGeneration, Overloaded, ValidationFailed
from lmport.server.streaming import token_texts
from lmport.server.validation import ValidRequest

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection; its request was aborted."""


@dataclass
class SequenceResult:
    """One of a request's n sequences, accumulated over the engine's outputs."""

    index: int
    tokens: list[TokenInfo] = field(default_factory=list)
    token_texts: list[str] = field(default_factory=list)  # each token's share of the text
    text_parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    seed: int | None = None
    cumulative_logprob: float = 0.0

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def generated_tokens(self) -> int:
        return len(self.tokens)


@dataclass
class Timings:
    """Monotonic timestamps of one request, for TGI's headers and histograms."""

    start: float  # the HTTP handler began
    queued: float | None = None  # handed to the engine (validation ends)
    scheduled: float | None = None  # first scheduled by the engine (queue ends)
    finished: float | None = None

    def observe(self, output: RequestOutput) -> None:
        if self.scheduled is None and output.first_scheduled_time is not None:
            self.scheduled = output.first_scheduled_time
        if output.finished:
            self.finished = output.finished_time or time.monotonic()

    def split(self) -> dict[str, float]:
        """Seconds spent in validation, queue and inference, and in total."""
        end = self.finished or time.monotonic()
        queued = self.queued or self.start
        scheduled = max(self.scheduled or queued, queued)
        return {
            "total": max(end - self.start, 0.0),
            "validation": max(queued - self.start, 0.0),
            "queue": max(scheduled - queued, 0.0),
            "inference": max(end - scheduled, 0.0),
        }


@dataclass
class GenerationResult:
    request_id: str
    input_length: int
    sequences: list[SequenceResult]
    prompt_tokens: list[TokenInfo] | None
    timings: Timings

    def best(self) -> SequenceResult:
        """The sequence with the highest cumulative log probability (TGI's best_of pick)."""
        return max(self.sequences, key=lambda s: s.cumulative_logprob)

    @property
    def generated_tokens(self) -> int:
        return sum(s.generated_tokens for s in self.sequences)


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def stream_outputs(
    engine: Any, valid: ValidRequest, timings: Timings, request_id: str | None = None
) -> AsyncIterator[RequestOutput]:
    """The engine's outputs for ``valid``; the request is aborted if the consumer stops early.

    A failed generation (``RequestOutput.error``) raises :class:`GenerationFailed` (424); an
    engine stream that ends before every sequence finished raises :class:`IncompleteGeneration`.
    """
    request_id = request_id or new_request_id()
    timings.queued = time.monotonic()
    request = GenerationRequest(request_id, valid.prompt_ids, valid.params, arrival_time=timings.queued)
    outputs = engine.generate(request)
    remaining = valid.params.n
    try:
        # One generator between the engine and the route (this runs once per streamed token),
        # so the engine's own refusals are mapped here rather than in a wrapper of its own.
        try:
            async for output in outputs:
                if output.error:
                    raise GenerationFailed(output.error)
                if timings.scheduled is None or output.finished:
                    timings.observe(output)
                if output.finished:
                    remaining -= 1
                yield output
                if remaining <= 0:
                    return
        except RequestValidationError as exc:  # TGI's answers: 422 validation, 429 overload, 424 dead engine
            raise ValidationFailed(str(exc)) from exc
        except EngineOverloadedError as exc:
            raise Overloaded(str(exc)) from exc
        except EngineDeadError as exc:
            raise GenerationFailed(str(exc)) from exc
        raise IncompleteGeneration()
    finally:
        # Shielded: under anyio (Starlette) a cancelled scope re-cancels every await in it.
        with anyio.CancelScope(shield=True):
            if remaining > 0:  # the consumer left early, failed or was cancelled: free the KV blocks
                await abort(engine, request_id)
            with contextlib.suppress(Exception):
                await outputs.aclose()


async def abort(engine: Any, request_id: str) -> None:
    """``engine.abort``, whether the engine made it a plain or an async method."""
    with contextlib.suppress(Exception):
        result = engine.abort(request_id)
        if inspect.isawaitable(result):
            await result


async def collect(engine: Any, valid: ValidRequest, timings: Timings) -> GenerationResult:
    """Run ``valid`` to completion and gather every sequence."""
    request_id = new_request_id()
    sequences = {i: SequenceResult(i) for i in range(valid.params.n)}
    prompt_tokens: list[TokenInfo] | None = None
    async for output in stream_outputs(engine, valid, timings, request_id):
        seq = sequences.setdefault(output.index, SequenceResult(output.index))
        seq.tokens.extend(output.tokens)
        seq.token_texts.extend(token_texts(output))
        seq.text_parts.append(output.text)
        seq.cumulative_logprob = output.cumulative_logprob
        if output.seed is not None:
            seq.seed = output.seed
        if output.prompt_tokens is not None and prompt_tokens is None:
            prompt_tokens = output.prompt_tokens
        if output.finished:
            seq.finish_reason = output.finish_reason
    ordered = [sequences[i] for i in sorted(sequences)]
    return GenerationResult(request_id, valid.input_length, ordered, prompt_tokens, timings)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first; then cancel it (which aborts)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientDisconnected()


async def _wait_for_disconnect(request: Request) -> None:
    # The body was read already, so the next ASGI message is the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
