"""Structured output speed: JSON-schema-constrained requests against free ones, same model, same run.

    python benchmarks/structured_bench.py --json structured.json                 # the default model (Gemma-3 270M)
    python benchmarks/structured_bench.py --model-id /ckpt/model --concurrency 64 --requests 128
    python benchmarks/structured_bench.py --tiny 128 ...      # a random 2-layer llama with the model's tokenizer

Two measurements (issue 13, point 6):

1. **Throughput.** ``--requests`` requests at ``--concurrency`` in flight (a new one starts when
   one finishes, as a load generator with that cap does), each asking for up to
   ``--output-len`` tokens, sampled (temperature 1, a seed per request), driven through the
   engine in this process (``build_llm_engine``: what ``lmport launch`` serves, without HTTP).
   "free" requests ignore EOS (exactly ``--output-len`` tokens); "json-schema" requests each
   carry one of :data:`SCHEMAS` (in turn) and end when their document is complete or at the
   length. Reported: output tokens per second over the run's wall time and the ratio
   constrained/free (the issue's target: >= 0.9), how many constrained outputs were complete
   and valid (``jsonschema``), and the share of the wall time the sampler spent waiting for
   masks.
2. **Compile time** per request of each schema, uncached (the compiled-grammar cache emptied
   before each compile; the tokenizer's vocabulary is built once, its time reported apart):
   p50 / p99 over ``--compile-repeats`` compiles per schema, and cached (what a repeated schema costs).

Prompts are the model's own text: "Write a JSON document." ... encoded by its tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

SCHEMAS: dict[str, dict] = {
    "nested-object": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "address": {
                "type": "object",
                "properties": {"street": {"type": "string", "maxLength": 32}, "city": {"type": "string", "maxLength": 24},
                               "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["street", "city", "zip"], "additionalProperties": False,
            },
        },
        "required": ["name", "age", "address"], "additionalProperties": False,
    },
    "array-of-objects": {
        "type": "object",
        "properties": {
            "order_id": {"type": "integer", "minimum": 1},
            "items": {"type": "array", "maxItems": 4, "items": {
                "type": "object",
                "properties": {"sku": {"type": "string", "maxLength": 12}, "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                               "price": {"type": "number", "minimum": 0}},
                "required": ["sku", "quantity", "price"], "additionalProperties": False}},
        },
        "required": ["order_id", "items"], "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {
            "status": {"enum": ["active", "inactive", "pending", "banned"]},
            "role": {"enum": ["admin", "editor", "viewer"]},
            "priority": {"enum": [1, 2, 3, 4, 5]},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue", "urgent", "later"]}, "maxItems": 3},
        },
        "required": ["status", "role", "priority"], "additionalProperties": False,
    },
    "anyOf": {
        "type": "object",
        "properties": {
            "result": {"anyOf": [
                {"type": "object", "properties": {"ok": {"const": True}, "value": {"type": "number"}}, "required": ["ok", "value"], "additionalProperties": False},
                {"type": "object", "properties": {"ok": {"const": False}, "error": {"type": "string", "maxLength": 40}}, "required": ["ok", "error"], "additionalProperties": False},
            ]},
            "id": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 16}]},
        },
        "required": ["result", "id"], "additionalProperties": False,
    },
    "string-formats": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "email": {"type": "string", "format": "email"},
            "born": {"type": "string", "format": "date"},
            "seen": {"type": "string", "format": "date-time"},
            "site": {"type": "string", "format": "uri"},
        },
        "required": ["id", "email", "born"], "additionalProperties": False,
    },
}
PROMPTS = [
    "Write a JSON document that describes one person and where they live.",
    "Here is an order from our shop, as JSON:",
    "The account's settings, in JSON:",
    "The result of the computation, as a JSON object:",
    "A user record with id, email and dates, as JSON:",
]  # fmt: skip


def tiny_checkpoint(tokenizer, path: Path, hidden: int) -> str:
    """A random 2-layer llama with ``tokenizer`` (its real vocabulary): cheap steps, so the
    masks' share of a step is as large as it gets (the worst case for the ratio)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                         max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def build_engine(model_id: str | None, dtype: str | None):
    from lmport.config import LaunchConfig
    from lmport.engine.factory import build_llm_engine
    from lmport.plugins import PluginHost

    config = LaunchConfig(model_id=model_id or "", dtype=dtype, max_total_tokens=1024, max_concurrent_requests=1024)
    return build_llm_engine(config, PluginHost(environ=dict(os.environ)).load())


class MaskWait:
    """Time the sampler's request-processor stage spends (waiting for and applying masks)."""

    def __init__(self) -> None:
        from lmport.engine.sampling import sampler

        self.seconds = 0.0
        self.stages = sampler.PIPELINE
        index = next(i for i, s in enumerate(self.stages) if s.name == "request_processors")
        stage = self.stages[index]

        def timed(logits, rows, which, run=stage.run):
            t0 = time.perf_counter()
            out = run(logits, rows, which)
            if out.is_cuda:
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - t0
            return out

        sampler.PIPELINE = (*self.stages[:index], type(stage)(stage.name, stage.applies, timed), *self.stages[index + 1:])


def run_load(engine, prompts: list[list[int]], requests: int, concurrency: int, output_len: int, constrained: bool) -> dict:
    from lmport.engine.api import Constraint, GenerationRequest, SamplingParams

    names = list(SCHEMAS)
    pending = []
    for i in range(requests):
        k = i % len(names)
        constraint = Constraint("json_schema", json.dumps(SCHEMAS[names[k]])) if constrained else None
        params = SamplingParams(max_new_tokens=output_len, do_sample=True, temperature=1.0, seed=i, ignore_eos=not constrained,
                                constraint=constraint)  # fmt: skip
        pending.append((GenerationRequest(f"r{i}", tuple(prompts[k]), params), names[k]))
    schema_of = {r.request_id: name for r, name in pending}
    texts: dict[str, str] = {}
    reasons: dict[str, str] = {}
    tokens = 0
    begin = time.perf_counter()
    while pending or engine.has_unfinished():
        while pending and engine.num_requests < concurrency:
            engine.add_request(pending.pop(0)[0])
        for out in engine.step():
            tokens += len(out.tokens)
            texts[out.request_id] = texts.get(out.request_id, "") + out.text
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    wall = time.perf_counter() - begin
    result = {"mode": "json-schema" if constrained else "free", "requests": requests, "concurrency": concurrency,
              "wall_s": round(wall, 3), "output_tokens": tokens, "output_tok_s": round(tokens / wall, 2)}  # fmt: skip
    if constrained:
        result.update(validity(texts, reasons, schema_of))
    return result


def validity(texts: dict[str, str], reasons: dict[str, str], schema_of: dict[str, str]) -> dict:
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    complete = valid = 0
    for rid, text in texts.items():
        if reasons.get(rid) != "eos_token":
            continue
        complete += 1
        try:
            doc = json.loads(text)
            if jsonschema is not None:
                jsonschema.validate(doc, SCHEMAS[schema_of[rid]])
            valid += 1
        except Exception:
            pass
    return {"complete": complete, "complete_and_valid": valid, "ended_at_length": sum(r == "length" for r in reasons.values())}


def compile_times(tokenizer, repeats: int) -> dict:
    from lmport.engine.api import Constraint
    from lmport.engine.constraints import ProcessorContext
    from lmport.engine.sampling import llguidance_backend as backend

    context = ProcessorContext(tokenizer)
    backend._tokenizers.clear()
    t0 = time.perf_counter()
    backend.ll_tokenizer(context)
    vocab_s = time.perf_counter() - t0
    per_schema, all_ms = {}, []
    for name, schema in SCHEMAS.items():
        constraint = Constraint("json_schema", json.dumps(schema))
        times = []
        for _ in range(repeats):
            backend._grammars.clear()
            t0 = time.perf_counter()
            backend.llguidance_processor(constraint, context)
            times.append(1000 * (time.perf_counter() - t0))
        t0 = time.perf_counter()
        backend.llguidance_processor(constraint, context)  # cached: a copy of the compiled matcher
        cached = 1000 * (time.perf_counter() - t0)
        per_schema[name] = {"p50_ms": round(statistics.median(times), 3), "p99_ms": round(percentile(times, 99), 3), "cached_ms": round(cached, 4)}
        all_ms += times
    return {"vocabulary_build_s": round(vocab_s, 3), "vocab_size": len(tokenizer), "schemas": per_schema,
            "all": {"p50_ms": round(statistics.median(all_ms), 3), "p99_ms": round(percentile(all_ms, 99), 3)}}  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-id", default=None, help="default: the installed Gemma-3 270M (lmport's default model)")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--compile-repeats", type=int, default=20)
    parser.add_argument("--tiny", type=int, default=0, metavar="HIDDEN",
                        help="instead of the model: a random 2-layer llama of this width with the model's tokenizer")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model_id = args.model_id
    if args.tiny:
        import tempfile

        from transformers import AutoTokenizer

        from lmport.models.resolve import resolve_model_source

        tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_source(model_id).path))
        model_id = tiny_checkpoint(tokenizer, Path(tempfile.mkdtemp(prefix="structured-tiny-")), args.tiny)
    engine, tokenizer, info = build_engine(model_id, args.dtype)
    device = str(getattr(engine.executor, "device", "cpu"))
    device_name = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or platform.machine()
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    report = {"model": str(info.path), "device": device, "device_name": device_name, "cpus": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "async_scheduling": engine.async_scheduling,
              "compile": compile_times(tokenizer, args.compile_repeats)}  # fmt: skip
    mask = MaskWait()
    run_load(engine, prompts, min(8, args.requests), min(8, args.concurrency), 8, constrained=True)  # warm-up, both paths
    run_load(engine, prompts, min(8, args.requests), min(8, args.concurrency), 8, constrained=False)
    runs = []
    for constrained in (False, True, False, True):  # interleaved: drift on a shared machine hits both
        mask.seconds = 0.0
        result = run_load(engine, prompts, args.requests, args.concurrency, args.output_len, constrained)
        if constrained:
            result["mask_stage_share"] = round(mask.seconds / result["wall_s"], 3)
        runs.append(result)
        print(json.dumps(result), flush=True)
    free = statistics.mean(r["output_tok_s"] for r in runs if r["mode"] == "free")
    constrained = statistics.mean(r["output_tok_s"] for r in runs if r["mode"] == "json-schema")
    report.update(runs=runs, free_tok_s=round(free, 2), json_schema_tok_s=round(constrained, 2), ratio=round(constrained / free, 3))
    print()
    print(f"model {info.path.name} on {device} ({device_name}), {args.requests} requests, {args.concurrency} concurrent, up to {args.output_len} tokens")
    print(f"{'mode':<12} {'output tok/s':>12} {'wall s':>8} {'tokens':>7}  notes")
    for r in runs:
        notes = ""
        if r["mode"] == "json-schema":
            notes = f"complete {r['complete']}, valid {r['complete_and_valid']}, at length {r['ended_at_length']}, mask stage {100 * r['mask_stage_share']:.1f}% of wall"
        print(f"{r['mode']:<12} {r['output_tok_s']:>12.1f} {r['wall_s']:>8.2f} {r['output_tokens']:>7}  {notes}")
    print(f"json-schema / free: {report['ratio']:.3f} (target >= 0.9)")
    comp = report["compile"]
    print(f"\ncompile per request, uncached (vocabulary of {comp['vocab_size']} built once in {comp['vocabulary_build_s']} s):")
    for name, row in comp["schemas"].items():
        print(f"  {name:<18} p50 {row['p50_ms']:>8.3f} ms  p99 {row['p99_ms']:>8.3f} ms  cached {row['cached_ms']:.4f} ms")
    print(f"  {'all':<18} p50 {comp['all']['p50_ms']:>8.3f} ms  p99 {comp['all']['p99_ms']:>8.3f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
