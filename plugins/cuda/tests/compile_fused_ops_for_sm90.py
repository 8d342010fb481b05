"""Compile the fused layer-op kernels (RMSNorm(+residual), RoPE, SiLU·mul) for sm_90 without a GPU.

The companion of ``compile_for_sm90.py`` (whose target, shared-memory limit and ptxas report
it reuses): the interpreter checks what the kernels compute, this checks that Triton's
compiler accepts the launches the backend makes at model shapes. Run with
``TRITON_INTERPRET`` unset; exit status 1 if a variant fails or spills.
"""

from __future__ import annotations

import sys

import torch
import triton
from triton.compiler import ASTSource

from compile_for_sm90 import SHARED_MEMORY_LIMIT, TARGET, TRITON_TYPES, ptxas_report
from lmport_cuda.kernels.activation import BLOCK as SILU_BLOCK
from lmport_cuda.kernels.activation import NUM_WARPS as SILU_WARPS
from lmport_cuda.kernels.activation import _silu_and_mul_kernel
from lmport_cuda.kernels.rms_norm import _rms_norm_kernel, rms_norm_launch_config
from lmport_cuda.kernels.rotary import _rotary_kernel, rotary_constexprs, rotary_num_warps

# (name, hidden, intermediate, heads, kv_heads, head_dim, rotary_dim, dtype)
MODELS = [
    ("llama3-8b", 4096, 14336, 32, 8, 128, 128, torch.bfloat16),
    ("llama3.2-1b", 2048, 8192, 32, 8, 64, 64, torch.bfloat16),
    ("mistral-nemo-5120", 5120, 14336, 32, 8, 128, 128, torch.float16),
    ("phi-partial-80", 2560, 10240, 32, 32, 80, 32, torch.float16),
    ("neox-partial-fp32", 1024, 4096, 16, 16, 64, 16, torch.float32),
]
FLOAT_POINTERS = {"cos_ptr", "sin_ptr"}


def signature(fn, dtype: torch.dtype, constexprs: dict, weight_dtype: torch.dtype | None = None) -> tuple[dict, dict]:
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            kind = torch.float32 if name in FLOAT_POINTERS else (weight_dtype or dtype) if name == "weight_ptr" else dtype
            sig[name] = f"*{TRITON_TYPES[kind]}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "eps":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_one(fn, dtype, constexprs: dict, num_warps: int, weight_dtype=None) -> dict:
    sig, attrs = signature(fn, dtype, constexprs, weight_dtype)
    kernel = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=TARGET, options={"num_warps": num_warps})
    shared = kernel.metadata.shared
    return {"shared_bytes": shared, "fits": shared <= SHARED_MEMORY_LIMIT, **ptxas_report(kernel.asm["ptx"])}


def variants():
    for name, hidden, inter, heads, kv_heads, head_dim, rotary_dim, dtype in MODELS:
        block, warps = rms_norm_launch_config(hidden)
        for residual in (False, True):
            yield f"{name}/rms_norm{'+residual' if residual else ''}", _rms_norm_kernel, dtype, \
                dict(HAS_RESIDUAL=residual, BLOCK=block), warps, None  # fmt: skip
        yield f"{name}/rms_norm/fp32-weight", _rms_norm_kernel, dtype, dict(HAS_RESIDUAL=True, BLOCK=block), warps, torch.float32
        yield f"{name}/rotary", _rotary_kernel, dtype, rotary_constexprs(heads, kv_heads, head_dim, rotary_dim), \
            rotary_num_warps(heads, head_dim), None  # fmt: skip
        yield f"{name}/silu_and_mul", _silu_and_mul_kernel, dtype, dict(BLOCK=SILU_BLOCK), SILU_WARPS, None


def main() -> int:
    failed = 0
    for label, fn, dtype, constexprs, warps, weight_dtype in variants():
        try:
            report = compile_one(fn, dtype, constexprs, warps, weight_dtype)
        except Exception as exc:  # report every failing variant, not only the first
            print(f"FAIL {label}: {type(exc).__name__}: {exc}")
            failed += 1
            continue
        bad = not report["fits"] or (report.get("spill_bytes") or 0) > 0
        failed += bad
        print(f"{'FAIL' if bad else 'ok  '} {label}: {report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
