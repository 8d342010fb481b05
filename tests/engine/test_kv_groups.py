"""KV cache groups: the cross group's table in the block manager, the mapping of groups onto the
physical cache, and the reference attention's cross-attention and position bias."""

from __future__ import annotations

import itertools

import pytest
import torch

from lmport.engine.api import SamplingParams
from lmport.engine.block_manager import BlockManager
from lmport.engine.model_runner import _map_groups
from lmport.engine.prefix_cache import hash_block
from lmport.engine.sequence import Sequence
from lmport.layers.attention import CROSS, FULL, AttentionSpec, KVCacheGroupSpec, KVCacheSpec
from lmport.layers.reference_attention import ReferenceAttention
from lmport.testing.attention_features import check_cross_attention, check_position_bias

_ids = itertools.count()


def encoder_decoder_seq(encoder_input: list[int], start: int = 0) -> Sequence:
    """A sequence as an encoder-decoder model prepares it: decoder prompt = its start token."""
    seq = Sequence(next(_ids), "r", 0, [start], SamplingParams(), 0.0)
    seq.encoder_input, seq.cross_kv_len = list(encoder_input), len(encoder_input)
    seq.hash_seed = hash_block(None, encoder_input)
    return seq


def test_cross_table_is_allocated_at_admission_and_freed_with_the_sequence():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = encoder_decoder_seq(list(range(10)))  # 3 cross blocks + 1 decoder block
    assert bm.allocate(seq, 1)
    assert len(seq.cross_block_table) == 3 and len(seq.block_table) == 1
    assert not set(seq.cross_block_table) & set(seq.block_table)
    assert bm.num_used_blocks == 4
    seq.num_computed_tokens = 1
    for _ in range(3):  # decode steps: the cross table never grows
        seq.append_token(7)
        assert bm.allocate(seq, 1)
        seq.num_computed_tokens += 1
    assert len(seq.cross_block_table) == 3 and len(seq.block_table) == 1
    bm.free(seq)
    assert seq.cross_block_table == [] and bm.num_used_blocks == 0 and bm.pool.num_free == 8


def test_admission_needs_room_for_the_cross_table_too():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = encoder_decoder_seq(list(range(13)))  # 4 cross blocks + 1 decoder block > 4
    assert not bm.allocate(seq, 1)
    assert seq.cross_block_table == [] and seq.block_table == [] and bm.pool.num_free == 4


def test_equal_decoder_tokens_after_different_inputs_never_share_blocks():
    """The decoder's K/V depend on the encoder's input: block hashes chain on ``hash_seed``."""
    bm = BlockManager(num_blocks=16, block_size=2)
    first, second, again = encoder_decoder_seq([5, 6, 7]), encoder_decoder_seq([5, 6, 8]), encoder_decoder_seq([5, 6, 7])
    for seq in (first, second, again):
        seq.token_ids += [9, 9, 9]
        seq.output_token_ids += [9, 9, 9]
    assert bm.allocate(first, first.num_tokens)
    first.num_computed_tokens = first.num_tokens
    bm.commit_computed(first)
    assert bm.peek_prefix(second) == []
    assert bm.peek_prefix(again) == first.block_table[:1]  # same input, same decoder tokens: a hit


def test_cross_layers_reuse_the_token_layers_tensors():
    groups = (KVCacheGroupSpec(FULL, (0, 1, 2), 2, 8), KVCacheGroupSpec(CROSS, (3, 4), 2, 8))
    physical = [(torch.zeros(1), torch.zeros(1)) for _ in range(3)]
    flat = _map_groups(physical, groups)
    assert [id(c) for c in flat] == [id(physical[i]) for i in (0, 1, 2, 0, 1)]
    spec = KVCacheSpec(3, 2, 8, 4, torch.float32, groups)
    assert spec.has_cross_group and spec.bytes_per_block() == KVCacheSpec(3, 2, 8, 4, torch.float32).bytes_per_block()


def test_unknown_group_kind_is_refused():
    with pytest.raises(ValueError, match="unknown KV cache group kind"):
        KVCacheGroupSpec("chunked", (0,), 1, 8)


def _cache(num_blocks, block_size=4, heads=2, head_dim=16):
    return tuple(torch.zeros(num_blocks, block_size, heads, head_dim) for _ in range(2))


def test_reference_cross_attention_matches_dense_math():
    backend = ReferenceAttention(AttentionSpec(2, 2, 16, scale=1.0, causal=False, kind="cross"))
    # one decoder token per sequence, then a recompute with several (more queries than keys)
    check_cross_attention(backend, _cache, encoder_lens=[5, 1, 9], decoder_lens=[1, 1, 1], block_size=4, device="cpu")
    check_cross_attention(backend, _cache, encoder_lens=[3, 7], decoder_lens=[6, 2], block_size=4, device="cpu", seed=1)


def test_reference_position_bias_matches_dense_math():
    backend = ReferenceAttention(AttentionSpec(2, 2, 16, scale=1.0, position_bias_len=5))
    check_position_bias(backend, _cache, cached=[0, 6, 3], new=[9, 1, 4], block_size=4, device="cpu")


def test_old_backends_never_get_cross_or_biased_specs():
    """A backend class without ``supports`` (written before these features) falls back to the reference."""
    from lmport.plugins import _supports

    class Old:
        def forward(self, query, key, value, kv_cache, metadata):
            raise AssertionError("must not run")

    assert _supports(Old(), AttentionSpec(2, 2, 16, 1.0))
    assert not _supports(Old(), AttentionSpec(2, 2, 16, 1.0, causal=False, kind="cross"))
    assert not _supports(Old(), AttentionSpec(2, 2, 16, 1.0, position_bias_len=4))
    assert _supports(ReferenceAttention(AttentionSpec(2, 2, 16, 1.0, kind="cross")), AttentionSpec(2, 2, 16, 1.0, kind="cross"))
