"""The CUDA backend's answer to ``lmport_layer_ops``: Triton RMSNorm(+residual), RoPE, SiLU·mul,
a skinny-GEMM ``linear`` for decode's few rows, and the quantized linears ``linear_wq`` (int4/int8
weight-only) and ``linear_fp8`` (kernels/wq_gemm.py, kernels/fp8_linear.py).

Each op falls back to the core's reference for what its kernel does not take (a CPU tensor,
a row too wide for one program, an odd rotary width), so binding these ops never narrows
what a model can run. The checks read shapes and devices only: no host sync.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any, Callable

import torch
from torch.nn import functional as F

from lmport.layers.ops import REFERENCE_OPS

log = logging.getLogger(__name__)

GEMV_MAX_ROWS_ENV = "LMPORT_CUDA_GEMV_MAX_ROWS"
# measured on an H200 (benchmarks/gemv_bench.py, Llama-3-8B shapes, in CUDA graphs): at one
# row the GEMV beats cuBLAS on every projection (1.03-1.15x; 4.84 -> 4.56 ms per batch-1
# decode step); from two rows cuBLAS wins on the down projection, from four on all of them
DEFAULT_GEMV_MAX_ROWS = 1


def gemv_max_rows(environ: dict[str, str] | None = None) -> int:
    """``LMPORT_CUDA_GEMV_MAX_ROWS`` (default 1; 0 turns the GEMV off), capped at the kernel's 16 rows."""
    from lmport_cuda.kernels.gemv import MAX_ROWS

    raw = (os.environ if environ is None else environ).get(GEMV_MAX_ROWS_ENV, "")
    try:
        rows = int(raw) if raw.strip() else DEFAULT_GEMV_MAX_ROWS
    except ValueError:
        log.warning("%s=%r is not an integer: using %d", GEMV_MAX_ROWS_ENV, raw, DEFAULT_GEMV_MAX_ROWS)
        rows = DEFAULT_GEMV_MAX_ROWS
    return max(0, min(rows, MAX_ROWS))


def gemv_linear_op(
    max_rows: int, runs_on: Callable[[torch.Tensor], bool] = lambda x: x.is_cuda
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """``linear`` that takes the Triton GEMV for 2-D inputs of at most ``max_rows`` rows (decode)
    and ``F.linear`` (cuBLAS) for everything else; ``max_rows`` is fixed at bind time, so one
    check of shapes decides and a captured graph replays the same kernel. ``runs_on`` lets the
    CPU tests take the GEMV branch in Triton's interpreter."""
    from lmport_cuda.kernels import gemv

    def linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() == 2 and 0 < x.shape[0] <= max_rows and runs_on(x) and gemv.supports(x, weight, bias):
            return gemv.gemv(x, weight, bias)
        return F.linear(x, weight, bias)

    return linear_op


def quantized_linear_ops(
    capabilities: Any, max_rows: int, runs_on: Callable[[torch.Tensor], bool] = lambda x: x.is_cuda
) -> dict[str, Callable[..., Any]]:
    """``linear_wq`` and ``linear_fp8``: the Triton kernels for what they take, the core's
    reference otherwise. fp8 batches run on the fp8 tensor cores where the backend's flags say
    the GPU has them (``fp8_compute``), weight-only elsewhere. ``max_rows`` is the GEMV switch
    (``LMPORT_CUDA_GEMV_MAX_ROWS``): 0 turns the quantized GEMVs off too (each keeps its own measured
    row limit otherwise)."""
    from lmport_cuda.kernels import fp8_linear, wq_gemm

    fp8_compute = bool(getattr(capabilities, "fp8_compute", False))
    # row-wise scaled fp8 GEMMs are an sm_90 (Hopper) cuBLASLt feature; sm_89 takes one scale for all of x
    rowwise = fp8_compute and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
    wq_rows = wq_gemm.GEMV_MAX_ROWS if max_rows else 0
    fp8_rows = fp8_linear.GEMV_MAX_ROWS if max_rows else 0

    def linear_wq_op(x, qweight, scales, zeros, bits, group_size, bias=None):
        flat = x.reshape(-1, x.shape[-1])
        if not runs_on(x) or not wq_gemm.supports(flat, qweight, scales, bits, group_size):
            return REFERENCE_OPS.linear_wq(x, qweight, scales, zeros, bits, group_size, bias)
        y = wq_gemm.linear_wq(flat, qweight, scales, zeros, bits, group_size, bias, gemv_max_rows=wq_rows)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def linear_fp8_op(x, weight, weight_scale, bias=None):
        flat = x.reshape(-1, x.shape[-1])
        if not runs_on(x) or not fp8_linear.supports(flat, weight, weight_scale):
            return REFERENCE_OPS.linear_fp8(x, weight, weight_scale, bias)
        y = fp8_linear.linear_fp8(flat, weight, weight_scale, bias, fp8_compute=fp8_compute, rowwise=rowwise,
                                  gemv_max_rows=fp8_rows)  # fmt: skip
        return y.reshape(*x.shape[:-1], y.shape[-1])

    return {"linear_wq": linear_wq_op, "linear_fp8": linear_fp8_op}


def _triton_runs_on(x: torch.Tensor) -> bool:
    # TRITON_INTERPRET=1 runs the kernels on CPU tensors (the tests' CPU path)
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def fused_layer_ops(capabilities: Any = None) -> dict[str, Callable[..., Any]] | None:
    """Op name -> fused implementation, or ``None`` where triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        log.warning("triton is not installed: the CUDA backend runs the reference layer ops")
        return None
    from lmport_cuda.kernels import activation, rms_norm, rotary

    def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if not _triton_runs_on(x) or x.shape[-1] > rms_norm.MAX_FUSED_HIDDEN:
            return REFERENCE_OPS.rms_norm(x, weight, eps)
        return rms_norm.rms_norm(x, weight, eps)

    def fused_add_rms_norm_op(
        x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not _triton_runs_on(x) or x.shape[-1] > rms_norm.MAX_FUSED_HIDDEN or x.shape != residual.shape:
            return REFERENCE_OPS.fused_add_rms_norm(x, residual, weight, eps)
        return rms_norm.fused_add_rms_norm(x, residual, weight, eps)

    def rotary_op(
        query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rotary_dim = cos.shape[-1]
        if not _triton_runs_on(query) or rotary_dim % 2 or rotary_dim > head_dim or query.dim() != 2:
            return REFERENCE_OPS.rotary(query, key, cos, sin, head_dim)
        return rotary.apply_rotary(query, key, cos, sin, head_dim)

    def silu_and_mul_op(gate_up: torch.Tensor) -> torch.Tensor:
        if not _triton_runs_on(gate_up) or gate_up.shape[-1] % 2:
            return REFERENCE_OPS.silu_and_mul(gate_up)
        return activation.silu_and_mul(gate_up)

    table = {
        "rms_norm": rms_norm_op,
        "fused_add_rms_norm": fused_add_rms_norm_op,
        "rotary": rotary_op,
        "silu_and_mul": silu_and_mul_op,
    }
    max_rows = gemv_max_rows()
    # the GEMV runs on CUDA tensors only (in the interpreter it would crawl through whole models)
    table["linear"] = gemv_linear_op(max_rows) if max_rows else REFERENCE_OPS.linear
    log.info("linear: Triton GEMV up to %d rows, cuBLAS above (%s)", max_rows, GEMV_MAX_ROWS_ENV)
    # like the GEMV, on CUDA tensors only
    table.update(quantized_linear_ops(capabilities, max_rows))
    return table
