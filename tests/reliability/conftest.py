"""Fixtures for the reliability tests: tiny random checkpoints with a trained tokenizer,
engines built through the real factory, servers on 127.0.0.1 (bounded load, loopback only).

- ``tiny_checkpoint(name)``: ``(path, hf_model)``, built once per session.
- ``build_engine_for(name, **settings)``: a synchronous :class:`LLMEngine` via ``build_llm_engine``.
- ``cpu_host()``: a new PluginHost with the CPU backend selected.
- ``serve(name="llama", **settings)``: a running :class:`ServerThread` on 127.0.0.1 (port 0) for a
  ``LaunchConfig`` with those settings, ``.state`` its ServerState; stopped after the test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lmport.config import LaunchConfig
from lmport.engine.factory import build_llm_engine
from lmport.plugins import PluginHost
from lmport.testing.tiny_models import make_checkpoint
from lmport.testing.tiny_tokenizer import train_tiny_tokenizer
from lmport.testing.torch_threads import one_torch_thread  # noqa: F401  (autouse: one intra-op thread)


def make_cpu_host() -> PluginHost:
    host = PluginHost(environ={}, load_entry_points=False).load()
    host.select_backend("cpu")
    return host


@pytest.fixture(name="cpu_host")
def cpu_host_fixture():
    """``cpu_host()``: a new PluginHost with the CPU backend selected (no entry points)."""
    return make_cpu_host


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    built: dict[str, tuple[Path, Any]] = {}

    def get(name: str) -> tuple[Path, Any]:
        if name not in built:
            path = tmp_path_factory.mktemp(f"reliability-{name}")
            hf_model = make_checkpoint(name, path)
            train_tiny_tokenizer(chat=True).save_pretrained(path)
            built[name] = (path, hf_model)
        return built[name]

    return get


@pytest.fixture
def build_engine_for(tiny_checkpoint):
    def build(name: str, **settings: Any):
        path, _ = tiny_checkpoint(name)
        return build_llm_engine(LaunchConfig(model_id=str(path), **settings), make_cpu_host())[0]

    return build


@pytest.fixture
def serve(tiny_checkpoint):
    from lmport.engine.factory import build_engine
    from lmport.server.app import build_app
    from lmport.server.assemble import build_state
    from lmport.server.serve import ServerThread

    started: list[ServerThread] = []

    def start(name: str = "llama", **settings: Any) -> ServerThread:
        path, _ = tiny_checkpoint(name)
        settings = {"max_batch_total_tokens": 8192, "max_total_tokens": 512, **settings}
        config = LaunchConfig(model_id=str(path), **settings)
        host = make_cpu_host()
        engine, tokenizer, info = build_engine(config, host)  # an engine process copies this thread count
        state = build_state(config, engine, tokenizer, info, host=host, model_id="tiny")
        server = ServerThread(build_app(state)).start()
        server.state = state  # type: ignore[attr-defined]
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
