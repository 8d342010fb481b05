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


def run_batch(engine, tokenizer, batch: int, input_len: int, output_len: int, profile: bool, sync_debug: bool = False,
              segments: bool = False) -> dict:  # fmt: skip
    # a new seed per run: the prefix cache must not serve one run's prompts to the next
    seed = batch + 1000 * int(engine.async_scheduling)
    prompts = random_prompts(batch, input_len, 1, len(tokenizer), seed=seed, exclude=set(tokenizer.all_special_ids))
    params = SamplingParams(max_new_tokens=output_len, ignore_eos=True, logprobs=True)
    tag = f"b{batch}-{'async' if engine.async_scheduling else 'sync'}"
    torch.cuda.synchronize()
    timeline: list[tuple[int, int, float]] = []  # per step: sequences, tokens fed, wall seconds of step()
    schedule = engine.scheduler.schedule

    def traced_schedule():
        step = schedule()
        timeline.append((len(step.entries), sum(e.num_new_tokens for e in step.entries), 0.0))
        return step

    engine.scheduler.schedule = traced_schedule
    timed_step = engine.step

    def step_and_time():
        start = time.perf_counter()
        out = timed_step()
        if timeline:
            n, t, _ = timeline[-1]
            timeline[-1] = (n, t, time.perf_counter() - start)
        return out

    engine.step = step_and_time
    started = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(GenerationRequest(f"{tag}-{i}", tuple(p.prompt_ids), params))
    # prefill until every sequence is decoding
    prefill_steps = 0
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
        prefill_steps += 1
    prefilled = time.perf_counter()
    profiler = cProfile.Profile() if profile else None
    times = []
    if sync_debug:  # warn (with the caller's line) on every op that waits for the device
        torch.cuda.set_sync_debug_mode("warn")
    waits = _WaitClock()  # host time blocked on the device during the decode steps
    waits.install()
    parts = _Segments() if segments else None
    if parts:
        parts.install()
    while engine.has_unfinished():
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        engine.step()
        if profiler:
            profiler.disable()
        times.append(time.perf_counter() - start)
    waits.uninstall()
    if parts:
        parts.uninstall()
    if sync_debug:
        torch.cuda.set_sync_debug_mode("default")
    total = time.perf_counter() - started
    del engine.step, engine.scheduler.schedule  # back to the class's methods
    times = times[2:-1] or times
    mixed = [(n, t, w) for n, t, w in timeline if t > n]
    decode = [(n, t, w) for n, t, w in timeline if t == n]
    result = {
        "batch": batch, "async_scheduling": engine.async_scheduling, "decode_steps": len(times),
        "step_ms": 1000 * sum(times) / len(times), "prefill_steps": prefill_steps,
        "prefill_s": prefilled - started, "total_s": total, "output_tok_per_s": batch * output_len / total,
        # where the run's wall time went: steps that fed prompt tokens vs pure decode steps
        "steps_with_prompt": len(mixed), "steps_with_prompt_s": sum(w for *_, w in mixed),
        "decode_only_steps": len(decode), "decode_only_s": sum(w for *_, w in decode),
        "decode_only_mean_batch": sum(n for n, *_ in decode) / max(len(decode), 1),
        # of the decode phase's wall time: blocked in Event.synchronize / CUDAGraph.replay (the
        # host waiting for the device); the rest is host work the device may be waiting for
        "decode_wait_event_ms": 1000 * waits.seconds["event"] / max(len(times), 1),
        "decode_wait_replay_ms": 1000 * waits.seconds["replay"] / max(len(times), 1),
        "segments_ms_per_step": {k: 1000 * v / max(len(times), 1) for k, v in (parts.seconds if parts else {}).items()},
    }  # fmt: skip
    if profiler:
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(25)
        pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(45)
        result["profile"] = buf.getvalue()
    return result


class _WaitClock:
    """Times the host's waits on the device by wrapping ``Event.synchronize`` and ``CUDAGraph.replay``."""

    def __init__(self) -> None:
        self.seconds = {"event": 0.0, "replay": 0.0}
        self._originals = {}

    def install(self) -> None:
        for key, owner, name in (("event", torch.cuda.Event, "synchronize"), ("replay", torch.cuda.CUDAGraph, "replay")):
            original = getattr(owner, name)
            self._originals[(owner, name)] = original

            def timed(obj, *args, _original=original, _key=key, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(obj, *args, **kwargs)
                finally:
                    self.seconds[_key] += time.perf_counter() - start

            setattr(owner, name, timed)

    def uninstall(self) -> None:
        for (owner, name), original in self._originals.items():
            setattr(owner, name, original)


class _Segments:
    """Wall time per engine segment during the decode steps (``--segments``): which host work a step spends its time in."""

    TARGETS = (
        ("lmport.engine.scheduler", "Scheduler", "schedule"),
        ("lmport.engine.llm_engine", "LLMEngine", "_feed"),
        ("lmport.engine.llm_engine", "LLMEngine", "_advance"),
        ("lmport.engine.llm_engine", "LLMEngine", "_finish_step"),
        ("lmport.engine.llm_engine", "LLMEngine", "_detokenize"),
        ("lmport.engine.model_runner", "PagedModelRunner", "launch"),
        ("lmport.engine.model_runner", "PagedModelRunner", "_forward"),
        ("lmport.engine.model_runner", "PagedModelRunner", "_sampling_row"),
        ("lmport.engine.model_runner", "PendingStep", "__init__"),
        ("lmport.engine.model_runner", "PendingStep", "result"),
        ("lmport.engine.sampling.sampler", "Sampler", "sample"),
        ("lmport.engine.outputs", "OutputProcessor", "process"),
    )

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._originals = []

    def install(self) -> None:
        import importlib

        from lmport.engine import model_runner

        targets = [(importlib.import_module(m), c, f) for m, c, f in self.TARGETS]
        for module, cls_name, name in targets:
            owner = getattr(module, cls_name)
            self._wrap(owner, name, f"{cls_name}.{name}")
        self._wrap(model_runner, "build_flat_batch", "build_flat_batch")
        self._wrap(model_runner, "_start_copy", "_start_copy")
        self._wrap(model_runner.PagedModelRunner, "_run", "PagedModelRunner._run")

    def _wrap(self, owner, name: str, label: str) -> None:
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        self._originals.append((owner, name, original))
        seconds = self.seconds

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._originals):
            setattr(owner, name, original)
        self._originals = []


def kernel_table(engine, tokenizer, what: str, batch: int, input_len: int, rows: int = 18) -> str:
    """torch.profiler's top device kernels over a few engine steps of one kind.

    ``what``: "decode" (steps of ``batch`` one-token rows, after their prefill) or "prefill"
    (the first step of ``batch`` fresh prompts).
    """
    from torch.profiler import ProfilerActivity, profile

    prompts = random_prompts(batch, input_len, 1, len(tokenizer), seed=7 + batch + len(what), exclude=set(tokenizer.all_special_ids))
    # long enough that the first prompts still decode when the last ones are prefilled
    params = SamplingParams(max_new_tokens=64, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(GenerationRequest(f"k-{what}-{batch}-{i}", tuple(p.prompt_ids), params))
    if what == "decode":
        while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()
        for _ in range(3):
            engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5 if what == "decode" else 1):
            engine.step()
        torch.cuda.synchronize()
    engine.abort_all()
    averages = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            return averages.table(sort_by=key, row_limit=rows, max_name_column_width=70)
        except Exception:  # the older or newer name
            continue
    return averages.table(row_limit=rows)


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
    parser.add_argument("--quantize", default=None, help="as lmport launch's --quantize (fp8: quantized at load)")
    parser.add_argument("--async-scheduling", choices=("on", "off", "both"), default="both",
                        help="launch step N+1 before step N's tokens reach the host; both: each batch size twice, off then on")  # fmt: skip
    parser.add_argument("--cprofile", action="store_true",
                        help="cProfile the decode steps of the first and the last run (slows Python-heavy steps 2-3x)")  # fmt: skip
    parser.add_argument("--sync-debug", action="store_true",
                        help="warn at every host-device synchronisation during the decode steps (torch.cuda.set_sync_debug_mode)")  # fmt: skip
    parser.add_argument("--segments", action="store_true",
                        help="time the engine's host segments (schedule, batch build, sampler, output processing ...) per decode step")  # fmt: skip
    parser.add_argument("--kernel-profile", action="store_true",
                        help="also print torch.profiler's top kernels: batch-1 decode (graph and eager) and a prefill step")  # fmt: skip
    args = parser.parse_args()
    host = PluginHost()
    host.select_backend()
    config = LaunchConfig(model_id=args.model, dtype="bfloat16", max_total_tokens=2048, max_input_tokens=1024,
                          max_batch_prefill_tokens=8192, max_batch_size=256,
                          async_scheduling=args.async_scheduling != "off", quantize=args.quantize)  # fmt: skip
    engine, tokenizer, _ = build_llm_engine(config, host)
    runner = engine.executor
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.async_scheduling]
    if True in modes and not engine.async_scheduling:
        print("async scheduling: the executor cannot; measuring it off only")
        modes = [False]
    # warm-up, not recorded: Triton compiles each kernel variant (prefill, mixed, decode) on first use
    engine.async_scheduling = modes[0]
    run_batch(engine, tokenizer, 32, args.input_len, 4, profile=False)
    results = []
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    for i, batch in enumerate(sizes):
        for mode in modes:
            engine.async_scheduling = mode  # a between-requests switch: nothing is in flight here
            last = i == len(sizes) - 1 and mode == modes[-1]
            r = run_batch(engine, tokenizer, batch, args.input_len, args.output_len, profile=args.cprofile and ((i == 0 and mode == modes[0]) or last),
                          sync_debug=args.sync_debug, segments=args.segments)  # fmt: skip
            r["forward_gpu_ms"] = forward_gpu_ms(runner, batch)
            results.append(r)
    print(f"{'batch':>5} {'async':>5} {'step ms':>8} {'GPU fwd ms':>10} {'host ms':>8} {'prefill s':>9} {'total s':>8} {'out tok/s':>9}")
    for r in results:
        gpu = r["forward_gpu_ms"]
        print(f"{r['batch']:>5} {'on' if r['async_scheduling'] else 'off':>5} {r['step_ms']:>8.2f} "
              f"{'-' if gpu is None else f'{gpu:.2f}':>10} {r['step_ms'] - (gpu or 0):>8.2f} "
              f"{r['prefill_s']:>9.2f} {r['total_s']:>8.2f} {r['output_tok_per_s']:>9.1f}")  # fmt: skip
    for r in results:
        print(f"batch {r['batch']} async {r['async_scheduling']}: {r['steps_with_prompt']} steps with prompt tokens "
              f"{r['steps_with_prompt_s']:.2f} s; {r['decode_only_steps']} decode-only steps {r['decode_only_s']:.2f} s "
              f"(mean batch {r['decode_only_mean_batch']:.0f}); per decode step blocked on the device: "
              f"event {r['decode_wait_event_ms']:.2f} ms, graph replay {r['decode_wait_replay_ms']:.2f} ms")  # fmt: skip
    for r in results:
        if r["segments_ms_per_step"]:
            print(f"batch {r['batch']} async {r['async_scheduling']}: ms per decode step (nested segments overlap): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["segments_ms_per_step"].items(), key=lambda kv: -kv[1])))  # fmt: skip
    for r in results:
        if "profile" in r:
            print(f"\n--- cProfile, batch {r['batch']} async {r['async_scheduling']} decode steps (tottime) ---\n{r.pop('profile')}")
    if args.kernel_profile:
        engine.async_scheduling = False
        print("\n--- kernels: batch-1 decode, 5 steps (CUDA graph replay) ---")
        print(kernel_table(engine, tokenizer, "decode", 1, args.input_len))
        graphs, runner.graph_runner = runner.graph_runner, None
        print("\n--- kernels: batch-1 decode, 5 steps (eager) ---")
        print(kernel_table(engine, tokenizer, "decode", 1, args.input_len))
        runner.graph_runner = graphs
        print("\n--- kernels: batch-256 decode, 5 steps (CUDA graph replay) ---")
        print(kernel_table(engine, tokenizer, "decode", 256, args.input_len))
        print(f"\n--- kernels: one prefill step of 16 x {args.input_len} tokens ---")
        print(kernel_table(engine, tokenizer, "prefill", 16, args.input_len))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
