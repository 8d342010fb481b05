"""Compile the CUDA backend's Triton kernels for sm_90 (H100/H200) on a machine without a GPU.

The interpreter (what the CPU tests run) checks what a kernel computes, not whether Triton's
compiler accepts it or whether a tile fits the hardware. This script compiles the launches the
backend really makes for model-shaped batches down to a cubin (Triton wheels carry ``ptxas``),
and reports registers, spills and shared memory. Run it with ``TRITON_INTERPRET`` unset:

    python plugins/cuda/tests/compile_for_sm90.py [--json]

Exit status 1 if a variant fails to compile or needs more shared memory than an H100 has.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lmport_cuda.kernels.kv_cache_write import _kv_cache_write_kernel
from lmport_cuda.kernels.paged_attention import head_dim_pad_of, kernel_constexprs, plan_launches
from lmport_cuda.kernels.unified_attention import merge_splits_kernel, unified_attention_kernel

TARGET = GPUTarget("cuda", 90, 32)
SHARED_MEMORY_LIMIT = 232448  # bytes of shared memory per block on sm_90
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
INDEX_POINTERS = {"block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr", "slot_mapping_ptr", "key_ranges_ptr"}
FLOAT_POINTERS = {"alibi_slopes_ptr", "partial_acc_ptr", "partial_max_ptr", "partial_sum_ptr"}
FLOAT_SCALARS = {"scale", "soft_cap"}

# (name, num_heads, num_kv_heads, head_dim, dtype, features) of models the backend serves
MODELS = [
    ("llama3-8b", 32, 8, 128, torch.bfloat16, {}),
    ("llama3.2-1b", 32, 8, 64, torch.bfloat16, {}),
    ("qwen2-7b-group-7", 28, 4, 128, torch.bfloat16, {}),
    ("mistral-window", 32, 8, 128, torch.float16, {"sliding_window": 4096}),
    ("gemma2-256-softcap", 8, 4, 256, torch.bfloat16, {"soft_cap": True, "sliding_window": 4096}),
    ("bloom-alibi-mha", 32, 32, 128, torch.float16, {"alibi": True}),
    ("falcon-7b-mqa", 71, 1, 64, torch.bfloat16, {}),
    ("phi-80", 32, 32, 80, torch.float16, {}),
    ("gpt-j-96", 16, 16, 96, torch.float32, {}),
    ("fp32-256", 8, 8, 256, torch.float32, {}),
    ("idefics-9b-cross-ranges", 32, 32, 128, torch.bfloat16, {"key_ranges": True}),
]
# (phase, num_seqs, max_query_len); a prefill plans two launches (its short sequences apart)
PHASES = [("decode-batch-1", 1, 1), ("decode-batch-256", 256, 1), ("mixed-512", 4, 512)]


def signature(fn, dtype: torch.dtype, constexprs: dict) -> tuple[dict, dict]:
    """Argument types as a real launch specialises them: tensors and strides 16-divisible."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            sig[name] = "*i32" if name in INDEX_POINTERS else "*fp32" if name in FLOAT_POINTERS else f"*{TRITON_TYPES[dtype]}"
            if name == "slot_mapping_ptr":
                sig[name] = "*i64"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride_") and name != "stride_bt_seq":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def ptxas_report(ptx: str) -> dict:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        err = subprocess.run([ptxas, "-v", "-arch=sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", err)
    spills = re.search(r"(\d+) bytes spill stores", err)
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": int(spills.group(1)) if spills else None}


def compile_one(fn, dtype, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    sig, attrs = signature(fn, dtype, constexprs)
    kernel = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=TARGET,
                            options={"num_warps": num_warps, "num_stages": num_stages})  # fmt: skip
    shared = kernel.metadata.shared
    return {"shared_bytes": shared, "fits": shared <= SHARED_MEMORY_LIMIT, **ptxas_report(kernel.asm["ptx"])}


def variants():
    for name, heads, kv_heads, head_dim, dtype, features in MODELS:
        for phase, num_seqs, max_query_len in PHASES:
            pad = head_dim_pad_of(head_dim)
            launches = plan_launches(num_seqs, kv_heads, heads // kv_heads, pad, max_query_len, dtype)
            for index, launch in enumerate(launches):
                config = launch.config
                constexprs = kernel_constexprs(
                    num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, block_size=16, config=config,
                    splits=config.num_splits, on_gpu=True, dtype=dtype, sliding_window=features.get("sliding_window"),
                    alibi=features.get("alibi", False), soft_cap=features.get("soft_cap", False),
                    key_ranges=features.get("key_ranges", False), causal=not features.get("key_ranges", False),
                    short_limit=launch.short_limit, short_pass=launch.short_pass,
                )  # fmt: skip
                part = f"/{'short' if launch.short_pass else 'long'}" if launch.short_limit else ""
                yield f"{name}/{phase}{part}", unified_attention_kernel, dtype, constexprs, config.num_warps, config.num_stages
                if config.num_splits > 1:
                    merge = dict(NUM_HEADS=heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, NUM_SPLITS=config.num_splits)
                    yield f"{name}/{phase}/merge", merge_splits_kernel, dtype, merge, 4, 1
        write = dict(NUM_KV_HEADS=kv_heads, HEAD_DIM=head_dim, HEADS_PAD=triton.next_power_of_2(kv_heads),
                     HEAD_DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=16)  # fmt: skip
        yield f"{name}/kv-write", _kv_cache_write_kernel, dtype, write, 4, 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--only", default="", help="substring of the variant names to compile")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    failures = 0
    for name, fn, dtype, constexprs, num_warps, num_stages in variants():
        if args.only not in name:
            continue
        try:
            result = {"variant": name, "ok": True, **compile_one(fn, dtype, constexprs, num_warps, num_stages)}
            result["ok"] = result["fits"]
        except Exception as exc:  # report every variant, then fail
            result = {"variant": name, "ok": False, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        failures += not result["ok"]
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            detail = result.get("error") or (
                f"shared {result['shared_bytes']:>6} B  registers {result.get('registers')}  spills {result.get('spill_bytes')} B"
            )
            print(f"{'ok  ' if result['ok'] else 'FAIL'} {name:<42} {detail}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
