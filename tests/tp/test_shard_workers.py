"""--num-shard 2 on the CPU: rank 0 in the engine, one worker process, joined through gloo.

Through the engine (async scheduling, so plans and device-fed decode tokens cross to the
worker) and through HTTP, greedy tokens equal the unsharded engine's; a clean close stops the
worker; a killed worker turns /health into 503, fails the request in flight, and the server
still shuts down leaving no process behind.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from lmport.config import LaunchConfig
from lmport.engine.factory import build_llm_engine
from lmport.plugins import PluginHost
from lmport.testing.engine_driver import engine_greedy, greedy_tokens
from lmport.testing.http_checks import post, start_server_thread
from lmport.testing.tiny_models import make_checkpoint
from lmport.testing.tiny_tokenizer import train_tiny_tokenizer

PROMPTS = [[5, 9, 33, 17, 80, 12, 7], [100, 3, 44], list(range(20, 45))]
LIMITS = dict(dtype="float32", block_size=16, max_batch_total_tokens=4096, max_batch_prefill_tokens=12,
              max_input_tokens=32, max_total_tokens=64)  # fmt: skip


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp-llama")
    make_checkpoint("llama", path)
    train_tiny_tokenizer().save_pretrained(path)
    return path


def host() -> PluginHost:
    return PluginHost(environ={}, load_entry_points=False).load()


def test_two_shards_through_the_engine_equal_one_and_close_stops_the_worker(llama):
    expected = engine_greedy(llama, host(), PROMPTS, 6)
    engine, _, _ = build_llm_engine(LaunchConfig(model_id=str(llama), num_shard=2, async_scheduling=True, **LIMITS), host())
    executor = engine.executor
    try:
        assert executor.world_size == 2 and engine.async_scheduling
        assert greedy_tokens(engine, PROMPTS, 6) == expected
    finally:
        engine.close()
    assert [w.proc.returncode for w in executor.workers] == [0]  # asked to stop, and stopped
    assert engine.executor_failure() is None


def _until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_http_with_two_shards_and_a_killed_worker(llama):
    server = start_server_thread(llama, num_shard=2, **{**LIMITS, "max_total_tokens": 512, "max_input_tokens": 32})
    executor = server.state.engine.engine.executor
    worker = executor.workers[0].proc
    try:
        text = "hello tensor parallel world"
        ids = server.state.tokenizer(text)["input_ids"]
        (expected,) = engine_greedy(llama, host(), [ids], 8)
        body = {"inputs": text, "parameters": {"max_new_tokens": 8, "details": True}}
        response = post(server, "/generate", body)
        assert response.status_code == 200, response.text
        got = [t["id"] for t in response.json()["details"]["tokens"]]
        assert got == expected[: len(got)] and (len(got) == 8 or got[-1] == 2)
        assert httpx.get(server.url + "/health").status_code == 200
        info = httpx.get(server.url + "/info").json()
        assert info["num_shard"] == 2 and info["sharded"]

        events: list[str] = []

        def stream() -> None:
            long = {"model": "tiny", "prompt": text, "max_tokens": 400, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", server.url + "/v1/completions", json=long, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        events.append(line[5:])

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert _until(lambda: len(events) >= 2, 30)
        worker.kill()
        reader.join(30)
        assert not reader.is_alive(), "the request in flight hung"
        assert any("error" in e for e in events[-2:]), events[-2:]  # it ended with an error, not 400 tokens
        assert _until(lambda: httpx.get(server.url + "/health").status_code == 503, 10)
        assert "exited with signal SIGKILL" in (executor.failure() or "")
        assert post(server, "/generate", body).status_code >= 400  # refused at once, no hang
    finally:
        server.stop()
    assert worker.poll() is not None
