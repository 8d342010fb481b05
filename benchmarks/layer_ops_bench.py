"""The CUDA backend's fused layer ops against the core's reference ops, per op, on the GPU.

Per decoder layer a Llama model runs two residual-add + RMSNorms, one RoPE on q and k and one
SiLU·mul. The reference runs each as several tiny torch kernels; the fused ops as one Triton
kernel each. Times are GPU time per call measured by replaying a CUDA graph of 50 calls (what a
captured decode step pays, without Python launch overhead), and eager time per call next to it.
Shapes: Llama-3-8B and Llama-3.2-1B, bf16, 1 token (decode at batch 1) and 256 tokens.

    python benchmarks/layer_ops_bench.py --json layer_ops.json
"""

from __future__ import annotations

import argparse
import json
import sys
from types import SimpleNamespace
from typing import Callable

import torch

DTYPE = torch.bfloat16
CALLS_PER_GRAPH = 50
# name: (hidden, intermediate, heads, kv_heads, head_dim, rms_norm_eps)
SHAPES = {
    "llama3-8b": (4096, 14336, 32, 8, 128, 1e-5),
    "llama3.2-1b": (2048, 8192, 32, 8, 64, 1e-5),
}
TOKENS = (1, 256)


def eager_us(fn: Callable[[], object], iters: int = 50) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def graph_us(fn: Callable[[], object], replays: int = 20) -> float | None:
    """GPU time per call inside a captured graph; ``None`` if the op cannot be captured."""
    try:
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(CALLS_PER_GRAPH):
                fn()
        graph.replay()
        torch.cuda.synchronize()
    except Exception as exc:  # report, do not hide the other ops
        print(f"  (graph capture failed: {type(exc).__name__}: {exc})", file=sys.stderr)
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * CALLS_PER_GRAPH)


def op_cases(shape: str, tokens: int, device: str = "cuda") -> dict[str, tuple[Callable, int]]:
    """op name -> (``call(ops)``, the bytes the op must move at least)."""
    from lmport.layers.rotary import RotaryEmbedding

    hidden, inter, heads, kv_heads, head_dim, eps = SHAPES[shape]
    dev = torch.device(device)
    x = torch.randn(tokens, hidden, dtype=DTYPE, device=dev)
    residual = torch.randn(tokens, hidden, dtype=DTYPE, device=dev)
    weight = torch.rand(hidden, dtype=DTYPE, device=dev) + 0.5
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = torch.randn(tokens, q_size + 2 * kv_size, dtype=DTYPE, device=dev)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    config = SimpleNamespace(rope_theta=500000.0, max_position_embeddings=8192, rope_scaling=None)
    cos, sin = RotaryEmbedding(config, head_dim).cos_sin(torch.randint(0, 4096, (tokens,), device=dev))
    gate_up = torch.randn(tokens, 2 * inter, dtype=DTYPE, device=dev)
    size = x.element_size()
    return {
        "rms_norm": (lambda ops: ops.rms_norm(x, weight, eps), 2 * tokens * hidden * size),
        "fused_add_rms_norm": (lambda ops: ops.fused_add_rms_norm(x, residual, weight, eps), 4 * tokens * hidden * size),
        "rotary": (lambda ops: ops.rotary(q, k, cos, sin, head_dim),
                   2 * tokens * (q_size + kv_size) * size + 2 * cos.numel() * cos.element_size()),  # fmt: skip
        "silu_and_mul": (lambda ops: ops.silu_and_mul(gate_up), 3 * tokens * inter * size),
    }


# ops one Llama decoder layer runs, with how often
PER_LAYER = {"fused_add_rms_norm": 2, "rotary": 1, "silu_and_mul": 1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("layer_ops_bench: no CUDA device", file=sys.stderr)
        return 2
    from lmport.layers.ops import REFERENCE_OPS, LayerOps
    from lmport_cuda.layer_ops import fused_layer_ops

    fused_table = fused_layer_ops()
    if fused_table is None:
        print("layer_ops_bench: triton is not installed", file=sys.stderr)
        return 2
    fused = LayerOps(**fused_table)
    rows = []
    print(f"{'shape':<12} {'tokens':>6} {'op':<20} {'ref graph us':>12} {'fused graph us':>14} {'speed-up':>8} "
          f"{'ref eager us':>12} {'fused eager us':>14} {'fused GB/s':>10}")  # fmt: skip
    for shape in SHAPES:
        for tokens in TOKENS:
            per_layer = {"reference": 0.0, "fused": 0.0}
            for op, (call, min_bytes) in op_cases(shape, tokens).items():
                row = {"shape": shape, "tokens": tokens, "op": op, "min_bytes": min_bytes}
                try:
                    for label, ops in (("reference", REFERENCE_OPS), ("fused", fused)):
                        row[f"{label}_graph_us"] = graph_us(lambda: call(ops))
                        row[f"{label}_eager_us"] = eager_us(lambda: call(ops))
                except Exception as exc:  # one failed op must not hide the others
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    print(f"{shape:<12} {tokens:>6} {op:<20} FAILED {row['error']}", flush=True)
                    rows.append(row)
                    continue
                ref_t, fused_t = row["reference_graph_us"], row["fused_graph_us"]
                if ref_t and fused_t:
                    row["speedup"] = ref_t / fused_t
                    row["fused_bytes_per_s"] = min_bytes / (fused_t * 1e-6)
                    if op in PER_LAYER:
                        per_layer["reference"] += PER_LAYER[op] * ref_t
                        per_layer["fused"] += PER_LAYER[op] * fused_t
                rows.append(row)

                def fmt(value, width):
                    return f"{value:>{width}.1f}" if value is not None else f"{'-':>{width}}"

                print(f"{shape:<12} {tokens:>6} {op:<20} {fmt(ref_t, 12)} {fmt(fused_t, 14)} "
                      f"{row.get('speedup', 0):>7.2f}x {fmt(row['reference_eager_us'], 12)} "
                      f"{fmt(row['fused_eager_us'], 14)} {row.get('fused_bytes_per_s', 0) / 1e9:>10.0f}", flush=True)  # fmt: skip
            if per_layer["fused"]:
                rows.append({"shape": shape, "tokens": tokens, "op": "per_layer", **{f"{k}_graph_us": v for k, v in per_layer.items()}})
                print(f"{shape:<12} {tokens:>6} {'= per layer':<20} {per_layer['reference']:>12.1f} {per_layer['fused']:>14.1f} "
                      f"{per_layer['reference'] / per_layer['fused']:>7.2f}x", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": str(DTYPE), "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
