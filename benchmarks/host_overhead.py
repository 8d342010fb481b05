"""The engine's host time per decode step, with the model taken out: CPU only.

A stand-in executor does the host work the paged runner does around the forward
(``build_flat_batch``, one ``SampledToken`` per sequence) and returns a pseudo-random token
at once, so what is timed is the rest of ``LLMEngine.step()``: scheduler, block manager,
batch build, output processing and the incremental detokenizer, with the trained tiny
byte-level BPE of ``lmport.testing.tiny_tokenizer``. Tokens are drawn uniformly from the
whole vocabulary (as a random-weight model emits them), never EOS (``ignore_eos`` too).

For each batch size: that many requests of ``--input-len`` tokens, prefilled, then
``--steps`` decode steps timed one by one: the median of the thread's CPU time per step (the
steadiest number on a shared machine), the median and mean wall time, and the mean wall time
spent inside ``build_flat_batch``; the best of ``--repeats`` runs. Prints a table and writes JSON.

    python benchmarks/host_overhead.py --batch-sizes 1,64,256 --json host_overhead.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import random
import statistics
import time

import torch

from lmport.engine.api import GenerationRequest, SamplingParams
from lmport.engine.batch import ExecutorOutput, SampledToken, ScheduledStep, build_flat_batch
from lmport.executor import ModelExecutor
from lmport.engine.limits import EngineLimits
from lmport.engine.llm_engine import LLMEngine
from lmport.testing.tiny_tokenizer import train_tiny_tokenizer


# the first sequences decode while later ones still prefill: room for those tokens
PREFILL_SLACK = 64


class InstantExecutor(ModelExecutor):
    """Builds the flat batch as the paged runner does, then samples nothing: a seeded random token per row."""

    def __init__(self, block_size: int, vocab: list[int], seed: int = 0) -> None:
        self.block_size = block_size
        rng = random.Random(seed)
        self.tokens = itertools.cycle([rng.choice(vocab) for _ in range(65_521)])  # drawn up front: not timed
        self.batch_seconds = 0.0
        self.device = torch.device("cpu")

    def kv_cache_spec(self):
        return None

    def initialize_cache(self, num_blocks: int) -> None:
        pass

    def execute(self, step: ScheduledStep) -> ExecutorOutput:
        start = time.perf_counter()
        batch = build_flat_batch(step, self.block_size, self.device)
        self.batch_seconds += time.perf_counter() - start
        tokens = self.tokens
        sampled = [SampledToken(next(tokens), -1.0, []) if row is not None else None for row in batch.sample_rows]
        return ExecutorOutput(sampled=sampled, prompt_logprobs=[None] * len(step.entries))

    # async scheduling: the engine's other path (launch now, read the tokens a step later)
    supports_async_scheduling = True

    def launch(self, step: ScheduledStep, feed=(), previous=None) -> "_Done":
        output = self.execute(step)
        return _Done(output, [i for i, s in enumerate(output.sampled) if s is not None])


class _Done:
    """A launched step whose results are there at once (what ``PendingStep`` gives the engine)."""

    def __init__(self, output: ExecutorOutput, sampled_pos: list[int]) -> None:
        self._output = output
        self.sample_row = {i: j for j, i in enumerate(sampled_pos)}
        self.token_ids = None

    def result(self) -> ExecutorOutput:
        return self._output


def make_limits(batch: int, input_len: int, steps: int, block_size: int) -> EngineLimits:
    total = input_len + steps + PREFILL_SLACK
    blocks = batch * (-(-total // block_size)) + 16
    return EngineLimits(
        max_concurrent_requests=batch,
        max_input_tokens=input_len,
        max_total_tokens=total,
        max_batch_prefill_tokens=max(input_len, 8192),
        max_batch_total_tokens=blocks * block_size,
        max_batch_size=batch,
        waiting_served_ratio=0.0,  # admit at once: the prefill phase is not what is measured
        max_waiting_tokens=20,
        block_size=block_size,
        num_blocks=blocks,
    )


def run(tokenizer, batch: int, input_len: int, steps: int, block_size: int, seed: int, async_scheduling: bool = False) -> dict:
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    executor = InstantExecutor(block_size, vocab, seed)
    engine = LLMEngine(executor, tokenizer, make_limits(batch, input_len, steps, block_size), eos_token_ids={tokenizer.eos_token_id},
                       async_scheduling=async_scheduling)  # fmt: skip
    rng = random.Random(seed)
    params = SamplingParams(max_new_tokens=steps + PREFILL_SLACK, ignore_eos=True, logprobs=True)  # as `lmport bench` asks
    for i in range(batch):
        prompt = tuple(rng.choice(vocab) for _ in range(input_len))
        engine.add_request(GenerationRequest(f"r{i}", prompt, params))
    while engine.scheduler.waiting or any(not s.is_decoding for s in engine.scheduler.running):
        engine.step()  # prefill (and the first token)
    executor.batch_seconds = 0.0
    times, cpu_times = [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.thread_time()
        outputs = engine.step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.thread_time() - cpu_start)
        assert len(outputs) == batch and not any(o.finished for o in outputs), outputs[:1]
    while engine.has_unfinished():  # (untimed) to the end, so nothing of this run is left over
        engine.step()
    return {
        "batch": batch,
        "input_len": input_len,
        "steps": steps,
        "step_ms_median": 1000 * statistics.median(times),
        "step_ms_mean": 1000 * statistics.fmean(times),
        "cpu_ms_median": 1000 * statistics.median(cpu_times),
        "batch_build_ms_mean": 1000 * executor.batch_seconds / steps,
        "us_per_sequence": 1e6 * statistics.median(cpu_times) / batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,64,256")
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs per batch size; the fastest is reported")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--async-scheduling", action="store_true", help="step through the engine's async path")
    parser.add_argument("--wordlevel-vocab", type=int, default=0,
                        help="use the benchmarks' WordLevel tokenizer of this many ids (128256: the GPU runs' Llama-3 shape) "
                             "instead of the tiny trained BPE")  # fmt: skip
    parser.add_argument("--cprofile", action="store_true", help="print cProfile's top functions over the last batch size")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.wordlevel_vocab:
        import tempfile

        from lmport.bench.checkpoint import save_wordlevel_tokenizer

        tokenizer = save_wordlevel_tokenizer(tempfile.mkdtemp(), args.wordlevel_vocab, bos_id=1, eos_id=2)
    else:
        tokenizer = train_tiny_tokenizer(vocab_size=100_000)  # grows as far as its corpus allows
    results = []
    for b in args.batch_sizes.split(","):
        # best of a few runs: other processes on a shared machine only ever add time
        runs = [run(tokenizer, int(b), args.input_len, args.steps, args.block_size, args.seed, args.async_scheduling)
                for _ in range(args.repeats)]  # fmt: skip
        results.append(min(runs, key=lambda r: r["cpu_ms_median"]))
    if args.cprofile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(run, tokenizer, int(b), args.input_len, args.steps, args.block_size, args.seed, args.async_scheduling)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    print(f"host time per decode step (CPU: {platform.processor() or platform.machine()}, vocab {len(tokenizer)}, "
          f"input {args.input_len}, block {args.block_size}, {args.steps} steps)")
    print(f"{'batch':>6} {'CPU ms':>8} {'wall ms':>8} {'wall mean':>10} {'batch build ms':>15} {'CPU us/seq':>11}")
    for r in results:
        print(
            f"{r['batch']:>6} {r['cpu_ms_median']:>8.3f} {r['step_ms_median']:>8.3f} {r['step_ms_mean']:>10.3f}"
            f" {r['batch_build_ms_mean']:>15.3f} {r['us_per_sequence']:>11.1f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "vocab": len(tokenizer), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
