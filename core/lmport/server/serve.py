"""Running the app under uvicorn: in the foreground (``lmport launch``) or in a background
thread (tests, embedding applications).

On SIGINT/SIGTERM uvicorn stops accepting connections and lets in-flight requests finish
(up to ``graceful_timeout`` seconds, after which their tasks are cancelled, which aborts their
engine requests); then the app's lifespan shuts the engine down and the process exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import uvicorn

log = logging.getLogger(__name__)

DEFAULT_GRACEFUL_TIMEOUT_S = 30.0


def uvicorn_config(app: Any, host: str, port: int, *, graceful_timeout: float | None = DEFAULT_GRACEFUL_TIMEOUT_S,
                   log_config: Any = None, access_log: bool = False) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=log_config,  # None: keep the launcher's logging setup
        access_log=access_log,
        timeout_graceful_shutdown=int(graceful_timeout) if graceful_timeout else None,
        lifespan="on",
    )


def serve(app: Any, host: str, port: int, *, graceful_timeout: float | None = DEFAULT_GRACEFUL_TIMEOUT_S) -> int:
    """Serve until SIGINT/SIGTERM; 0 after a clean shutdown, 1 if the server failed to start."""
    server = uvicorn.Server(uvicorn_config(app, host, port, graceful_timeout=graceful_timeout))
    # uvicorn handles the signal, drains, then re-raises it under the handler that was there
    # before; a quiet handler there turns "killed by SIGTERM" into a clean exit 0.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, _after_shutdown) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if server.started else 1


def _after_shutdown(signum: int, frame: Any) -> None:
    log.debug("signal %d after shutdown", signum)


class ServerThread:
    """uvicorn in a daemon thread on ``host`` (port 0 picks a free one); ``url`` once started."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, graceful_timeout: float | None = 5.0):
        self.server = uvicorn.Server(uvicorn_config(app, host, port, graceful_timeout=graceful_timeout))
        self.thread = threading.Thread(target=self.server.run, name="lmport-uvicorn", daemon=True)
        self.host = host

    def start(self, timeout: float = 120.0) -> "ServerThread":
        self.thread.start()
        deadline = threading.Event()
        waited = 0.0
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread exited before it started (see the log)")
            deadline.wait(0.05)
            waited += 0.05
            if waited > timeout:
                raise TimeoutError(f"the server did not start within {timeout} s")
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
