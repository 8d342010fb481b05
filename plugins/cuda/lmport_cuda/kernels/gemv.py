"""Skinny GEMM for decode: ``y = x @ W.T (+ bias)`` for a few rows of ``x`` (Triton).

At batch 1..16 a projection reads each weight element once and does 2*M flops with it, so
it is bound by how fast the weight streams from HBM; cuBLAS picks split-K GEMM tiles built
for larger M and reaches 3.0-4.2 TB/s on an H200. Here each program owns ``BLOCK_N`` weight
rows and streams them over (its share of) K in ``BLOCK_K``-wide vector loads, with all M
rows of ``x`` (a few KB, L1/L2 resident) loaded beside them: one pass over W for the batch.

Two kernels, picked per config:

- ``fma`` (M <= 8): CUDA-core FMAs into one ``[BLOCK_N, BLOCK_K // 8]`` float32 accumulator per row
  of x (each thread first sums its own 8-wide load), reduced across threads once after the
  loop (no shuffles, no shared memory in the loop). For the smallest M, where padding to a
  tensor-core tile would waste registers.
- ``dot`` (any M <= 16): ``tl.dot`` on tensor cores with x padded to 16 rows; Triton pipelines
  the weight loads of a dot loop through shared memory (cp.async, ``num_stages`` deep), which
  keeps many bytes in flight per SM. For larger M, where FMAs would become the limit.

Split-K (``split_k > 1``) for shapes with too few column blocks to fill the SMs: each split
writes float32 partials and a second small kernel sums them (deterministic, no atomics,
no zero-fill). Configs come from :func:`pick_config` (a frozen table from
``benchmarks/gemv_bench.py --autotune``, then a rule); shapes only, no host reads, so a
CUDA graph captures a launch as is. Accumulation is float32; the output is x's dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # rows of x the kernel takes (dot pads to 16)
MAX_FMA_ROWS = 8  # the fma kernel unrolls one accumulator per row
DTYPES = (torch.bfloat16, torch.float16)
SM_COUNT_GUESS = 132  # H100/H200 SXM; only steers split-K, never correctness
REDUCE_BLOCK = 1024


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    use_dot: bool = False

    def short(self) -> str:
        kind = "dot" if self.use_dot else "fma"
        return f"{kind} n{self.block_n} k{self.block_k} s{self.split_k} w{self.num_warps} st{self.num_stages}"


# (rows bucket, N, K) -> config, from `benchmarks/gemv_bench.py --autotune --no-dot --rows 1`
# on an NVIDIA H200 (2026-11-27): Llama-3-8B and Llama-3.2-1B projections and heads
FROZEN: dict[tuple[int, int, int], GemvConfig] = {
    (1, 2048, 2048): GemvConfig(4, 1024, 1, 8, 1, use_dot=False),
    (1, 2048, 8192): GemvConfig(4, 1024, 1, 8, 1, use_dot=False),
    (1, 3072, 2048): GemvConfig(4, 1024, 1, 4, 1, use_dot=False),
    (1, 4096, 4096): GemvConfig(4, 1024, 1, 4, 1, use_dot=False),
    (1, 4096, 14336): GemvConfig(8, 1024, 1, 8, 1, use_dot=False),
    (1, 6144, 4096): GemvConfig(4, 512, 1, 4, 1, use_dot=False),
    (1, 16384, 2048): GemvConfig(4, 1024, 1, 8, 1, use_dot=False),
    (1, 28672, 4096): GemvConfig(8, 512, 1, 4, 1, use_dot=False),
    (1, 128256, 2048): GemvConfig(4, 1024, 1, 8, 1, use_dot=False),
    (1, 128256, 4096): GemvConfig(16, 512, 1, 4, 1, use_dot=False),
}


def rows_bucket(m: int) -> int:
    """Configs are chosen per power-of-two row count (1, 2, 4, 8, 16)."""
    return 1 << max(m - 1, 0).bit_length()


def pick_config(m: int, n: int, k: int) -> GemvConfig:
    """The launch config for ``x [m, k] @ W[n, k].T``: the frozen table, else a rule.

    The rule (guesses from sm_90 compiles, untuned until the table is filled): fma up to 4
    rows with 8-16 KB of weight per program per step at <= ~72 registers; dot from 5 rows.
    Split-K until the grid has ~4 programs per SM (each split >= 2 K-steps)."""
    bucket = rows_bucket(m)
    frozen = FROZEN.get((bucket, n, k))
    if frozen is not None:
        return frozen
    if bucket <= 2:
        cfg = GemvConfig(block_n=8, block_k=1024, num_warps=4, num_stages=1)
    elif bucket == 4:
        cfg = GemvConfig(block_n=4, block_k=1024, num_warps=4, num_stages=1)
    else:
        cfg = GemvConfig(block_n=32, block_k=128, num_warps=4, num_stages=4, use_dot=True)
    return with_split(cfg, n, k)


def with_split(cfg: GemvConfig, n: int, k: int, programs_per_sm: int = 4) -> GemvConfig:
    """Split K (powers of two, each split >= 2 steps of BLOCK_K) while the grid is short of the SMs' worth."""
    blocks, split = triton.cdiv(n, cfg.block_n), 1
    while (
        blocks * split < programs_per_sm * SM_COUNT_GUESS
        and k % (2 * split * cfg.block_k) == 0
        and k // (2 * split) >= 2 * cfg.block_k
    ):
        split *= 2
    return dataclasses.replace(cfg, split_k=split)


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :func:`gemv` takes these operands (reads shapes/dtypes only)."""
    return (
        x.dim() == 2
        and weight.dim() == 2
        and 0 < x.shape[0] <= MAX_ROWS
        and x.dtype in DTYPES
        and weight.dtype == x.dtype
        and x.shape[1] == weight.shape[1]
        and weight.stride(1) == 1
        and (bias is None or (bias.dim() == 1 and bias.shape[0] == weight.shape[0]))
    )


@triton.jit
def _row_products(w, x_ptr, row: tl.constexpr, stride_xm, ks, mask_k, EVEN_K: tl.constexpr, VEC: tl.constexpr):
    """``w * x[row]`` summed over each thread's own ``VEC`` contiguous K elements (the width of
    one 16-byte load: the reshape and the sum stay in registers), ``[BLOCK_N, BLOCK_K // VEC]``:
    the accumulator is VEC times smaller than the tile, which leaves registers for wide loads."""
    # x's row is loaded at the weight tile's full shape (the same address down each column, L1
    # hits) so that it takes the tile's register layout: a [BLOCK_K] load gets a layout of its
    # own, and converting it costs a trip through shared memory and a barrier every step
    x_ptrs = x_ptr + row * stride_xm + ks[None, :] + tl.zeros_like(w).to(tl.int32)
    if EVEN_K:
        x = tl.load(x_ptrs)
    else:
        x = tl.load(x_ptrs, mask=mask_k[None, :], other=0.0)
    prod = w * x.to(tl.float32)
    return tl.sum(tl.reshape(prod, (prod.shape[0], prod.shape[1] // VEC, VEC)), axis=2)


@triton.jit
def _store_row(acc, row: tl.constexpr, offs_n, mask_n, scale, bias, y_ptr, stride_ym, partial_ptr, pid_k, M, N, SPLIT: tl.constexpr):
    out = tl.sum(acc, axis=1) * scale  # scaled before the split-K sum: it is linear
    if SPLIT:
        tl.store(partial_ptr + (pid_k * M + row).to(tl.int64) * N + offs_n, out, mask=mask_n)
    else:
        tl.store(y_ptr + row * stride_ym + offs_n, (out + bias).to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def fp8_bits_to_float(w):
    """float8 e4m3 bytes (uint8) as float32 by bit moves, for GPUs and Triton's interpreter without
    a native fp8 conversion: sign and the 7 exponent/mantissa bits go to their float32 places,
    and ``2**120`` re-biases the exponent (7 -> 127); subnormals come out right too."""
    b = w.to(tl.int32)
    bits = ((b & 0x80) << 24) | ((b & 0x7F) << 20)
    return bits.to(tl.float32, bitcast=True) * 1.329227995784916e36


@triton.jit
def _gemv_fma_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, partial_ptr, scale_ptr,
    N, K, stride_xm, stride_wn, stride_ym, k_per_split,
    ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE: tl.constexpr = 0, FP8_BITS: tl.constexpr = False,
):  # fmt: skip
    """One ``[BLOCK_N, BLOCK_K // VEC]`` float32 accumulator per row of x (ROWS <= 8, unrolled at
    compile time): each keeps the weight tile's own register layout, so the loop is loads and
    in-thread FMAs only, and K is reduced across threads once at the end. (A 3-D ``[M, N, K]``
    accumulator makes Triton shuffle the weight tile through shared memory every step.)"""
    VEC: tl.constexpr = 8  # 16 bytes of bf16/fp16
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    # int64 row offsets: lm_head's W is 128256 x 4096 (0.5 G elements, near int32's edge in bytes)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    acc0 = tl.zeros((BLOCK_N, BLOCK_K // VEC), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_K // VEC), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K // VEC), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_K // VEC), dtype=tl.float32)
    acc4 = tl.zeros((BLOCK_N, BLOCK_K // VEC), dtype=tl.float32)
    acc5 = tl.zeros((BLOCK_N, BLOCK_K // VEC), dtype=tl.float32)
    acc6 = tl.zeros((BLOCK_N, BLOCK_K // VEC), dtype=tl.float32)
    acc7 = tl.zeros((BLOCK_N, BLOCK_K // VEC), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        ks = tl.max_contiguous(tl.multiple_of(k0 + offs_k, BLOCK_K), BLOCK_K)
        mask_k = ks < k_stop
        # no K mask when K splits evenly: a per-element mask would break the 16-byte vector loads
        if EVEN_K:
            if EVEN_N:
                w = tl.load(w_rows + ks[None, :])
            else:
                w = tl.load(w_rows + ks[None, :], mask=mask_n[:, None], other=0.0)
        else:
            w = tl.load(w_rows + ks[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if FP8_BITS:
            w = fp8_bits_to_float(w)
        else:
            w = w.to(tl.float32)
        acc0 += _row_products(w, x_ptr, 0, stride_xm, ks, mask_k, EVEN_K, VEC)
        if ROWS > 1:
            acc1 += _row_products(w, x_ptr, 1, stride_xm, ks, mask_k, EVEN_K, VEC)
        if ROWS > 2:
            acc2 += _row_products(w, x_ptr, 2, stride_xm, ks, mask_k, EVEN_K, VEC)
        if ROWS > 3:
            acc3 += _row_products(w, x_ptr, 3, stride_xm, ks, mask_k, EVEN_K, VEC)
        if ROWS > 4:
            acc4 += _row_products(w, x_ptr, 4, stride_xm, ks, mask_k, EVEN_K, VEC)
        if ROWS > 5:
            acc5 += _row_products(w, x_ptr, 5, stride_xm, ks, mask_k, EVEN_K, VEC)
        if ROWS > 6:
            acc6 += _row_products(w, x_ptr, 6, stride_xm, ks, mask_k, EVEN_K, VEC)
        if ROWS > 7:
            acc7 += _row_products(w, x_ptr, 7, stride_xm, ks, mask_k, EVEN_K, VEC)
    M = ROWS
    # SCALE: 0 none, 1 one scale for the whole weight, 2 one per output row (fp8 weights)
    scale = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
    if SCALE == 1:
        scale = scale * tl.load(scale_ptr).to(tl.float32)
    if SCALE == 2:
        scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_BIAS and not SPLIT:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    _store_row(acc0, 0, offs_n, mask_n, scale, bias, y_ptr, stride_ym, partial_ptr, pid_k, M, N, SPLIT)
    if ROWS > 1:
        _store_row(acc1, 1, offs_n, mask_n, scale, bias, y_ptr, stride_ym, partial_ptr, pid_k, M, N, SPLIT)
    if ROWS > 2:
        _store_row(acc2, 2, offs_n, mask_n, scale, bias, y_ptr, stride_ym, partial_ptr, pid_k, M, N, SPLIT)
    if ROWS > 3:
        _store_row(acc3, 3, offs_n, mask_n, scale, bias, y_ptr, stride_ym, partial_ptr, pid_k, M, N, SPLIT)
    if ROWS > 4:
        _store_row(acc4, 4, offs_n, mask_n, scale, bias, y_ptr, stride_ym, partial_ptr, pid_k, M, N, SPLIT)
    if ROWS > 5:
        _store_row(acc5, 5, offs_n, mask_n, scale, bias, y_ptr, stride_ym, partial_ptr, pid_k, M, N, SPLIT)
    if ROWS > 6:
        _store_row(acc6, 6, offs_n, mask_n, scale, bias, y_ptr, stride_ym, partial_ptr, pid_k, M, N, SPLIT)
    if ROWS > 7:
        _store_row(acc7, 7, offs_n, mask_n, scale, bias, y_ptr, stride_ym, partial_ptr, pid_k, M, N, SPLIT)


@triton.jit
def _gemv_dot_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, partial_ptr,
    M, N, K, stride_xm, stride_wn, stride_ym, k_per_split,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, DOT_FP32: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """x padded to 16 rows times the weight tile, transposed, on tensor cores; Triton pipelines
    the dot's operand loads (cp.async into shared memory, ``num_stages`` deep)."""
    BLOCK_M: tl.constexpr = 16
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        ks = tl.max_contiguous(tl.multiple_of(k0 + offs_k, BLOCK_K), BLOCK_K)
        if EVEN_K:
            if EVEN_N:
                w = tl.load(w_rows + ks[None, :])
            else:
                w = tl.load(w_rows + ks[None, :], mask=mask_n[:, None], other=0.0)
            x = tl.load(x_rows + ks[None, :], mask=mask_m[:, None], other=0.0)
        else:
            mask_k = ks < k_stop
            w = tl.load(w_rows + ks[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            x = tl.load(x_rows + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT:
        tl.store(partial_ptr + (pid_k * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :], acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _split_k_reduce_kernel(
    partial_ptr, bias_ptr, y_ptr, M, N, stride_ym, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(partial_ptr + (s * M + row).to(tl.int64) * N + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + cols, acc.to(y_ptr.dtype.element_ty), mask=mask)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    weight_scale: torch.Tensor | None = None,
    fp8_bits: bool = False,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x [M, K]`` with M <= 16 (see :func:`supports`).

    ``weight_scale`` (float32 ``[]`` or ``[N]``) multiplies each output column before the bias:
    the fp8 GEMV (``weight`` float8 e4m3, M <= 8, fma kernel only). ``fp8_bits``: ``weight`` is
    those bytes as uint8, converted by bit moves (GPUs without fp8 conversion, the interpreter)."""
    m, k = x.shape
    n = weight.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    cfg = config or pick_config(m, n, k)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split_k = triton.cdiv(k, k_per_split)
    split = split_k > 1
    partial = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split else y
    grid = (triton.cdiv(n, cfg.block_n), split_k)
    common = dict(
        HAS_BIAS=bias is not None, SPLIT=split, EVEN_N=n % cfg.block_n == 0, EVEN_K=k % k_per_split == 0,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    args = (x, weight, bias if bias is not None else y, y, partial)
    scaled = weight_scale is not None or fp8_bits or weight.dtype == torch.float8_e4m3fn
    if scaled:
        assert m <= MAX_FMA_ROWS and not cfg.use_dot, "the fp8 GEMV runs the fma kernel (<= 8 rows)"
    if cfg.use_dot or m > MAX_FMA_ROWS:
        # Triton's interpreter (CPU tensors) mishandles a bf16 tl.dot: float32 operands there
        _gemv_dot_kernel[grid](*args, m, n, k, x.stride(0), weight.stride(0), y.stride(0), k_per_split,
                               DOT_FP32=not x.is_cuda, **common)  # fmt: skip
    else:
        scale = 0 if weight_scale is None else 1 if weight_scale.numel() == 1 else 2
        _gemv_fma_kernel[grid](*args, weight_scale if weight_scale is not None else y,
                               n, k, x.stride(0), weight.stride(0), y.stride(0), k_per_split, ROWS=m,
                               SCALE=scale, FP8_BITS=fp8_bits, **common)  # fmt: skip
    if split:
        _split_k_reduce_kernel[(m, triton.cdiv(n, REDUCE_BLOCK))](
            partial, bias if bias is not None else y, y, m, n, y.stride(0),
            SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK, num_warps=4,
        )  # fmt: skip
    return y
