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

A batch that mixes decodes with prompt chunks runs as two launches over the same grid layout:
small tiles for the sequences of at most ``SHORT_LIMIT`` new tokens, large tiles for the rest
(each launch's programs skip the other kind), so a decode row never pays for a 128-row tile.

A position bias table (T5's relative position buckets, ``[num_heads, POS_BIAS_LEN]`` float32)
adds ``bias[head, min(q_pos - k_pos, POS_BIAS_LEN - 1)]`` to each score. Cross-attention is
the same kernel, not causal, over the cross group's block tables and lengths; with
``KEY_RANGES`` each query token attends only its own ``[lo, hi)`` of them (``key_ranges [tokens,
2]``, Idefics' image before each token; a tile walks only from its rows' lowest start to their
highest end), and a token with an empty range writes zeros (no key adds to its sum, which
stays 0).

Split-KV (flash-decoding): with ``NUM_SPLITS > 1`` the key range of every tile is cut into
that many parts, run by separate programs that write unnormalised partial results; a small
reduce kernel merges them. That fills the GPU when a decode batch has few sequences.
"""

from __future__ import annotations

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


# num_seqs stays a runtime value: specialising 1 into a constant would break the search loop's types
@triton.jit(do_not_specialize=["num_seqs"])
def unified_attention_kernel(
    out_ptr,
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    alibi_slopes_ptr,
    pos_bias_ptr,
    key_ranges_ptr,
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
    POS_BIAS_LEN: tl.constexpr,
    KEY_RANGES: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SHORT_LIMIT: tl.constexpr,
    SHORT_PASS: tl.constexpr,
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
    done = local_tile * BLOCK_Q >= q_len
    if SHORT_LIMIT > 0:  # a mixed batch in two launches: short sequences (decodes) and the rest
        if SHORT_PASS:
            done = done | (q_len > SHORT_LIMIT)
        else:
            done = done | (q_len <= SHORT_LIMIT)
    if done:
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
    if KEY_RANGES:  # each query token's own [lo, hi) of its sequence's keys (padding rows: empty)
        range_lo = tl.load(key_ranges_ptr + token * 2, mask=row_mask, other=0)
        range_hi = tl.load(key_ranges_ptr + token * 2 + 1, mask=row_mask, other=0)
        # the tile walks only the keys some row's range covers
        kv_end = tl.minimum(kv_end, tl.max(range_hi, axis=0))
        tile_lo = tl.maximum(tile_lo, tl.min(tl.where(row_mask, range_lo, kv_end), axis=0) // TILE_N)
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
        if KEY_RANGES:
            allowed = allowed & (k_pos[None, :] >= range_lo[:, None]) & (k_pos[None, :] < range_hi[:, None])
        if USE_ALIBI:
            s = s - slope[:, None] * distance.to(tl.float32)
        if POS_BIAS_LEN > 0:  # a learned bias per (head, distance), the last entry for all farther keys
            bias_index = tl.minimum(tl.maximum(distance, 0), POS_BIAS_LEN - 1)
            s = s + tl.load(pos_bias_ptr + head[:, None] * POS_BIAS_LEN + bias_index, mask=allowed, other=0.0)
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
