"""The attention contract between models and backends.

A model never calls a kernel directly: each attention layer holds an
:class:`AttentionBackend` chosen by the active backend's ``lmport_attention_backend`` hook
for the layer's :class:`AttentionSpec`. All backends see the same flat batch
(:class:`AttentionMetadata`) and the same paged KV layout per layer:
``key_cache`` and ``value_cache`` of shape ``[num_blocks, block_size, num_kv_heads, head_dim]``.

KV cache groups: a model declares its caches per layer group (:class:`KVCacheGroupSpec`):
the layers of a ``full`` or ``sliding`` group keep the K/V of the sequence's own tokens (one
block table, the sequence's); a ``cross`` group keeps K/V written once per request, at its
encoder step (T5's encoder output, a vision model's image states), in a block table of its
own of a fixed length per request. The step's metadata carries one
:class:`AttentionMetadata` per group (``metadata.groups``; group 0 is ``metadata`` itself).

Per-step state: an attention backend derives what its kernels need from the flat batch once
per step (:meth:`AttentionBackend.prepare_metadata`, cached in ``metadata.prepared`` under the
backend's ``metadata_key``), never once per layer, and keeps that state in static buffers
while decode graphs are captured and replayed (:meth:`AttentionBackend.init_capture_graph`,
:meth:`AttentionBackend.prepare_for_replay`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Hashable

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
    # "self": K/V of this step's tokens are written, then attended; "cross": K/V were written
    # at the request's encoder step (``write_kv``), queries attend all of them (not causal)
    kind: str = "self"
    # a learned additive bias per (head, distance): ``position_bias[h, min(q_pos - k_pos, n - 1)]``
    # with n this length, passed to ``forward`` (T5's relative position buckets, precomputed)
    position_bias_len: int | None = None
    # cross specs only: query token ``t`` attends only its sequence's cross positions
    # ``metadata.key_ranges[t, 0] <= k < metadata.key_ranges[t, 1]``; a token with an empty range
    # attends nothing and its output is zero (Idefics: each text token sees the image before it)
    key_ranges: bool = False


FULL, SLIDING, CROSS = "full", "sliding", "cross"  # KV group kinds
GROUP_KINDS = (FULL, SLIDING, CROSS)


@dataclass(frozen=True)
class KVCacheGroupSpec:
    """One group of attention layers that share a block table per sequence.

    ``layers`` index the model's flat ``kv_caches`` list. ``full`` and ``sliding`` groups hold
    the sequence's own tokens (they all use the sequence's block table, so blocks that left a
    window are given back only when every self-attention layer is windowed: the block
    manager's ``sliding_window``); a ``cross`` group holds
    ``Sequence.cross_kv_len`` positions per request, written once.
    """

    kind: str
    layers: tuple[int, ...]
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in GROUP_KINDS:
            raise ValueError(f"unknown KV cache group kind {self.kind!r}; known: {', '.join(GROUP_KINDS)}")


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of the whole paged KV cache; the physical layout is the backend's.

    ``num_layers`` is how many per-layer ``(key, value)`` tensors to allocate. ``groups`` (empty:
    one full-attention group over every layer) say which layers serve which group: a cross
    group's blocks are never a token group's blocks at the same time (one pool hands out both),
    so its layers share the physical tensors of the token groups' layers (the model's
    ``kv_caches`` list names a tensor pair twice) and cost no memory of their own.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    groups: tuple[KVCacheGroupSpec, ...] = ()

    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    @property
    def has_cross_group(self) -> bool:
        return any(g.kind == CROSS for g in self.groups)


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
    # one per KV group, group 0 first (``self``); empty: a single group. A cross group's
    # ``seq_lens`` are its sequences' cross lengths and its ``slot_mapping`` is empty.
    groups: list["AttentionMetadata"] = field(default_factory=list)
    # per-step state of attention backends, by their ``metadata_key`` (prepare_metadata's results)
    prepared: dict[Hashable, Any] = field(default_factory=dict)
    # a cross group's per-query-token key ranges, int32 [num_tokens, 2] (``[start, end)`` within
    # the token's sequence's cross positions), for specs with ``key_ranges``; None: all of them
    key_ranges: torch.Tensor | None = None

    def group(self, index: int) -> "AttentionMetadata":
        return self.groups[index] if index else self

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
    keys (causal, with the spec's window, ALiBi, position bias and soft-cap), and returns
    ``[num_tokens, num_heads, head_dim]``. For a ``cross`` spec ``key``/``value`` are None and
    nothing is written: ``metadata`` is the cross group's, and the queries attend every one of
    their sequence's ``seq_lens[i]`` cached positions, which :meth:`write_kv` wrote at the
    request's encoder step; with ``spec.key_ranges``, query token ``t`` attends only positions
    ``metadata.key_ranges[t, 0] .. metadata.key_ranges[t, 1] - 1`` of them, and a token whose
    range is empty gets zeros.

    Per-step state (``prepare_metadata``): backends with the same ``metadata_key`` share one
    result per step, which ``forward`` reads from ``metadata.prepared[self.metadata_key]``.
    Decode graphs: ``init_capture_graph`` allocates that state's static buffers once,
    ``prepare_for_capture`` returns the state a graph is captured with (views of them), and
    ``prepare_for_replay`` refreshes them in place before each replay (no host sync).
    Backends whose state is None need none of these. ``supports(spec)`` says whether this
    class computes a spec's features; the core falls back to its reference when it does not
    (a backend written before cross-attention or position bias existed says no to them).
    """

    name: str = "attention"
    metadata_key: Hashable = None  # None: this backend prepares nothing per step

    def __init__(self, spec: AttentionSpec):
        self.spec = spec

    @classmethod
    def supports(cls, spec: AttentionSpec) -> bool:
        return spec.kind == "self" and spec.position_bias_len is None and not spec.key_ranges

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor | None,  # [num_tokens, num_kv_heads, head_dim]; None for a cross spec
        value: torch.Tensor | None,  # [num_tokens, num_kv_heads, head_dim]; None for a cross spec
        kv_cache: KVCache,
        metadata: AttentionMetadata,
        position_bias: torch.Tensor | None = None,  # float32 [num_heads, spec.position_bias_len]
    ) -> torch.Tensor: ...

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: KVCache, slot_mapping: torch.Tensor) -> None:
        """Write K/V rows at ``slot_mapping`` (-1 skips): a cross group's K/V at its encoder step."""
        from lmport.layers.reference_attention import write_kv_cache

        write_kv_cache(key, value, kv_cache, slot_mapping)

    # per-step state; the defaults prepare nothing
    def prepare_metadata(self, metadata: AttentionMetadata) -> Any:
        return None

    def init_capture_graph(self, max_batch: int, max_blocks: int, device: torch.device) -> None:
        pass

    def prepare_for_capture(self, metadata: AttentionMetadata) -> Any:
        return self.prepare_metadata(metadata)

    def prepare_for_replay(self, metadata: AttentionMetadata, batch: int) -> None:
        pass


def prepare_step_metadata(backends: list[AttentionBackend], metadata: AttentionMetadata) -> None:
    """Run each distinct ``metadata_key``'s ``prepare_metadata`` once for this step, on its group's metadata."""
    for backend in backends:
        key = backend.metadata_key
        if key is not None and key not in metadata.prepared:
            metadata.prepared[key] = backend.prepare_metadata(metadata)


class Attention(nn.Module):
    """The attention layer models build on: shapes in, backend call, shapes out.

    ``kv_group`` is the index of the layer's KV cache group: its metadata is
    ``metadata.group(kv_group)`` (group 0, the default, is ``metadata`` itself).
    """

    def __init__(self, spec: AttentionSpec, backend: AttentionBackend, layer_index: int, kv_group: int = 0):
        super().__init__()
        self.spec = spec
        self.backend = backend
        self.layer_index = layer_index
        self.kv_group = kv_group

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None,
        value: torch.Tensor | None,
        kv_caches: list[KVCache],
        metadata: AttentionMetadata,
        position_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``query``/``key``/``value`` as ``[num_tokens, heads * head_dim]``; returns the same for queries.

        ``key``/``value`` are None for a cross-attention layer (its K/V were written at the encoder step).
        """
        s = self.spec
        q = query.view(-1, s.num_heads, s.head_dim)
        if self.kv_group:
            metadata = metadata.groups[self.kv_group]
        if key is not None:
            key = key.view(-1, s.num_kv_heads, s.head_dim)
            value = value.view(-1, s.num_kv_heads, s.head_dim)
        if position_bias is None:
            out = self.backend.forward(q, key, value, kv_caches[self.layer_index], metadata)
        else:
            out = self.backend.forward(q, key, value, kv_caches[self.layer_index], metadata, position_bias)
        return out.reshape(-1, s.num_heads * s.head_dim)

    def write_cross_kv(self, key: torch.Tensor, value: torch.Tensor, kv_caches: list[KVCache], slot_mapping: torch.Tensor) -> None:
        """Write a cross layer's K/V (``[tokens, kv_heads * head_dim]``) at its encoder step."""
        s = self.spec
        k = key.view(-1, s.num_kv_heads, s.head_dim)
        v = value.view(-1, s.num_kv_heads, s.head_dim)
        self.backend.write_kv(k, v, kv_caches[self.layer_index], slot_mapping)
