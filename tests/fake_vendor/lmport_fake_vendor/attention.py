"""The vendor's "kernel": the reference attention, counting its calls."""

from __future__ import annotations

from lmport.layers.reference_attention import ReferenceAttention


class CountingAttention(ReferenceAttention):
    """Computes exactly what the reference computes, and counts forward calls and tokens."""

    name = "fake-vendor"
    is_reference = False

    def __init__(self, spec):
        super().__init__(spec)
        self.calls = 0
        self.tokens = 0
        self.shapes: set[tuple[int, int, int]] = set()  # (sequences, tokens, block-table width) seen

    def forward(self, query, key, value, kv_cache, metadata, position_bias=None):
        self.calls += 1
        self.tokens += query.shape[0]
        self.shapes.add((metadata.num_seqs, query.shape[0], metadata.block_tables.shape[1]))
        return super().forward(query, key, value, kv_cache, metadata, position_bias)
