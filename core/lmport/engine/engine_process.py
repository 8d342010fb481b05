"""The engine loop in a process of its own, served to asyncio code in the parent.

Why a process: in one process the HTTP event loop's per-token work (SSE framing, JSON,
validation) and the engine's step loop share one GIL, so each slows the other; measured on an
H200 with a Llama-3-8B-shape model, the threaded :class:`~lmport.engine.async_engine.AsyncEngine`
served 4,398 output tok/s over HTTP against 6,448 stepping the engine directly. vLLM V1 runs
its engine core in a separate process for the same reason.

:class:`EngineProcessClient` implements :class:`~lmport.engine.api.EngineClient`, as
``AsyncEngine`` does. What crosses the two one-way pipes:

- parent -> child: ``("add", GenerationRequest)``, ``("abort", request_id)``, ``("stop",)``;
- child -> parent: once ``("ready", _Ready)`` or ``("error", text)``; then per step
  ``("step", [RequestOutput, ...], EngineStats)`` (one message for the whole step),
  ``("failed", request_id, exception)`` for an add the engine refused, ``("stats", EngineStats)``
  when the idle engine's counts change, and ``("dead", text)`` before a fatal exit.

Requests are validated and admitted in the parent (:meth:`StreamingFrontend.submit
<lmport.engine.streams.StreamingFrontend.submit>`: the engine's rules and the
``max_concurrent_requests`` check), so a refusal costs no round trip; the child queues them as they come. Timestamps in outputs are
``time.monotonic()`` of the child, comparable with the parent's: on Linux and macOS it is one
system-wide clock.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Mapping

from lmport.config import LaunchConfig
from lmport.engine.api import EngineStats, GenerationRequest, RequestOutput
from lmport.engine.errors import EngineDeadError, EngineRestartingError
from lmport.engine.limits import EngineLimits
from lmport.engine.restarts import RestartPolicy, describe_exit
from lmport.engine.streams import StreamingFrontend
from lmport.models.base import ModelInfo
from lmport.models.resolve import ModelSource, model_info_for, resolve_model_source

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 1.0  # how often an idle child checks that its parent is still there
_READY_POLL_S = 0.5


class EngineStartupError(RuntimeError):
    """The engine process could not build its engine; the message carries the child's reason."""


@dataclass(frozen=True)
class _ChildSpec:
    """Everything the child needs to build the same engine the parent would have built."""

    config: LaunchConfig
    source: ModelSource
    backend: str
    environ: Mapping[str, str]  # the parent host's snapshot: LMPORT_PLUGINS etc. read the same
    load_entry_points: bool
    parent_pid: int
    torch_threads: int
    log_level: int
    log_formatter: Any  # the parent's formatter, when it pickles


@dataclass(frozen=True)
class _Ready:
    """What the parent learns from the child once its engine is built."""

    pid: int
    limits: EngineLimits
    vocab_size: int | None
    model_dtype: str | None
    fallbacks: tuple[str, ...]
    stats: EngineStats


class _Child:
    """One engine process and the parent's ends of its two pipes."""

    def __init__(self, spec: _ChildSpec) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold a CUDA context
        child_in, self.to_child = ctx.Pipe(duplex=False)
        self.from_child, child_out = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_child_main, args=(spec, child_in, child_out), name="lmport-engine", daemon=True)
        self.process.start()
        # the child holds its own ends now; closing ours makes either side's death an EOF for the other
        child_in.close()
        child_out.close()
        self.send_lock = threading.Lock()  # one writer at a time on the pipe to the child
        self.spawned_at = time.monotonic()
        self.ready_at: float | None = None
        self.dead_reason: str | None = None  # the child's own last words ("dead" message), if any

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def wait_ready(self) -> _Ready:
        while not self.from_child.poll(_READY_POLL_S):
            if not self.process.is_alive():
                break
        try:
            message = self.from_child.recv()
        except (EOFError, OSError):
            self.process.join(5)
            raise EngineStartupError(
                f"the engine process exited while loading ({describe_exit(self.process.exitcode)})"
            ) from None
        if message[0] == "error":
            self.process.join(10)
            raise EngineStartupError(f"the engine process failed to start: {message[1]}")
        self.ready_at = time.monotonic()
        return message[1]

    def post(self, message: tuple) -> None:
        with self.send_lock:
            self.to_child.send(message)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.terminate()  # a loading child ends here; a serving one ignores it
            self.process.join(2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)

    def close(self) -> None:
        self.to_child.close()
        self.from_child.close()

    def startup_s(self) -> float | None:
        return self.ready_at - self.spawned_at if self.ready_at is not None else None

    def served_s(self) -> float:
        return time.monotonic() - self.ready_at if self.ready_at is not None else 0.0


class EngineProcessClient(StreamingFrontend):
    """Serves an :class:`~lmport.engine.llm_engine.LLMEngine` that runs in a spawned child process.

    Construction spawns the child and waits until its engine is built (weights loaded, KV cache
    sized), raising :class:`EngineStartupError` with the child's reason if it cannot; the
    parent meanwhile loads its own tokenizer for the HTTP layer. ``generate`` behaves as
    :meth:`AsyncEngine.generate <lmport.engine.async_engine.AsyncEngine.generate>`: leaving it early
    aborts the request. The child ignores SIGINT, and SIGTERM once serving (the parent's
    graceful stop needs it to keep stepping); it exits on :meth:`shutdown` or when its parent
    does (its inbound pipe reaches EOF).

    Supervision: if the child dies, every open stream raises :class:`EngineDeadError` (the
    requests in flight are lost with it), the cause is logged, and a new child is started after
    a back-off (:class:`~lmport.engine.restarts.RestartPolicy`, ``config.engine_restarts`` in
    a row at most). Meanwhile ``is_healthy`` is False and new requests are refused at once with
    :class:`EngineRestartingError`; once the new child is ready the client serves again. When
    the limit is reached ``is_healthy`` stays False and ``error`` says why.
    """

    def __init__(self, config: LaunchConfig, host: Any, source: ModelSource | None = None) -> None:
        if host.selection is None:
            host.select_backend(config.backend)
        source = source or resolve_model_source(config.model_id, config.revision)
        super().__init__()
        self._stopping = False
        self._stopped = threading.Event()  # wakes a restart's back-off at shutdown
        self._life_lock = threading.Lock()  # shutdown vs. a restart swapping the child
        self.started_at: float | None = None
        self.restart_policy = RestartPolicy(max_restarts=config.engine_restarts)
        self._host = host
        self._spec = _ChildSpec(
            config=config,
            source=source,
            backend=host.backend.name,
            environ=dict(host.environ),
            load_entry_points=getattr(host, "_load_entry_points", True),
            parent_pid=os.getpid(),
            torch_threads=_torch_threads(),
            log_level=logging.getLogger().getEffectiveLevel(),
            log_formatter=_picklable_formatter(),
        )
        self._child = _Child(self._spec)
        log.info("engine process %d started; loading the model there", self._child.pid)
        try:
            self.info: ModelInfo = model_info_for(source, config.trust_remote_code)
            from lmport.engine.factory import load_tokenizer

            self._tokenizer = load_tokenizer(config, source.path)
            ready = self._child.wait_ready()
        except BaseException:
            self._child.kill()
            raise
        self._adopt(self._child, ready)

    @classmethod
    def launch(cls, config: LaunchConfig, host: Any, source: ModelSource | None = None) -> tuple["EngineProcessClient", Any, ModelInfo]:
        """What :func:`lmport.engine.factory.build_engine` returns: the client, its tokenizer, the model info."""
        client = cls(config, host, source)
        return client, client.tokenizer, client.info

    def _adopt(self, child: _Child, ready: _Ready) -> None:
        """Serve from ``child``, which said it is ready, and read its messages."""
        previous = getattr(self, "_limits", None)
        if previous is not None and ready.limits != previous:
            log.warning("the restarted engine has other limits than the first one: %s", ready.limits)
        self.pid = ready.pid
        self._limits = ready.limits
        self._vocab_size = ready.vocab_size
        self.model_dtype = ready.model_dtype
        self._stats = ready.stats
        for message in ready.fallbacks:  # /info reports the kernels the child fell back on
            if message not in self._host.fallbacks:
                self._host.fallbacks.append(message)
        self._child = child
        self._reader = threading.Thread(target=self._read, args=(child,), name="lmport-engine-reader", daemon=True)
        self._reader.start()

    # ------------------------------------------------------------------ life cycle

    @property
    def limits(self) -> EngineLimits:
        return self._limits

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def vocab_size(self) -> int | None:
        return self._vocab_size

    @property
    def restarts(self) -> int:
        """How many times a dead engine process was replaced (start attempts, counted)."""
        return self.restart_policy.total

    def start(self) -> "EngineProcessClient":
        """The child's loop runs from construction; this only refuses a shut-down engine."""
        if self._stopping:
            raise EngineDeadError("the engine was shut down")
        if self.started_at is None:
            self.started_at = time.monotonic()
        return self

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the child (stop message, then terminate, then kill); open streams end with an error."""
        with self._life_lock:
            if self._stopping:
                return
            self._stopping = True
            self._stopped.set()
            child = self._child
            serving = self._error is None  # else the child is dead or still loading: no need to wait
        try:
            child.post(("stop",))
        except (OSError, ValueError):  # the child is gone already
            pass
        child.process.join(timeout if serving else 0)
        child.kill()
        self._reader.join(5)  # ends on the pipe's EOF
        child.close()
        self._fail_streams(EngineDeadError("the engine is shutting down"))

    @property
    def is_healthy(self) -> bool:
        return self._error is None and not self._stopping and self._child.process.is_alive()

    def stats(self) -> EngineStats:
        """The counts the child sent with its last step (or when it went idle)."""
        return self._stats

    # ------------------------------------------------------------------ requests

    def _submit(self, request: GenerationRequest) -> None:
        try:
            self._post(("add", request))
        except (OSError, ValueError):  # the child died since the health check: end this stream too
            self._send(request.request_id, EngineDeadError("the engine process died before it took the request"))

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; the child frees its blocks on its loop's next turn."""
        try:
            self._post(("abort", request_id))
        except (OSError, ValueError):  # the child is gone: nothing holds the request any more
            pass

    def _post(self, message: tuple) -> None:
        self._child.post(message)

    # ------------------------------------------------------------------ the reader thread

    def _read(self, child: _Child) -> None:
        """Hand ``child``'s messages to the streams until its pipe ends; then supervise."""
        try:
            while True:
                try:
                    message = child.from_child.recv()
                except (EOFError, OSError):
                    break
                kind = message[0]
                if kind == "step":
                    self._stats = message[2]
                    self._deliver(message[1])
                elif kind == "stats":
                    self._stats = message[1]
                elif kind == "failed":
                    self._send(message[1], message[2])
                elif kind == "dead":
                    child.dead_reason = message[1]
        except BaseException as exc:  # never end silently: streams would wait forever
            log.exception("engine reader failed")
            child.dead_reason = f"engine reader failed: {type(exc).__name__}: {exc}"
            child.kill()
        if self._stopping:
            return
        child.process.join(1)
        self._supervise(child)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for request_id in self._dispatch(outputs):  # nobody listens: the child stops generating for it
            self.abort(request_id)

    def _supervise(self, dead: _Child) -> None:
        """``dead`` has exited: fail its requests, then start new children until one is ready or the limit is hit."""
        cause = dead.dead_reason or describe_exit(dead.process.exitcode)
        served = dead.served_s()
        startup = dead.startup_s() or 10.0  # how long a start takes, for Retry-After
        # refuse new requests first, then fail the open ones: none falls between the two
        self._error = EngineRestartingError(f"the engine process died ({cause}); it is being restarted", startup)
        with self._lock:
            in_flight = len(self._streams)
        self._fail_streams(EngineDeadError(f"the engine process died ({cause})"))
        self._stats = dataclasses.replace(self._stats, running=0, waiting=0, kv_blocks_used=0, batch_size=0)
        dead.close()
        while True:
            delay = self.restart_policy.next_delay(served)
            if delay is None:
                log.error("the engine process %s died (%s); %d restarts in a row failed, so it stays down",
                          dead.pid, cause, self.restart_policy.max_restarts)
                self._error = EngineDeadError(f"the engine process died ({cause}) and could not be restarted")
                return
            log.error("the engine process %s died (%s) after serving %.0f s; %d requests in flight failed; "
                      "restarting it in %.1f s (attempt %d of %d)", dead.pid, cause, served, in_flight, delay,
                      self.restart_policy.consecutive, self.restart_policy.max_restarts)
            self._error = EngineRestartingError(f"the engine process died ({cause}); it is being restarted", delay + startup)
            in_flight = 0
            if self._stopped.wait(delay):
                return
            with self._life_lock:
                if self._stopping:
                    return
                child = _Child(self._spec)
                self._child = child  # shutdown() stops this one if it comes while the child loads
            try:
                ready = child.wait_ready()
            except EngineStartupError as exc:
                child.kill()
                child.close()
                if self._stopping:
                    return
                dead, cause, served = child, str(exc), 0.0
                continue
            with self._life_lock:
                if self._stopping:
                    return
                self._adopt(child, ready)
                self._error = None
            log.info("engine process %d ready again; serving", child.pid)
            return


# ---------------------------------------------------------------------- the child


def _child_main(spec: _ChildSpec, inbound: Connection, outbound: Connection) -> None:
    """The spawned process: build the engine as the parent would have, say ready, run the loop."""
    # Ctrl-C in a terminal reaches the whole process group: the parent answers it with a
    # graceful stop (in-flight requests finish), which needs this loop to keep stepping
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _setup_logging(spec)
    import torch

    from lmport.engine.factory import build_llm_engine
    from lmport.engine.llm_engine import weights_dtype
    from lmport.plugins import PluginHost

    torch.set_num_threads(spec.torch_threads)
    try:
        host = PluginHost(environ=spec.environ, load_entry_points=spec.load_entry_points).load()
        host.select_backend(spec.backend)
        engine, _, _ = build_llm_engine(spec.config, host, spec.source)
    except BaseException as exc:
        log.debug("engine process failed to start", exc_info=True)
        _send_quietly(outbound, ("error", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    ready = _Ready(
        pid=os.getpid(),
        limits=engine.limits,
        vocab_size=engine.vocab_size,
        model_dtype=weights_dtype(engine),
        fallbacks=tuple(host.fallbacks),
        stats=engine.stats(),
    )
    # Serving, the child stops only when told (or when its parent is gone): a SIGTERM sent to
    # the whole group (systemd, ``timeout``, ``kill -- -pgid``) must not cut in-flight requests
    # off while the parent drains them. The parent's last resort is SIGKILL.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    outbound.send(("ready", ready))
    _ChildLoop(engine, inbound, outbound, spec.parent_pid).run()


class _ChildLoop:
    """:meth:`AsyncEngine._loop <lmport.engine.async_engine.AsyncEngine._loop>` with pipes at both ends.

    A reader thread moves the parent's messages into a deque, so the parent's writes never wait
    for a step to end; the loop drains the deque, steps, and sends the step's outputs (plus any
    abort outputs) and the stats as one message.
    """

    def __init__(self, engine: Any, inbound: Connection, outbound: Connection, parent_pid: int) -> None:
        self.engine = engine
        self.inbound = inbound
        self.outbound = outbound
        self.parent_pid = parent_pid
        self.inbox: deque[tuple] = deque()
        self.wake = threading.Event()
        self.stopping = False

    def run(self) -> None:
        threading.Thread(target=self._receive, name="lmport-engine-inbox", daemon=True).start()
        try:
            try:
                self._loop()
            finally:
                self.engine.close()
        except (BrokenPipeError, ConnectionResetError, EOFError):
            log.warning("the parent process is gone; the engine process exits")
        except BaseException as exc:  # tell the parent why before exiting: its streams are waiting
            log.exception("engine loop died; the engine process exits")
            _send_quietly(self.outbound, ("dead", f"{type(exc).__name__}: {exc}"))
            raise SystemExit(1) from None

    def _receive(self) -> None:
        while True:
            try:
                message = self.inbound.recv()
            except (EOFError, OSError):  # the parent is gone (or closed the pipe): stop
                message = ("stop",)
            if message[0] == "stop":
                self.stopping = True
                self.wake.set()
                return
            self.inbox.append(message)
            self.wake.set()

    def _loop(self) -> None:
        engine = self.engine
        last_stats = None
        while not self.stopping:
            self.wake.clear()
            failure = engine.executor_failure()
            if failure is not None:  # a tensor-parallel worker died: this engine cannot go on
                raise RuntimeError(failure)
            outputs: list[RequestOutput] = []
            try:
                self._drain_inbox(outputs)  # an abort is engine bookkeeping too
                if not engine.has_unfinished():
                    stats = engine.stats()
                    if outputs:
                        self.outbound.send(("step", outputs, stats))
                    elif stats != last_stats:
                        self.outbound.send(("stats", stats))
                    last_stats = stats
                    if not self.wake.wait(_IDLE_WAIT_S) and os.getppid() != self.parent_pid:
                        log.warning("the parent process is gone; the engine process exits")
                        return
                    continue
                outputs.extend(engine.step())
            except (OSError, EOFError, pickle.PicklingError):
                raise  # the pipe broke or an output cannot cross it: fatal
            except Exception as exc:  # outside the executor: a bug in bookkeeping
                log.exception("engine step failed outside the model; failing all requests")
                outputs.extend(engine.abort_all(error=f"{type(exc).__name__}: {exc}"))
            last_stats = engine.stats()
            self.outbound.send(("step", outputs, last_stats))

    def _drain_inbox(self, outputs: list[RequestOutput]) -> None:
        while self.inbox:
            kind, payload = self.inbox.popleft()
            if kind == "add":
                try:
                    self.engine.add_validated(payload)  # the parent's submit() validated it
                except Exception as exc:
                    self.outbound.send(("failed", payload.request_id, _crossable(exc)))
            elif kind == "abort":
                outputs.extend(self.engine.abort(payload))


# ---------------------------------------------------------------------- helpers


def _crossable(exc: Exception) -> Exception:
    """``exc`` if it survives pickling, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def _send_quietly(conn: Connection, message: tuple) -> None:
    try:
        conn.send(message)
    except Exception:  # the parent is gone: nobody to tell
        pass


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _picklable_formatter() -> logging.Formatter | None:
    """The parent's log formatter (``--json-output`` included) if it can cross to the child."""
    for handler in logging.getLogger().handlers:
        if handler.formatter is not None:
            try:
                pickle.dumps(handler.formatter)
            except Exception:
                return None
            return handler.formatter
    return None


def _setup_logging(spec: _ChildSpec) -> None:
    """The child logs to the stderr it shares with the parent, at the parent's level and format."""
    import sys

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(spec.log_formatter or logging.Formatter("%(asctime)s %(levelname)-5s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(spec.log_level)
