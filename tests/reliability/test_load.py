"""Load and faults over a real socket, on a tiny model (bounded in count and time, loopback only):
1,000 concurrent streams with nothing lost, duplicated or 5xx; 200 clients that leave mid-stream
and every KV block back in the pool; a KV cache of a few blocks under many long requests, every
one finished with its uncontended tokens; a bad request that fails alone while the batch it
would have joined goes on."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from lmport.testing.hf_oracle import hf_greedy_generate
from lmport.testing.http_checks import metric_value, wait_until_idle
from lmport.testing.tgi_stream import open_streams, read_stream

PROMPTS = [f"stream {i} of the load test" for i in range(20)]


@pytest.fixture
def reference(tiny_checkpoint):
    """``reference(tokenizer, prompt, max_new)``: transformers' greedy ids (stopping at EOS, as the server does)."""
    _, hf_model = tiny_checkpoint("llama")
    cache: dict = {}

    def get(tokenizer, prompt: str, max_new: int) -> list[int]:
        if (prompt, max_new) not in cache:
            cache[prompt, max_new] = hf_greedy_generate(hf_model, tokenizer(prompt)["input_ids"], max_new, stop_at_eos=True)[0]
        return cache[prompt, max_new]

    return get


def client_for(server, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits)


def test_1000_concurrent_streams_none_lost_duplicated_or_5xx(serve, reference):
    count, max_new = 1000, 6
    server = serve(max_concurrent_requests=count, max_batch_total_tokens=32768)
    tokenizer = server.state.tokenizer
    metrics_before = httpx.get(f"{server.url}/metrics").text

    async def main():
        async with client_for(server, count) as client:
            body = lambda i: {"inputs": PROMPTS[i % len(PROMPTS)], "parameters": {"max_new_tokens": max_new, "details": True}}  # noqa: E731
            return await asyncio.gather(*(read_stream(client, body(i)) for i in range(count)))

    results = asyncio.run(main())
    assert len(results) == count
    assert sorted({r.status for r in results}) == [200]
    for i, result in enumerate(results):
        prompt = PROMPTS[i % len(PROMPTS)]
        assert result.error is None, result.error
        assert result.indexes == list(range(1, len(result.token_ids) + 1))  # none lost, none twice
        assert result.token_ids == reference(tokenizer, prompt, max_new)  # nobody else's tokens
        assert result.generated_text == tokenizer.decode(result.token_ids, skip_special_tokens=True)
    wait_until_idle(server)
    after = httpx.get(f"{server.url}/metrics").text
    assert metric_value(after, "tgi_request_success") - metric_value(metrics_before, "tgi_request_success") == count


def test_200_mid_stream_disconnects_free_every_block(serve):
    count = 200
    server = serve(max_concurrent_requests=count, max_batch_total_tokens=32768)
    total = server.state.engine.stats().kv_blocks_total
    name = 'tgi_request_failure{err="disconnected"}'
    before = metric_value(httpx.get(f"{server.url}/metrics").text, name)
    rng = random.Random(5)
    leave_after = [rng.randint(1, 6) for _ in range(count)]

    async def one(client, i):
        body = {"inputs": PROMPTS[i % len(PROMPTS)], "parameters": {"max_new_tokens": 400}}
        seen = 0
        async with client.stream("POST", "/generate_stream", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    seen += 1
                    if seen == leave_after[i]:
                        return seen  # leaving the block closes the connection mid-stream

    async def main():
        async with client_for(server, count) as client:
            return await asyncio.gather(*(one(client, i) for i in range(count)))

    assert asyncio.run(main()) == leave_after
    stats = wait_until_idle(server, timeout=60)
    assert stats.kv_blocks_used == 0 and stats.kv_blocks_total == total
    assert server.state.engine.num_open == 0
    assert metric_value(httpx.get(f"{server.url}/metrics").text, name) == before + count


def test_kv_exhaustion_preempts_and_finishes_every_request_with_its_own_tokens(serve, reference):
    """16 blocks of 4 tokens for 24 requests that each grow to ~45 tokens (12 blocks): at most one
    runs at a time, the others queue or are preempted and recomputed; all finish, each with the
    tokens it gets alone."""
    count, max_new = 24, 36
    server = serve(block_size=4, max_batch_total_tokens=64, max_total_tokens=64, max_concurrent_requests=count)
    tokenizer = server.state.tokenizer
    assert server.state.engine.stats().kv_blocks_total == 16

    async def main():
        async with client_for(server, count) as client:
            body = lambda i: {"inputs": PROMPTS[i % len(PROMPTS)], "parameters": {"max_new_tokens": max_new, "details": True}}  # noqa: E731
            streams = [read_stream(client, body(i)) for i in range(count // 2)]
            plain = [client.post("/generate", json=body(i)) for i in range(count // 2, count)]
            return await asyncio.gather(*streams), await asyncio.gather(*plain)

    streamed, plain = asyncio.run(main())
    for i, result in enumerate(streamed):
        assert result.status == 200 and result.error is None, result.error
        assert result.token_ids == reference(tokenizer, PROMPTS[i % len(PROMPTS)], max_new)
    for i, response in enumerate(plain, start=count // 2):
        assert response.status_code == 200, response.text
        ids = [t["id"] for t in response.json()["details"]["tokens"]]
        assert ids == reference(tokenizer, PROMPTS[i % len(PROMPTS)], max_new)
    stats = wait_until_idle(server)
    assert stats.extra["preemptions"] > 0  # the cache really ran out
    assert stats.kv_blocks_used == 0


BAD = [
    ("/generate", {"inputs": "x " * 600, "parameters": {"max_new_tokens": 4}}, 422),  # prompt past max_input_tokens
    ("/generate", {"inputs": "x", "parameters": {"top_p": 1.5}}, 422),
    ("/generate", '{"inputs": "x", "parameters": {"temperature": NaN}}', 422),
    ("/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 0}}, 422),
    # an image for a model that reads none
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, 422),
    ("/v1/completions", {"prompt": "x", "max_tokens": 4, "n": 1000}, 422),
    ("/generate", b"{not json", 400),
]


def test_bad_requests_fail_alone_while_the_batch_they_would_join_goes_on(serve, reference):
    max_new = 40
    server = serve()
    tokenizer = server.state.tokenizer

    async def main():
        async with client_for(server, 64) as client:
            bodies = [{"inputs": p, "parameters": {"max_new_tokens": max_new}} for p in PROMPTS[:12]]
            batch = await asyncio.wait_for(open_streams(client, bodies), 60)
            answers = []
            for path, payload, _ in BAD:  # while the batch runs
                if isinstance(payload, (bytes, str)):
                    answers.append(await client.post(path, content=payload, headers={"content-type": "application/json"}))
                else:
                    answers.append(await client.post(path, json=payload))
            return await asyncio.gather(*batch), answers

    results, answers = asyncio.run(main())
    for (path, _, status), answer in zip(BAD, answers):
        assert answer.status_code == status, (path, answer.text)
        body = answer.json()
        assert ("error" in body and "error_type" in body) or set(body["error"]) == {"message", "type", "param", "code"}
    for prompt, result in zip(PROMPTS, results):
        assert result.status == 200 and result.error is None
        assert result.token_ids == reference(tokenizer, prompt, max_new)
    wait_until_idle(server)
