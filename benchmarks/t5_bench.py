"""T5 throughput: the native paged engine against the transformers one-at-a-time executor.

    python benchmarks/t5_bench.py                                   # CPU, FLAN-T5-small shape, 32 requests
    python benchmarks/t5_bench.py --device cuda --dtype bfloat16 --shape flan-t5-base --json t5.json

A random-weight checkpoint of the shape is built offline (a word-level tokenizer of the real
vocabulary size), then the same ``--requests`` prompts of ``--input-len`` tokens are submitted
at once to each path's engine, each asking for exactly ``--output-len`` tokens (greedy,
``ignore_eos``). Reported: wall time, the process's CPU time (on a CPU shared with other work,
wall time says more about the neighbours), output tokens per second and the native/fallback ratio,
measured in the same run; and whether both paths produced the same tokens (they should in
float32; bf16 rounds differently per batch shape). "hf-seq2seq" is the engine over
:class:`~lmport.models.hf_seq2seq.HFSeq2SeqExecutor` (transformers' model and cache per
sequence, its sequences looped one by one each step), which served T5 before it was native.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from lmport.bench.checkpoint import save_wordlevel_tokenizer
from lmport.config import LaunchConfig
from lmport.engine import factory
from lmport.engine.api import GenerationRequest, SamplingParams
from lmport.plugins import PluginHost

SHAPES = {
    # FLAN-T5's published shapes (t5 v1.1: gated-gelu, untied head)
    "flan-t5-small": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6),
    "flan-t5-base": dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12),
    "flan-t5-large": dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_decoder_layers=24, num_heads=16),
}
VOCAB = 32128


def build_checkpoint(shape: str, path: Path, seed: int = 0) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=VOCAB, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **SHAPES[shape])  # fmt: skip
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.05)
        model.lm_head.weight[config.eos_token_id].zero_()  # greedy never picks EOS first
    model.save_pretrained(path)
    save_wordlevel_tokenizer(path, VOCAB, bos_id=2, eos_id=1)


@contextmanager
def transformers_seq2seq_path():
    """Build engines as if T5 had no native module: the factory's fallback, the one-at-a-time executor."""
    native = factory.build_native_model
    factory.build_native_model = lambda *args, **kwargs: None
    try:
        yield
    finally:
        factory.build_native_model = native


def run_path(name: str, path: Path, args, prompts: list[list[int]]) -> dict:
    config = LaunchConfig(
        model_id=str(path), dtype=args.dtype, max_batch_total_tokens=args.requests * (args.input_len + args.output_len + 32),
        max_total_tokens=args.input_len + args.output_len + 8, max_batch_prefill_tokens=max(4096, args.requests * 8),
    )
    if args.device == "cpu":
        host = PluginHost(environ={}, load_entry_points=False).load()
    else:
        host = PluginHost()
        host.select_backend(args.device)
    if name == "hf-seq2seq":
        with transformers_seq2seq_path():
            engine, _, _ = factory.build_llm_engine(config, host)
    else:
        engine, _, _ = factory.build_llm_engine(config, host)
    params = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)
    engine.generate([GenerationRequest(f"warm{i}", tuple(prompts[i]), params) for i in range(2)])  # first-use costs
    requests = [GenerationRequest(f"r{i}", tuple(p), params) for i, p in enumerate(prompts)]
    if args.device == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    steps_before = engine.num_steps
    outputs = engine.generate(requests)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    tokens = {r.request_id: [t.token_id for out in outputs[r.request_id] for t in out.tokens] for r in requests}
    generated = sum(len(t) for t in tokens.values())
    return {
        "path": name, "executor": type(engine.executor).__name__, "wall_s": wall, "cpu_s": cpu, "output_tokens": generated,
        "output_tok_per_s": generated / wall, "steps": engine.num_steps - steps_before, "tokens": tokens,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="flan-t5-small")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (the installed CUDA backend is selected)")
    parser.add_argument("--dtype", default=None, help="default: float32 on the CPU, bfloat16 on a GPU")
    parser.add_argument("--paths", default="native,hf-seq2seq")
    parser.add_argument("--checkpoint", default=None, help="a folder to build the checkpoint in (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default on the CPU: 1; on a shared, loaded CPU, two threads wait on each other at every op)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (args.input_len,), generator=gen).tolist() for _ in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.checkpoint or tmp)
        if not (path / "config.json").exists():
            build_checkpoint(args.shape, path)
        results = []
        for name in args.paths.split(","):
            results.append(run_path(name, path, args, prompts))
            r = results[-1]
            print(f"# {name}: {r['wall_s']:.2f} s wall, {r['cpu_s']:.2f} s CPU, {r['output_tok_per_s']:.1f} tok/s", flush=True)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"T5 {args.shape} on {device_name}, {args.dtype}: {args.requests} requests at once, "
          f"{args.input_len} tokens in, {args.output_len} out")  # fmt: skip
    print(f"{'path':<12} {'executor':<22} {'wall s':>8} {'cpu s':>8} {'steps':>6} {'out tok/s':>10}")
    for r in results:
        print(f"{r['path']:<12} {r['executor']:<22} {r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} {r['steps']:>6} {r['output_tok_per_s']:>10.1f}")
    summary = {"shape": args.shape, "device": device_name, "dtype": args.dtype, "requests": args.requests,
               "input_len": args.input_len, "output_len": args.output_len,
               "results": [{k: v for k, v in r.items() if k != "tokens"} for r in results]}  # fmt: skip
    if len(results) == 2:
        ratio = results[0]["output_tok_per_s"] / results[1]["output_tok_per_s"]
        same = results[0]["tokens"] == results[1]["tokens"]
        cpu_ratio = results[1]["cpu_s"] / results[0]["cpu_s"]
        print(f"{results[0]['path']} / {results[1]['path']}: {ratio:.3g}x output tok/s ({cpu_ratio:.3g}x less process "
              f"CPU time); same tokens: {'yes' if same else 'no'}")  # fmt: skip
        summary.update(ratio=ratio, cpu_ratio=cpu_ratio, same_tokens=same)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
