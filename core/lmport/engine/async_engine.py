"""The engine loop in its own thread, served to asyncio code.

The HTTP server's event loop never runs a model step: ``generate`` posts the request to the
loop thread's inbox and awaits outputs that the thread hands back with
``loop.call_soon_threadsafe``. The API is small (``generate``, ``abort``, ``stats``) so that
the loop can later move into a process of its own without touching the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator

from lmport.engine.api import EngineStats, GenerationRequest, RequestOutput
from lmport.engine.errors import EngineDeadError, EngineOverloadedError, RequestValidationError
from lmport.engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 1.0


@dataclass
class _Stream:
    """Where one request's outputs go: a queue on the caller's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def put(self, item: RequestOutput | BaseException) -> bool:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody listens any more
            return False
        return True


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class AsyncEngine:
    """Serves :class:`LLMEngine` to asyncio callers from a background thread.

    ``generate(request)`` is an async iterator of :class:`RequestOutput` (one per step per
    sequence; for ``n > 1`` the sequences' outputs interleave, told apart by ``index``); it
    ends when every sequence has finished. Leaving the iteration early (break, cancellation,
    client disconnect) aborts the request and frees its blocks. A step that raises fails only
    the requests in that step (their last output has ``error`` set); an error outside a step
    fails every request, and the engine keeps serving if it can recover, else
    ``is_healthy`` turns False and ``error`` says why.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: deque[tuple[str, object]] = deque()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards _streams against the loop thread
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._error: BaseException | None = None
        self._stats = engine.stats()
        self.started_at: float | None = None

    # ------------------------------------------------------------------ life cycle

    @property
    def limits(self):
        return self.engine.limits

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def vocab_size(self) -> int | None:
        return self.engine.vocab_size

    def start(self) -> "AsyncEngine":
        """Start the loop thread (idempotent)."""
        if self._thread is None:
            if self._stopping:
                raise EngineDeadError("the engine was shut down")
            self._thread = threading.Thread(target=self._run, name="lmport-engine", daemon=True)
            self.started_at = time.monotonic()
            self._thread.start()
        return self

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the loop; requests still in flight end with an error."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_streams(EngineDeadError("the engine is shutting down"))

    @property
    def is_healthy(self) -> bool:
        return self._error is None and not self._stopping and (self._thread is None or self._thread.is_alive())

    @property
    def error(self) -> BaseException | None:
        return self._error

    def stats(self) -> EngineStats:
        """The counts after the last step (read without stopping the loop)."""
        return self._stats

    # ------------------------------------------------------------------ requests

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of ``request``; raises the validation or overload error up front."""
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
        self.engine.validate(request)
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            if request.request_id in self._streams:
                raise RequestValidationError(f"request id {request.request_id!r} is already in flight")
            if len(self._streams) >= self.engine.limits.max_concurrent_requests:
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
        self._post("add", request)
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; its blocks are freed on the loop's next turn."""
        self._post("abort", request_id)

    def _post(self, kind: str, payload: object) -> None:
        self._inbox.append((kind, payload))
        self._wake.set()

    # ------------------------------------------------------------------ the loop thread

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the thread must never end silently: streams would wait forever
            log.exception("engine loop died; it stops serving")
            self._error = exc
            self._fail_streams(EngineDeadError(f"engine failed: {type(exc).__name__}: {exc}"))

    def _loop(self) -> None:
        engine = self.engine
        while not self._stopping:
            self._wake.clear()
            try:
                self._drain_inbox()  # an abort is engine bookkeeping too
                if not engine.has_unfinished():
                    self._stats = engine.stats()
                    self._wake.wait(_IDLE_WAIT_S)
                    continue
                self._deliver(engine.step())  # delivering aborts the outputs nobody listens to
            except Exception as exc:  # outside the executor: a bug in bookkeeping
                log.exception("engine step failed outside the model; failing all requests")
                if not self._recover(exc):
                    return
                continue
            self._stats = engine.stats()

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, payload = self._inbox.popleft()
            if kind == "add":
                try:
                    self.engine.add_request(payload)
                except Exception as exc:
                    self._send(payload.request_id, exc)
            else:
                self._deliver(self.engine.abort(payload))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs over: one wake-up per event loop, not one per output.

        Under load a step has an output per running sequence; a ``call_soon_threadsafe`` each
        would cost a self-pipe write and an event-loop turn per token.
        """
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        unheard: list[str] = []
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    unheard.append(out.request_id)
                else:
                    by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody listens any more
                unheard.extend(out.request_id for _, out in items)
        for request_id in unheard:
            self.engine.abort(request_id)

    def _send(self, request_id: str, item: RequestOutput | BaseException) -> bool:
        with self._lock:
            stream = self._streams.get(request_id)
        return stream.put(item) if stream is not None else False

    def _recover(self, exc: BaseException) -> bool:
        message = f"{type(exc).__name__}: {exc}"
        try:
            self._deliver(self.engine.abort_all(error=message))
        except Exception as fatal:
            log.exception("engine could not recover; it stops serving")
            self._error = fatal
            self._fail_streams(EngineDeadError(f"engine failed: {message}"))
            return False
        return True

    def _fail_streams(self, exc: BaseException) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.put(exc)
