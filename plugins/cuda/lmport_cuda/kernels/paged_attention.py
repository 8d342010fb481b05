"""Host side of the unified paged attention kernel: tile choice and launch.

Every choice here depends on shapes and on host ints that stay fixed while a decode graph is
replayed (``max_query_len``), never on context lengths, so a captured launch stays valid.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import triton

from lmport_cuda.kernels.unified_attention import merge_splits_kernel, unified_attention_kernel


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # query rows per program (query positions x heads of a group)
    tile_n: int  # keys per loop iteration
    num_splits: int
    num_warps: int
    num_stages: int

    def block_q(self, queries_per_kv: int) -> int:
        return max(1, self.block_m // queries_per_kv)


# A decode batch with fewer (sequence, KV head) pairs than this is split along the keys.
SPLIT_KV_BELOW_PROGRAMS = 256
MAX_SPLITS = 32


def choose_tile_config(
    num_seqs: int, num_kv_heads: int, queries_per_kv: int, head_dim_pad: int, max_query_len: int, dtype: torch.dtype
) -> TileConfig:
    """Tile sizes from shapes and host ints only (so a captured decode graph never goes stale).

    Sized (with ptxas -v for sm_90) to stay clear of register spills and of the shared-memory
    limit; float32 operands take twice the space, so their tiles are smaller.
    """
    group = triton.next_power_of_2(queries_per_kv)
    if dtype == torch.float32:
        tile_n, max_block_m = (32 if head_dim_pad <= 128 else 16), 32
    elif head_dim_pad > 128:
        tile_n, max_block_m = 32, 64
    else:
        tile_n, max_block_m = 64, 128
    if max_query_len <= 1:
        block_m = max(16, group)
        pairs = num_seqs * num_kv_heads
        splits = 1
        if pairs < SPLIT_KV_BELOW_PROGRAMS:
            splits = min(MAX_SPLITS, triton.next_power_of_2(triton.cdiv(2 * SPLIT_KV_BELOW_PROGRAMS, max(pairs, 1))))
        stages = 3 if dtype != torch.float32 and head_dim_pad <= 128 else 2
        return TileConfig(block_m, tile_n, splits, 4, stages)
    rows = triton.next_power_of_2(max_query_len * queries_per_kv)
    block_m = max(group, min(max_block_m, max(16, rows)))
    big = block_m * head_dim_pad >= 128 * 128  # 128x128 or 64x256 accumulators want 8 warps
    return TileConfig(block_m, tile_n, 1, 8 if big else 4, 2)


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a step; ``short_limit > 0`` restricts it to sequences of at most
    (``short_pass``) or more than (not ``short_pass``) that many new tokens."""

    config: TileConfig
    short_limit: int = 0
    short_pass: bool = False


def plan_launches(
    num_seqs: int, num_kv_heads: int, queries_per_kv: int, head_dim_pad: int, max_query_len: int, dtype: torch.dtype,
    num_splits: int | None = None,
) -> list[Launch]:
    """Decode-only: one launch of small tiles (split along the keys when the GPU would idle).
    With prompt chunks: small tiles for the sequences one tile covers, large tiles for the rest,
    so the decodes of a mixed step do not run in 128-row tiles. ``num_splits`` forces one
    launch with that many splits (tests)."""
    small = choose_tile_config(num_seqs, num_kv_heads, queries_per_kv, head_dim_pad, 1, dtype)
    if num_splits is not None:
        config = choose_tile_config(num_seqs, num_kv_heads, queries_per_kv, head_dim_pad, max_query_len, dtype)
        return [Launch(replace(config, num_splits=num_splits))]
    if max_query_len <= 1:
        return [Launch(small)]
    small = replace(small, num_splits=1)
    short_limit = small.block_q(queries_per_kv)
    large = choose_tile_config(num_seqs, num_kv_heads, queries_per_kv, head_dim_pad, max_query_len, dtype)
    if max_query_len <= short_limit:
        return [Launch(small)]
    if large.block_m <= small.block_m:
        return [Launch(large)]
    return [Launch(small, short_limit, True), Launch(large, short_limit, False)]


def kernel_constexprs(
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    config: TileConfig,
    splits: int,
    on_gpu: bool,
    dtype: torch.dtype,
    causal: bool = True,
    sliding_window: int | None = None,
    alibi: bool = False,
    soft_cap: bool = False,
    pos_bias_len: int = 0,
    key_ranges: bool = False,
    short_limit: int = 0,
    short_pass: bool = False,
) -> dict[str, Any]:
    """The compile-time parameters of one launch (shared with the sm_90 compile check)."""
    queries_per_kv = num_heads // num_kv_heads
    # Triton runs CPU tensors only in interpreter mode, whose tl.dot mishandles bf16: fp32 there.
    dot_fp32 = not on_gpu or dtype == torch.float32
    return dict(
        NUM_HEADS=num_heads,
        QUERIES_PER_KV=queries_per_kv,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad_of(head_dim),
        BLOCK_SIZE=block_size,
        TILE_N=config.tile_n,
        BLOCK_M=config.block_m,
        BLOCK_Q=config.block_q(queries_per_kv),
        IS_CAUSAL=causal,
        SLIDING_WINDOW=sliding_window or 0,
        USE_ALIBI=alibi,
        USE_SOFT_CAP=soft_cap,
        POS_BIAS_LEN=pos_bias_len,
        KEY_RANGES=key_ranges,
        NUM_SPLITS=splits,
        SHORT_LIMIT=short_limit,
        SHORT_PASS=short_pass,
        DOT_FP32=dot_fp32,
        # float32 on the GPU: three tf32 MMAs give float32 accuracy without the spills of "ieee";
        # 16-bit operands ignore the setting
        DOT_PRECISION=("tf32x3" if on_gpu else "ieee") if dot_fp32 else "tf32",
    )


def head_dim_pad_of(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def unified_attention(
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks]
    seq_lens: torch.Tensor,  # int32 [num_seqs]
    query_start_loc: torch.Tensor,  # int32 [num_seqs + 1]
    *,
    max_query_len: int,
    scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
    alibi_slopes: torch.Tensor | None = None,  # float32 [num_heads]
    soft_cap: float | None = None,
    position_bias: torch.Tensor | None = None,  # float32 [num_heads, n]: bias[h, min(q_pos - k_pos, n - 1)]
    num_splits: int | None = None,  # None: chosen from shapes
    key_ranges: torch.Tensor | None = None,  # int32 [num_tokens, 2]: each query's [lo, hi) of its keys
) -> torch.Tensor:
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    num_kv_heads = key_cache.shape[2]
    if num_tokens == 0 or num_seqs == 0:
        return out
    for t in (query, out, key_cache, value_cache):
        if t.stride(-1) != 1:
            raise ValueError("attention operands need a contiguous last (head_dim) dimension")
    queries_per_kv = num_heads // num_kv_heads
    launches = plan_launches(num_seqs, num_kv_heads, queries_per_kv, head_dim_pad_of(head_dim), max_query_len,
                             key_cache.dtype, num_splits)  # fmt: skip
    for launch in launches:
        _launch(out, query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, launch, scale=scale,
                causal=causal, sliding_window=sliding_window, alibi_slopes=alibi_slopes, soft_cap=soft_cap,
                position_bias=position_bias, key_ranges=key_ranges)  # fmt: skip
    return out


def _launch(out, query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, launch: Launch, *,
            scale, causal, sliding_window, alibi_slopes, soft_cap, position_bias=None, key_ranges=None) -> None:  # fmt: skip
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    _, block_size, num_kv_heads, _ = key_cache.shape
    config, splits = launch.config, launch.config.num_splits
    queries_per_kv = num_heads // num_kv_heads
    head_dim_pad = head_dim_pad_of(head_dim)
    block_q = config.block_q(queries_per_kv)
    constexprs = kernel_constexprs(
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
        config=config, splits=splits, on_gpu=query.device.type == "cuda", dtype=query.dtype, causal=causal,
        sliding_window=sliding_window, alibi=alibi_slopes is not None, soft_cap=bool(soft_cap),
        pos_bias_len=position_bias.shape[1] if position_bias is not None else 0, key_ranges=key_ranges is not None,
        short_limit=launch.short_limit, short_pass=launch.short_pass,
    )  # fmt: skip
    if splits > 1:
        partial_acc = torch.empty((num_tokens, num_heads, splits, head_dim_pad), dtype=torch.float32, device=query.device)
        partial_max = torch.empty((num_tokens, num_heads, splits), dtype=torch.float32, device=query.device)
        partial_sum = torch.empty_like(partial_max)
    else:
        partial_acc = partial_max = partial_sum = out  # placeholders: the kernel writes `out` directly
    grid = (num_tokens // block_q + num_seqs, num_kv_heads, splits)
    unified_attention_kernel[grid](
        out,
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        alibi_slopes if alibi_slopes is not None else query,
        position_bias if position_bias is not None else query,
        key_ranges if key_ranges is not None else seq_lens,
        partial_acc,
        partial_max,
        partial_sum,
        scale,
        soft_cap or 0.0,
        num_seqs,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        block_tables.stride(0),
        **constexprs,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if splits > 1:
        merge_splits_kernel[(num_tokens, num_heads)](
            out,
            partial_acc,
            partial_max,
            partial_sum,
            out.stride(0),
            out.stride(1),
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad,
            NUM_SPLITS=splits,
        )
