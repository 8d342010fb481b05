"""Where a decode step's time goes: the engine without HTTP, on one checkpoint.

For each batch size: N requests of --input-len random tokens, --output-len new tokens each
(ignore EOS), stepped through ``LLMEngine.step()``. Reports the mean wall time of a decode
step, the GPU time of one decode forward alone (graph replay when captured), and the host
time around it; then cProfile's top functions over the decode steps of the last run.

    python benchmarks/profile_decode.py --model /tmp/ckpt/llama3.2-1b --batch-sizes 1,64,256
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time

import torch

from lmport.bench.dataset import random_prompts
from lmport.config import LaunchConfig
from lmport.engine.api import GenerationRequest, SamplingParams
from lmport.engine.factory import build_llm_engine
from lmport.plugins import PluginHost


def run_batch(engine, tokenizer, batch: int, input_len: int, output_len: int, profile: bool) -> dict:
    prompts = random_prompts(batch, input_len, 1, len(tokenizer), seed=batch, exclude=set(tokenizer.all_special_ids))
    params = SamplingParams(max_new_tokens=output_len, ignore_eos=True, logprobs=True)
    for i, p in enumerate(prompts):
        engine.add_request(GenerationRequest(f"b{batch}-{i}", tuple(p.prompt_ids), params))
    # prefill until every sequence is decoding
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    profiler = cProfile.Profile() if profile else None
    times = []
    torch.cuda.synchronize()
    while engine.has_unfinished():
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        engine.step()
        if profiler:
            profiler.disable()
        times.append(time.perf_counter() - start)
    times = times[2:-1] or times
    result = {"batch": batch, "decode_steps": len(times), "step_ms": 1000 * sum(times) / len(times)}
    if profiler:
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(25)
        result["profile"] = buf.getvalue()
    return result


def forward_gpu_ms(runner, batch: int) -> float | None:
    """GPU time of one decode forward at ``batch`` sequences (graph replay when captured)."""
    graphs = getattr(runner.graph_runner, "_graphs", None) or getattr(runner.graph_runner, "graphs", None)
    if not graphs:
        return None
    size = min((s for s in graphs if s >= batch), default=None)
    if size is None:
        return None
    graph = graphs[size]
    graph = getattr(graph, "graph", graph)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        graph.replay()
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch-sizes", default="1,64,256")
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--json", default=None)
    parser.add_argument("--async-scheduling", choices=("on", "off"), default="off",
                        help="launch step N+1 before step N's tokens reach the host (compare both on one GPU)")  # fmt: skip
    args = parser.parse_args()
    host = PluginHost()
    host.select_backend()
    config = LaunchConfig(model_id=args.model, dtype="bfloat16", max_total_tokens=2048, max_input_tokens=1024,
                          max_batch_prefill_tokens=8192, max_batch_size=256,
                          async_scheduling=args.async_scheduling == "on")  # fmt: skip
    engine, tokenizer, _ = build_llm_engine(config, host)
    runner = engine.executor
    print(f"async scheduling: {'on' if engine.async_scheduling else 'off'}")
    results = []
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    for i, batch in enumerate(sizes):
        r = run_batch(engine, tokenizer, batch, args.input_len, args.output_len, profile=(i == 0 or i == len(sizes) - 1))
        r["forward_gpu_ms"] = forward_gpu_ms(runner, batch)
        results.append(r)
    for r in results:
        gpu = r["forward_gpu_ms"]
        print(f"batch {r['batch']:>4}: decode step {r['step_ms']:.2f} ms wall; forward on GPU "
              f"{gpu if gpu is None else round(gpu, 2)} ms; host around it {r['step_ms'] - (gpu or 0):.2f} ms")  # fmt: skip
    for r in results:
        if "profile" in r:
            print(f"\n--- cProfile, batch {r['batch']} decode steps (tottime) ---\n{r.pop('profile')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
