"""``lmport bench``: load a running server the way vLLM's ``bench serve`` does and report.

Fixed-length random token-id prompts, fixed output length with ``ignore_eos``, streamed from
``/v1/completions``; a sweep over ``--max-concurrency`` and ``--request-rate`` values (comma
lists). Prints a table, writes JSON with ``--result-json``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark a running server (vLLM's `bench serve` protocol on /v1/completions)",
        description="Send fixed-length random token-id prompts to a running server's OpenAI /v1/completions "
        "(streaming, ignore_eos), with Poisson arrivals under a concurrency cap, and report request and "
        "token throughput with TTFT, TPOT and ITL (mean, median, percentiles).",
    )
    parser.add_argument("--base-url", default=None, help="server URL (default http://HOST:PORT)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--model", default=None, help="`model` field of the requests (default: the server's /v1/models)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for the vocabulary (default: the server's model_id, "
                        "which loads when it is a hub id; a local checkpoint's server names only its folder)")
    parser.add_argument("--vocab-size", type=int, default=None, help="draw ids from 0..N-1 instead of a tokenizer's vocabulary")
    parser.add_argument("--num-prompts", type=int, default=256, help="requests per run")
    parser.add_argument("--input-len", type=int, default=512, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=128, help="generated tokens per request")
    parser.add_argument("--max-concurrency", default="", help="comma list of caps on requests in flight, one run each (empty: no cap)")
    parser.add_argument("--request-rate", default="inf", help="comma list of Poisson arrival rates in requests/s, one run each (inf: all at once)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--percentiles", default="50,99", help="latency percentiles to report")
    parser.add_argument("--num-warmups", type=int, default=1, help="requests sent before measuring")
    parser.add_argument("--wait-for-server", type=float, default=0.0, metavar="SECONDS", help="wait this long for /health first")
    parser.add_argument("--result-json", default=None, help="write all runs and the server's /info here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def parse_list(text: str, kind: type) -> list:
    items = [item.strip() for item in text.split(",") if item.strip()]
    return [kind(item) for item in items]


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:  # pragma: no cover - interactive
        return 130


async def _run(args: argparse.Namespace) -> int:
    import httpx

    from lmport.bench.dataset import random_prompts
    from lmport.bench.report import format_table, write_json
    from lmport.bench.runner import LoadSpec, ServerNotReady, run_load, wait_for_server, warm_up

    base_url = args.base_url or f"http://{args.host}:{args.port}"
    concurrencies: list[int | None] = parse_list(args.max_concurrency, int) or [None]
    rates = parse_list(args.request_rate, float) or [math.inf]
    percentiles = parse_list(args.percentiles, float)
    try:
        if args.wait_for_server > 0:
            await wait_for_server(base_url, args.wait_for_server)
        info, model = await _server_facts(base_url, args.model)
    except (ServerNotReady, httpx.HTTPError) as exc:
        print(f"lmport bench: {base_url} is not serving: {exc}", file=sys.stderr)
        return 2
    vocab_size, special = _vocabulary(args, info)

    runs = []
    for index, (concurrency, rate) in enumerate((c, r) for c in concurrencies for r in rates):
        spec = LoadSpec(args.num_prompts, args.input_len, args.output_len, rate, concurrency,
                        label=f"c{concurrency or 'inf'}-r{rate:g}")  # fmt: skip
        # fresh prompts per run (and for the warm-up): a prefix cache must not serve a later run
        seed = args.seed + 1000 * (index + 1)
        requests = random_prompts(args.num_prompts, args.input_len, args.output_len, vocab_size, seed=seed, exclude=special)
        try:
            for w in range(args.num_warmups):
                warm = random_prompts(1, args.input_len, args.output_len, vocab_size, seed=seed + 1 + w, exclude=special)
                await warm_up(base_url, warm[0], model)
        except ServerNotReady as exc:
            print(f"lmport bench: {exc}", file=sys.stderr)
            return 2
        result = await run_load(base_url, requests, spec, model=model, seed=seed, progress=not args.no_progress,
                                percentiles=percentiles)  # fmt: skip
        runs.append(result)
        for error in result.errors:
            print(f"  {spec.label}: failed request: {error}", file=sys.stderr)

    device = (info.get("server_info") or {}).get("device_name") or (info.get("backend") or {}).get("name", "?")
    print(f"lmport bench: {base_url}  model={info.get('model_id', model)}  device={device}  "
          f"{args.input_len} in / {args.output_len} out, {args.num_prompts} requests per run")  # fmt: skip
    print(format_table(runs))
    if args.result_json:
        context = {"base_url": base_url, "model": model, "server_info": info, "args": vars(args) | {"func": None}}
        write_json(args.result_json, runs, context)
        print(f"results written to {Path(args.result_json).resolve()}")
    return 0 if all(r.metrics.failed == 0 and r.metrics.completed > 0 for r in runs) else 1


async def _server_facts(base_url: str, model: str | None) -> tuple[dict, str | None]:
    """The server's /info (empty if it has none) and the model name to put in requests."""
    import httpx

    async with httpx.AsyncClient(timeout=30.0) as client:
        info: dict = {}
        response = await client.get(base_url.rstrip("/") + "/info")
        if response.status_code == 200:
            info = response.json()
        if model is None:
            response = await client.get(base_url.rstrip("/") + "/v1/models")
            if response.status_code == 200 and response.json().get("data"):
                model = response.json()["data"][0]["id"]
    return info, model


def _vocabulary(args: argparse.Namespace, info: dict) -> tuple[int, list[int]]:
    """Vocabulary size and the special ids prompts must avoid."""
    if args.vocab_size:
        return args.vocab_size, []
    source = args.tokenizer or info.get("model_id")
    if not source:
        raise SystemExit("lmport bench: pass --tokenizer or --vocab-size (the server did not name its model)")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:  # e.g. the default model's name, or a hub id offline
        raise SystemExit(
            f"lmport bench: cannot load a tokenizer from '{source}' ({type(exc).__name__}); "
            "pass --tokenizer FOLDER or --vocab-size N"
        ) from exc
    special = set(tokenizer.all_special_ids)
    special |= {i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
    return len(tokenizer), sorted(special)
