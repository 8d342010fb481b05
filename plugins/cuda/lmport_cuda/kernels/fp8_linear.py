"""fp8 (e4m3) weight linear (``linear_fp8``): ``y = x @ (weight * weight_scale[:, None]).T + bias``.

``weight`` float8_e4m3fn ``[N, K]``, ``weight_scale`` float32 ``[]`` or ``[N]``. Three paths:

- up to :data:`GEMV_MAX_ROWS` rows (decode): the Triton GEMV of :mod:`gemv` reading the fp8 weight (16 elements per
  16-byte load), converting in registers (natively on sm_89+, by bit moves elsewhere) and
  applying the scale per output column; x stays in its own precision (weight-only).
- batches on GPUs with fp8 matrix units (``fp8_compute``, sm_89+): x is quantized per token
  (one Triton kernel: per-row absmax -> scale, then e4m3) and ``torch._scaled_mm`` runs the
  fp8 GEMM with row-wise scales (x's per token, the weight's per channel) on sm_90; where
  row-wise scaling is not available (sm_89) one dynamic scale for all of x, and the weight's
  per-channel scale applied to the float32 result.
- batches elsewhere (weight-only): the weight is dequantized to x's dtype in one Triton kernel,
  then cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmport_cuda.kernels import gemv as gemv_kernels
from lmport_cuda.kernels.gemv import GemvConfig, fp8_bits_to_float, with_split

FP8_MAX = 448.0  # largest finite e4m3fn
# H200, Llama-3-8B projections: at one row the GEMV takes 0.34-0.48x the time of per-token fp8 +
# _scaled_mm (whose quantize kernel and small-M GEMM cost 17-48 us); the fma kernel's FMAs grow
# with the rows, so up to 4
GEMV_MAX_ROWS = 4


def supports(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> bool:
    return (
        x.dim() == 2
        and weight.dim() == 2
        and weight.dtype == torch.float8_e4m3fn
        and x.shape[1] == weight.shape[1]
        and weight.stride(1) == 1
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and weight_scale.numel() in (1, weight.shape[0])
    )


def pick_gemv_config(n: int, k: int) -> GemvConfig:
    """fp8 rows are half the bytes of bf16 ones: twice the K elements per step for the same bytes."""
    return with_split(GemvConfig(block_n=4, block_k=2048, num_warps=4, num_stages=1), n, k)


def fp8_gemv(x, weight, weight_scale, bias=None, native: bool = True, config: GemvConfig | None = None) -> torch.Tensor:
    """``x [M <= 8, K]``: weight-only (x is not quantized). ``native=False`` reads the bytes as uint8."""
    m, k = x.shape
    cfg = config or pick_gemv_config(weight.shape[0], k)
    if cfg.block_k > k:
        cfg = with_split(GemvConfig(cfg.block_n, triton.next_power_of_2(k), num_warps=cfg.num_warps, num_stages=1), weight.shape[0], k)
    w = weight if native else weight.view(torch.uint8)
    return gemv_kernels.gemv(x, w, bias, cfg, weight_scale=weight_scale.float().reshape(-1), fp8_bits=not native)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_xm, stride_qm, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    """One program per row: absmax over the row, then x / scale rounded to e4m3. A row that fits
    one block is read once and kept in registers; a longer one is read twice (the second from L2)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    if ONE_PASS:
        mask = offs < K
        v = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(v), axis=0), 1e-12) / 448.0
        tl.store(scale_ptr + row, scale)
        q = tl.clamp(v / scale, -448.0, 448.0)
        tl.store(q_ptr + row * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            v = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / 448.0
        tl.store(scale_ptr + row, scale)
        for k0 in range(0, K, BLOCK):
            mask = k0 + offs < K
            v = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            q = tl.clamp(v / scale, -448.0, 448.0)
            tl.store(q_ptr + row * stride_qm + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=mask)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic quantization: ``(x_fp8 [M, K], scale float32 [M, 1])`` with ``x ~= x_fp8 * scale``."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    block = min(16384, triton.next_power_of_2(k))
    _quantize_rows_kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0), BLOCK=block, ONE_PASS=k <= block,
                                num_warps=8 if block >= 4096 else 4)  # fmt: skip
    return q, scale


def scaled_mm_linear(x, weight, weight_scale, bias=None, rowwise: bool = True) -> torch.Tensor:
    """W8A8: per-token fp8 activations times the fp8 weight on the fp8 tensor cores."""
    n = weight.shape[0]
    ws = weight_scale.float().reshape(-1)
    if rowwise:
        xq, xs = quantize_rows(x)
        # row-wise scaling writes bf16 only (a float16 x is rounded once more on the way back)
        y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=ws.expand(n).reshape(1, n).contiguous(),
                             bias=bias.to(torch.bfloat16) if bias is not None else None, out_dtype=torch.bfloat16)  # fmt: skip
        return y if x.dtype == torch.bfloat16 else y.to(x.dtype)
    xs = (x.abs().amax().float().clamp(min=1e-12) / FP8_MAX).reshape(())
    xq = (x.float() / xs).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    one = torch.ones((), dtype=torch.float32, device=x.device)
    y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=one, out_dtype=torch.float32) * ws
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@triton.jit
def _fp8_dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, PER_ROW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    idx = offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    w = fp8_bits_to_float(tl.load(w_ptr + idx, mask=mask, other=0))
    if PER_ROW:
        s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0)[:, None]
    else:
        s = tl.load(s_ptr)
    tl.store(out_ptr + idx, (w * s).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight * weight_scale[:, None]`` as ``dtype`` ``[N, K]`` (reads the fp8 bytes as uint8: any GPU)."""
    n, k = weight.shape
    out = torch.empty((n, k), dtype=dtype, device=weight.device)
    ws = weight_scale.float().reshape(-1)
    block_n, block_k = 16, 256
    _fp8_dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        weight.contiguous().view(torch.uint8), ws, out, n, k, PER_ROW=ws.numel() > 1, BLOCK_N=block_n, BLOCK_K=block_k
    )
    return out


def dequant_linear(x, weight, weight_scale, bias=None) -> torch.Tensor:
    """Weight-only for batches: dequantize, then cuBLAS."""
    return torch.nn.functional.linear(x, dequantize(weight, weight_scale, x.dtype), bias)


def linear_fp8(
    x, weight, weight_scale, bias=None, *, fp8_compute: bool, rowwise: bool, gemv_max_rows: int = GEMV_MAX_ROWS
) -> torch.Tensor:
    """``linear_fp8`` by row count and what the GPU has (assumes :func:`supports`)."""
    m = x.shape[0]
    if m <= gemv_max_rows and x.dtype != torch.float32:
        return fp8_gemv(x, weight, weight_scale, bias, native=fp8_compute)
    if fp8_compute and x.dtype != torch.float32:
        return scaled_mm_linear(x, weight, weight_scale, bias, rowwise=rowwise)
    return dequant_linear(x, weight, weight_scale, bias)
