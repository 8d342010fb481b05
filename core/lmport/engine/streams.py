"""The asyncio side of an engine that steps somewhere else (a thread, a process).

:class:`StreamingFrontend` keeps one queue per request on its caller's event loop and hands
a step's outputs over with one ``call_soon_threadsafe`` per event loop (under load a step has
an output per running sequence; a wake-up each would cost a self-pipe write and an event-loop
turn per token). :class:`~lmport.engine.async_engine.AsyncEngine` and
:class:`~lmport.engine.engine_process.EngineProcessClient` differ only in where the engine
runs: they say how a request reaches it (``_submit``), how it is aborted, and whether it is
alive. Admission (``max_concurrent_requests``) and validation (the engine's rules) happen here,
in :meth:`StreamingFrontend.submit`, once per request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

from lmport.engine.api import GenerationRequest, RequestOutput
from lmport.engine.errors import EngineDeadError, EngineOverloadedError, EngineRestartingError, RequestValidationError
from lmport.engine.rules import validate_request


@dataclass
class _Stream:
    """Where one request's outputs go: a queue on the caller's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class RequestStream:
    """One admitted request's outputs (:class:`~lmport.engine.api.OutputStream`).

    Iterating ends once its ``n`` sequences have finished; :meth:`close` aborts it when it has
    not and gives its admission slot back. Leaving it unclosed keeps the slot until the engine
    finishes the request and the last output is read.
    """

    def __init__(self, frontend: "StreamingFrontend", request: GenerationRequest, stream: _Stream) -> None:
        self.request_id = request.request_id
        self.arrival_time: float = request.arrival_time  # type: ignore[assignment]  (stamped by submit)
        self._frontend = frontend
        self._queue = stream.queue
        self._remaining = request.params.n
        self._closed = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._remaining <= 0 or self._closed:
            self.close()
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        if item.finished:
            self._remaining -= 1
            if self._remaining <= 0:
                self.close()
        return item

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._frontend._close(self.request_id, aborted=self._remaining > 0)


class StreamingFrontend:
    """``submit`` and ``generate`` for asyncio callers of an engine that runs in another thread or process.

    Subclasses provide ``is_healthy``, ``limits``, ``vocab_size``, ``start()``,
    ``abort(request_id)`` and ``_submit(request)`` (hand an accepted request to the engine), set
    ``_error`` when the engine dies, and call :meth:`_dispatch` with each step's outputs.
    """

    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards _streams against the thread that delivers outputs
        self._error: BaseException | None = None  # why the engine stopped serving, once it has

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def num_open(self) -> int:
        return len(self._streams)

    def validate(self, request: GenerationRequest) -> None:
        """Raise :class:`RequestValidationError` for a request that can never run; no round trip."""
        validate_request(request, self.limits, self.vocab_size)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of ``request``; raises the validation or overload error up front.

        Leaving the iteration early (break, cancellation, client disconnect) aborts the request.
        """
        (stream,) = self.submit([request])
        try:
            async for item in stream:
                yield item
        finally:
            stream.close()

    def submit(self, requests: Sequence[GenerationRequest]) -> list[RequestStream]:
        """Validate, admit (all or none) and hand ``requests`` to the engine; their output streams."""
        if not self.is_healthy:
            raise self._not_serving()
        for request in requests:
            self.validate(request)
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise RequestValidationError("request ids must differ within one submission")
        loop = asyncio.get_running_loop()
        streams = [_Stream(loop) for _ in requests]
        with self._lock:
            for request_id in ids:
                if request_id in self._streams:
                    raise RequestValidationError(f"request id {request_id!r} is already in flight")
            if len(self._streams) + len(requests) > self.limits.max_concurrent_requests:
                raise EngineOverloadedError("Model is overloaded")
            self._streams.update(zip(ids, streams))
        if self._error is not None:
            # the engine died after the health check above: its failing pass over the open
            # streams may have run before these were registered, so nothing would end them
            with self._lock:
                for request_id in ids:
                    self._streams.pop(request_id, None)
            raise self._not_serving()
        now = time.monotonic()
        accepted = [r if r.arrival_time is not None else dataclasses.replace(r, arrival_time=now) for r in requests]
        self.start()
        for request in accepted:
            self._submit(request)
        return [RequestStream(self, request, stream) for request, stream in zip(accepted, streams)]

    def _not_serving(self) -> EngineDeadError:
        """The refusal while the engine is down, of the error's own kind (restarting or dead)."""
        message = f"the engine is not serving: {self._error or 'shut down'}"
        if isinstance(self._error, EngineRestartingError):
            return EngineRestartingError(message, self._error.retry_after_s)
        return EngineDeadError(message)

    def _close(self, request_id: str, aborted: bool) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
        if aborted:
            self.abort(request_id)

    def _dispatch(self, outputs: list[RequestOutput]) -> list[str]:
        """Hand a step's outputs to their streams; returns the unfinished requests nobody listens to
        (their stream is gone or its loop closed), for the caller to abort."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        unheard: list[str] = []
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    if not out.finished:
                        unheard.append(out.request_id)
                else:
                    by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody listens any more
                unheard.extend(out.request_id for _, out in items if not out.finished)
        return list(dict.fromkeys(unheard))

    def _send(self, request_id: str, item: RequestOutput | BaseException) -> bool:
        """One item to one stream; False when nobody listens to it."""
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is None:
            return False
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed
            return False
        return True

    def _fail_streams(self, exc: BaseException) -> None:
        """End every open stream with ``exc``."""
        with self._lock:
            request_ids = list(self._streams)
        for request_id in request_ids:
            self._send(request_id, exc)
