"""The attention contract between models and backends.

A model never calls a kernel directly: each attention layer holds an
:class:`AttentionBackend` chosen by the active backend's ``lmport_attention_backend`` hook
for the layer's :class:`AttentionSpec`. All backends see the same flat batch
(:class:`AttentionMetadata`) and the same paged KV layout per layer:
``key_cache`` and ``value_cache`` of shape ``[num_blocks, block_size, num_kv_heads, head_dim]``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

KVCache = tuple[torch.Tensor, torch.Tensor]  # (key_cache, value_cache) of one layer


@dataclass(frozen=True)
class AttentionSpec:
    """What one attention layer computes; backends are chosen (and cached) per spec."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    dtype: str = "float32"
    sliding_window: int | None = None  # a query attends to at most this many keys (itself included)
    alibi_slopes: tuple[float, ...] | None = None  # one per query head
    logits_soft_cap: float | None = None
    causal: bool = True


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of the whole paged KV cache; the physical layout is the backend's."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem


@dataclass
class AttentionMetadata:
    """One step's flat batch, shared by every layer.

    Tokens of all scheduled sequences are packed along dimension 0 (whole prompts, prompt
    chunks and single decode tokens together). Sequence ``i`` owns tokens
    ``query_start_loc[i]:query_start_loc[i+1]``; it has ``seq_lens[i]`` tokens in total after
    this step (cached + new), so its new tokens sit at positions
    ``seq_lens[i] - query_len .. seq_lens[i] - 1``. ``slot_mapping[t]`` is the flat cache slot
    (``block * block_size + offset``) where token ``t``'s K/V is written; ``-1`` skips the
    write (padding). The ``*_host`` lists mirror the tensors so that host code never has to
    synchronise with the device to read them.
    """

    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq]
    slot_mapping: torch.Tensor  # int64 [num_tokens]
    query_start_loc_host: list[int]
    seq_lens_host: list[int]
    max_query_len: int
    max_seq_len: int
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc_host[-1]

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(ABC):
    """One attention implementation for one :class:`AttentionSpec`.

    ``forward`` first writes the new ``key``/``value`` rows into ``kv_cache`` at
    ``metadata.slot_mapping``, then attends each sequence's queries over all of its cached
    keys (causal, with the spec's window, ALiBi and soft-cap), and returns
    ``[num_tokens, num_heads, head_dim]``.
    """

    name: str = "attention"

    def __init__(self, spec: AttentionSpec):
        self.spec = spec

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: KVCache,
        metadata: AttentionMetadata,
    ) -> torch.Tensor: ...


class Attention(nn.Module):
    """The attention layer models build on: shapes in, backend call, shapes out."""

    def __init__(self, spec: AttentionSpec, backend: AttentionBackend, layer_index: int):
        super().__init__()
        self.spec = spec
        self.backend = backend
        self.layer_index = layer_index

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_caches: list[KVCache],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """``query``/``key``/``value`` as ``[num_tokens, heads * head_dim]``; returns the same for queries."""
        s = self.spec
        q = query.view(-1, s.num_heads, s.head_dim)
        k = key.view(-1, s.num_kv_heads, s.head_dim)
        v = value.view(-1, s.num_kv_heads, s.head_dim)
        out = self.backend.forward(q, k, v, kv_caches[self.layer_index], metadata)
        return out.reshape(-1, s.num_heads * s.head_dim)
