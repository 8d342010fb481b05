"""One paged attention kernel for the whole flat batch: prefill, prompt chunks and decode (Triton).

Each program takes a tile of query rows of ONE sequence for ONE KV head: ``BLOCK_Q`` query
positions times the ``QUERIES_PER_KV`` query heads that share that KV head (GQA/MQA), so a
K/V tile loaded once serves the whole group. It walks that sequence's keys ``TILE_N`` at a
time, looking each key's physical block up in the block table, with an online softmax.
Queries of a sequence sit at absolute positions ``seq_len - query_len ...``, which gives
chunked prefill and prefix-cache hits for free.

Programs are laid out so that the grid depends only on shapes: sequence ``i`` owns tiles
``query_start_loc[i] // BLOCK_Q + i ...`` (at least as many as it needs), a program finds its
sequence by binary search and programs past a sequence's last row return at once. Loop bounds
come from ``seq_lens`` on the device. Nothing is read on the host, so decode can be captured
in a CUDA graph whatever the context lengths are.

Split-KV (flash-decoding): with ``NUM_SPLITS > 1`` the key range of every tile is cut into
that many parts, run by separate programs that write unnormalised partial results; a small
reduce kernel merges them. That fills the GPU when a decode batch has few sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _find_sequence(query_start_loc_ptr, q_tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence whose query tiles include global tile ``q_tile`` (binary search)."""
    left: tl.int32 = 0
    right = num_seqs
    while left < right:
        mid = (left + right) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= q_tile:
            left = mid + 1
        else:
            right = mid
    return left - 1


@triton.jit
def _tanh(x):
    # tanh from exp: stable at both ends (exp overflow gives 1, underflow gives -1)
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def unified_attention_kernel(
    out_ptr,
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    alibi_slopes_ptr,
    partial_acc_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    scale,
    soft_cap,
    num_seqs,
    stride_q_token,
    stride_q_head,
    stride_o_token,
    stride_o_head,
    stride_k_block,
    stride_k_offset,
    stride_k_head,
    stride_v_block,
    stride_v_offset,
    stride_v_head,
    stride_bt_seq,
    NUM_HEADS: tl.constexpr,
    QUERIES_PER_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    USE_ALIBI: tl.constexpr,
    USE_SOFT_CAP: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    q_tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq = _find_sequence(query_start_loc_ptr, q_tile, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    local_tile = q_tile - (q_start // BLOCK_Q + seq)
    if local_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    # rows of this tile: BLOCK_Q query positions x QUERIES_PER_KV heads of the group
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM_PAD)
    q_index = local_tile * BLOCK_Q + rows // QUERIES_PER_KV  # within this step's rows of the sequence
    head = kv_head * QUERIES_PER_KV + rows % QUERIES_PER_KV
    row_mask = (q_index < q_len) & (rows < BLOCK_Q * QUERIES_PER_KV)
    dim_mask = dims < HEAD_DIM
    token = (q_start + q_index).to(tl.int64)
    q_pos = context_len + q_index  # absolute position of each row's query

    q = tl.load(
        query_ptr + token[:, None] * stride_q_token + head[:, None] * stride_q_head + dims[None, :],
        mask=row_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )
    if DOT_FP32:
        q = q.to(tl.float32)

    # the keys any row of this tile may see: [kv_start, kv_end)
    last_q_pos = context_len + tl.minimum(local_tile * BLOCK_Q + BLOCK_Q, q_len) - 1
    if IS_CAUSAL:
        kv_end = last_q_pos + 1
    else:
        kv_end = seq_len
    tile_lo = 0
    if SLIDING_WINDOW > 0:
        first_q_pos = context_len + local_tile * BLOCK_Q
        tile_lo = tl.maximum(first_q_pos - SLIDING_WINDOW + 1, 0) // TILE_N
    tile_hi = tl.cdiv(kv_end, TILE_N)
    if NUM_SPLITS > 1:
        per_split = tl.cdiv(tile_hi - tile_lo, NUM_SPLITS)
        tile_lo = tile_lo + split * per_split
        tile_hi = tl.minimum(tile_lo + per_split, tile_hi)

    if USE_ALIBI:
        slope = tl.load(alibi_slopes_ptr + head, mask=row_mask, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    cols = tl.arange(0, TILE_N)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq

    for tile in range(tile_lo, tile_hi):
        k_pos = tile * TILE_N + cols
        k_valid = k_pos < kv_end
        block = tl.load(table + k_pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
        offset = k_pos % BLOCK_SIZE
        k_rows = block * stride_k_block + offset * stride_k_offset + kv_head * stride_k_head
        v_rows = block * stride_v_block + offset * stride_v_offset + kv_head * stride_v_head
        k = tl.load(key_cache_ptr + k_rows[None, :] + dims[:, None], mask=dim_mask[:, None] & k_valid[None, :], other=0.0)
        v = tl.load(value_cache_ptr + v_rows[:, None] + dims[None, :], mask=k_valid[:, None] & dim_mask[None, :], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        else:
            k = k.to(q.dtype)
            v = v.to(q.dtype)

        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale
        if USE_SOFT_CAP:
            s = soft_cap * _tanh(s / soft_cap)
        distance = q_pos[:, None] - k_pos[None, :]
        allowed = row_mask[:, None] & k_valid[None, :]
        if IS_CAUSAL:
            allowed = allowed & (distance >= 0)
        if SLIDING_WINDOW > 0:
            allowed = allowed & (distance < SLIDING_WINDOW)
        if USE_ALIBI:
            s = s - slope[:, None] * distance.to(tl.float32)
        s = tl.where(allowed, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # a row that saw no key yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + token[:, None] * stride_o_token + head[:, None] * stride_o_head + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_mask[:, None] & dim_mask[None, :],
        )
    else:
        # partials laid out [token, head, split]; an empty split stores (-inf, 0, 0)
        part = (token * NUM_HEADS + head) * NUM_SPLITS + split
        tl.store(partial_max_ptr + part, m_i, mask=row_mask)
        tl.store(partial_sum_ptr + part, l_i, mask=row_mask)
        tl.store(partial_acc_ptr + part[:, None] * HEAD_DIM_PAD + dims[None, :], acc, mask=row_mask[:, None])


@triton.jit
def merge_splits_kernel(
    out_ptr,
    partial_acc_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    stride_o_token,
    stride_o_head,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_DIM_PAD)
    part = (token * NUM_HEADS + head) * NUM_SPLITS + splits
    m = tl.load(partial_max_ptr + part)
    l = tl.load(partial_sum_ptr + part)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max > float("-inf"), m_max, 0.0)
    weight = tl.exp(m - m_max)  # 0 for empty splits
    acc = tl.load(partial_acc_ptr + part[:, None] * HEAD_DIM_PAD + dims[None, :])
    total = tl.sum(l * weight, axis=0)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + token * stride_o_token + head * stride_o_head + dims, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


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
    """Tile sizes from shapes and host ints only (so a captured decode graph never goes stale)."""
    group = triton.next_power_of_2(queries_per_kv)
    wide = head_dim_pad > 128 or dtype == torch.float32  # keep registers and shared memory in budget
    if max_query_len <= 1:
        block_m = max(16, group)
        pairs = num_seqs * num_kv_heads
        splits = 1
        if pairs < SPLIT_KV_BELOW_PROGRAMS:
            splits = min(MAX_SPLITS, triton.next_power_of_2(triton.cdiv(2 * SPLIT_KV_BELOW_PROGRAMS, max(pairs, 1))))
        return TileConfig(block_m, 32 if wide else 64, splits, 4, 2 if wide else 3)
    rows = triton.next_power_of_2(max_query_len * queries_per_kv)
    block_m = max(group, min(64 if wide else 128, max(16, rows)))
    return TileConfig(block_m, 32 if wide else 64, 1, 8 if block_m >= 128 else 4, 2)


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
    num_splits: int | None = None,  # None: chosen from shapes
) -> torch.Tensor:
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    _, block_size, num_kv_heads, _ = key_cache.shape
    if num_tokens == 0 or num_seqs == 0:
        return out
    for t in (query, out, key_cache, value_cache):
        if t.stride(-1) != 1:
            raise ValueError("attention operands need a contiguous last (head_dim) dimension")
    queries_per_kv = num_heads // num_kv_heads
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    config = choose_tile_config(num_seqs, num_kv_heads, queries_per_kv, head_dim_pad, max_query_len, key_cache.dtype)
    splits = config.num_splits if num_splits is None else num_splits
    block_q = config.block_q(queries_per_kv)
    # Triton runs CPU tensors only in interpreter mode, whose tl.dot mishandles bf16: use fp32 there.
    dot_fp32 = query.device.type != "cuda" or query.dtype == torch.float32
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
        NUM_HEADS=num_heads,
        QUERIES_PER_KV=queries_per_kv,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size,
        TILE_N=config.tile_n,
        BLOCK_M=config.block_m,
        BLOCK_Q=block_q,
        IS_CAUSAL=causal,
        SLIDING_WINDOW=sliding_window or 0,
        USE_ALIBI=alibi_slopes is not None,
        USE_SOFT_CAP=bool(soft_cap),
        NUM_SPLITS=splits,
        DOT_FP32=dot_fp32,
        DOT_PRECISION="ieee" if dot_fp32 else "tf32",
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
    return out
