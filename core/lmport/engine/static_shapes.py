"""Padding a flat batch to shape buckets, for backends with ``static_shapes`` (graphs per shape).

The padded batch has the bucket's number of sequences, tokens and block-table columns
(:class:`lmport.planning.ShapeBuckets`). Pad tokens belong to dummy sequences whose block
tables are all block 0 and whose slots are ``-1`` (no K/V write), so they read whatever block
0 holds and change nothing; their hidden rows are never turned into logits (the logits
indices name real rows only).
"""

from __future__ import annotations

import dataclasses

import torch

from lmport.engine.batch import FlatBatch
from lmport.planning import PaddedShape, ShapeBuckets


def padded_shape(batch: FlatBatch, buckets: ShapeBuckets) -> PaddedShape:
    meta = batch.metadata
    return buckets.pad(meta.num_seqs, meta.num_tokens, meta.block_tables.shape[1], meta.block_size)


def pad_flat_batch(batch: FlatBatch, buckets: ShapeBuckets) -> FlatBatch:
    """``batch`` padded to its bucket (the same object when it fits one exactly).

    A model with several KV groups (sliding windows beside full attention, cross-attention)
    is padded in its first group only; such models are not padded (returned as they are).
    """
    meta = batch.metadata
    if meta.groups:
        return batch
    shape = padded_shape(batch, buckets)
    num_seqs, num_tokens, width = meta.num_seqs, meta.num_tokens, meta.block_tables.shape[1]
    if (shape.num_seqs, shape.num_tokens, shape.num_blocks) == (num_seqs, num_tokens, width):
        return batch
    extra_tokens = shape.num_tokens - num_tokens
    extra_seqs = shape.num_seqs - num_seqs
    if num_tokens == num_seqs:  # decode: one token per dummy sequence
        dummy_lens = [1] * extra_seqs
    else:  # the first dummy takes every pad token, the others none
        dummy_lens = [extra_tokens] + [0] * (extra_seqs - 1) if extra_seqs else []
    device = batch.input_ids.device

    def grow(t: torch.Tensor, n: int, value: int) -> torch.Tensor:
        return torch.cat([t, torch.full((n,), value, dtype=t.dtype, device=device)]) if n else t

    starts_host = list(meta.query_start_loc_host)
    for n in dummy_lens:
        starts_host.append(starts_host[-1] + n)
    tables = meta.block_tables
    if shape.num_blocks > width or extra_seqs:
        padded_tables = torch.zeros((shape.num_seqs, shape.num_blocks), dtype=tables.dtype, device=device)
        padded_tables[:num_seqs, :width] = tables
        tables = padded_tables
    seq_lens_host = list(meta.seq_lens_host) + dummy_lens
    padded_meta = dataclasses.replace(
        meta,
        query_start_loc=torch.tensor(starts_host, dtype=meta.query_start_loc.dtype).to(device, non_blocking=True),
        seq_lens=grow(meta.seq_lens, extra_seqs, 0) if not dummy_lens else torch.tensor(
            seq_lens_host, dtype=meta.seq_lens.dtype).to(device, non_blocking=True),
        block_tables=tables,
        slot_mapping=grow(meta.slot_mapping, extra_tokens, -1),
        query_start_loc_host=starts_host,
        seq_lens_host=seq_lens_host,
        max_query_len=max([meta.max_query_len, *dummy_lens]),
        max_seq_len=max([meta.max_seq_len, *dummy_lens]),
        prepared={},
    )
    return dataclasses.replace(
        batch,
        input_ids=grow(batch.input_ids, extra_tokens, 0),
        positions=grow(batch.positions, extra_tokens, 0),
        metadata=padded_meta,
    )
