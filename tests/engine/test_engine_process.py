"""The engine loop in a spawned child process: the same outputs as transformers, aborts,
refusals in the parent, a dead child, startup failures, shutdown, and the HTTP app on top.

Spawning costs seconds (the child imports torch and builds the model), so most tests share
one child through a module-scoped fixture; the tests that kill or stop a child get their own.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from lmport.config import LaunchConfig
from lmport.engine.api import GenerationRequest, SamplingParams
from lmport.engine.async_engine import AsyncEngine
from lmport.engine.engine_process import EngineProcessClient, EngineStartupError
from lmport.engine.errors import EngineDeadError, EngineOverloadedError, EngineRestartingError, RequestValidationError
from lmport.engine.restarts import RestartPolicy, describe_exit
from lmport.engine.factory import build_engine
from lmport.plugins import PluginHost
from lmport.testing.hf_oracle import hf_greedy_generate

MAX_CONCURRENT = 4


def cpu_host() -> PluginHost:
    return PluginHost(environ={}, load_entry_points=False).load()


def request(rid: str, prompt: list[int], max_new: int = 8, **params) -> GenerationRequest:
    return GenerationRequest(rid, tuple(prompt), SamplingParams(max_new_tokens=max_new, ignore_eos=True, **params))


def tokens_of(outputs) -> list[int]:
    return [t.token_id for o in outputs for t in o.tokens]


async def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def spawn(path: Path, **settings) -> EngineProcessClient:
    """A client on one torch thread in the child too (it copies the parent's count)."""
    settings = {"block_size": 4, "max_batch_total_tokens": 2048, "max_concurrent_requests": MAX_CONCURRENT, **settings}
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return EngineProcessClient(LaunchConfig(model_id=str(path), **settings), cpu_host())
    finally:
        torch.set_num_threads(saved)


def exited(pid: int) -> bool:
    """Gone, or a zombie nobody reaped yet (a container's pid 1 may not reap)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status


@pytest.fixture(scope="module")
def shared(tiny_model_dir):
    path, hf_model = tiny_model_dir("llama")
    client = spawn(path, max_batch_prefill_tokens=12)  # prompts longer than 12 prefill in chunks
    yield client, hf_model
    client.shutdown()


def test_concurrent_greedy_outputs_equal_transformers(shared, random_prompts, hf_greedy):
    client, hf_model = shared
    prompts = random_prompts([4, 21, 9, 15], seed=10)

    async def main():
        async def collect(rid, prompt):
            return [out async for out in client.generate(request(rid, prompt))]

        return await asyncio.gather(*(collect(f"greedy-{i}", p) for i, p in enumerate(prompts)))

    results = asyncio.run(main())
    for prompt, outs in zip(prompts, results):
        assert tokens_of(outs) == hf_greedy(hf_model, prompt, 8)[0]
        assert outs[-1].finished and sum(o.finished for o in outs) == 1
        assert outs[-1].finish_reason == "length"
    assert client.pid != os.getpid() and client.is_healthy
    stats = client.stats()  # sent with the last step: everything is released
    assert stats.kv_blocks_used == 0 and stats.extra["requests"] == 0 and stats.extra["steps"] > 0


def test_leaving_the_stream_early_aborts_the_request_in_the_child(shared):
    client, _ = shared

    async def main():
        stream = client.generate(request("long", [5, 6, 7, 8, 9], max_new=400))
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 2:
                break
        await stream.aclose()
        assert client.stats().extra["requests"] == 1  # still running in the child a moment ago
        await wait_until(lambda: client.stats().extra["requests"] == 0 and client.stats().kv_blocks_used == 0)

    asyncio.run(main())
    assert client.stats().running == 0


def test_refusals_are_raised_in_the_parent_without_a_round_trip(shared, monkeypatch):
    client, _ = shared
    posted: list[tuple] = []
    post = client._post

    def spy(message):
        posted.append(message)
        post(message)

    monkeypatch.setattr(client, "_post", spy)
    limits = client.limits
    vocab = client.vocab_size

    async def first(req):
        return await client.generate(req).__anext__()

    async def main():
        # a prompt of max_total_tokens: TGI's rules name the total first
        with pytest.raises(RequestValidationError, match="must be <= "):
            await first(request("too-long", [5] * (limits.max_input_tokens + 1)))
        with pytest.raises(RequestValidationError, match="out of the vocabulary"):
            await first(request("bad-id", [5, vocab]))
        with pytest.raises(RequestValidationError, match="max_new_tokens"):
            await first(request("too-many", [5, 6], max_new=limits.max_total_tokens))
        assert posted == []  # none of these reached the child

        streams = [client.generate(request(f"busy-{i}", [5, 6, 7], max_new=300)) for i in range(MAX_CONCURRENT)]
        for stream in streams:
            assert (await stream.__anext__()).request_id.startswith("busy-")
        adds = len(posted)
        with pytest.raises(EngineOverloadedError, match="overloaded"):
            await first(request("one-too-many", [5, 6, 7]))
        assert len(posted) == adds == MAX_CONCURRENT  # the refused one was never sent
        for stream in streams:
            await stream.aclose()
        await wait_until(lambda: client.stats().extra["requests"] == 0 and client.stats().kv_blocks_used == 0)
        # the slots are free again: a request goes through
        outs = [out async for out in client.generate(request("after", [5, 6, 7], max_new=3))]
        assert outs[-1].finished and outs[-1].num_generated_tokens == 3

    asyncio.run(main())
    # leaving a stream aborts it (again for a step's output that was already on its way)
    assert {m[1] for m in posted if m[0] == "abort"} == {f"busy-{i}" for i in range(MAX_CONCURRENT)}
    assert all(m[0] != "add" or m[1].request_id != "one-too-many" for m in posted)


def test_killing_the_child_without_restarts_fails_open_streams_and_health(tiny_model_dir):
    path, _ = tiny_model_dir("llama")
    client = spawn(path, engine_restarts=0)
    try:
        assert client.is_healthy

        async def main():
            stream = client.generate(request("doomed", [5, 6, 7], max_new=400))
            await stream.__anext__()
            os.kill(client.pid, signal.SIGKILL)
            with pytest.raises(EngineDeadError, match=r"died \(killed by SIGKILL\)"):
                async for _ in stream:
                    pass
            await wait_until(lambda: "could not be restarted" in str(client.error))
            with pytest.raises(EngineDeadError, match="not serving"):
                await client.generate(request("later", [5, 6])).__anext__()

        asyncio.run(main())
        assert not client.is_healthy and client.restarts == 0
    finally:
        client.shutdown()


def test_a_killed_child_is_replaced_and_serves_again(tiny_model_dir, hf_greedy):
    """In-flight requests fail, new ones are refused at once while the new child loads
    (EngineRestartingError), then the same greedy tokens come from the new child."""
    path, hf_model = tiny_model_dir("llama")
    client = spawn(path)
    client.restart_policy.backoff_s = 0.1
    first_pid = client.pid
    try:
        async def main():
            streams = [client.generate(request(f"doomed-{i}", [5, 6, 7 + i], max_new=400)) for i in range(3)]
            for stream in streams:
                await stream.__anext__()
            os.kill(first_pid, signal.SIGKILL)
            for stream in streams:
                with pytest.raises(EngineDeadError, match="killed by SIGKILL"):
                    async for _ in stream:
                        pass
            assert not client.is_healthy
            with pytest.raises(EngineRestartingError, match="being restarted"):
                await client.generate(request("too-soon", [5, 6])).__anext__()
            await wait_until(lambda: client.is_healthy, timeout=120)
            return [out async for out in client.generate(request("after", [5, 6, 7, 8]))]

        outs = asyncio.run(main())
        assert tokens_of(outs) == hf_greedy(hf_model, [5, 6, 7, 8], 8)[0]
        assert client.pid != first_pid and exited(first_pid) and client.restarts == 1
        assert client.stats().kv_blocks_used == 0
    finally:
        client.shutdown()
    assert exited(client.pid)


def test_restarts_stop_at_the_limit_when_the_new_child_cannot_start(tiny_model_dir, tmp_path):
    path, _ = tiny_model_dir("llama")
    before = {p.pid for p in multiprocessing.active_children()}
    model = tmp_path / "model"
    shutil.copytree(path, model)
    client = spawn(model, engine_restarts=1)
    client.restart_policy.backoff_s = 0.05
    try:
        for weights in model.glob("*.safetensors"):
            weights.unlink()  # every new child fails to load
        os.kill(client.pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while "could not be restarted" not in str(client.error):
            assert time.monotonic() < deadline, client.error
            time.sleep(0.05)
        assert client.restarts == 1 and not client.is_healthy
    finally:
        client.shutdown()
    assert {p.pid for p in multiprocessing.active_children()} == before


def test_restart_policy_backs_off_and_stops_at_the_limit():
    policy = RestartPolicy(max_restarts=3, backoff_s=1.0, max_backoff_s=3.0, stable_s=60.0)
    assert [policy.next_delay(0.0) for _ in range(4)] == [1.0, 2.0, 3.0, None]
    assert policy.next_delay(61.0) == 1.0  # served a minute before dying: a fresh count
    assert policy.total == 4
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL" and describe_exit(1) == "exit code 1"


def test_startup_failures_are_clear_and_leave_no_child(tiny_model_dir, tmp_path):
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(Exception, match="no-such-model"):
        spawn(tmp_path / "no-such-model")
    # a checkpoint whose config and tokenizer load but whose weights are missing fails in the child
    path, _ = tiny_model_dir("llama")
    broken = tmp_path / "no-weights"
    shutil.copytree(path, broken, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.index.json"))
    with pytest.raises(EngineStartupError, match="failed to start: .+") as caught:
        spawn(broken)
    assert "safetensors" in str(caught.value).lower() or "weights" in str(caught.value).lower()
    assert {p.pid for p in multiprocessing.active_children()} == before


def test_child_exits_when_its_parent_dies(tiny_model_dir):
    path, _ = tiny_model_dir("llama")
    script = (
        "import sys, time\n"
        "from lmport.config import LaunchConfig\n"
        "from lmport.engine.engine_process import EngineProcessClient\n"
        "from lmport.plugins import PluginHost\n"
        "host = PluginHost(environ={}, load_entry_points=False).load()\n"
        f"client = EngineProcessClient(LaunchConfig(model_id={str(path)!r}, block_size=4, max_batch_total_tokens=512), host)\n"
        "print(client.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        child = int(parent.stdout.readline())
        assert not exited(child)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 20
        while not exited(child):
            assert time.monotonic() < deadline, "the engine process outlived its parent"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_the_flag_and_the_default():
    import argparse

    from lmport.commands import launch
    from lmport.commands.launch_flags import resolve_settings

    def parse(argv, environ=None):
        parser = argparse.ArgumentParser()
        launch.add_parser(parser.add_subparsers())
        return resolve_settings(parser.parse_args(["launch", *argv]), environ or {}).config

    assert parse([]).engine_process is None
    assert parse(["--engine-process", "true"]).engine_process is True
    assert parse([], {"LMPORT_ENGINE_PROCESS": "false"}).engine_process is False
    assert parse(["--engine-process", "false"], {"LMPORT_ENGINE_PROCESS": "true"}).engine_process is False


def test_cpu_default_keeps_the_engine_in_process(tiny_model_dir):
    path, _ = tiny_model_dir("llama")
    engine, _, _ = build_engine(LaunchConfig(model_id=str(path), block_size=4, max_batch_total_tokens=512), cpu_host())
    assert isinstance(engine, AsyncEngine)


def test_http_server_on_the_engine_process(tiny_model_dir):
    """``/generate`` and a streamed ``/v1/completions`` through build_engine(engine_process=True)."""
    from lmport.server.app import build_app
    from lmport.server.assemble import build_state
    from lmport.server.serve import ServerThread

    path, hf_model = tiny_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = LaunchConfig(model_id=str(path), engine_process=True, max_batch_total_tokens=4096, max_total_tokens=256)
    host = cpu_host()
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine, served_tokenizer, info = build_engine(config, host)
    finally:
        torch.set_num_threads(saved)
    assert isinstance(engine, EngineProcessClient)
    state = build_state(config, engine, served_tokenizer, info, host=host, model_id="tiny-llama")
    server = ServerThread(build_app(state)).start()
    try:
        prompt = "The quick brown fox"
        expected_ids, _ = hf_greedy_generate(hf_model, tokenizer(prompt)["input_ids"], 10, stop_at_eos=True)
        expected_text = tokenizer.decode(expected_ids, skip_special_tokens=True)

        body = {"inputs": prompt, "parameters": {"max_new_tokens": 10, "details": True}}
        response = httpx.post(f"{server.url}/generate", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert [t["id"] for t in response.json()["details"]["tokens"]] == expected_ids
        assert response.json()["generated_text"] == expected_text

        texts = []
        body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 10, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as streamed:
            assert streamed.status_code == 200
            for line in streamed.iter_lines():
                data = line.removeprefix("data:").strip()  # TGI writes ``data:{json}``
                if line.startswith("data:") and data != "[DONE]":
                    texts.extend(choice["text"] for choice in json.loads(data)["choices"])
        assert "".join(texts) == expected_text

        info_json = httpx.get(f"{server.url}/info").json()
        assert info_json["model_dtype"] == "float32" and info_json["max_total_tokens"] == 256
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        server.stop()
    assert not engine._child.process.is_alive() and engine._child.process.exitcode == 0  # the app's lifespan stopped it
