"""The reference attention's KV write: rows land in their slots, -1 slots are skipped, and no
operation depends on the data for its size (so nothing waits for a GPU mid-step)."""

from __future__ import annotations

import pytest
import torch

from lmport.layers.reference_attention import write_kv_cache

NUM_BLOCKS, BLOCK_SIZE, HEADS, DIM = 5, 4, 2, 3


def expected_after(cache: torch.Tensor, rows: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """Row by row in Python: the plain meaning of a slot mapping."""
    flat = cache.clone().view(-1, HEADS, DIM)
    for row, slot in zip(rows, slots):
        if slot >= 0:
            flat[slot] = row.to(flat.dtype)
    return flat.view_as(cache)


@pytest.mark.parametrize(
    "slots",
    [
        [3, 7, 8, 19],  # all written
        [-1, -1, 5, 6, 0],  # padding first; slot 0 written after it
        [0, -1, 12, -1, 13],  # padding between rows, slot 0 first
        [9, 10, -1, -1],  # padding last
        [-1, -1, -1],  # nothing written
        [],  # an empty step
    ],
)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_rows_land_in_their_slots_and_padding_is_skipped(slots, cache_dtype):
    gen = torch.Generator().manual_seed(len(slots))
    caches = tuple(torch.randn(NUM_BLOCKS, BLOCK_SIZE, HEADS, DIM, generator=gen).to(cache_dtype) for _ in range(2))
    key = torch.randn(len(slots), HEADS, DIM, generator=gen)
    value = torch.randn(len(slots), HEADS, DIM, generator=gen)
    expected = (expected_after(caches[0], key, slots), expected_after(caches[1], value, slots))
    write_kv_cache(key, value, caches, torch.tensor(slots, dtype=torch.int64))
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


def test_int32_slot_mapping():
    caches = tuple(torch.zeros(NUM_BLOCKS, BLOCK_SIZE, HEADS, DIM) for _ in range(2))
    rows = torch.ones(3, HEADS, DIM)
    write_kv_cache(rows, 2 * rows, caches, torch.tensor([4, -1, 2], dtype=torch.int32))
    flat_k, flat_v = (c.view(-1, HEADS, DIM) for c in caches)
    assert flat_k.sum(dim=(1, 2)).nonzero().flatten().tolist() == [2, 4]
    assert torch.equal(flat_v[4], 2 * rows[0])


def test_no_operation_needs_the_data_to_know_its_size():
    """Meta tensors have shapes and no data: a boolean mask, ``nonzero`` or ``.item()`` (each a
    host sync on a GPU) raises on them."""
    meta = torch.device("meta")
    caches = tuple(torch.empty(NUM_BLOCKS, BLOCK_SIZE, HEADS, DIM, device=meta) for _ in range(2))
    key = torch.empty(4, HEADS, DIM, device=meta)
    with pytest.raises(NotImplementedError):
        key[torch.empty(4, dtype=torch.bool, device=meta)]  # what a mask would do
    write_kv_cache(key, key, caches, torch.empty(4, dtype=torch.int64, device=meta))
