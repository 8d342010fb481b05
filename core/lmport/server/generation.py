"""Running validated requests through the engine: the route scope that admits, counts and
closes them, the stream of their outputs, the collected result, its timings, and the abort when
the client goes away.

The engine speaks :mod:`lmport.engine.api` (:class:`~lmport.engine.api.EngineClient`); this
module is the only place the HTTP layer submits to it, so the routes stay about JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Iterator, Sequence, TypeVar

from starlette.requests import Request

from lmport.engine.api import GenerationRequest, OutputStream, RequestOutput, TokenInfo
from lmport.engine.errors import EngineDeadError, EngineOverloadedError, EngineRestartingError, RequestValidationError
from lmport.server.errors import (
    ApiError, EngineUnavailable, GenerationFailed, IncompleteGeneration, Overloaded, TimedOut, ValidationFailed,
)
from lmport.server.streaming import token_texts
from lmport.server.validation import ValidRequest

if TYPE_CHECKING:
    from lmport.server.state import ServerState

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
    stop_text_offset: int | None = None  # where the stop string that ended it begins in ``text``

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def text_before_stop(self) -> str:
        """The text without the stop string that ended it and what followed (OpenAI's text)."""
        text = self.text
        return text if self.stop_text_offset is None else text[: self.stop_text_offset]

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


FAILURE_KIND = {"incomplete_generation": "incomplete"}  # metrics' label for an error_type


class RouteScope:
    """One generating HTTP request, as each of the four generating routes enters it: counted
    once, its engine requests admitted together (the engine's :meth:`~EngineClient.submit` is the
    only admission control), its failure or its successes recorded, its streams closed (which
    aborts what is unfinished) however it ends.

    ``with scope:`` around a whole request (non-streaming routes). A streaming route enters
    ``with scope.opening():`` to validate and submit (a refusal is recorded and closes what was
    opened), then the event generator records what happens later and calls :meth:`close` last.
    """

    def __init__(self, state: "ServerState") -> None:
        self.state = state
        self.started = time.monotonic()
        self.streams: list[OutputStream] = []
        state.metrics.request()

    # ------------------------------------------------------------------ entering

    def __enter__(self) -> "RouteScope":
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            self._record(exc)
        finally:
            self.close()

    @contextlib.contextmanager
    def opening(self) -> Iterator["RouteScope"]:
        try:
            yield self
        except BaseException as exc:
            self._record(exc)
            self.close()
            raise

    def _record(self, exc: BaseException | None) -> None:
        if isinstance(exc, ApiError):
            self.failed(exc)
        elif isinstance(exc, ClientDisconnected):
            self.state.metrics.failure("disconnected")

    # ------------------------------------------------------------------ the engine

    def open(self, valids: Sequence[ValidRequest]) -> list[OutputStream]:
        """Submit ``valids`` to the engine, all admitted or none; its refusals as TGI's errors."""
        requests = [GenerationRequest(new_request_id(), v.prompt_ids, v.params, images=v.images) for v in valids]
        try:
            streams = self.state.engine.submit(requests)
        except RequestValidationError as exc:  # TGI's answers: 422 validation, 429 overload, 424 dead engine
            raise ValidationFailed(str(exc)) from exc
        except EngineOverloadedError as exc:
            raise Overloaded(str(exc)) from exc
        except EngineDeadError as exc:
            raise engine_down(exc) from exc
        self.streams.extend(streams)
        metrics = self.state.metrics
        for valid in valids:
            metrics.input_length.observe(valid.input_length)
            metrics.max_new_tokens.observe(valid.params.max_new_tokens)
        return streams

    def timings(self, stream: OutputStream) -> "Timings":
        """The timings of one of this request's streams (validation ends when it was admitted)."""
        return Timings(start=self.started, queued=stream.arrival_time)

    # ------------------------------------------------------------------ leaving

    def failed(self, exc: ApiError) -> None:
        self.state.metrics.failure(FAILURE_KIND.get(exc.error_type, exc.error_type))

    def succeeded(self, timings: "Timings", generated: int) -> dict[str, float]:
        """Record one stream's success; its seconds in validation, queue, inference and in total."""
        split = timings.split()
        self.state.metrics.success(
            total=split["total"], validation=split["validation"], queue=split["queue"],
            inference=split["inference"], generated=generated,
        )
        return split

    def close(self) -> None:
        """Close every stream (idempotent): unfinished requests are aborted, their slots freed."""
        for stream in self.streams:
            stream.close()


async def stream_outputs(stream: OutputStream, timings: Timings, n: int = 1) -> AsyncIterator[RequestOutput]:
    """The outputs of a submitted request of ``n`` sequences; closing this early closes (aborts) the stream.

    A failed generation (``RequestOutput.error``) raises :class:`GenerationFailed` (424); an
    engine stream that ends before every sequence finished raises :class:`IncompleteGeneration`.
    """
    remaining = n
    try:
        try:
            # one generator between the engine and the route: this runs once per streamed token
            async for output in stream:
                if output.error:
                    raise failure_of(output)
                if timings.scheduled is None or output.finished:
                    timings.observe(output)
                if output.finished:
                    remaining -= 1
                yield output
        except EngineDeadError as exc:
            raise engine_down(exc) from exc
        if remaining > 0:
            raise IncompleteGeneration()
    finally:
        stream.close()  # synchronous: a cancelled consumer still frees the KV blocks now


def failure_of(output: RequestOutput) -> ApiError:
    """A failed output's answer: 504 past --request-timeout, 429 past --max-queue-time, else 424."""
    if output.error_kind == "timeout":
        return TimedOut(output.error)
    if output.error_kind == "queue_timeout":
        return Overloaded(output.error)
    return GenerationFailed(output.error)


def engine_down(exc: EngineDeadError) -> ApiError:
    """503 with Retry-After while a dead engine process is replaced; 424 (TGI's answer) otherwise."""
    if isinstance(exc, EngineRestartingError):
        return EngineUnavailable(str(exc), retry_after_s=exc.retry_after_s)
    return GenerationFailed(str(exc))


async def collect(stream: OutputStream, valid: ValidRequest, timings: Timings) -> GenerationResult:
    """Run a submitted request to completion and gather every sequence."""
    sequences = {i: SequenceResult(i) for i in range(valid.params.n)}
    prompt_tokens: list[TokenInfo] | None = None
    async for output in stream_outputs(stream, timings, valid.params.n):
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
            seq.stop_text_offset = output.stop_text_offset
    ordered = [sequences[i] for i in sorted(sequences)]
    return GenerationResult(stream.request_id, valid.input_length, ordered, prompt_tokens, timings)


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
