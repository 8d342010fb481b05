"""``lmport bench``: its arithmetic, its stream reader, and a real run against ``lmport launch``.

The metric tests use hand-made timings and a minimal in-process ASGI app that streams in the
server's format (no sockets, no timing); the integration tests start the real server on a
tiny random Llama with a tokenizer and run the real command against it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from lmport.bench.checkpoint import llama_config, write_random_checkpoint
from lmport.bench.client import RequestResult, stream_completion
from lmport.bench.dataset import BenchRequest, random_prompts
from lmport.bench.metrics import compute_metrics, peak_concurrency
from lmport.cli import main as lmport_main

TINY_LLAMA = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=512, max_position_embeddings=512, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False)  # fmt: skip


# ------------------------------------------------------------------ prompts and arithmetic


def test_random_prompts_are_seeded_and_avoid_special_ids() -> None:
    a = random_prompts(4, 32, 7, vocab_size=50, seed=3, exclude=[0, 1, 2, 49])
    b = random_prompts(4, 32, 7, vocab_size=50, seed=3, exclude=[0, 1, 2, 49])
    c = random_prompts(4, 32, 7, vocab_size=50, seed=4, exclude=[0, 1, 2, 49])
    assert a == b and a != c
    ids = {i for r in a for i in r.prompt_ids}
    assert all(len(r.prompt_ids) == 32 and r.output_len == 7 for r in a)
    assert ids <= set(range(3, 49)) and len(ids) > 20


def test_metrics_follow_vllm_definitions() -> None:
    results = [
        RequestResult(prompt_len=10, success=True, output_tokens=5, ttft=0.1, itl=[0.01, 0.02, 0.03, 0.04], latency=0.2, start=0.0),
        RequestResult(prompt_len=10, success=True, output_tokens=3, ttft=0.3, itl=[0.05, 0.15], latency=0.5, start=0.1),
        RequestResult(prompt_len=10, success=True, output_tokens=1, ttft=0.2, itl=[], latency=0.2, start=1.0),
        RequestResult(prompt_len=10, success=False, error="HTTP 500"),
    ]
    m = compute_metrics(results, duration_s=2.0, percentiles=[50, 99])
    assert (m.completed, m.failed) == (3, 1)
    assert (m.total_input_tokens, m.total_output_tokens) == (30, 9)
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(4.5)
    assert m.total_token_throughput == pytest.approx(19.5)
    assert m.ttft_ms.mean == pytest.approx(200.0)
    assert m.ttft_ms.median == pytest.approx(200.0)
    # TPOT per request: (0.2 - 0.1) / 4 and (0.5 - 0.3) / 2; the one-token request has none
    assert m.tpot_ms.mean == pytest.approx((25.0 + 100.0) / 2)
    # ITL pools every gap of every request
    assert m.itl_ms.mean == pytest.approx(1000 * 0.30 / 6)
    # gaps in ms sorted: 10 20 30 40 50 150; p99 interpolates at rank 4.95
    assert m.itl_ms.percentiles["p99"] == pytest.approx(145.0)
    assert m.itl_ms.median == pytest.approx(35.0)
    assert m.e2el_ms.mean == pytest.approx(300.0)
    assert m.max_concurrent_requests == 2  # the first two overlap, the third starts after both
    assert peak_concurrency([]) == 0


# ------------------------------------------------------------------ the stream reader


def sse_app(events: list, status: int = 200):
    """A minimal ASGI app that answers every request with ``events`` as server-sent events."""

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await receive()
        if status != 200:
            await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": json.dumps({"error": "bad", "error_type": "validation"}).encode()})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for event in events:
            data = event if isinstance(event, str) else json.dumps(event)
            await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


def read_stream(app) -> RequestResult:
    async def go() -> RequestResult:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await stream_completion(client, "http://test/v1/completions", BenchRequest([5, 6, 7], 3), "m")

    return asyncio.run(go())


def chunk(text: str, finish: str | None = None) -> dict:
    return {"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}]}


def test_stream_reader_counts_chunks_and_reads_usage() -> None:
    usage = {"id": "cmpl-1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    result = read_stream(sse_app([chunk("a"), chunk(""), chunk("b", "length"), usage, "[DONE]"]))
    assert result.success and not result.error
    assert result.output_tokens == 4  # the usage chunk wins over the chunk count
    assert len(result.itl) == 2 and result.ttft > 0 and result.latency >= result.ttft
    assert result.prompt_len == 3


def test_stream_reader_reports_failures() -> None:
    http_error = read_stream(sse_app([], status=422))
    assert not http_error.success and http_error.error.startswith("HTTP 422")
    in_stream = read_stream(sse_app([chunk("a"), {"error": "Request failed during generation", "error_type": "generation"}]))
    assert not in_stream.success and "generation" in in_stream.error
    empty = read_stream(sse_app(["[DONE]"]))
    assert not empty.success and "without a token" in empty.error


# ------------------------------------------------------------------ against the real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``lmport launch`` in a subprocess on the CPU backend."""

    def __init__(self, model: Path, log: Path):
        self.model = model
        self.port = free_port()
        self.log = log
        cmd = [sys.executable, "-m", "lmport.cli", "launch", "--model-id", str(model), "--backend", "cpu",
               "--hostname", "127.0.0.1", "--port", str(self.port), "--max-input-tokens", "64", "--max-total-tokens", "128"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=dict(os.environ, LOG_LEVEL="WARNING"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not healthy in {timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-server")
    write_random_checkpoint(llama_config(TINY_LLAMA), root / "model", dtype=torch.float32, device="cpu", std=0.08)
    server = Server(root / "model", root / "server.log")
    try:
        server.wait()
        yield server
    finally:
        server.stop()


def test_bench_command_against_lmport_launch(tiny_server: Server, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    # --tokenizer: /info names a local checkpoint by its folder name, never its path
    rc = lmport_main(["bench", "--base-url", tiny_server.url, "--tokenizer", str(tiny_server.model), "--num-prompts", "6", "--input-len", "16",
                      "--output-len", "8", "--max-concurrency", "1,4", "--request-rate", "inf,50",
                      "--result-json", str(out), "--no-progress"])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0, printed
    document = json.loads(out.read_text())
    assert document["server_info"]["model_id"] == "model" and document["base_url"] == tiny_server.url
    runs = document["runs"]
    assert [(r["spec"]["max_concurrency"], r["spec"]["request_rate"]) for r in runs] == [(1, "inf"), (1, 50.0), (4, "inf"), (4, 50.0)]
    for run in runs:
        m = run["metrics"]
        assert (m["completed"], m["failed"]) == (6, 0), run["errors"]
        assert m["total_input_tokens"] == 6 * 16
        assert m["total_output_tokens"] == 6 * 8  # the checkpoint's EOS is never the greedy pick
        assert 1 <= m["max_concurrent_requests"] <= run["spec"]["max_concurrency"]
        assert m["ttft_ms"]["mean"] > 0 and m["tpot_ms"]["mean"] > 0 and m["itl_ms"]["percentiles"]["p99"] > 0
        assert m["output_throughput"] == pytest.approx(m["total_output_tokens"] / m["duration_s"])
    assert runs[0]["metrics"]["max_concurrent_requests"] == 1
    table_rows = [line for line in printed.splitlines() if line.strip().startswith("c")]
    assert len(table_rows) == 4 and "c4-rinf" in printed


@pytest.fixture(scope="module")
def always_eos_server(tmp_path_factory):
    """A checkpoint whose greedy pick is always EOS: the final norm is zero, so every logit is 0
    and argmax is id 0, which this tokenizer makes EOS."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("eos-server")
    model = root / "model"
    config = llama_config(dict(TINY_LLAMA, bos_token_id=1, eos_token_id=0))
    write_random_checkpoint(config, model, dtype=torch.float32, device="cpu")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = model / index["weight_map"]["model.norm.weight"]
    tensors = load_file(str(shard))
    tensors["model.norm.weight"].zero_()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    server = Server(model, root / "server.log")
    try:
        server.wait()
        yield server
    finally:
        server.stop()


def completion_tokens(url: str, ignore_eos: bool) -> int:
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 5, "temperature": 0.0, "ignore_eos": ignore_eos}
    response = httpx.post(url + "/v1/completions", json=body, timeout=60.0)
    assert response.status_code == 200, response.text
    return response.json()["usage"]["completion_tokens"]


def test_server_stops_at_eos_without_ignore_eos(always_eos_server: Server) -> None:
    assert completion_tokens(always_eos_server.url, ignore_eos=False) == 1


def test_server_honours_ignore_eos(always_eos_server: Server) -> None:
    assert completion_tokens(always_eos_server.url, ignore_eos=True) == 5


def test_bench_names_the_fix_when_the_servers_model_id_is_no_tokenizer(tmp_path: Path) -> None:
    """The default model's /info names "gemma-3-270m-q4_k_m", which no tokenizer loads from:
    a one-line error naming --tokenizer / --vocab-size, not a traceback."""
    from lmport.commands.bench import _vocabulary

    args = argparse.Namespace(vocab_size=None, tokenizer=str(tmp_path))  # a folder with no tokenizer in it
    with pytest.raises(SystemExit, match="--tokenizer FOLDER or --vocab-size N"):
        _vocabulary(args, {})
