"""Deadlines and backpressure: --request-timeout ends a request wherever it is and frees its
blocks; --max-queue-time refuses one never scheduled in time; a full server answers 429 with
Retry-After (TGI's and OpenAI's routes). The engine's part runs on a fake clock, so it is exact."""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
import pytest
import torch

from lmport.engine.api import GenerationRequest, SamplingParams
from lmport.testing.hf_oracle import hf_greedy_generate
from lmport.testing.http_checks import wait_until_idle


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def request(rid: str, prompt: list[int], max_new: int = 12, **params) -> GenerationRequest:
    return GenerationRequest(rid, tuple(prompt), SamplingParams(max_new_tokens=max_new, ignore_eos=True, **params))


def engine_with(build_engine_for, **deadlines):
    engine = build_engine_for("llama", block_size=4, max_batch_total_tokens=1024, max_batch_size=1)
    engine.limits = engine.scheduler.limits = dataclasses.replace(engine.limits, **deadlines)
    engine.clock = FakeClock()
    return engine


def prompts(*lengths: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, 384, (n,), generator=gen).tolist() for n in lengths]


def test_request_timeout_ends_the_request_and_frees_its_blocks(build_engine_for, tiny_checkpoint):
    _, hf_model = tiny_checkpoint("llama")
    engine = engine_with(build_engine_for, request_timeout=5.0)
    old, new = prompts(9, 6)
    engine.add_request(request("old", old, max_new=200))
    for _ in range(3):
        assert not any(o.error for o in engine.step())
    engine.clock.now += 4.0
    engine.add_request(request("new", new))  # waits behind "old" (one sequence at a time)
    engine.step()
    assert engine.stats().kv_blocks_used > 0
    engine.clock.now += 1.5  # "old" is 5.5 s old, "new" 1.5 s
    outputs = engine.step()
    (ended,) = [o for o in outputs if o.request_id == "old"]
    assert ended.finished and ended.error_kind == "timeout" and "--request-timeout" in ended.error
    outputs.remove(ended)  # in the same step "new" took the freed seat
    while engine.has_unfinished():
        outputs += engine.step()
    assert all(o.error is None for o in outputs) and {o.request_id for o in outputs} == {"new"}
    assert [t.token_id for o in outputs for t in o.tokens] == hf_greedy_generate(hf_model, new, 12)[0]
    assert engine.stats().kv_blocks_used == 0


def test_max_queue_time_refuses_only_requests_never_scheduled(build_engine_for):
    engine = engine_with(build_engine_for, max_queue_time=2.0)
    running, waiting, later = prompts(5, 7, 4)
    engine.add_request(request("running", running, max_new=100))
    engine.step()
    engine.add_request(request("waiting", waiting))
    engine.clock.now += 1.0
    engine.add_request(request("later", later))
    engine.step()
    engine.clock.now += 1.5  # "running" and "waiting" are 2.5 s old, "later" 1.5 s
    ended = [o for o in engine.step() if o.error]
    assert [(o.request_id, o.error_kind) for o in ended] == [("waiting", "queue_timeout")]
    assert "--max-queue-time" in ended[0].error
    engine.clock.now += 0.6  # now "later" has waited too long as well
    assert [o.request_id for o in engine.step() if o.error] == ["later"]
    engine.abort("running")
    assert engine.stats().kv_blocks_used == 0 and not engine.has_unfinished()


# ---------------------------------------------------------------------- over HTTP


# 480 tokens, EOS or not (vLLM's ignore_eos on the OpenAI route)
LONG = {"prompt": "a long one", "max_tokens": 480, "ignore_eos": True}


def test_a_full_server_answers_429_with_retry_after(serve):
    server = serve(max_concurrent_requests=2)

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            busy = [asyncio.create_task(client.post("/v1/completions", json=LONG)) for _ in range(2)]
            while server.state.engine.num_open < 2:
                await asyncio.sleep(0.01)
            tgi = await client.post("/generate", json={"inputs": "one more"})
            openai = await client.post("/v1/completions", json={"prompt": "one more", "max_tokens": 3})
            done = await asyncio.gather(*busy)
            return tgi, openai, done

    tgi, openai, done = asyncio.run(main())
    assert tgi.status_code == 429 and tgi.headers["retry-after"] == "1"
    assert tgi.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    assert openai.status_code == 429 and openai.headers["retry-after"] == "1"
    assert openai.json()["error"]["type"] == "rate_limit_error"
    assert [r.status_code for r in done] == [200, 200]


def test_deadlines_over_http(serve):
    """504 past --request-timeout; 429 with Retry-After for one that waited past --max-queue-time
    (one sequence at a time, behind a long one); both free their blocks."""
    # one sequence at a time, 480 tokens each: whichever runs first may finish within the second,
    # every one behind it cannot (it would need 480 steps in what is left of that second)
    server = serve(request_timeout=1.0, max_batch_size=1)

    async def timed_out():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            first = [asyncio.create_task(client.post("/v1/completions", json=LONG)) for _ in range(3)]
            while server.state.engine.num_open < 3:
                await asyncio.sleep(0.005)
            chat = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 480, "ignore_eos": True})
            return await asyncio.gather(*first), chat

    generated, chat = asyncio.run(timed_out())
    wait_until_idle(server)  # every block freed
    late = [r for r in generated if r.status_code == 504]
    assert len(late) >= 2 and all(r.status_code in (200, 504) for r in generated)
    for response in late:
        error = response.json()["error"]
        assert error["code"] == "timeout" and error["type"] == "server_error" and "--request-timeout" in error["message"]
    assert chat.status_code == 504 and chat.json()["error"]["type"] == "server_error"
    assert chat.json()["error"]["code"] == "timeout"

    server = serve(max_queue_time=0.05, max_batch_size=1)

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            long = asyncio.create_task(client.post("/v1/completions", json=LONG))
            while server.state.engine.stats().running < 1:
                await asyncio.sleep(0.005)
            queued = await client.post("/generate", json={"inputs": "queued", "parameters": {"max_new_tokens": 3}})
            return queued, await long

    queued, long = asyncio.run(main())
    wait_until_idle(server)
    assert queued.status_code == 429 and queued.headers["retry-after"] == "1"
    assert "--max-queue-time" in queued.json()["error"]
    assert long.status_code == 200
