"""The engine loop in its own thread, served to asyncio code.

The HTTP server's event loop never runs a model step: ``generate`` posts the request to the
loop thread's inbox and awaits outputs that the thread hands back with
``loop.call_soon_threadsafe``. It implements :class:`~lmport.engine.api.EngineClient`, as
:class:`~lmport.engine.engine_process.EngineProcessClient` does for a loop in its own process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from lmport.engine.api import EngineStats, GenerationRequest, RequestOutput
from lmport.engine.errors import EngineDeadError
from lmport.engine.llm_engine import LLMEngine, weights_dtype
from lmport.engine.streams import StreamingFrontend

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 1.0


class AsyncEngine(StreamingFrontend):
    """Serves :class:`LLMEngine` to asyncio callers from a background thread.

    ``generate(request)`` is an async iterator of :class:`RequestOutput` (one per step per
    sequence; for ``n > 1`` the sequences' outputs interleave, told apart by ``index``); it
    ends when every sequence has finished. Leaving the iteration early (break, cancellation,
    client disconnect) aborts the request and frees its blocks. A step that raises fails only
    the requests that make it raise (their last output has ``error`` set); an error outside a step
    fails every request, and the engine keeps serving if it can recover, else
    ``is_healthy`` turns False and ``error`` says why.
    """

    def __init__(self, engine: LLMEngine) -> None:
        super().__init__()
        self.engine = engine
        self._inbox: deque[tuple[str, object]] = deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
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

    @property
    def model_dtype(self) -> str | None:
        return weights_dtype(self.engine)

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
        self.engine.close()

    @property
    def is_healthy(self) -> bool:
        return (
            self._error is None and not self._stopping and (self._thread is None or self._thread.is_alive())
            and self.engine.executor_failure() is None
        )  # fmt: skip

    def stats(self) -> EngineStats:
        """The counts after the last step (read without stopping the loop)."""
        return self._stats

    # ------------------------------------------------------------------ requests

    def _submit(self, request: GenerationRequest) -> None:
        self._post("add", request)

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
            failure = engine.executor_failure()
            if failure is not None:  # the executor cannot recover (a worker died): every request fails
                raise EngineDeadError(failure)
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
                    self.engine.add_validated(payload)  # submit() validated it
                except Exception as exc:
                    self._send(payload.request_id, exc)
            else:
                self._deliver(self.engine.abort(payload))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for request_id in self._dispatch(outputs):  # nobody listens: stop generating for it
            self.engine.abort(request_id)

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
