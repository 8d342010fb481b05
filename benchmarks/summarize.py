"""The GPU suite's last word: one short table from the JSON files the stages wrote.

    python benchmarks/summarize.py OUT_DIR

Speeds are ratios: batch-1 decode against the roofline (bytes a decode step must read /
measured copy bandwidth), and against transformers measured in the same run on the same GPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

MODELS = ("llama3-8b", "llama3.2-1b")


def load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def decode_bytes_per_step(shape: str) -> float | None:
    """Weight bytes one decode step reads: every weight but the input embedding (one row of
    it is read), which is the output projection too when embeddings are tied. bf16."""
    try:
        from lmport.bench.checkpoint import SHAPES, llama_config, parameter_count
    except ImportError:
        return None
    fields = SHAPES[shape]
    params = parameter_count(llama_config(shape))
    if not fields.get("tie_word_embeddings"):
        params -= fields["vocab_size"] * fields["hidden_size"]
    return 2.0 * params


def workload_ceiling(shape: str, spec: dict, bw: float | None, gemm: float | None) -> float | None:
    """Output tok/s no implementation can beat on this GPU for the load test's workload.

    All prompts prefill (2 x parameters FLOPs per token, plus causal attention FLOPs) at the
    measured GEMM rate; then ``output_len - 1`` decode steps over all requests at once, each
    bounded by the larger of its GEMM FLOPs at the GEMM rate and its weight bytes at the copy
    bandwidth, plus reading every sequence's whole KV cache (K and V of every layer, bf16) at
    the copy bandwidth. Assumes all requests run together (concurrency >= prompts).
    """
    try:
        from lmport.bench.checkpoint import SHAPES
    except ImportError:
        return None
    if not bw or not gemm or not spec:
        return None
    f = SHAPES[shape]
    n, inp, out = spec["num_prompts"], spec["input_len"], spec["output_len"]
    if spec.get("max_concurrency") and spec["max_concurrency"] < n:
        return None
    layers, heads = f["num_hidden_layers"], f["num_attention_heads"]
    head_dim = f.get("head_dim") or f["hidden_size"] // heads
    params = decode_bytes_per_step(shape) / 2  # the weights a token passes through (bf16 bytes / 2)
    attention_flops = 2 * 2 * layers * heads * head_dim * inp * inp / 2  # QK^T and PV, causal
    seconds = n * (2 * params * inp + attention_flops) / gemm
    kv_bytes_per_token = 2 * layers * f["num_key_value_heads"] * head_dim * 2
    for step in range(1, out):
        context = inp + step
        seconds += max(2 * params * n / gemm, 2 * params / bw) + n * context * kv_bytes_per_token / bw
    return n * out / seconds


def run_metrics(doc: dict | None) -> dict | None:
    if not doc or not doc.get("runs"):
        return None
    return doc["runs"][-1]["metrics"]


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def ratio(a: float | None, b: float | None) -> str:
    # three significant digits: two decimals would print 0.696 as 0.70, on the right side of a 70 % target
    return "-" if not a or not b else f"{a / b:.3g}x"


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    roof = load(out / "roofline.json") or {}
    gpu = roof.get("gpu", "?")
    bw = roof.get("copy_bytes_per_s")
    lines = [f"GPU: {gpu}   copy {fmt(bw and bw / 1e12, '.2f')} TB/s (read+write)   "
             f"bf16 GEMM {fmt(roof.get('bf16_gemm_flops') and roof['bf16_gemm_flops'] / 1e12, '.0f')} TFLOP/s"]  # fmt: skip

    stages = out / "stages.tsv"
    if stages.exists():
        cells = [line.split("\t") for line in stages.read_text().splitlines() if line.strip()]
        lines.append("stages: " + "  ".join(f"{c[0]}={c[1]}({c[2]}s)" for c in cells if len(c) >= 3))

    tests_log = out / "tests.log"
    if tests_log.exists():
        outcome = [line for line in tests_log.read_text().splitlines() if " passed" in line or " failed" in line or " error" in line]
        if outcome:
            lines.append("GPU tests: " + outcome[-1].strip("= "))

    attention = load(out / "attention.json")
    if attention:
        dec = [r for r in attention["rows"] if r.get("phase") == "decode" and "fraction_of_copy_bw" in r]
        pre = [r for r in attention["rows"] if r.get("phase") == "prefill" and "ratio_to_sdpa" in r]
        if dec:
            best = max(dec, key=lambda r: r["fraction_of_copy_bw"])
            lines.append(f"attention decode: best {best['fraction_of_copy_bw']:.0%} of copy bandwidth "
                         f"(batch {best['batch']}, context {best['context']})")  # fmt: skip
        if pre:
            lines.append("attention prefill vs torch SDPA: " + ", ".join(f"{r['batch']}x{r['context']} {r['ratio_to_sdpa']:.2f}x" for r in pre))

    layer_ops = load(out / "layer_ops.json")
    if layer_ops:
        per_layer = [r for r in layer_ops["rows"] if r.get("op") == "per_layer"]
        if per_layer:
            lines.append("layer ops per decoder layer (graph us, reference -> fused): " + ", ".join(
                f"{r['shape']}x{r['tokens']} {r['reference_graph_us']:.1f} -> {r['fused_graph_us']:.1f}" for r in per_layer))  # fmt: skip

    header = f"{'model':<12} {'measure':<38} {'lmport':>9} {'reference':>26} {'ratio':>7}"
    table = [header, "-" * len(header)]
    for model in MODELS:
        b1 = run_metrics(load(out / f"lmport-{model}-b1.json"))
        load_doc = load(out / f"lmport-{model}-load.json")
        loadm = run_metrics(load_doc)
        hf = load(out / f"hf-{model}.json") or {}
        if not (b1 or loadm or hf):
            continue
        decode_tps = 1000.0 / b1["tpot_ms"]["mean"] if b1 and b1["tpot_ms"]["mean"] else None
        step_bytes = decode_bytes_per_step(model)
        ceiling = bw / step_bytes if bw and step_bytes else None
        hf_b1 = (hf.get("generate_b1") or {}).get("output_tok_s")
        hf_batch = (hf.get("generate_batch") or {}).get("output_tok_s")
        load_tps = loadm["output_throughput"] if loadm else None
        table.append(f"{model:<12} {'batch-1 decode tok/s (1/TPOT)':<38} {fmt(decode_tps):>9} "
                     f"{'roofline ' + fmt(ceiling):>26} {ratio(decode_tps, ceiling):>7}")  # fmt: skip
        table.append(f"{'':<12} {'batch-1 decode tok/s vs HF generate':<38} {fmt(decode_tps):>9} "
                     f"{'generate b1 ' + fmt(hf_b1):>26} {ratio(decode_tps, hf_b1):>7}")  # fmt: skip
        if loadm:
            ok = f"{loadm['completed']}/{loadm['completed'] + loadm['failed']}"
            spec = load_doc["runs"][-1]["spec"]
            label = f"{spec['num_prompts']}x{spec['input_len']}in/{spec['output_len']}out c={spec['max_concurrency']} out tok/s"
            table.append(f"{'':<12} {label:<38} {fmt(load_tps):>9} "
                         f"{'generate_batch ' + fmt(hf_batch):>26} {ratio(load_tps, hf_batch):>7}")  # fmt: skip
            ceiling_tps = workload_ceiling(model, spec, bw, roof.get("bf16_gemm_flops"))
            table.append(f"{'':<12} {'  vs the workload ceiling':<38} {fmt(load_tps):>9} "
                         f"{'ceiling ' + fmt(ceiling_tps, '.0f'):>26} {ratio(load_tps, ceiling_tps):>7}")  # fmt: skip
            table.append(f"{'':<12} {'  requests ok, TTFT p50/p99 ms':<38} {ok:>9} "
                         f"{fmt(loadm['ttft_ms']['median'], '.0f') + ' / ' + fmt(loadm['ttft_ms']['percentiles'].get('p99'), '.0f'):>26}")  # fmt: skip
            table.append(f"{'':<12} {'  ITL p50/p99 ms, TPOT mean ms':<38} {fmt(loadm['tpot_ms']['mean'], '.1f'):>9} "
                         f"{fmt(loadm['itl_ms']['median'], '.1f') + ' / ' + fmt(loadm['itl_ms']['percentiles'].get('p99'), '.1f'):>26}")  # fmt: skip
    lines += table
    lines.append("roofline = copy bandwidth / weight bytes one decode step reads (bf16, input embedding excluded unless tied)")
    lines.append("workload ceiling = prefill FLOPs at the GEMM rate + per decode step max(GEMM FLOPs at the GEMM rate, "
                 "weight bytes at copy bandwidth) + the KV cache read at copy bandwidth")
    text = "\n".join(lines)
    print(text)
    (out / "summary.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
