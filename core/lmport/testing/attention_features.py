"""Checks of the attention contract's encoder-decoder features against dense torch math.

``check_cross_attention``: K/V written once through ``write_kv`` into scattered blocks, then
decoder queries (one or several per sequence) attend all of their sequence's cross positions,
or, for a spec with ``key_ranges``, each its own range of them (some empty: zeros).
``check_position_bias``: causal self-attention over the paged cache with a per-(head, distance)
bias table, prompts and decode steps mixed. Both compare with attention computed here from the
dense tensors (not with the core's reference), so they test the reference too. Used by the
core's tests, the CUDA plugin's kernel tests and the conformance suite.
"""

from __future__ import annotations

import torch

from lmport.layers.attention import AttentionBackend
from lmport.testing.model_driver import build_metadata

TOLERANCES = {"float32": (2e-4, 2e-4), "float16": (2e-2, 2e-2), "bfloat16": (5e-2, 5e-2)}


def _scattered_tables(lengths: list[int], block_size: int, gen: torch.Generator) -> tuple[list[list[int]], int]:
    per_seq = [-(-n // block_size) for n in lengths]
    num_blocks = sum(per_seq) + 1
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # block 0 unused
    tables, start = [], 0
    for count in per_seq:
        tables.append(order[start : start + count])
        start += count
    return tables, num_blocks


def _dense(q, k, v, mask, bias=None):
    """``q [n, H, d]``, ``k/v [m, H, d]``, ``mask [n, m]`` (True: attend); float32 out."""
    scores = torch.einsum("nhd,mhd->hnm", q.float(), k.float())
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hnm,mhd->nhd", torch.softmax(scores, -1), v.float())


def check_cross_attention(backend: AttentionBackend, cache_factory, *, encoder_lens, decoder_lens, block_size, device,
                          dtype=torch.float32, seed=0) -> None:  # fmt: skip
    """``cache_factory(num_blocks)`` -> one layer's ``(key_cache, value_cache)``."""
    spec = backend.spec
    assert spec.kind == "cross" and spec.num_heads == spec.num_kv_heads
    gen = torch.Generator().manual_seed(seed)
    heads, d = spec.num_heads, spec.head_dim
    tables, num_blocks = _scattered_tables(list(encoder_lens), block_size, gen)
    kv_cache = cache_factory(num_blocks)
    # the encoder step: every sequence's K/V at its cross slots, through write_kv
    enc_meta, _ = build_metadata([0] * len(encoder_lens), list(encoder_lens), tables, block_size, device)
    total = sum(encoder_lens)
    k = torch.randn(total, heads, d, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(total, heads, d, generator=gen).to(device=device, dtype=dtype)
    backend.write_kv(k, v, kv_cache, enc_meta.slot_mapping)
    # decoder queries: the cross metadata has the encoder lengths and no slots
    starts = [0]
    for n in decoder_lens:
        starts.append(starts[-1] + n)
    meta, _ = build_metadata([0] * len(encoder_lens), list(encoder_lens), tables, block_size, device)
    meta.query_start_loc = torch.tensor(starts, dtype=torch.int32, device=device)
    meta.query_start_loc_host = starts
    meta.max_query_len = max(decoder_lens)
    meta.slot_mapping = meta.slot_mapping[:0]
    q = torch.randn(starts[-1], heads, d, generator=gen).to(device=device, dtype=dtype)
    ranges = _key_ranges(encoder_lens, decoder_lens, gen) if spec.key_ranges else None
    if ranges is not None:
        meta.key_ranges = torch.tensor(ranges, dtype=torch.int32, device=device)
    got = backend.forward(q, None, None, kv_cache, meta)
    enc_starts = enc_meta.query_start_loc_host
    atol, rtol = TOLERANCES[str(dtype).removeprefix("torch.")]
    for i in range(len(encoder_lens)):
        qi = q[starts[i] : starts[i + 1]] * spec.scale
        ki, vi = k[enc_starts[i] : enc_starts[i + 1]], v[enc_starts[i] : enc_starts[i + 1]]
        mask = torch.ones(qi.shape[0], ki.shape[0], dtype=torch.bool, device=device)
        if ranges is not None:
            k_pos = torch.arange(ki.shape[0], device=device)[None, :]
            lo, hi = (torch.tensor([r[j] for r in ranges[starts[i] : starts[i + 1]]], device=device)[:, None] for j in (0, 1))
            mask = (k_pos >= lo) & (k_pos < hi)
        want = _dense(qi, ki, vi, mask)
        if ranges is not None:  # a query that attends nothing gets zeros
            want = torch.where(mask.any(-1)[:, None, None], want, torch.zeros_like(want))
        torch.testing.assert_close(got[starts[i] : starts[i + 1]].float(), want, atol=atol, rtol=rtol)


def _key_ranges(encoder_lens, decoder_lens, gen: torch.Generator) -> list[tuple[int, int]]:
    """Per decoder query, a random ``[lo, hi)`` of its sequence's cross positions; every third one empty."""
    ranges = []
    for m, n in zip(encoder_lens, decoder_lens):
        for t in range(n):
            lo = int(torch.randint(0, m, (1,), generator=gen))
            hi = int(torch.randint(lo + 1, m + 1, (1,), generator=gen))
            ranges.append((lo, lo) if t % 3 == 2 else (lo, hi))
    return ranges


def check_position_bias(backend: AttentionBackend, cache_factory, *, cached, new, block_size, device,
                        dtype=torch.float32, seed=0) -> None:  # fmt: skip
    """Sequences with ``cached[i]`` tokens in the cache (written by a first step) and ``new[i]`` more."""
    spec = backend.spec
    n_bias = spec.position_bias_len
    assert n_bias and spec.causal and spec.num_heads == spec.num_kv_heads
    gen = torch.Generator().manual_seed(seed)
    heads, d = spec.num_heads, spec.head_dim
    totals = [c + n for c, n in zip(cached, new)]
    tables, num_blocks = _scattered_tables(totals, block_size, gen)
    kv_cache = cache_factory(num_blocks)
    bias = torch.randn(heads, n_bias, generator=gen).to(device)
    k_all = [torch.randn(t, heads, d, generator=gen).to(device=device, dtype=dtype) for t in totals]
    v_all = [torch.randn(t, heads, d, generator=gen).to(device=device, dtype=dtype) for t in totals]
    q_all = [torch.randn(t, heads, d, generator=gen).to(device=device, dtype=dtype) for t in totals]
    atol, rtol = TOLERANCES[str(dtype).removeprefix("torch.")]
    for step_cached, step_new in (([0] * len(cached), list(cached)), (list(cached), list(new))):
        live = [i for i, n in enumerate(step_new) if n]
        if not live:
            continue
        meta, _ = build_metadata([step_cached[i] for i in live], [step_new[i] for i in live], [tables[i] for i in live],
                                 block_size, device)  # fmt: skip
        pick = lambda xs: torch.cat([xs[i][step_cached[i] : step_cached[i] + step_new[i]] for i in live])  # noqa: E731
        got = backend.forward(pick(q_all), pick(k_all), pick(v_all), kv_cache, meta, bias)
        row = 0
        for i in live:
            c, n = step_cached[i], step_new[i]
            q_pos = torch.arange(c, c + n, device=device)[:, None]
            k_pos = torch.arange(c + n, device=device)[None, :]
            distance = q_pos - k_pos
            table = bias[:, distance.clamp(0, n_bias - 1)]  # [H, n, m]
            want = _dense(q_all[i][c : c + n] * spec.scale, k_all[i][: c + n], v_all[i][: c + n], distance >= 0, table)
            torch.testing.assert_close(got[row : row + n].float(), want, atol=atol, rtol=rtol)
            row += n
