"""Fixtures for the reliability tests: tiny random checkpoints with a trained tokenizer,
engines built through the real factory, servers on 127.0.0.1 (bounded load, loopback only).

- ``tiny_checkpoint(name)``: ``(path, hf_model)``, built once per session.
- ``build_engine_for(name, **settings)``: a synchronous :class:`LLMEngine` via ``build_llm_engine``.
- ``cpu_host()``: a new PluginHost with the CPU backend selected.
- ``serve(name="llama", **settings)``: a running :class:`ServerThread` on 127.0.0.1 (port 0) for a
  ``LaunchConfig`` with those settings, ``.state`` its ServerState; stopped after the test
  (``serve_module``: after the module).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from lmport.config import LaunchConfig
from lmport.engine.factory import build_llm_engine
from lmport.plugins import PluginHost
from lmport.testing.http_checks import start_server_thread
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


def _servers(tiny_checkpoint) -> Iterator[Callable[..., Any]]:
    started: list[Any] = []

    def start(name: str = "llama", **settings: Any) -> Any:
        path, _ = tiny_checkpoint(name)
        settings = {"max_batch_total_tokens": 8192, "max_total_tokens": 512, **settings}
        server = start_server_thread(path, "tiny", **settings)  # an engine process copies this thread count
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def serve(tiny_checkpoint):
    yield from _servers(tiny_checkpoint)


@pytest.fixture(scope="module")
def serve_module(tiny_checkpoint):
    """``serve``, with servers kept for the whole module (many cases against one server)."""
    yield from _servers(tiny_checkpoint)
