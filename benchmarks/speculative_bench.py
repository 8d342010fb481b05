"""Batch-1 decode with speculative decoding against the plain engine, on one checkpoint.

Runs the engine without HTTP (``LLMEngine.step()``) on one request at a time, ``--output-len``
new tokens (EOS ignored), and reports decode tokens/s after the prefill for:

* ``plain``: no speculation (the baseline of the same run);
* ``draft-same``: ``--speculative-model`` = the target itself: every draft is accepted, so the
  result shows the overhead ceiling (k draft forwards + one verify of k + 1 tokens per k + 1
  tokens, against k + 1 plain decode steps);
* ``ngram``: n-gram prompt lookup on a repetitive prompt (a random chunk repeated), and on a
  random prompt (what lookup costs when it finds little).

Each row: tokens/s, its ratio to ``plain`` and to the weight-bandwidth roofline (from
``roofline.py``'s JSON when given: ``copy_bytes_per_s / weight bytes``), the acceptance rate,
tokens per step, and whether the greedy tokens equal the plain run's (bf16 kernels for ``k + 1``
query tokens may round differently from the one-token decode kernels, so a near-tie can flip).

    python benchmarks/speculative_bench.py --model /tmp/lmport-ckpt/llama3-8b --speculate 4 --json spec.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch

from lmport.bench.dataset import random_prompts
from lmport.config import LaunchConfig
from lmport.engine.api import GenerationRequest, SamplingParams
from lmport.engine.factory import build_llm_engine
from lmport.plugins import PluginHost


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def decode_rate(engine, prompt: list[int], output_len: int, tag: str) -> dict:
    """Tokens/s of ``output_len`` greedy tokens after the first one (prefill excluded)."""
    params = SamplingParams(max_new_tokens=output_len, ignore_eos=True)
    engine.add_request(GenerationRequest(tag, tuple(prompt), params))
    tokens: list[int] = []
    started = steps = None
    while engine.has_unfinished():
        for out in engine.step():
            tokens += [t.token_id for t in out.tokens]
        if started is None and tokens:  # the first token came with the prefill
            sync()
            started, first, steps0 = time.perf_counter(), len(tokens), engine.num_steps
    sync()
    elapsed = time.perf_counter() - started
    return {"tokens": tokens, "decode_tok_s": (len(tokens) - first) / elapsed, "steps": engine.num_steps - steps0,
            "decoded": len(tokens) - first}  # fmt: skip


def build(model: str, dtype: str, **settings) -> object:
    host = PluginHost().load()
    # batch 1 only: one decode graph bucket keeps the capture (the target's and the draft's) short
    config = LaunchConfig(model_id=model, dtype=dtype, max_total_tokens=settings.pop("max_total_tokens"), cuda_graphs=(1, 2),
                          **settings)  # fmt: skip
    engine, tokenizer, _ = build_llm_engine(config, host)
    return engine, tokenizer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--speculate", type=int, default=4)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=32, help="the repetitive prompt repeats a random chunk of this many tokens")
    parser.add_argument("--cases", default="plain,draft-same,ngram")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--roofline", default=None, help="roofline.py's JSON (copy_bytes_per_s)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    max_total = args.input_len + args.output_len + 8
    cases = args.cases.split(",")
    settings = {
        "plain": {},
        "draft-same": {"speculative_model": args.model, "speculate": args.speculate},
        "ngram": {"speculate": args.speculate},
    }
    bandwidth = None
    if args.roofline and os.path.exists(args.roofline):
        bandwidth = json.load(open(args.roofline))["copy_bytes_per_s"]
    rows, plain_tokens, weight_bytes = [], {}, None
    for case in cases:
        engine, tokenizer = build(args.model, args.dtype, max_total_tokens=max_total, max_batch_total_tokens=4 * max_total, **settings[case])
        if weight_bytes is None:
            weight_bytes = sum(p.numel() * p.element_size() for p in engine.executor.model.parameters())
        special = set(tokenizer.all_special_ids)
        random_prompt = random_prompts(1, args.input_len, 1, len(tokenizer), seed=7, exclude=special)[0].prompt_ids
        chunk = random_prompts(1, args.chunk, 1, len(tokenizer), seed=8, exclude=special)[0].prompt_ids
        repetitive = (list(chunk) * (args.input_len // args.chunk + 1))[: args.input_len]
        decode_rate(engine, random_prompt[:16], 16, f"{case}-warm")  # first-use compiles
        for prompt_name, prompt in (("random", list(random_prompt)), ("repetitive", repetitive)):
            if case == "draft-same" and prompt_name == "repetitive":
                continue  # every draft is accepted whatever the prompt
            extra0 = dict(engine.stats().extra)
            result = decode_rate(engine, prompt, args.output_len, f"{case}-{prompt_name}")
            extra = engine.stats().extra
            drafted = extra.get("spec_draft_tokens", 0) - extra0.get("spec_draft_tokens", 0)
            accepted = extra.get("spec_accepted_tokens", 0) - extra0.get("spec_accepted_tokens", 0)
            key = prompt_name
            if case == "plain":
                plain_tokens[key] = (result["tokens"], result["decode_tok_s"])
            base_tokens, base_rate = plain_tokens.get(key, (None, None))
            row = {
                "case": case, "prompt": prompt_name, "decode_tok_s": round(result["decode_tok_s"], 1),
                "vs_plain": round(result["decode_tok_s"] / base_rate, 3) if base_rate else None,
                "vs_roofline": round(result["decode_tok_s"] * weight_bytes / bandwidth, 3) if bandwidth else None,
                "acceptance": round(accepted / drafted, 3) if drafted else None,
                "tokens_per_step": round(result["decoded"] / max(result["steps"], 1), 2),
                "equal_to_plain": None if base_tokens is None else result["tokens"] == base_tokens,
                "first_difference": None if base_tokens is None else next(
                    (i for i, (a, b) in enumerate(zip(result["tokens"], base_tokens)) if a != b), None),
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"\n{device_name()}, batch 1, {args.input_len} in / {args.output_len} out, k={args.speculate}")
    header = ("case", "prompt", "decode_tok_s", "vs_plain", "vs_roofline", "acceptance", "tokens_per_step", "equal_to_plain")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[h]) for h in header))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(), "args": vars(args), "weight_bytes": weight_bytes,
                       "rows": rows}, f, indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
