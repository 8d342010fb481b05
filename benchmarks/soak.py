"""A soak: steady mixed load on a running lmport server for a set time, so drift and leaks show.

A benchmark, not a test: it prints a table and writes JSON. ``--concurrency`` clients loop until
``--duration`` is over, each picking its next request by a seeded draw from ``--mix``:

- ``stream``: ``/generate_stream`` read to its end (latency, time to first token, tokens);
- ``plain``: ``/generate`` with ``details``;
- ``chat``: ``/v1/chat/completions`` (the chat template path);
- ``disconnect``: ``/generate_stream`` left after 1-5 tokens (the server must abort and free);
- ``bad``: a body the server must refuse with a 4xx JSON error (out-of-range parameters,
  unparsable JSON, a prompt past ``max_input_tokens``).

Anything else is *unexpected*: a 5xx, a transport error, a stream that ends without its final
event, a bad request accepted. Every ``--sample-every`` seconds a sample records the window's
requests/s, output tokens/s, p50/p99 latency, the server's RSS (the HTTP process and its
children, i.e. the engine process) from ``/proc``, GPU memory per process from ``nvidia-smi``
when there is one, and ``/metrics``' KV blocks in use, queue and batch size. After the load it
waits for the server to go idle and checks the gauges return to zero.

The server is either launched here (``--model-id``, extra launch flags after ``--``; stopped
with SIGTERM at the end, its exit code recorded) or given (``--url``, and ``--server-pid`` for
its memory)::

    python benchmarks/soak.py --model-id ./tiny-llama --duration 300 --json soak.json -- --max-batch-total-tokens 8192
    python benchmarks/soak.py --url http://127.0.0.1:3000 --server-pid 1234 --duration 600

The machine's load average is recorded at the start and the end: on a shared machine the
throughput says as much about the neighbours as about the server; the drift columns (RSS, KV
blocks, unexpected errors over time) are what a soak is for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

KINDS = ("stream", "plain", "chat", "disconnect", "bad")
DEFAULT_MIX = "stream=0.4,plain=0.25,chat=0.15,disconnect=0.1,bad=0.1"
WORDS = "the server streams tokens to many clients while the engine batches their requests on one device".split()


@dataclass
class Outcome:
    kind: str
    start: float
    end: float
    ok: bool  # what the kind expects happened
    status: int = 0
    tokens: int = 0
    ttft: float | None = None
    detail: str = ""


@dataclass
class Sample:
    t: float  # seconds since the load started
    requests: int  # finished in this window
    unexpected: int
    req_per_s: float
    output_tok_per_s: float
    p50_latency_s: float | None
    p99_latency_s: float | None
    p99_ttft_s: float | None
    rss_mib: float | None
    gpu_mib: float | None
    kv_blocks_used: float | None
    queue: float | None
    batch: float | None


# ---------------------------------------------------------------------- the requests


def prompt(rng: random.Random, words: tuple[int, int]) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))


def bad_request(rng: random.Random, max_input_tokens: int) -> tuple[str, dict | bytes]:
    choices = [
        ("/generate", {"inputs": "x", "parameters": {"top_p": 1.5}}),
        ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 0}}),
        ("/generate_stream", {"inputs": "x", "parameters": {"temperature": -1}}),
        ("/generate", b'{"inputs": "x", "parameters": {"temperature": NaN}}'),
        ("/v1/chat/completions", b"{not json"),
        ("/generate", {"inputs": "word " * (max_input_tokens + 8), "parameters": {"max_new_tokens": 2}}),
    ]
    return rng.choice(choices)


async def run_stream(client: httpx.AsyncClient, body: dict, leave_after: int | None) -> Outcome:
    start = time.monotonic()
    outcome = Outcome("disconnect" if leave_after else "stream", start, start, False)
    async with client.stream("POST", "/generate_stream", json=body) as response:
        outcome.status = response.status_code
        if response.status_code != 200:
            outcome.detail = (await response.aread()).decode(errors="replace")[:200]
            outcome.end = time.monotonic()
            return outcome
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                outcome.detail = str(event["error"])[:200]
                break
            outcome.tokens += 1
            if outcome.ttft is None:
                outcome.ttft = time.monotonic() - start
            if leave_after and outcome.tokens >= leave_after:
                outcome.ok = True  # leaving the block closes the connection mid-stream
                break
            if event.get("generated_text") is not None:
                outcome.ok = True
    outcome.end = time.monotonic()
    return outcome


async def one_request(client: httpx.AsyncClient, kind: str, rng: random.Random, args, max_input: int) -> Outcome:
    text = prompt(rng, args.prompt_words)
    max_new = rng.randint(*args.max_new_tokens)
    start = time.monotonic()
    try:
        if kind in ("stream", "disconnect"):
            body = {"inputs": text, "parameters": {"max_new_tokens": max_new}}
            return await run_stream(client, body, rng.randint(1, 5) if kind == "disconnect" else None)
        if kind == "plain":
            response = await client.post("/generate", json={"inputs": text, "parameters": {"max_new_tokens": max_new, "details": True}})
            tokens = response.json()["details"]["generated_tokens"] if response.status_code == 200 else 0
            return Outcome(kind, start, time.monotonic(), response.status_code == 200, response.status_code, tokens,
                           detail="" if response.status_code == 200 else response.text[:200])
        if kind == "chat":
            body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_new}
            response = await client.post("/v1/chat/completions", json=body)
            tokens = response.json()["usage"]["completion_tokens"] if response.status_code == 200 else 0
            return Outcome(kind, start, time.monotonic(), response.status_code == 200, response.status_code, tokens,
                           detail="" if response.status_code == 200 else response.text[:200])
        path, body = bad_request(rng, max_input)
        if isinstance(body, bytes):
            response = await client.post(path, content=body, headers={"content-type": "application/json"})
        else:
            response = await client.post(path, json=body)
        refused = 400 <= response.status_code < 500 and "error" in response.json()
        return Outcome(kind, start, time.monotonic(), refused, response.status_code, detail=response.text[:200])
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        return Outcome(kind, start, time.monotonic(), False, detail=f"{type(exc).__name__}: {exc}"[:200])


async def client_loop(client, worker: int, deadline: float, args, mix, max_input: int, outcomes: list[Outcome]) -> None:
    rng = random.Random(args.seed * 1000 + worker)
    kinds, weights = zip(*mix.items())
    while time.monotonic() < deadline:
        kind = rng.choices(kinds, weights)[0]
        outcomes.append(await one_request(client, kind, rng, args, max_input))


# ---------------------------------------------------------------------- sampling


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the engine process and what it started)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def rss_mib(pids: list[int]) -> float | None:
    total, seen = 0, False
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    seen = True
        except OSError:
            pass
    return total / 1024 if seen else None


def gpu_mib(pids: list[int]) -> float | None:
    """GPU memory the given processes hold, from ``nvidia-smi`` (None without one)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = 0.0
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in pids:
            used += float(parts[1])
    return used


def gauges(text: str) -> dict[str, float]:
    wanted = {"lmport_kv_blocks_used": "kv_blocks_used", "tgi_queue_size": "queue", "tgi_batch_current_size": "batch"}
    found = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in wanted:
            found[wanted[name]] = float(value)
    return found


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def sampler(client, started: float, deadline: float, every: float, pid: int | None, outcomes: list[Outcome], samples: list[Sample]) -> None:
    seen = 0
    window_start = started
    while True:
        now = time.monotonic()
        await asyncio.sleep(max(0.0, min(every, deadline - now) if now < deadline else 0))
        now = time.monotonic()
        window = outcomes[seen:]
        seen += len(window)
        span = max(now - window_start, 1e-9)
        window_start = now
        latencies = [o.end - o.start for o in window if o.ok and o.kind in ("stream", "plain", "chat")]
        pids = process_tree(pid) if pid else []
        try:
            metrics = gauges((await client.get("/metrics")).text)
        except httpx.HTTPError:
            metrics = {}
        samples.append(Sample(
            t=now - started, requests=len(window), unexpected=sum(not o.ok for o in window),
            req_per_s=len(window) / span, output_tok_per_s=sum(o.tokens for o in window) / span,
            p50_latency_s=percentile(latencies, 0.5), p99_latency_s=percentile(latencies, 0.99),
            p99_ttft_s=percentile([o.ttft for o in window if o.ttft is not None], 0.99),
            rss_mib=rss_mib(pids) if pids else None,
            gpu_mib=await asyncio.to_thread(gpu_mib, pids) if pids else None,
            **{k: metrics.get(k) for k in ("kv_blocks_used", "queue", "batch")},
        ))
        if now >= deadline:
            return


async def wait_idle(client: httpx.AsyncClient, timeout: float) -> dict:
    """The gauges once the server is idle (or after ``timeout``): a soak must leave nothing held."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = gauges((await client.get("/metrics")).text)
        idle = metrics.get("kv_blocks_used", 0) == 0 and metrics.get("queue", 0) == 0 and metrics.get("batch", 0) == 0
        if idle or time.monotonic() > deadline:
            return {"idle": idle, **metrics}
        await asyncio.sleep(0.5)


# ---------------------------------------------------------------------- the run


async def soak(args, url: str, pid: int | None) -> dict:
    mix = parse_mix(args.mix)
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits) as client:
        info = (await client.get("/info")).json()
        max_input = int(info.get("max_input_tokens") or 1024)
        outcomes: list[Outcome] = []
        samples: list[Sample] = []
        started = time.monotonic()
        deadline = started + args.duration
        load = [client_loop(client, w, deadline, args, mix, max_input, outcomes) for w in range(args.concurrency)]
        await asyncio.gather(sampler(client, started, deadline, args.sample_every, pid, outcomes, samples), *load)
        elapsed = time.monotonic() - started
        idle = await wait_idle(client, 60)
    return {"info": info, "elapsed_s": elapsed, "outcomes": outcomes, "samples": samples, "idle_after": idle}


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        if kind.strip() not in KINDS:
            raise SystemExit(f"--mix: unknown kind {kind!r}; choose from {', '.join(KINDS)}")
        mix[kind.strip()] = float(weight)
    return mix


def per_kind(outcomes: list[Outcome]) -> dict[str, dict]:
    table = {}
    for kind in KINDS:
        done = [o for o in outcomes if o.kind == kind]
        if not done:
            continue
        latencies = [o.end - o.start for o in done if o.ok]
        table[kind] = {
            "requests": len(done),
            "unexpected": sum(not o.ok for o in done),
            "output_tokens": sum(o.tokens for o in done),
            "p50_latency_s": percentile(latencies, 0.5),
            "p99_latency_s": percentile(latencies, 0.99),
            "p99_ttft_s": percentile([o.ttft for o in done if o.ttft is not None], 0.99),
            "statuses": count_statuses(done),
            "examples": sorted({o.detail for o in done if not o.ok})[:3],
        }
    return table


def count_statuses(outcomes: list[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[str(o.status)] = counts.get(str(o.status), 0) + 1
    return dict(sorted(counts.items()))


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_report(result: dict) -> None:
    print(f"\nsoak of {result['elapsed_s']:.0f} s, {result['config']['concurrency']} clients, model {result['info'].get('model_id')}")
    print(f"load average: {result['machine']['loadavg_start']} at the start, {result['machine']['loadavg_end']} at the end "
          f"({result['machine']['cpus']} CPUs)")
    print("\n    t s   req/s   out tok/s   p50 s   p99 s  p99 ttft s  unexpected   RSS MiB   GPU MiB  KV used  queue  batch")
    for s in result["samples"]:
        print(f"{s['t']:7.0f} {s['req_per_s']:7.2f} {s['output_tok_per_s']:11.1f} {fmt(s['p50_latency_s']):>7} "
              f"{fmt(s['p99_latency_s']):>7} {fmt(s['p99_ttft_s']):>11} {s['unexpected']:11d} {fmt(s['rss_mib'], '.0f'):>9} "
              f"{fmt(s['gpu_mib'], '.0f'):>9} {fmt(s['kv_blocks_used'], '.0f'):>8} {fmt(s['queue'], '.0f'):>6} {fmt(s['batch'], '.0f'):>6}")
    print("\nkind        requests  unexpected  out tokens   p50 s   p99 s  p99 ttft s  statuses")
    for kind, row in result["kinds"].items():
        print(f"{kind:<11} {row['requests']:8d} {row['unexpected']:11d} {row['output_tokens']:11d} {fmt(row['p50_latency_s']):>7} "
              f"{fmt(row['p99_latency_s']):>7} {fmt(row['p99_ttft_s']):>11}  {row['statuses']}")
    totals = result["totals"]
    print(f"\ntotal: {totals['requests']} requests ({totals['req_per_s']:.2f}/s), {totals['output_tok_per_s']:.1f} output tok/s, "
          f"{totals['unexpected']} unexpected; RSS {fmt(totals['rss_first_mib'], '.0f')} -> {fmt(totals['rss_last_mib'], '.0f')} MiB "
          f"(max {fmt(totals['rss_max_mib'], '.0f')}); idle after: {result['idle_after']}")
    if "server_exit_code" in result:
        print(f"server stopped with SIGTERM: exit code {result['server_exit_code']}")


def summarize(raw: dict, args, machine: dict) -> dict:
    outcomes, samples = raw["outcomes"], [asdict(s) for s in raw["samples"]]
    rss = [s["rss_mib"] for s in samples if s["rss_mib"] is not None]
    elapsed = raw["elapsed_s"]
    return {
        "config": {k: v for k, v in vars(args).items() if k != "launch_args"} | {"launch_args": args.launch_args},
        "machine": machine,
        "info": raw["info"],
        "elapsed_s": elapsed,
        "samples": samples,
        "kinds": per_kind(outcomes),
        "totals": {
            "requests": len(outcomes),
            "unexpected": sum(not o.ok for o in outcomes),
            "req_per_s": len(outcomes) / elapsed,
            "output_tok_per_s": sum(o.tokens for o in outcomes) / elapsed,
            "rss_first_mib": rss[0] if rss else None,
            "rss_last_mib": rss[-1] if rss else None,
            "rss_max_mib": max(rss) if rss else None,
        },
        "idle_after": raw["idle_after"],
    }


# ---------------------------------------------------------------------- launching


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args) -> tuple[subprocess.Popen, str]:
    port = args.port or free_port()
    command = [sys.executable, "-m", "lmport.cli", "launch", "--model-id", args.model_id, "--hostname", "127.0.0.1",
               "--port", str(port), *args.launch_args]
    log = open(args.server_log, "w") if args.server_log else subprocess.DEVNULL
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    if args.pid_file:
        Path(args.pid_file).write_text(str(process.pid))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server exited during start-up (exit code {process.returncode}); see {args.server_log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"the server was not healthy within {args.startup_timeout} s")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    launch_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--model-id", help="launch `lmport launch --model-id ...` here (extra launch flags after `--`)")
    where.add_argument("--url", help="a server that is running already")
    parser.add_argument("--server-pid", type=int, help="with --url: the server's PID, for its memory")
    parser.add_argument("--port", type=int, help="with --model-id: the port (default: a free one)")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load (default 300)")
    parser.add_argument("--concurrency", type=int, default=32, help="clients in flight (default 32)")
    parser.add_argument("--mix", default=DEFAULT_MIX, help=f"weights per kind (default {DEFAULT_MIX})")
    parser.add_argument("--prompt-words", type=int, nargs=2, default=(4, 48), metavar=("MIN", "MAX"))
    parser.add_argument("--max-new-tokens", type=int, nargs=2, default=(8, 64), metavar=("MIN", "MAX"))
    parser.add_argument("--sample-every", type=float, default=15.0, help="seconds between samples (default 15)")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="client-side timeout per request (s)")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--server-log", help="with --model-id: the server's log file")
    parser.add_argument("--pid-file", help="with --model-id: write the server's PID here (for a suite's clean-up)")
    args = parser.parse_args(argv)
    args.launch_args = launch_args
    process = None
    if args.model_id:
        process, url = launch(args)
        pid = process.pid
    else:
        url, pid = args.url.rstrip("/"), args.server_pid
    machine = {"cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        raw = asyncio.run(soak(args, url, pid))
    finally:
        machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        exit_code = None
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                exit_code = process.wait(120)
            except subprocess.TimeoutExpired:
                process.kill()
                exit_code = process.wait()
            if args.pid_file:
                Path(args.pid_file).unlink(missing_ok=True)
    result = summarize(raw, args, machine)
    if process is not None:
        result["server_exit_code"] = exit_code
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["totals"]["unexpected"] == 0 and result["idle_after"]["idle"] and exit_code in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
