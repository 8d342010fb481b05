"""Many streams at once, and clients that leave: every stream completes with transformers'
tokens, and a disconnect aborts its request so the KV blocks return to the pool."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx

from lmport.testing.http_checks import metric_value, wait_until_idle

PROMPTS = ["The quick brown fox", "Servers stream tokens", "A chat template", "héllo wörld ☃"]


def test_64_concurrent_streams_complete(server, tiny_llama, hf_reference):
    tokenizer = tiny_llama[2]
    max_new = 16
    expected = {p: hf_reference(tokenizer(p)["input_ids"], max_new) for p in PROMPTS}

    async def one(client: httpx.AsyncClient, prompt: str) -> tuple[str, list[int], str]:
        ids, final = [], None
        body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new}}
        async with client.stream("POST", "/generate_stream", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    event = json.loads(line[5:])
                    ids.append(event["token"]["id"])
                    final = event["generated_text"]
        return prompt, ids, final

    async def run():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as client:
            return await asyncio.gather(*(one(client, PROMPTS[i % len(PROMPTS)]) for i in range(64)))

    results = asyncio.run(run())
    assert len(results) == 64
    for prompt, ids, final in results:
        assert ids == expected[prompt][0]
        assert final == expected[prompt][1]
    wait_until_idle(server)


def test_stream_disconnect_frees_blocks(server):
    wait_until_idle(server)
    body = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 400}}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        with client.stream("POST", "/generate_stream", json=body) as response:
            seen = 0
            for line in response.iter_lines():
                if line.startswith("data:"):
                    seen += 1
                if seen == 3:
                    assert server.state.engine.stats().kv_blocks_used > 0
                    break  # leaving the block closes the connection mid-stream
    stats = wait_until_idle(server)
    assert stats.kv_blocks_used == 0


def test_generate_disconnect_frees_blocks(server):
    """A non-streaming client that hangs up is noticed too (the server watches the socket)."""
    wait_until_idle(server)
    body = json.dumps({"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 500}}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        deadline = time.monotonic() + 10
        while server.state.engine.stats().running == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.state.engine.stats().kv_blocks_used > 0
    wait_until_idle(server)


def test_metrics_count_requests(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        before = client.get("/metrics").text
        assert client.post("/generate", json={"inputs": "The quick", "parameters": {"max_new_tokens": 3}}).status_code == 200
        assert client.post("/generate", json={"inputs": "The quick", "parameters": {"top_k": 0}}).status_code == 422
        after = client.get("/metrics").text

    assert metric_value(after, "tgi_request_count") == metric_value(before, "tgi_request_count") + 2
    assert metric_value(after, "tgi_request_success") == metric_value(before, "tgi_request_success") + 1
    assert metric_value(after, 'tgi_request_failure{err="validation"}') == metric_value(before, 'tgi_request_failure{err="validation"}') + 1
    assert metric_value(after, "tgi_request_generated_tokens_count") == metric_value(before, "tgi_request_generated_tokens_count") + 1
    for name in ("tgi_request_duration_bucket", "tgi_request_queue_duration_sum", "tgi_request_inference_duration_count",
                 "tgi_request_mean_time_per_token_duration_count", "tgi_request_input_length_count",
                 "tgi_batch_current_size", "tgi_queue_size", "lmport_kv_blocks_used", "lmport_kv_blocks_free",
                 "lmport_prefix_cache_hit_rate"):
        assert name in after
    assert metric_value(after, "lmport_kv_blocks_used") == 0
    assert "tgi_request_count_total" not in after  # TGI's names, not prometheus_client's suffix
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(after)}  # valid exposition text
    assert families["tgi_request_count"].type == "counter"
    assert families["tgi_request_duration"].type == "histogram"
