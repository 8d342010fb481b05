"""cuBLAS (``F.linear``) against lmport's Triton GEMV at decode shapes (M = 1..16 rows).

For each Llama-3-8B and Llama-3.2-1B projection and each M it times both with CUDA events,
eager (median of single calls: includes launch cost) and inside a CUDA graph of 32 calls
(median per call: launch cost gone, what a captured decode step sees), and reports µs,
achieved TB/s (weight bytes / time; x and y are noise next to W) and the max abs error of
each against a float32 reference. Weights rotate over enough copies to exceed the L2 cache
(an H200's 50 MB would otherwise hold o_proj's 32 MB), as a decode step's 32 layers do.

    python3 benchmarks/gemv_bench.py                      # the table, ~30 s on an H200
    python3 benchmarks/gemv_bench.py --json gemv.json
    python3 benchmarks/gemv_bench.py --autotune --rows 1 2 4 8   # search configs; prints FROZEN lines

``--autotune`` times a grid of configs per shape in graphs and prints the winners as lines
to paste into ``FROZEN`` in ``plugins/cuda/lmport_cuda/kernels/gemv.py``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins" / "cuda"))

from lmport_cuda.kernels import gemv as G  # noqa: E402

# (model, name, N, K)
SHAPES = [
    ("8b", "qkv", 6144, 4096),
    ("8b", "o_proj", 4096, 4096),
    ("8b", "gate_up", 28672, 4096),
    ("8b", "down", 4096, 14336),
    ("8b", "lm_head", 128256, 4096),
    ("1b", "qkv", 3072, 2048),
    ("1b", "o_proj", 2048, 2048),
    ("1b", "gate_up", 16384, 2048),
    ("1b", "down", 2048, 8192),
    ("1b", "lm_head", 128256, 2048),
]
GRAPH_CALLS = 32
ROTATE_BYTES = 256 << 20  # > L2 of any current GPU (H200: 50 MB)


def weights_for(n: int, k: int, dtype: torch.dtype) -> list[torch.Tensor]:
    copies = max(1, math.ceil(ROTATE_BYTES / (n * k * 2)))
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    return [(torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(dtype) for _ in range(copies)]


def time_eager(fn, weights, reps: int) -> float:
    for w in weights[:3]:
        fn(w)
    times = []
    for i in range(reps):
        w = weights[i % len(weights)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(w)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def time_graph(fn, weights, replays: int, calls: int = GRAPH_CALLS) -> float:
    """Median µs per call over ``replays`` replays of a graph of ``calls`` calls (weights rotating)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for w in weights[:3]:
            fn(w)  # compile / pick cuBLAS algos outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(weights[i % len(weights)])
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


def max_error(fn, x, w, bias) -> float:
    ref = x.float() @ w.float().T + (bias.float() if bias is not None else 0)
    return (fn(w).float() - ref).abs().max().item()


def candidates(m: int, n: int, k: int, dot: bool = True) -> list[G.GemvConfig]:
    """The autotune grid: fma tiles (m <= 8) and dot tiles, each at split 1 and the rule's split."""
    out: list[G.GemvConfig] = []
    if m <= G.MAX_FMA_ROWS:
        for bn, bk, warps in itertools.product((4, 8, 16), (512, 1024), (4, 8)):
            per_thread = bn * bk // (32 * warps)  # weight elements per thread per step; the accumulators hold m * that / 8
            if not 8 <= per_thread <= 64 or m * per_thread // 8 > 64:
                continue
            out.append(G.GemvConfig(bn, bk, 1, warps, 1))
    for bn, bk, stages in itertools.product((16, 32, 64), (128, 256), (3, 5)) if dot or m > G.MAX_FMA_ROWS else ():
        out.append(G.GemvConfig(bn, bk, 1, 4, stages, use_dot=True))
    seen, grid = set(), []
    for cfg in out:
        for c in (cfg, G.with_split(cfg, n, k), G.with_split(cfg, n, k, programs_per_sm=8)):
            if c not in seen and k % c.block_k == 0:
                seen.add(c)
                grid.append(c)
    return grid


def run(args) -> dict:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    props = torch.cuda.get_device_properties(0)
    G.SM_COUNT_GUESS = props.multi_processor_count
    rows_out, frozen = [], {}
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, dtype {args.dtype}; "
          f"µs per call: eager (with launch) / graph ({GRAPH_CALLS} calls per graph)")  # fmt: skip
    header = f"{'shape':<14}{'N':>7}{'K':>6}{'M':>3} | {'cuBLAS eager':>12}{'graph':>8}{'TB/s':>6} | {'triton eager':>12}{'graph':>8}{'TB/s':>6} | {'speedup':>7} | {'err cuBLAS':>10}{'err triton':>11} | config"  # fmt: skip
    print(header + "\n" + "-" * len(header))
    for model, name, n, k in SHAPES:
        if model not in args.models:
            continue
        weights = weights_for(n, k, dtype)
        wbytes = n * k * weights[0].element_size()
        for m in args.rows:
            gen = torch.Generator(device="cuda").manual_seed(m)
            x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
            bias = (torch.randn(n, device="cuda", generator=gen) * 0.1).to(dtype) if args.bias else None
            cfg = G.pick_config(m, n, k)
            if args.autotune:
                best = None
                for cand in candidates(m, n, k, dot=not args.no_dot):
                    try:
                        t = time_graph(lambda w, c=cand: G.gemv(x, w, bias, c), weights, max(3, args.replays // 4))
                    except Exception as exc:  # a config the compiler rejects (shared memory ...)
                        print(f"  skip {cand.short()}: {type(exc).__name__}")
                        continue
                    if best is None or t < best[0]:
                        best = (t, cand)
                cfg = best[1]
                frozen[(G.rows_bucket(m), n, k)] = cfg
            cublas = lambda w: F.linear(x, w, bias)  # noqa: E731
            triton_fn = lambda w, c=cfg: G.gemv(x, w, bias, c)  # noqa: E731
            row = dict(model=model, shape=name, N=n, K=k, M=m, config=cfg.short(),
                       cublas_eager_us=time_eager(cublas, weights, args.reps),
                       cublas_graph_us=time_graph(cublas, weights, args.replays),
                       triton_eager_us=time_eager(triton_fn, weights, args.reps),
                       triton_graph_us=time_graph(triton_fn, weights, args.replays),
                       cublas_err=max_error(cublas, x, weights[0], bias),
                       triton_err=max_error(triton_fn, x, weights[0], bias))  # fmt: skip
            row["cublas_tbps"] = wbytes / row["cublas_graph_us"] / 1e6
            row["triton_tbps"] = wbytes / row["triton_graph_us"] / 1e6
            row["speedup"] = row["cublas_graph_us"] / row["triton_graph_us"]
            rows_out.append(row)
            print(f"{model + ' ' + name:<14}{n:>7}{k:>6}{m:>3} | {row['cublas_eager_us']:>12.1f}{row['cublas_graph_us']:>8.1f}"
                  f"{row['cublas_tbps']:>6.2f} | {row['triton_eager_us']:>12.1f}{row['triton_graph_us']:>8.1f}"
                  f"{row['triton_tbps']:>6.2f} | {row['speedup']:>6.2f}x | {row['cublas_err']:>10.4f}{row['triton_err']:>11.4f} | {cfg.short()}",
                  flush=True)  # fmt: skip
        del weights
        torch.cuda.empty_cache()
    for model in args.models:
        for m in args.rows:
            sel = [r for r in rows_out if r["model"] == model and r["M"] == m and r["shape"] != "lm_head"]
            if sel:
                layers = 32 if model == "8b" else 16
                cb, tr = (sum(r[key] for r in sel) * layers for key in ("cublas_graph_us", "triton_graph_us"))
                best = sum(min(r["cublas_graph_us"], r["triton_graph_us"]) for r in sel) * layers
                print(f"{model} M={m}: per-step layer GEMMs ({layers} layers, graph): cuBLAS {cb:.0f} µs, "
                      f"triton {tr:.0f} µs, best-of-each {best:.0f} µs")  # fmt: skip
    if frozen:
        print("\n# paste into FROZEN in plugins/cuda/lmport_cuda/kernels/gemv.py:")
        for (bucket, n, k), c in sorted(frozen.items()):
            print(f"    ({bucket}, {n}, {k}): GemvConfig({c.block_n}, {c.block_k}, {c.split_k}, {c.num_warps}, "
                  f"{c.num_stages}, use_dot={c.use_dot}),")  # fmt: skip
    return {"device": props.name, "torch": torch.__version__, "dtype": args.dtype, "rows": rows_out,
            "frozen": {f"{b},{n},{k}": c.short() for (b, n, k), c in frozen.items()}}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--models", nargs="+", default=["8b", "1b"], choices=["8b", "1b"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--bias", action="store_true", help="time with a bias (Llama has none)")
    parser.add_argument("--reps", type=int, default=30, help="eager calls timed per case")
    parser.add_argument("--replays", type=int, default=20, help="graph replays timed per case")
    parser.add_argument("--autotune", action="store_true", help="search configs per shape (minutes) and print FROZEN lines")
    parser.add_argument("--no-dot", action="store_true", help="autotune: leave the tensor-core tiles out where fma ones apply (faster)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    if any(not 1 <= m <= G.MAX_ROWS for m in args.rows):
        parser.error(f"--rows must be in 1..{G.MAX_ROWS}")
    t0 = time.time()
    result = run(args)
    result["seconds"] = time.time() - t0
    print(f"done in {result['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
