"""Quantized-linear kernels on the Llama-3-8B projection shapes: lmport's kernels against
dequantize + cuBLAS and against bf16 cuBLAS, and each format against its weight-bytes roofline.

    python3 benchmarks/quant_bench.py kernels --json quant_kernels.json          # ~1-2 min on an H200
    python3 benchmarks/quant_bench.py kernels --rows 1 --autotune                # search the one-row configs
    python3 benchmarks/quant_bench.py checkpoint BF16_DIR GPTQ_DIR               # a GPTQ int4 g128 copy, on the GPU
    python3 benchmarks/quant_bench.py report OUT_DIR                             # the model-level table of a suite run

``kernels``: for M in ``--rows`` (default 1, 16, 256, 4096) and each projection (qkv, o, gate_up,
down), the median µs per call inside a CUDA graph of several calls, weights rotating over more
than the L2 cache holds (as a decode step's 32 layers do), of

- bf16: ``F.linear`` (cuBLAS), and at one row the Triton GEMV the server runs;
- int4 g128 (``linear_wq``, GPTQ layout, asymmetric float zeros): the GEMV (one row), the fused
  dequant GEMM (tensor cores), dequantize + cuBLAS, and what ``linear_wq`` picks;
- fp8 e4m3, per-channel scales (``linear_fp8``): the fp8 GEMV (one row), per-token fp8 +
  ``torch._scaled_mm`` (row-wise scales), dequantize + cuBLAS, and what ``linear_fp8`` picks;

with each one's fraction of the copy-bandwidth roofline of its own bytes (weights + scales/zeros)
at the rows where bytes bound it, and its error against a float32 reference of the dequantized
weight. The summary adds up one decode step's layer GEMMs (32 layers) per format.

``report``: reads the suite's ``lmport-llama3-8b{,-fp8,-int4}-{b1,load}.json`` and ``roofline.json``
and prints batch-1 decode per format against bf16 and against the format's own roofline
(bytes one decode step reads / copy bandwidth), and the fp8 load test against bf16's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins" / "cuda"))
sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPES = [("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]  # (name, N, K)
LAYERS = 32
GROUP = 128
ROTATE_BYTES = 256 << 20  # > the L2 of any current GPU (H200: 50 MB)
DEVICE = "cuda"  # a smoke test of this script sets "cpu" (kernels in Triton's interpreter)


def graph_us(fn, copies: list, replays: int, calls: int) -> float:
    """Median µs per call over replays of a CUDA graph of ``calls`` calls, operands rotating."""
    from gemv_bench import time_graph

    return time_graph(fn, copies, replays, calls)


def device_facts() -> tuple[str, int, tuple[int, int]]:
    props = torch.cuda.get_device_properties(0)
    return props.name, props.multi_processor_count, torch.cuda.get_device_capability()


def copy_bandwidth() -> float:
    from roofline import copy_bandwidth as measure

    return measure(gib=1.0, iters=10)


class Operands:
    """Random weights of one projection in every format, in enough copies to defeat the L2 cache."""

    def __init__(self, n: int, k: int, seed: int):
        from lmport_cuda.kernels.wq_gemm import dequantize

        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        self.n, self.k = n, k
        copies = max(2, math.ceil(ROTATE_BYTES / (n * k // 2)))
        self.int4 = []
        for _ in range(copies):
            qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), device=DEVICE, dtype=torch.int32, generator=gen)
            scales = (torch.rand(k // GROUP, n, device=DEVICE, generator=gen) * 0.002 + 0.001).to(torch.bfloat16)
            zeros = (torch.rand(k // GROUP, n, device=DEVICE, generator=gen) * 15).to(torch.bfloat16)
            self.int4.append((qweight, scales, zeros))
        self.int4_bytes = n * k // 2 + 2 * (k // GROUP) * n * 2
        self.int4_ref = dequantize(*self.int4[0], 4, GROUP).float()  # [K, N]
        copies = max(2, math.ceil(ROTATE_BYTES / (n * k)))
        self.fp8 = []
        for _ in range(copies):
            w = (torch.randn(n, k, device=DEVICE, generator=gen) * 0.02).to(torch.bfloat16)
            scale = w.float().abs().amax(1) / 448.0
            self.fp8.append(((w.float() / scale[:, None]).to(torch.float8_e4m3fn), scale))
        self.fp8_bytes = n * k + n * 4
        self.fp8_ref = (self.fp8[0][0].float() * self.fp8[0][1][:, None]).T  # [K, N]
        copies = max(2, math.ceil(ROTATE_BYTES / (n * k * 2)))
        self.bf16 = [(torch.randn(n, k, device=DEVICE, generator=gen) * 0.02).to(torch.bfloat16) for _ in range(copies)]
        self.bf16_bytes = n * k * 2


def rel_error(y: torch.Tensor, x: torch.Tensor, w_kn: torch.Tensor) -> float:
    ref = x.float() @ w_kn
    return ((y.float() - ref).norm() / ref.norm()).item()


def kernels(args) -> dict:
    from torch.nn import functional as F

    from lmport_cuda.kernels import fp8_linear as F8
    from lmport_cuda.kernels import gemv as G
    from lmport_cuda.kernels import wq_gemm as W

    name_, sms, cc = device_facts()
    G.SM_COUNT_GUESS = sms
    rowwise, fp8_compute = cc >= (9, 0), cc >= (8, 9)
    bw = copy_bandwidth()
    print(f"{name_}: copy {bw / 1e12:.2f} TB/s; µs per call in CUDA graphs; 'roof' = own bytes / copy bandwidth / time")
    rows, tuned = [], {}
    for name, n, k in SHAPES:
        ops = Operands(n, k, seed=n + k)
        for m in args.rows:
            gen = torch.Generator(device=DEVICE).manual_seed(m)
            x = torch.randn(m, k, device=DEVICE, generator=gen).to(torch.bfloat16)
            calls = 16 if m <= 256 else 4
            t = lambda fn, copies: graph_us(fn, copies, args.replays, calls)  # noqa: E731
            cases: dict[str, tuple] = {}  # label -> (fn over one copy, copies, bytes, reference [K, N] or None)
            cases["bf16 cublas"] = (lambda w: F.linear(x, w), ops.bf16, ops.bf16_bytes, None)
            if m <= G.MAX_ROWS and G.supports(x, ops.bf16[0], None):
                cases["bf16 gemv"] = (lambda w: G.gemv(x, w), ops.bf16, ops.bf16_bytes, None)
            wq = lambda fn: (lambda c: fn(x, c[0], c[1], c[2], 4, GROUP))  # noqa: E731
            if m == 1:
                gemv_cfg = None
                if args.autotune:  # the runtime tuner's candidates, timed here with rotating weights
                    gemv_cfg, tuned[("int4", n, k)] = autotune("int4 gemv", W.gemv_candidates(n, k, GROUP, 4),
                                                               lambda c, cfg: W.wq_gemv(x, *c, 4, GROUP, None, cfg), ops.int4, t, n, k)  # fmt: skip
                cases["int4 gemv"] = (lambda c, cfg=gemv_cfg: W.wq_gemv(x, *c, 4, GROUP, None, cfg), ops.int4, ops.int4_bytes, ops.int4_ref)
            if m <= 4096:
                cases["int4 gemm"] = (wq(W.wq_gemm), ops.int4, ops.int4_bytes, ops.int4_ref)
            cases["int4 dequant+cublas"] = (wq(W.wq_dequant_matmul), ops.int4, ops.int4_bytes, ops.int4_ref)
            cases["int4 linear_wq"] = (wq(W.linear_wq), ops.int4, ops.int4_bytes, ops.int4_ref)
            if m <= G.MAX_FMA_ROWS:
                f8cfg = None
                if args.autotune and m == 1:
                    f8cfg, tuned[("fp8", n, k)] = autotune("fp8 gemv", fp8_gemv_grid(n, k),
                                                           lambda c, cfg: F8.fp8_gemv(x, c[0], c[1], None, config=cfg), ops.fp8, t, n, k)  # fmt: skip
                cases["fp8 gemv"] = (lambda c, cfg=f8cfg: F8.fp8_gemv(x, c[0], c[1], None, native=fp8_compute, config=cfg),
                                     ops.fp8, ops.fp8_bytes, ops.fp8_ref)  # fmt: skip
            if fp8_compute:
                cases["fp8 scaled_mm"] = (lambda c: F8.scaled_mm_linear(x, c[0], c[1], None, rowwise=rowwise), ops.fp8, ops.fp8_bytes, ops.fp8_ref)
            if fp8_compute:  # the per-token activation quantization alone (part of "fp8 scaled_mm")
                cases["fp8 quantize x"] = (lambda c: F8.quantize_rows(x), ops.fp8, 3 * m * k, None)
            cases["fp8 dequant+cublas"] = (lambda c: F8.dequant_linear(x, c[0], c[1]), ops.fp8, ops.fp8_bytes, ops.fp8_ref)
            cases["fp8 linear_fp8"] = (lambda c: F8.linear_fp8(x, c[0], c[1], None, fp8_compute=fp8_compute, rowwise=rowwise),
                                       ops.fp8, ops.fp8_bytes, ops.fp8_ref)  # fmt: skip
            bf16_us = None
            for label, (fn, copies, nbytes, ref) in cases.items():
                try:
                    us = t(fn, copies)
                    err = rel_error(fn(copies[0]), x, ref) if ref is not None else None
                except Exception as exc:  # report and go on: one broken path must not hide the others
                    print(f"  {name} M={m} {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                    continue
                bf16_us = us if label == "bf16 cublas" else bf16_us
                flops = 2 * m * n * k
                row = dict(shape=name, N=n, K=k, M=m, path=label, us=us, bytes=nbytes, roof=nbytes / bw / (us * 1e-6),
                           tflops=flops / us / 1e6, vs_bf16_cublas=bf16_us / us if bf16_us else None, rel_err=err)  # fmt: skip
                rows.append(row)
                print(f"{name:<8}{n:>6}{k:>6}{m:>5}  {label:<20}{us:>10.1f} us  roof {row['roof']:>5.2f}  "
                      f"{row['tflops']:>6.0f} TFLOP/s  vs bf16 cuBLAS {row['vs_bf16_cublas'] or 0:>5.2f}x  "
                      f"err {'-' if err is None else f'{err:.1e}'}", flush=True)  # fmt: skip
        del ops
        torch.cuda.empty_cache()
    summary = step_summary(rows, bw)
    chosen = {f"{n}x{k} g{g} int{b}": c.short() for (n, k, g, b, *_), c in W._TUNED.items()}
    print("int4 GEMV configs the runtime tuner chose:", json.dumps(chosen))
    return {"device": name_, "torch": torch.__version__, "copy_bytes_per_s": bw, "rows": rows, "step": summary,
            "tuned": {f"{fmt} {n} {k}": c for (fmt, n, k), c in tuned.items()}, "trials": TRIALS, "runtime_tuned": chosen}  # fmt: skip


def step_summary(rows: list[dict], bw: float) -> list[dict]:
    """One decode step's layer GEMMs (32 layers x 4 projections) per path, against the bytes' roofline."""
    out = []
    for m in sorted({r["M"] for r in rows}):
        for path in sorted({r["path"] for r in rows if r["M"] == m}):
            sel = [r for r in rows if r["M"] == m and r["path"] == path]
            if len(sel) != len(SHAPES):
                continue
            us = LAYERS * sum(r["us"] for r in sel)
            nbytes = LAYERS * sum(r["bytes"] for r in sel)
            out.append(dict(M=m, path=path, step_us=us, roof=nbytes / bw / (us * 1e-6)))
    base = {s["M"]: s["step_us"] for s in out if s["path"] == "bf16 cublas"}
    print("\nlayer GEMMs of one decode step (32 layers, graphs):")
    for s in out:
        s["vs_bf16_cublas"] = base.get(s["M"], 0) / s["step_us"]
        print(f"  M={s['M']:<5} {s['path']:<20} {s['step_us']:>9.0f} us  roof {s['roof']:.2f}  vs bf16 cuBLAS {s['vs_bf16_cublas']:.2f}x")
    return out


TRIALS: list[dict] = []  # every autotune timing, for the JSON


def autotune(kernel_name: str, configs: list, run, copies: list, t, n: int, k: int):
    """The fastest of ``configs`` for ``run(copy, config)`` (timed by ``t``); every timing goes to TRIALS."""
    best = None
    for cfg in configs:
        try:
            us = t(lambda c, cfg=cfg: run(c, cfg), copies)
        except Exception:  # a config the compiler or the shared memory refuses
            continue
        TRIALS.append(dict(shape=f"{n}x{k}", kernel=kernel_name, config=cfg.short(), us=us))
        if best is None or us < best[0]:
            best = (us, cfg)
    if best is None:
        print(f"  {kernel_name} {n}x{k}: no config ran; the default stays")
        return None, "default"
    print(f"  {kernel_name} {n}x{k}: best {best[1].short()} {best[0]:.1f} us")
    return best[1], best[1].short()


def fp8_gemv_grid(n: int, k: int) -> list:
    from lmport_cuda.kernels import gemv as G

    out = []
    for bn, bk, warps in itertools.product((4, 8, 16), (1024, 2048, 4096), (4, 8)):
        if 16 <= bn * bk // (32 * warps) <= 128:  # fp8 elements per thread per step
            for spp in (2, 4, 8):
                cfg = G.with_split(G.GemvConfig(bn, bk, 1, warps, 1), n, k, spp)
                if k % cfg.block_k == 0 and cfg not in out:
                    out.append(cfg)
    return out


# ---- checkpoint: a GPTQ int4 copy of the bf16 benchmark checkpoint ------------------------------


def write_gptq_checkpoint(src: Path, dst: Path, bits: int = 4, group_size: int = GROUP) -> None:
    """``src`` (bf16 safetensors shards) -> ``dst`` in AutoGPTQ's on-disk layout (v1 ``checkpoint_format``,
    symmetric), shard by shard on the GPU: the RTN quantizer of ``lmport.testing.quantize_checkpoint``
    (which works on a whole state dict on the CPU, minutes for 8B) redone per tensor, with its packers,
    its choice of quantizable weights and its ``quantization_config``."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from lmport.layers.quant_ops import pack_int_rows
    from lmport.layers.quantization.int_weights import pack_int_cols
    from lmport.testing.quantize_checkpoint import default_quantizable, quantization_config

    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name != "model.safetensors.index.json":
            shutil.copy(item, dst / item.name)
    maxq = (1 << bits) - 1
    weight_map = {}
    for shard in sorted(src.glob("*.safetensors")):
        out = {}
        with safe_open(str(shard), framework="pt", device="cuda" if torch.cuda.is_available() else "cpu") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if not default_quantizable(name, t):
                    out[name] = t.cpu()
                    continue
                n, k = t.shape
                w = t.float().reshape(n, k // group_size, group_size)
                scale = (w.abs().amax(dim=2) / ((maxq + 1) / 2 - 0.5)).clamp(min=1e-8).half().float()  # [N, G]
                zero = (maxq + 1) // 2
                q = torch.clamp(torch.round(w / scale[..., None]) + zero, 0, maxq).reshape(n, k).long()
                module = name.removesuffix(".weight")
                out[f"{module}.qweight"] = pack_int_rows(q.t(), bits).cpu()
                zeros = torch.full((k // group_size, n), zero - 1, dtype=torch.long, device=q.device)  # v1 stores zero - 1
                out[f"{module}.qzeros"] = pack_int_cols(zeros, bits).cpu()
                out[f"{module}.scales"] = scale.t().contiguous().half().cpu()
                out[f"{module}.g_idx"] = (torch.arange(k, dtype=torch.int32) // group_size).contiguous()
        save_file(out, str(dst / shard.name), metadata={"format": "pt"})
        weight_map.update({name: shard.name for name in out})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config("gptq", bits=bits, group_size=group_size, sym=True)
    (dst / "config.json").write_text(json.dumps(config, indent=2))


# ---- report: the model-level numbers of a suite run ------------------------------------------

FORMATS = {  # suite name suffix -> (label, bytes per weight of the decoder layers; lm_head stays bf16)
    "": ("bf16", 2.0),
    "-fp8": ("fp8 (per-channel)", 1.0),
    "-int4": (f"int4 g{GROUP}", 0.5 + 2 * 2 / GROUP),
}


def step_bytes(shape: str, per_weight: float, extra_per_row: float = 0.0) -> float:
    """Bytes one decode step reads: decoder-layer linears at ``per_weight`` bytes, the rest (norms,
    LM head) bf16, the input embedding excluded (one row of it is read)."""
    from lmport.bench.checkpoint import SHAPES as CKPT, llama_config, parameter_count

    f = CKPT[shape]
    h, inter, layers = f["hidden_size"], f["intermediate_size"], f["num_hidden_layers"]
    kv = f["num_key_value_heads"] * (h // f["num_attention_heads"])
    linear = layers * (h * (h + 2 * kv) + h * h + 3 * h * inter)
    total = parameter_count(llama_config(shape)) - f["vocab_size"] * h  # the input embedding is not read whole
    return linear * per_weight + (total - linear) * 2.0


def report(out: Path) -> str:
    def load(p):
        try:
            return json.loads((out / p).read_text())
        except (OSError, ValueError):
            return None

    def metrics(doc):
        return doc["runs"][-1]["metrics"] if doc and doc.get("runs") else None

    roof = load("roofline.json") or {}
    bw = roof.get("copy_bytes_per_s")
    lines = [f"quantized Llama-3-8B shape on {roof.get('gpu', '?')} (copy {bw / 1e12 if bw else 0:.2f} TB/s), same run as bf16"]
    b1 = {}
    for suffix, (label, per_weight) in FORMATS.items():
        m = metrics(load(f"lmport-llama3-8b{suffix}-b1.json"))
        if not m or not m["tpot_ms"]["mean"]:
            lines.append(f"  {label:<18} batch 1: no result")
            continue
        tps = 1000.0 / m["tpot_ms"]["mean"]
        b1[suffix] = tps
        ceiling = bw / step_bytes("llama3-8b", per_weight) if bw else None
        vs_bf16 = f"{tps / b1[''] :.3g}x bf16" if "" in b1 and suffix else ""
        lines.append(f"  {label:<18} batch-1 decode {tps:>7.1f} tok/s   own roofline {ceiling or 0:>7.1f}   "
                     f"{tps / ceiling if ceiling else 0:.3g}x roofline   {vs_bf16}")  # fmt: skip
    loads = {s: metrics(load(f"lmport-llama3-8b{s}-load.json")) for s in ("", "-fp8")}
    if all(loads.values()):
        a, b = loads[""]["output_throughput"], loads["-fp8"]["output_throughput"]
        ok = f"{loads['-fp8']['completed']}/{loads['-fp8']['completed'] + loads['-fp8']['failed']}"
        lines.append(f"  load 256x512/128: bf16 {a:,.0f} out tok/s, fp8 {b:,.0f} ({ok} ok)   fp8 {b / a:.3g}x bf16")
    else:
        lines.append("  load 256x512/128 fp8 vs bf16: no result")
    text = "\n".join(lines)
    print(text)
    (out / "quant_summary.txt").write_text(text + "\n")
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    kp = sub.add_parser("kernels", help="the kernel microbenchmark")
    kp.add_argument("--rows", type=int, nargs="+", default=[1, 16, 256, 4096])
    kp.add_argument("--replays", type=int, default=10)
    kp.add_argument("--autotune", action="store_true", help="time the one-row GEMV configs per shape with rotating weights")
    kp.add_argument("--json", type=Path)
    rp = sub.add_parser("report", help="the model-level table from a suite run's JSON")
    rp.add_argument("out", type=Path)
    cp = sub.add_parser("checkpoint", help="write a GPTQ int4 (g128) copy of a bf16 checkpoint (on the GPU)")
    cp.add_argument("src", type=Path)
    cp.add_argument("dst", type=Path)
    args = parser.parse_args()
    if args.command == "report":
        report(args.out)
        return 0
    if args.command == "checkpoint":
        done = args.dst / "config.json"
        if done.exists() and "quantization_config" in json.loads(done.read_text()):
            print(f"{args.dst}: already there")
            return 0
        t0 = time.time()
        write_gptq_checkpoint(args.src, args.dst)
        print(f"{args.dst}: GPTQ int4 g{GROUP} in {time.time() - t0:.0f} s")
        return 0
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    t0 = time.time()
    result = kernels(args)
    result["seconds"] = time.time() - t0
    print(f"done in {result['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
