"""Integer weight-only linear (``linear_wq``): ``y = x @ dequant(qweight) + bias`` (Triton).

The canonical layout every integer format is repacked into at load (GPTQ order):
``qweight`` int32 ``[K * bits // 32, N]``, row ``k``'s value in word ``k // (32 // bits)`` at
shift ``bits * (k % (32 // bits))``; ``scales``/``zeros`` ``[K // group_size, N]`` in x's dtype
(float zero points); ``w[k, n] = (q[k, n] - zeros[g, n]) * scales[g, n]`` with ``g = k // group_size``.

Three paths, picked by the row count (:func:`linear_wq`):

- ``gemv`` (one row, decode): each program streams a ``[BLOCK_K // pack, BLOCK_N]`` tile of packed
  words (16-byte loads along N) over its share of K and never dequantizes a weight: value ``j``
  of a word is masked into the top of a float32 mantissa, ``1 + q * 2**-bits`` (exact; a shift
  and one AND/OR per weight), and multiplied into ``x``. Per K tile (inside one group)
  ``sum x*q = 2**bits * (P - sum x)``, so the group's scale and zero are applied once per column:
  ``y += s * (2**bits * P - (2**bits + z) * sum x)``. About three ALU operations per weight,
  which is what one row can afford at int4's byte rate. Split-K over ``split_k`` programs with
  float32 partials summed by a second kernel (deterministic, no atomics).
- ``gemm``: tiles of x times the tile's integer values converted to x's dtype on tensor cores
  (``tl.dot``, float32 accumulation), the same per-tile scale/zero correction. Measured slower
  than dequantize + cuBLAS at every batch on an H200 (:data:`GEMM_MAX_ROWS` is 0), so it only
  runs when asked for (the benchmark, a GPU where it may win).
- ``dequant`` (two rows and up): the weight dequantized to x's dtype by one Triton kernel, then
  cuBLAS; the extra pass over ``K * N`` elements is small next to ``2 * M * K * N`` FLOPs.

A K tile never straddles a group (``BLOCK_K`` divides ``group_size``). Configs come from shapes
only (no host reads), so CUDA graphs capture the launches as they are.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lmport_cuda.kernels.gemv import REDUCE_BLOCK, _split_k_reduce_kernel, with_split

log = logging.getLogger(__name__)

BITS = (4, 8)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# measured on an NVIDIA H200 (benchmarks/quant_bench.py, Llama-3-8B projections, 2026-12-04): the
# GEMV wins at one row; from 16 rows up dequantize + cuBLAS beat the fused GEMM on every
# projection (down, 16 rows: 89 vs 108 us; 256 rows: 104 vs 1357 us), so the GEMM is off (0)
GEMV_MAX_ROWS = 1
GEMM_MAX_ROWS = 0
ONE_BITS = 0x3F800000  # float32 1.0
PROGRAMS_PER_SM = 2  # split K until the grid has about this many programs per SM (gemv.with_split)


@dataclass(frozen=True)
class WqConfig:
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    block_m: int = 16  # gemm only
    prefetch: bool = False  # gemv only: register double buffering of the next tile
    fused_reduce: bool = False  # gemv only: the last split sums the partials (no second kernel)

    def short(self) -> str:
        extra = ("p" if self.prefetch else "") + ("f" if self.fused_reduce else "")
        return f"m{self.block_m} n{self.block_n} k{self.block_k} s{self.split_k} w{self.num_warps} st{self.num_stages}{' ' + extra if extra else ''}"


def supports(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> bool:
    """Whether these kernels take the operands (shapes and dtypes only; no host sync)."""
    if x.dim() != 2 or qweight.dim() != 2 or bits not in BITS or x.dtype not in DTYPES:
        return False
    k = x.shape[1]
    return (
        qweight.dtype == torch.int32
        and qweight.shape[0] * (32 // bits) == k
        and qweight.stride(1) == 1
        and scales.dim() == 2
        and scales.shape == (k // group_size, qweight.shape[1])
        and k % group_size == 0
        and group_size % 16 == 0
    )


def _block_k(group_size: int, cap: int) -> int:
    """The largest power of two <= cap that divides the group (tiles stay inside one group)."""
    block = cap
    while group_size % block:
        block //= 2
    return block


def pick_gemv_config(n: int, k: int, group_size: int, bits: int) -> WqConfig:
    """The rule: what won most shapes on an H200 in the first measurement (4 columns x 16 words
    per thread, split until the grid has ~2 programs per SM); :func:`tuned_gemv_config` refines it."""
    cfg = WqConfig(block_n=256, block_k=_block_k(group_size, 128), num_warps=4, num_stages=1)
    return with_split(cfg, n, k, PROGRAMS_PER_SM)


def gemv_candidates(n: int, k: int, group_size: int, bits: int) -> list[WqConfig]:
    """What :func:`tuned_gemv_config` times: tiles of 4-8 columns x 8-16 words per thread, with and
    without prefetch, split K none / to ~2 / to ~8 programs per SM (fused reduction when split)."""
    out: list[WqConfig] = []
    for bn, cap, warps in ((256, 128, 4), (512, 64, 2), (512, 128, 4), (1024, 64, 4), (256, 64, 2)):
        block_k = _block_k(group_size, cap)
        if block_k % (32 // bits) or k % block_k:
            continue
        for prefetch in (False, True):
            base = WqConfig(block_n=bn, block_k=block_k, num_warps=warps, num_stages=1, prefetch=prefetch)
            for cfg in (base, with_split(base, n, k, PROGRAMS_PER_SM), with_split(base, n, k, programs_per_sm=8)):
                cfg = dataclasses.replace(cfg, fused_reduce=cfg.split_k > 1)
                if cfg not in out:
                    out.append(cfg)
    return out


_TUNED: dict[tuple, WqConfig] = {}


def tuned_gemv_config(x, qweight, scales, zeros, bits, group_size, bias) -> WqConfig:
    """The fastest of :func:`gemv_candidates` for this shape on this GPU, timed once per process
    (``triton.testing.do_bench``, L2 flushed between runs) at the first call, which the engine's
    warm-up makes before any CUDA graph is captured; inside a capture, or off CUDA, the rule.
    A candidate whose output is not within float32-summation distance of the rule's (run on
    NaN-poisoned memory, so an unwritten or unsummed column shows) is never picked."""
    n, k = qweight.shape[1], x.shape[1]
    key = (n, k, group_size, bits, x.dtype, str(x.device), bias is not None)
    if key in _TUNED:
        return _TUNED[key]
    rule = pick_gemv_config(n, k, group_size, bits)
    if not x.is_cuda or torch.cuda.is_current_stream_capturing():
        return rule
    try:
        best = _time_candidates(x, qweight, scales, zeros, bits, group_size, bias, rule)
    except Exception as exc:  # tuning must never stop a model from loading: the rule is correct
        log.warning("int%d GEMV tuning for %dx%d failed (%s: %s); using %s", bits, n, k, type(exc).__name__, exc, rule.short())
        best = rule
    _TUNED[key] = best
    return best


def _time_candidates(x, qweight, scales, zeros, bits, group_size, bias, rule: WqConfig) -> WqConfig:
    from triton.testing import do_bench

    n, k = qweight.shape[1], x.shape[1]
    expected = wq_gemv(x, qweight, scales, zeros, bits, group_size, bias, rule).float()
    limit = 1e-2 * expected.abs().max().item() + 1e-6
    best, best_ms = rule, float("inf")
    for cfg in gemv_candidates(n, k, group_size, bits):
        try:
            # the caching allocator hands the freed poisoned blocks to the candidate's outputs
            poison = [torch.full((cfg.split_k, 1, n), float("nan"), device=x.device), torch.full((1, n), float("nan"), dtype=x.dtype, device=x.device)]
            del poison
            y = wq_gemv(x, qweight, scales, zeros, bits, group_size, bias, cfg).float()
            if not bool(((y - expected).abs() <= limit).all()):
                log.warning("int%d GEMV config %s disagrees with the rule's output on %dx%d: skipped", bits, cfg.short(), n, k)
                continue
            ms = do_bench(lambda c=cfg: wq_gemv(x, qweight, scales, zeros, bits, group_size, bias, c), warmup=2, rep=10)
        except Exception as exc:  # a config this GPU's compiler or shared memory refuses
            log.debug("GEMV config %s failed: %s", cfg.short(), exc)
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    log.info("int%d GEMV %dx%d (group %d): %s, %.1f us", bits, n, k, group_size, best.short(), best_ms * 1e3)
    return best


_LOCKS: dict[str, torch.Tensor] = {}
LOCKS = 4096  # column blocks a fused-reduction launch may count (N / BLOCK_N)


def _locks(device: torch.device) -> torch.Tensor | None:
    """Zeroed int32 counters, one per column block, that every fused-reduction launch leaves zero.
    Made once per device outside graph capture (``None`` while capturing before that)."""
    key = str(device)
    if key not in _LOCKS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _LOCKS[key] = torch.zeros(LOCKS, dtype=torch.int32, device=device)
    return _LOCKS[key]


def pick_gemm_config(m: int, n: int, k: int, group_size: int, bits: int) -> WqConfig:
    """Row tiles of 16/32/64 (64 x 128 float32 accumulators plus the dot's own stay under 255
    registers on sm_90; 128 rows spilled), split K while the grid is short for up to 64 rows."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64 if m <= 64 else 128
    cfg = WqConfig(block_m=block_m, block_n=block_n, block_k=_block_k(group_size, 128 if m <= 64 else 64),
                   num_warps=4, num_stages=3)  # fmt: skip
    if m <= 64:
        return with_split(cfg, n, k, PROGRAMS_PER_SM)
    return cfg


@triton.jit
def _value_as_float(w, j: tl.constexpr, BITS: tl.constexpr, one_bits):
    """Value ``j`` of each packed word as the float32 ``1 + q * 2**-BITS`` (exact): the value is
    moved to the top of the mantissa and OR-ed with the exponent of 1.0 (``one_bits``, a runtime
    0x3F800000: as an immediate it would cost a second LOP3 per value)."""
    SHIFT: tl.constexpr = 23 - BITS - BITS * j  # left; negative means right
    MASK: tl.constexpr = ((1 << BITS) - 1) << (23 - BITS)
    if SHIFT >= 0:
        v = w << SHIFT
    else:
        v = w >> (-SHIFT)
    return ((v & MASK) | one_bits).to(tl.float32, bitcast=True)


@triton.jit
def _mantissa(v, MASK: tl.constexpr, one_bits):
    return ((v & MASK) | one_bits).to(tl.float32, bitcast=True)


@triton.jit
def _load_words(qw_ptr, k0, offs_kp, offs_n, mask_n, stride_qk, PACK: tl.constexpr, EVEN_N: tl.constexpr):
    w_ptrs = qw_ptr + (k0 // PACK + offs_kp).to(tl.int64)[:, None] * stride_qk + offs_n[None, :]
    if EVEN_N:
        return tl.load(w_ptrs)
    return tl.load(w_ptrs, mask=mask_n[None, :], other=0)


@triton.jit
def _tile_product(w, x_row, s, z, one_bits, BITS: tl.constexpr, PACK: tl.constexpr, KP: tl.constexpr,
                  BLOCK_N: tl.constexpr, NIBBLE_PAIRS: tl.constexpr):  # fmt: skip
    """``sum_k x[k] * w[k, n]`` over one K tile (inside one group), float32 ``[BLOCK_N]``."""
    if NIBBLE_PAIRS:
        HI: tl.constexpr = 0xF0000
        LO: tl.constexpr = 0xF000
        # the lo values' x is scaled by 16 so both kinds share one accumulator:
        # hi: x (1 + q/128), lo: 16x (1 + q/2048); 128 * both = (128 x or 2048 x) + q x
        x0 = tl.load(x_row + 0).to(tl.float32)
        x1 = tl.load(x_row + 1).to(tl.float32) * 16.0
        x2 = tl.load(x_row + 2).to(tl.float32)
        x3 = tl.load(x_row + 3).to(tl.float32) * 16.0
        x4 = tl.load(x_row + 4).to(tl.float32)
        x5 = tl.load(x_row + 5).to(tl.float32) * 16.0
        x6 = tl.load(x_row + 6).to(tl.float32)
        x7 = tl.load(x_row + 7).to(tl.float32) * 16.0
        w_l8 = w << 8
        w_r8 = w >> 8
        p = _mantissa(w << 16, HI, one_bits) * x0[:, None]
        p += _mantissa(w_l8, LO, one_bits) * x1[:, None]
        p += _mantissa(w_l8, HI, one_bits) * x2[:, None]
        p += _mantissa(w, LO, one_bits) * x3[:, None]
        p += _mantissa(w, HI, one_bits) * x4[:, None]
        p += _mantissa(w_r8, LO, one_bits) * x5[:, None]
        p += _mantissa(w_r8, HI, one_bits) * x6[:, None]
        p += _mantissa(w >> 16, LO, one_bits) * x7[:, None]
        xs_hi = tl.sum(x0 + x2 + x4 + x6, axis=0)
        xs_lo = tl.sum(x1 + x3 + x5 + x7, axis=0) * 0.0625
        return s * (128.0 * tl.sum(p, axis=0) - (128.0 + z) * xs_hi - (2048.0 + z) * xs_lo)
    else:
        ONE: tl.constexpr = 1 << BITS
        p = tl.zeros((KP, BLOCK_N), dtype=tl.float32)
        xs = tl.zeros((KP,), dtype=tl.float32)
        for j in tl.static_range(PACK):
            xj = tl.load(x_row + j).to(tl.float32)
            p += _value_as_float(w, j, BITS, one_bits) * xj[:, None]
            xs += xj
        x_sum = tl.sum(xs, axis=0)
        return s * (ONE * tl.sum(p, axis=0) - (ONE + z) * x_sum)


@triton.jit
def _wq_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, partial_ptr, lock_ptr,
    N, K, stride_qk, stride_g, group_size, k_per_split, one_bits,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN_N: tl.constexpr, NIBBLE_PAIRS: tl.constexpr,
    PREFETCH: tl.constexpr, FUSED_REDUCE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``NIBBLE_PAIRS`` (int4, 16-bit x): four shifted copies of each word (<< 16, << 8, >> 8, >> 16)
    put every value at bits 16-19 ("hi", ``1 + q / 2**7``) or 12-15 ("lo", ``1 + q / 2**11``) of a
    mantissa, so a value costs one LOP3 and one FFMA plus half a shift; the lo values keep about
    13 bits through the per-tile cancellation, ample for a 16-bit output (float32 x takes the
    exact one-shift-per-value path). ``PREFETCH``: the next tile's words are loaded before this
    tile is multiplied (register double buffering). ``FUSED_REDUCE``: the last split of a column
    block to finish (a counter per block in ``lock_ptr``, reset by that split) sums the partials,
    so split-K needs no second kernel."""
    PACK: tl.constexpr = 32 // BITS
    KP: tl.constexpr = BLOCK_K // PACK
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = tl.max_contiguous(tl.multiple_of(offs_n, BLOCK_N), BLOCK_N)
    mask_n = offs_n < N
    offs_kp = tl.arange(0, KP)
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if PREFETCH:
        k_last = k_stop - BLOCK_K
        w_next = _load_words(qw_ptr, k_start, offs_kp, offs_n, mask_n, stride_qk, PACK, EVEN_N)
    for k0 in range(k_start, k_stop, BLOCK_K):
        if PREFETCH:
            w = w_next
            # the last tile loads itself again (an L1/L2 hit) instead of a masked load past the split
            w_next = _load_words(qw_ptr, tl.minimum(k0 + BLOCK_K, k_last), offs_kp, offs_n, mask_n, stride_qk, PACK, EVEN_N)
        else:
            w = _load_words(qw_ptr, k0, offs_kp, offs_n, mask_n, stride_qk, PACK, EVEN_N)
        g = k0 // group_size
        s = tl.load(s_ptr + g * stride_g + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * stride_g + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += _tile_product(w, x_ptr + k0 + offs_kp * PACK, s, z, one_bits, BITS, PACK, KP, BLOCK_N, NIBBLE_PAIRS)
    if SPLIT:
        tl.store(partial_ptr + pid_k.to(tl.int64) * N + offs_n, acc, mask=mask_n)
        if FUSED_REDUCE:
            tl.debug_barrier()  # every thread's partials are written before the block is counted
            done = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if done == tl.num_programs(1) - 1:
                total = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for split in range(0, tl.num_programs(1)):
                    total += tl.load(partial_ptr + split * N + offs_n, mask=mask_n, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                tl.store(y_ptr + offs_n, total.to(y_ptr.dtype.element_ty), mask=mask_n)
                tl.atomic_xchg(lock_ptr + pid_n, 0, sem="relaxed", scope="gpu")  # ready for the next launch
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _unpack(w, offs_k, BITS: tl.constexpr):
    """``[BLOCK_K, BLOCK_N]`` integer values from words loaded once per row (row k reads word k // pack)."""
    PACK: tl.constexpr = 32 // BITS
    return (w >> ((offs_k % PACK) * BITS)[:, None]) & ((1 << BITS) - 1)


@triton.jit
def _expand_words(w, BITS: tl.constexpr, KP: tl.constexpr, BLOCK_N: tl.constexpr):
    """Words ``[KP, BLOCK_N]`` (each loaded once) -> values ``[KP * pack, BLOCK_N]``, row ``kp * pack + j``."""
    PACK: tl.constexpr = 32 // BITS
    shifts = tl.arange(0, PACK) * BITS
    q = (w[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
    return tl.reshape(q, (KP * PACK, BLOCK_N))


@triton.jit
def _wq_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, partial_ptr,
    M, N, K, stride_xm, stride_qk, stride_g, stride_ym, group_size, k_per_split,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, DOT_FP32: tl.constexpr, MAGIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Each packed word is loaded once (``[BLOCK_K // pack, BLOCK_N]``) and expanded in registers.
    ``MAGIC`` (16-bit x): a value becomes ``OFFSET + q`` in x's dtype by OR-ing the exponent bits of
    OFFSET (bf16 0x4300 = 128, fp16 0x6400 = 1024; exact for q < 128 / 1024), and the offset joins
    the zero point: ``x @ (OFFSET + q) - (OFFSET + z) * sum x`` (no int-to-float conversion)."""
    PACK: tl.constexpr = 32 // BITS
    KP: tl.constexpr = BLOCK_K // PACK
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = tl.max_contiguous(tl.multiple_of(offs_n, BLOCK_N), BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kp = tl.arange(0, KP)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    if MAGIC:
        if x_ptr.dtype.element_ty == tl.bfloat16:
            OFFSET_BITS: tl.constexpr = 0x4300
            OFFSET: tl.constexpr = 128.0
        else:
            OFFSET_BITS: tl.constexpr = 0x6400
            OFFSET: tl.constexpr = 1024.0
    else:
        OFFSET_BITS: tl.constexpr = 0
        OFFSET: tl.constexpr = 0.0
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        ks = k0 + offs_k
        x = tl.load(x_rows + ks[None, :], mask=mask_m[:, None], other=0.0)
        w = tl.load(qw_ptr + (k0 // PACK + offs_kp).to(tl.int64)[:, None] * stride_qk + offs_n[None, :], mask=mask_n[None, :], other=0)
        q = _expand_words(w, BITS, KP, BLOCK_N)
        g = k0 // group_size
        s = tl.load(s_ptr + g * stride_g + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * stride_g + offs_n, mask=mask_n, other=0.0).to(tl.float32) + OFFSET
        if DOT_FP32:
            d = tl.dot(x.to(tl.float32), q.to(tl.float32), input_precision="ieee")
        elif MAGIC:
            d = tl.dot(x, (q | OFFSET_BITS).to(tl.int16).to(x.dtype, bitcast=True))
        else:
            d = tl.dot(x, q.to(x.dtype))  # values < 256: exact in bf16/fp16
        x_sum = tl.sum(x.to(tl.float32), axis=1)
        acc += s[None, :] * (d - x_sum[:, None] * z[None, :])
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT:
        tl.store(partial_ptr + (pid_k * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :], acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _dequant_kernel(
    qw_ptr, s_ptr, z_ptr, w_ptr, N, K, stride_qk, stride_g, stride_wk, group_size,
    BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    PACK: tl.constexpr = 32 // BITS
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    w = tl.load(qw_ptr + (offs_k // PACK).to(tl.int64)[:, None] * stride_qk + offs_n[None, :], mask=mask, other=0)
    q = _unpack(w, offs_k, BITS).to(tl.float32)
    g = (offs_k // group_size)[:, None] * stride_g + offs_n[None, :]
    s = tl.load(s_ptr + g, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g, mask=mask, other=0.0).to(tl.float32)
    out = ((q - z) * s).to(w_ptr.dtype.element_ty)
    tl.store(w_ptr + offs_k.to(tl.int64)[:, None] * stride_wk + offs_n[None, :], out, mask=mask)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The weight ``[K, N]`` in the scales' dtype: ``(q - zeros) * scales`` per group."""
    pack = 32 // bits
    k, n = qweight.shape[0] * pack, qweight.shape[1]
    out = torch.empty((k, n), dtype=scales.dtype, device=qweight.device)
    block_k, block_n = 32, 128
    _dequant_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, block_n))](
        qweight, scales, zeros, out, n, k, qweight.stride(0), scales.stride(0), out.stride(0), group_size,
        BITS=bits, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )  # fmt: skip
    return out


def _finish_split(partial, bias, y, m, n, split_k):
    _split_k_reduce_kernel[(m, triton.cdiv(n, REDUCE_BLOCK))](
        partial, bias if bias is not None else y, y, m, n, y.stride(0),
        SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK, num_warps=4,
    )  # fmt: skip


def _splits(k: int, cfg: WqConfig) -> tuple[int, int]:
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    return k_per_split, triton.cdiv(k, k_per_split)


def wq_gemv(
    x, qweight, scales, zeros, bits, group_size, bias=None, config: WqConfig | None = None, exact: bool = False
) -> torch.Tensor:
    """One row: ``x [1, K]`` (see the module docstring); ``exact`` forces the one-shift-per-value path."""
    k, n = x.shape[1], qweight.shape[1]
    x = x.contiguous()
    cfg = config or tuned_gemv_config(x, qweight, scales, zeros, bits, group_size, bias)
    assert group_size % cfg.block_k == 0 and cfg.block_k % (32 // bits) == 0, cfg
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    k_per_split, split_k = _splits(k, cfg)
    split = split_k > 1
    partial = torch.empty((split_k, 1, n), dtype=torch.float32, device=x.device) if split else y
    blocks = triton.cdiv(n, cfg.block_n)
    locks = _locks(x.device) if split and cfg.fused_reduce and blocks <= LOCKS else None
    _wq_gemv_kernel[(blocks, split_k)](
        x, qweight, scales, zeros, bias if bias is not None else y, y, partial, locks if locks is not None else y,
        n, k, qweight.stride(0), scales.stride(0), group_size, k_per_split, ONE_BITS,
        BITS=bits, HAS_BIAS=bias is not None, SPLIT=split, EVEN_N=n % cfg.block_n == 0,
        NIBBLE_PAIRS=bits == 4 and x.dtype != torch.float32 and not exact,
        PREFETCH=cfg.prefetch, FUSED_REDUCE=locks is not None,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if split and locks is None:
        _finish_split(partial, bias, y, 1, n, split_k)
    return y


def wq_gemm(x, qweight, scales, zeros, bits, group_size, bias=None, config: WqConfig | None = None) -> torch.Tensor:
    """Any rows, on tensor cores (see the module docstring)."""
    m, k = x.shape
    n = qweight.shape[1]
    cfg = config or pick_gemm_config(m, n, k, group_size, bits)
    assert group_size % cfg.block_k == 0 and cfg.block_k % (32 // bits) == 0, cfg
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    k_per_split, split_k = _splits(k, cfg)
    split = split_k > 1
    partial = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split else y
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split_k)
    _wq_gemm_kernel[grid](
        x, qweight, scales, zeros, bias if bias is not None else y, y, partial,
        m, n, k, x.stride(0), qweight.stride(0), scales.stride(0), y.stride(0), group_size, k_per_split,
        # float32 x, and Triton's interpreter (which mishandles a bf16 tl.dot), take float32 operands
        BITS=bits, HAS_BIAS=bias is not None, SPLIT=split, DOT_FP32=x.dtype == torch.float32 or not x.is_cuda,
        MAGIC=x.is_cuda and x.dtype != torch.float32 and (bits == 4 or x.dtype == torch.float16),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if split:
        _finish_split(partial, bias, y, m, n, split_k)
    return y


def wq_dequant_matmul(x, qweight, scales, zeros, bits, group_size, bias=None) -> torch.Tensor:
    """Dequantize to x's dtype, then cuBLAS."""
    w = dequantize(qweight, scales.to(x.dtype), zeros.to(x.dtype), bits, group_size)
    y = x @ w
    return y + bias if bias is not None else y


def linear_wq(x, qweight, scales, zeros, bits, group_size, bias=None, gemv_max_rows: int = GEMV_MAX_ROWS) -> torch.Tensor:
    """``linear_wq`` by row count: the GEMV up to ``gemv_max_rows`` (one), the fused GEMM up to
    :data:`GEMM_MAX_ROWS` (none), dequantize + cuBLAS above (assumes :func:`supports`)."""
    m = x.shape[0]
    if m <= gemv_max_rows:
        return wq_gemv(x, qweight, scales, zeros, bits, group_size, bias)
    if m <= GEMM_MAX_ROWS:
        return wq_gemm(x, qweight, scales, zeros, bits, group_size, bias)
    return wq_dequant_matmul(x, qweight, scales, zeros, bits, group_size, bias)
