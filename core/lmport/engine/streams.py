"""The asyncio side of an engine that steps somewhere else (a thread, a process).

:class:`StreamingFrontend` keeps one queue per request on its caller's event loop and hands
a step's outputs over with one ``call_soon_threadsafe`` per event loop (under load a step has
an output per running sequence; a wake-up each would cost a self-pipe write and an event-loop
turn per token). :class:`~lmport.engine.async_engine.AsyncEngine` and
:class:`~lmport.engine.engine_process.EngineProcessClient` differ only in where the engine
runs: they say how a request reaches it (``_submit``), how it is aborted, and whether it is
alive.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from lmport.engine.api import GenerationRequest, RequestOutput
from lmport.engine.errors import EngineDeadError, EngineOverloadedError, RequestValidationError


@dataclass
class _Stream:
    """Where one request's outputs go: a queue on the caller's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class StreamingFrontend:
    """``generate`` for asyncio callers of an engine that runs in another thread or process.

    Subclasses provide ``is_healthy``, ``limits``, ``validate(request)``,
    ``start()``, ``abort(request_id)`` and ``_submit(request)`` (hand an accepted request to
    the engine), set ``_error`` when the engine dies, and call :meth:`_dispatch` with each step's outputs.
    """

    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards _streams against the thread that delivers outputs
        self._error: BaseException | None = None  # why the engine stopped serving, once it has

    @property
    def error(self) -> BaseException | None:
        return self._error

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of ``request``; raises the validation or overload error up front.

        Leaving the iteration early (break, cancellation, client disconnect) aborts the request.
        """
        stream = self._open(request)
        remaining = request.params.n
        try:
            while remaining:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    remaining -= 1
                yield item
        finally:
            with self._lock:
                self._streams.pop(request.request_id, None)
            if remaining:
                self.abort(request.request_id)

    def _open(self, request: GenerationRequest) -> _Stream:
        if not self.is_healthy:
            raise EngineDeadError(f"the engine is not serving: {self._error or 'shut down'}")
        self.validate(request)
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            if request.request_id in self._streams:
                raise RequestValidationError(f"request id {request.request_id!r} is already in flight")
            if len(self._streams) >= self.limits.max_concurrent_requests:
                raise EngineOverloadedError("Model is overloaded")
            self._streams[request.request_id] = stream
        if self._error is not None:
            # the engine died after the health check above: its failing pass over the open
            # streams may have run before this one was registered, so nothing would end it
            with self._lock:
                self._streams.pop(request.request_id, None)
            raise EngineDeadError(f"the engine is not serving: {self._error}")
        if request.arrival_time is None:
            request = dataclasses.replace(request, arrival_time=time.monotonic())
        self.start()
        self._submit(request)
        return stream

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
