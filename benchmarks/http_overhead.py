"""The HTTP server's CPU time per streamed token, with the model taken out: CPU only.

The real app (``build_app`` on a ``ServerState`` from ``build_state``) runs under uvicorn in a
child process, in front of a stand-in engine that answers at once. The stand-in looks like
:class:`lmport.engine.async_engine.AsyncEngine` from the server's side (``generate``,
``abort``, ``stats``, ``is_healthy``, ``limits``, ``tokenizer``, ``vocab_size``,
``validate``) and delivers like it: a thread runs "steps", each emitting one token to every
open sequence, and hands a step's outputs to the event loop in one ``call_soon_threadsafe``.
It starts the next step once the loop has handled the last one's outputs, so it never runs
ahead of the server: every step carries a token for each open request, as under a GPU. Tokens are ASCII pieces of a trained byte-level BPE (``lmport.testing``), saved
to a folder and loaded back as the server would load them; a request finishes with
``length`` at its ``max_new_tokens``.

The load: ``--num-prompts`` streamed requests, ``--max-concurrency`` in flight, on each route:

- ``completions``: ``/v1/completions`` driven by lmport's own load generator
  (``lmport.bench.runner.run_load``, the ``lmport bench`` client: token-id prompts, usage chunk);
- ``generate_stream``: TGI's ``/generate_stream`` (text prompt, ``details: true``, as the
  ``text-generation`` client sends it);
- ``chat``: ``/v1/chat/completions`` with ``stream: true``;

both of the last with a small httpx client of the same shape. The server reports its own
``time.process_time()`` and the stand-in thread's ``time.thread_time()`` on an extra route;
their deltas over a run, divided by the tokens the stand-in emitted (all of which were
streamed), give the server's CPU microseconds per streamed token, and that less the stand-in's
share. Each route runs ``--repeats`` times; the table shows the best (the least disturbed on a
shared machine) and the median.

    python benchmarks/http_overhead.py --json http_overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

ROUTES = ("completions", "generate_stream", "chat")
TEXT = "The quick brown fox jumps over the lazy dog. Servers stream tokens to their clients as server-sent events. "


# ---------------------------------------------------------------------------- the stand-in engine


@dataclass
class _Open:
    """One request the stand-in is generating for."""

    request: Any
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    generated: list[int] = field(default_factory=list)  # per sequence
    position: int = 0  # where in the token cycle the next token comes from


class StandInEngine:
    """AsyncEngine's interface over a "model" that costs nothing (see the module doc)."""

    def __init__(self, tokenizer: Any, limits: Any, token_ids: list[int]):
        from lmport.engine.api import EngineStats, TokenInfo

        self.tokenizer = tokenizer
        self.limits = limits
        self.vocab_size = len(tokenizer)
        # the token cycle, decoded once: the stand-in's per-token work is a tuple lookup
        self._tokens = [TokenInfo(token_id=i, logprob=-0.5, text=tokenizer.decode([i])) for i in token_ids]
        self._open: dict[str, _Open] = {}
        self._aborted: deque[str] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._taken = threading.Event()  # the loop ran the last step's hand-over
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stats = EngineStats(running=0, waiting=0, kv_blocks_total=1, kv_blocks_used=0, prefix_cache_queries=0, prefix_cache_hits=0)
        self.tokens_emitted = 0
        self.steps = 0
        self.thread_cpu = 0.0

    # life cycle, as AsyncEngine
    def start(self) -> "StandInEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="standin-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float | None = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_healthy(self) -> bool:
        return not self._stopping

    def stats(self) -> Any:
        return self._stats

    model_dtype = "float32"
    error = None
    started_at = None

    @property
    def num_open(self) -> int:
        return len(self._open)

    def validate(self, request: Any) -> None:
        from lmport.engine.rules import validate_request

        validate_request(request, self.limits, self.vocab_size)

    def submit(self, requests: list[Any]) -> list["_StandInStream"]:
        """EngineClient.submit: validate, register, wake the step thread."""
        loop = asyncio.get_running_loop()
        streams = []
        for request in requests:
            self.validate(request)
        for request in requests:
            request = dataclasses.replace(request, arrival_time=request.arrival_time or time.monotonic())
            entry = _Open(request, asyncio.Queue(), loop, [0] * request.params.n)
            with self._lock:
                self._open[request.request_id] = entry
            streams.append(_StandInStream(self, entry))
        self.start()
        self._wake.set()
        return streams

    async def generate(self, request: Any) -> AsyncIterator[Any]:
        (stream,) = self.submit([request])
        try:
            async for item in stream:
                yield item
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        self._aborted.append(request_id)

    # the step thread
    def _run(self) -> None:
        start_cpu = time.thread_time()
        while not self._stopping:
            with self._lock:
                while self._aborted:
                    self._open.pop(self._aborted.popleft(), None)
                running = list(self._open.values())
            if not running:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
            done: list[str] = []
            for entry in running:
                for index in range(len(entry.generated)):
                    output = self._step_one(entry, index)
                    if output is None:
                        continue
                    by_loop.setdefault(entry.loop, []).append((entry.queue, output))
                if all(g >= entry.request.params.max_new_tokens for g in entry.generated):
                    done.append(entry.request.request_id)
            with self._lock:
                for request_id in done:
                    self._open.pop(request_id, None)
            self._taken.clear()
            for loop, items in by_loop.items():
                loop.call_soon_threadsafe(self._hand_over, items)
            self.steps += 1
            self.thread_cpu = time.thread_time() - start_cpu
            self._taken.wait(1.0)

    def _step_one(self, entry: _Open, index: int) -> Any:
        from lmport.engine.api import RequestOutput

        request = entry.request
        limit = request.params.max_new_tokens
        if entry.generated[index] >= limit:
            return None
        token = self._tokens[entry.position % len(self._tokens)]
        entry.position += 1
        entry.generated[index] += 1
        count = entry.generated[index]
        finished = count >= limit
        now = time.monotonic()
        self.tokens_emitted += 1
        return RequestOutput(
            request_id=request.request_id, index=index, tokens=[token], text=token.text, finished=finished,
            finish_reason="length" if finished else None, num_prompt_tokens=len(request.prompt_token_ids),
            num_generated_tokens=count, cumulative_logprob=-0.5 * count, seed=request.params.seed,
            arrival_time=request.arrival_time or now, first_scheduled_time=request.arrival_time or now,
            first_token_time=now, finished_time=now if finished else None,
        )

    def _hand_over(self, items: list[tuple[asyncio.Queue, Any]]) -> None:
        for queue, item in items:
            queue.put_nowait(item)
        # Queued behind the wake-ups of the requests just fed: the next step starts once the
        # server has turned this one's outputs into writes, as when it keeps pace with a GPU.
        asyncio.get_running_loop().call_soon(self._taken.set)


class _StandInStream:
    """One request's outputs from the stand-in (EngineClient's OutputStream)."""

    def __init__(self, engine: StandInEngine, entry: _Open):
        self.request_id = entry.request.request_id
        self.arrival_time = entry.request.arrival_time
        self._engine, self._queue = engine, entry.queue
        self._remaining = entry.request.params.n

    def __aiter__(self) -> "_StandInStream":
        return self

    async def __anext__(self) -> Any:
        if self._remaining <= 0:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item.finished:
            self._remaining -= 1
        return item

    def close(self) -> None:
        if self._remaining > 0:
            self._remaining = 0
            self._engine.abort(self.request_id)


# ---------------------------------------------------------------------------- the server process


def serve(args: argparse.Namespace) -> None:
    """Child process: build the real app on the stand-in, print the URL, serve until stdin closes."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from lmport.config import LaunchConfig
    from lmport.engine.limits import EngineLimits
    from lmport.models.base import ModelInfo
    from lmport.server.app import build_app
    from lmport.server.assemble import build_state
    from lmport.server.serve import ServerThread
    from lmport.testing.tiny_tokenizer import train_tiny_tokenizer

    folder = tempfile.mkdtemp(prefix="http-overhead-tok-")
    train_tiny_tokenizer(chat=True).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    cycle = [i for i in tokenizer(TEXT * 4, add_special_tokens=False)["input_ids"] if tokenizer.decode([i]).isascii()]

    concurrency = max(args.max_concurrency * 2, 128)
    max_total = args.input_len * 4 + args.output_len + 64
    config = LaunchConfig(model_id=folder, max_concurrent_requests=concurrency, max_total_tokens=max_total,
                          max_input_tokens=max_total - 1)  # fmt: skip
    limits = EngineLimits(
        max_concurrent_requests=concurrency, max_input_tokens=max_total - 1, max_total_tokens=max_total,
        max_batch_prefill_tokens=max_total, max_batch_total_tokens=max_total * concurrency, max_batch_size=concurrency,
        waiting_served_ratio=1.2, max_waiting_tokens=20, block_size=16, num_blocks=max_total * concurrency // 16,
    )
    engine = StandInEngine(tokenizer, limits, cycle)
    info = ModelInfo(model_id="standin", path=folder, hf_config=SimpleNamespace(model_type="llama"), architecture="standin")
    state = build_state(config, engine, tokenizer, info, model_id="standin")
    app = build_app(state)
    profiler = None

    async def cpu() -> dict[str, Any]:
        return {"process_cpu": time.process_time(), "engine_cpu": engine.thread_cpu,
                "tokens": engine.tokens_emitted, "steps": engine.steps}  # fmt: skip

    async def profile(action: str) -> dict[str, str]:
        nonlocal profiler
        import cProfile

        if action == "start":
            profiler = cProfile.Profile()
            profiler.enable()
        elif profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile_out)
            profiler = None
        return {"profile": action}

    app.add_api_route("/bench/cpu", cpu, methods=["GET"])
    app.add_api_route("/bench/profile/{action}", profile, methods=["POST"])
    thread = ServerThread(app, port=0).start()
    print(thread.url, flush=True)
    sys.stdin.read()  # the driver closes our stdin to stop us
    thread.stop()


# ---------------------------------------------------------------------------- the load


async def stream_one(client: Any, url: str, payload: dict) -> int:
    """POST a streamed request; the number of token events it got (raises on an error event)."""
    events = 0
    async with client.stream("POST", url, json=payload) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"error event: {event}")
            events += 1
    return events


async def drive_httpx(base_url: str, route: str, args: argparse.Namespace, prompt: str) -> int:
    import httpx

    if route == "generate_stream":
        url = base_url + "/generate_stream"
        payload = {"inputs": prompt, "parameters": {"max_new_tokens": args.output_len, "details": True}}
    else:
        url = base_url + "/v1/chat/completions"
        payload = {"model": "standin", "messages": [{"role": "user", "content": prompt}],
                   "max_tokens": args.output_len, "stream": True, "temperature": 0.0}  # fmt: skip
    limits = httpx.Limits(max_connections=args.max_concurrency, max_keepalive_connections=args.max_concurrency)
    gate = asyncio.Semaphore(args.max_concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=60.0), limits=limits) as client:

        async def one() -> int:
            async with gate:
                return await stream_one(client, url, payload)

        counts = await asyncio.gather(*(one() for _ in range(args.num_prompts)))
    return sum(counts)


async def drive_bench(base_url: str, args: argparse.Namespace, vocab_size: int, seed: int) -> int:
    from lmport.bench.dataset import random_prompts
    from lmport.bench.runner import LoadSpec, run_load

    requests = random_prompts(args.num_prompts, args.input_len, args.output_len, vocab_size, seed=seed, exclude=[0, 1, 2, 3, 4])
    spec = LoadSpec(args.num_prompts, args.input_len, args.output_len, max_concurrency=args.max_concurrency, label="completions")
    result = await run_load(base_url, requests, spec, model="standin", seed=seed, progress=False)
    if result.errors or result.metrics.failed:
        raise RuntimeError(f"completions: {result.metrics.failed} failed: {result.errors}")
    return result.metrics.total_output_tokens


async def measure(base_url: str, route: str, args: argparse.Namespace, prompt: str, vocab_size: int, seed: int) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=30.0) as client:
        before = (await client.get(base_url + "/bench/cpu")).json()
        wall = time.perf_counter()
        if route == "completions":
            received = await drive_bench(base_url, args, vocab_size, seed)
        else:
            received = await drive_httpx(base_url, route, args, prompt)
        wall = time.perf_counter() - wall
        after = (await client.get(base_url + "/bench/cpu")).json()
    tokens = after["tokens"] - before["tokens"]
    if received != tokens:  # every emitted token must have reached a client, one event each
        raise RuntimeError(f"{route}: the stand-in emitted {tokens} tokens, the clients got {received}")
    cpu = after["process_cpu"] - before["process_cpu"]
    engine = after["engine_cpu"] - before["engine_cpu"]
    return {
        "route": route, "tokens": tokens, "steps": after["steps"] - before["steps"], "wall_s": wall,
        "server_cpu_s": cpu, "standin_cpu_s": engine,
        "us_per_token": 1e6 * cpu / tokens, "http_us_per_token": 1e6 * (cpu - engine) / tokens,
    }


async def drive(args: argparse.Namespace, base_url: str) -> list[dict]:
    from lmport.testing.tiny_tokenizer import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(chat=True)
    ids = tokenizer(TEXT * (args.input_len // 8 + 1), add_special_tokens=False)["input_ids"][: args.input_len]
    prompt = tokenizer.decode(ids)
    runs = []
    # warm both sides (imports, connection pools, first-request paths) before measuring
    small = argparse.Namespace(**{**vars(args), "num_prompts": 4, "max_concurrency": 4})
    for route in args.routes:
        await measure(base_url, route, small, prompt, len(tokenizer), seed=1)
    for repeat in range(args.repeats):
        for route in args.routes:  # interleaved: slow drift of a shared machine hits every route alike
            if args.profile and repeat == 0:
                await _post(base_url + "/bench/profile/start")
            run = await measure(base_url, route, args, prompt, len(tokenizer), seed=100 + repeat)
            if args.profile and repeat == 0:
                await _post(base_url + "/bench/profile/stop")
            runs.append(run)
            print(f"  {route:16s} run {repeat + 1}: {run['us_per_token']:7.1f} us/token server CPU "
                  f"({run['http_us_per_token']:.1f} without the stand-in), {run['tokens']} tokens in {run['wall_s']:.1f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
    return runs


async def _post(url: str) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=30.0) as client:
        (await client.post(url)).raise_for_status()


def summarize(runs: list[dict], routes: list[str]) -> list[dict]:
    rows = []
    for route in routes:
        mine = [r for r in runs if r["route"] == route]
        best = min(mine, key=lambda r: r["us_per_token"])
        rows.append({
            "route": route,
            "us_per_token_best": best["us_per_token"],
            "us_per_token_median": statistics.median(r["us_per_token"] for r in mine),
            "http_us_per_token_best": min(r["http_us_per_token"] for r in mine),
            "standin_us_per_token": 1e6 * best["standin_cpu_s"] / best["tokens"],
            "tokens_per_s_best": max(r["tokens"] / r["wall_s"] for r in mine),
            "mean_tokens_per_step": best["tokens"] / max(best["steps"], 1),
        })
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routes", default=",".join(ROUTES), help=f"comma list of {', '.join(ROUTES)}")
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--max-concurrency", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", default=None, metavar="FILE", help="cProfile the server during each route's first run; "
                        "one stats file per route, FILE.<route>")  # fmt: skip
    parser.add_argument("--json", default=None, help="write the runs and the summary here")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--profile-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    if unknown := set(args.routes) - set(ROUTES):
        parser.error(f"unknown routes: {sorted(unknown)}")
    if args.serve:
        serve(args)
        return 0

    runs: list[dict] = []
    for route in args.routes if args.profile else [None]:
        # with --profile, a server per route, so each profile holds one route's work
        child_args = [sys.executable, os.path.abspath(__file__), "--serve", f"--max-concurrency={args.max_concurrency}",
                      f"--input-len={args.input_len}", f"--output-len={args.output_len}"]  # fmt: skip
        if route is not None:
            child_args.append(f"--profile-out={args.profile}.{route}")
        child = subprocess.Popen(child_args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            base_url = child.stdout.readline().strip()
            if not base_url.startswith("http"):
                raise SystemExit("the server process did not start (see its log above)")
            sub = argparse.Namespace(**{**vars(args), "routes": [route] if route else args.routes})
            runs += asyncio.run(drive(sub, base_url))
        finally:
            child.stdin.close()
            child.wait(60)

    rows = summarize(runs, args.routes)
    print(f"server CPU per streamed token: {args.num_prompts} requests, {args.max_concurrency} concurrent, "
          f"{args.input_len} in / {args.output_len} out, best of {args.repeats} ({platform.python_version()}, {os.cpu_count()} cpus)")  # fmt: skip
    print(f"| route | us/token best | median | less stand-in | stand-in | tokens/s | tokens/step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['route']} | {row['us_per_token_best']:.1f} | {row['us_per_token_median']:.1f} | "
              f"{row['http_us_per_token_best']:.1f} | {row['standin_us_per_token']:.1f} | {row['tokens_per_s_best']:.0f} | "
              f"{row['mean_tokens_per_step']:.0f} |")  # fmt: skip
    if args.json:
        context = {"args": vars(args), "python": platform.python_version(), "cpus": os.cpu_count()}
        with open(args.json, "w") as f:
            json.dump({"context": context, "summary": rows, "runs": runs}, f, indent=2)
        print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
