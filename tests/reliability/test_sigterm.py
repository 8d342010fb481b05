"""SIGTERM under load, sent to the whole process group (as systemd, ``timeout`` or
``kill -- -pgid`` do): ``lmport launch`` with its engine in a process of its own stops taking
connections, lets every request in flight finish whole, and exits 0 with no process left."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from transformers import AutoTokenizer

from lmport.testing.hf_oracle import hf_greedy_generate
from lmport.testing.tgi_stream import open_streams

IN_FLIGHT = 16
MAX_NEW = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        found += [int(c) for c in children]
    return found


def alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_sigterm_to_the_group_under_load_drains_and_exits_0(tiny_checkpoint, tmp_path):
    path, hf_model = tiny_checkpoint("llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    expected, _ = hf_greedy_generate(hf_model, tokenizer("draining")["input_ids"], MAX_NEW, stop_at_eos=True)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "JSON_OUTPUT": "true"}
    log_path = tmp_path / "launch.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", "import sys; from lmport.cli import launcher_main; sys.exit(launcher_main())",
             "--model-id", str(path), "--hostname", "127.0.0.1", "--port", str(port), "--engine-process", "true",
             "--max-batch-total-tokens", "8192", "--max-total-tokens", "256", "--graceful-shutdown-timeout", "60"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its own group, as a service
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        children = children_of(process.pid)
        assert children, "the engine process is missing"

        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                body = {"inputs": "draining", "parameters": {"max_new_tokens": MAX_NEW, "details": True}}
                plain = [asyncio.create_task(client.post("/generate", json=body)) for _ in range(4)]
                streams = await asyncio.wait_for(open_streams(client, [body] * IN_FLIGHT), 60)
                os.killpg(process.pid, signal.SIGTERM)
                return await asyncio.gather(*streams), await asyncio.gather(*plain)

        streamed, plain = asyncio.run(main())
        assert process.wait(90) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    for result in streamed:
        assert result.status == 200 and result.error is None and result.generated_text is not None
        assert result.token_ids == expected  # finished whole, not cut off
    for response in plain:
        assert response.status_code == 200 and int(response.headers["x-generated-tokens"]) == len(expected)
    deadline = time.monotonic() + 15  # the engine process (and multiprocessing's resource tracker) exit on their own
    while any(alive(pid) for pid in children):
        assert time.monotonic() < deadline, [pid for pid in children if alive(pid)]
        time.sleep(0.1)
    with_errors = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert not [entry for entry in with_errors if entry.get("level") == "ERROR"], with_errors
