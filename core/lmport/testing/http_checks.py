"""Helpers for tests that talk to a running lmport server over HTTP (the core's tests and a
backend's own): posting bodies, reading either error shape, scraping one metric, waiting for
an idle engine."""

from __future__ import annotations

import time
from typing import Any

import httpx


def post(server: Any, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    """POST ``body`` (JSON-encoded, or sent as it is when bytes/str) to ``server.url + path``."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        if isinstance(body, (bytes, str)):
            headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
            return client.post(path, content=body, headers=headers, **kwargs)
        return client.post(path, json=body, **kwargs)


def error_of(response: httpx.Response) -> tuple[str, str]:
    """(message, TGI error_type) from the error shape the route must use: OpenAI's on /v1/*, TGI's elsewhere."""
    body = response.json()
    if response.request.url.path.startswith("/v1/"):
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        return body["error"]["message"], body["error"]["code"]
    assert set(body) == {"error", "error_type"}, body
    return body["error"], body["error_type"]


def metric_value(text: str, name: str) -> float:
    """One series of a Prometheus exposition (``name`` with its labels, e.g. ``x{err="y"}``); 0 if absent."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        if series == name:
            return float(value)
    return 0.0


def wait_until_idle(server: Any, timeout: float = 10.0) -> Any:
    """Wait until the server's engine runs nothing and holds no KV block; its stats then."""
    deadline = time.monotonic() + timeout
    stats = server.state.engine.stats()
    while time.monotonic() < deadline:
        stats = server.state.engine.stats()
        if stats.kv_blocks_used == 0 and stats.running == 0 and stats.waiting == 0:
            return stats
        time.sleep(0.02)
    raise AssertionError(f"the engine did not free its blocks: {stats}")


def start_server_thread(model_path: Any, model_id: str = "tiny", **settings: Any) -> Any:
    """A :class:`~lmport.server.serve.ServerThread` serving the checkpoint at ``model_path`` on
    127.0.0.1 (a free port) with the CPU backend and ``LaunchConfig(**settings)``; started and
    warmed up. ``.url``, ``.state`` (the ServerState); ``.stop()`` when done."""
    from lmport.config import LaunchConfig
    from lmport.engine.factory import build_engine
    from lmport.plugins import PluginHost
    from lmport.server.app import build_app
    from lmport.server.assemble import build_state
    from lmport.server.serve import ServerThread

    config = LaunchConfig(model_id=str(model_path), **settings)
    host = PluginHost(environ={}, load_entry_points=False).load()
    engine, tokenizer, info = build_engine(config, host)
    state = build_state(config, engine, tokenizer, info, host=host, model_id=model_id)
    thread = ServerThread(build_app(state)).start()
    thread.state = state
    return thread
