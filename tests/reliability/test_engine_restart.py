"""The HTTP process supervises the engine process: SIGKILL it under load, and every client in
flight gets an error (none waits forever), ``/health`` says 503 while a new engine process
loads and 200 once it serves (new requests meanwhile: 503 with Retry-After), and new requests
then get the same tokens as transformers."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest
import torch

from lmport.engine.engine_process import EngineProcessClient
from lmport.testing.hf_oracle import hf_greedy_generate
from lmport.testing.tgi_stream import open_streams

IN_FLIGHT = 12


@pytest.fixture
def process_server(serve, tiny_checkpoint):
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # the engine process copies the parent's count
    try:
        server = serve(engine_process=True)
    finally:
        torch.set_num_threads(saved)
    engine = server.state.engine
    assert isinstance(engine, EngineProcessClient)
    engine.restart_policy.backoff_s = 0.2
    _, hf_model = tiny_checkpoint("llama")
    return server, engine, hf_model, server.state.tokenizer


def test_sigkill_under_load_fails_only_the_requests_in_flight_and_the_server_serves_again(process_server):
    server, engine, hf_model, tokenizer = process_server
    first_pid = engine.pid
    prompts = [f"request number {i} says" for i in range(IN_FLIGHT)]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            body = lambda p: {"inputs": p, "parameters": {"max_new_tokens": 400, "details": True}}  # noqa: E731
            plain = asyncio.create_task(client.post("/generate", json=body("a plain request")))
            streams = await asyncio.wait_for(open_streams(client, [body(p) for p in prompts]), 60)
            os.kill(first_pid, signal.SIGKILL)
            killed_at = time.monotonic()
            # nobody waits forever: every client in flight has its answer within seconds
            results = await asyncio.wait_for(asyncio.gather(*streams), 30)
            answered = await asyncio.wait_for(plain, 30)
            waited = time.monotonic() - killed_at

            down = await client.get("/health")
            refused = await client.post("/generate", json={"inputs": "too soon", "parameters": {"max_new_tokens": 2}})
            while (health := await client.get("/health")).status_code != 200:
                assert time.monotonic() - killed_at < 120, "the engine process was not restarted"
                await asyncio.sleep(0.1)
            assert health.status_code == 200

            after = [f"after the restart {i}" for i in range(4)]
            new = await asyncio.gather(*(client.post("/generate", json={"inputs": p, "parameters": {"max_new_tokens": 8, "details": True}}) for p in after))
            return results, answered, waited, down, refused, after, new

    results, answered, waited, down, refused, after, new = asyncio.run(main())
    for result in results:
        assert result.status == 200 and result.generated_text is None  # cut off mid-stream ...
        assert result.error is not None and result.error["error_type"] == "generation"  # ... with an error event
        assert "killed by SIGKILL" in result.error["error"]
    assert answered.status_code == 424 and "killed by SIGKILL" in answered.json()["error"]
    assert waited < 30
    assert down.status_code == 503  # right after the kill, while the new engine process loads
    assert refused.status_code == 503 and refused.json()["error_type"] == "unavailable"
    assert "being restarted" in refused.json()["error"] and int(refused.headers["retry-after"]) >= 1
    for prompt, response in zip(after, new):
        assert response.status_code == 200, response.text
        expected, _ = hf_greedy_generate(hf_model, tokenizer(prompt)["input_ids"], 8, stop_at_eos=True)
        assert [t["id"] for t in response.json()["details"]["tokens"]] == expected
    assert engine.pid != first_pid and engine.restarts == 1
