"""Decode-step graph capture, provided by a backend through ``lmport_graph_runner`` (imports nothing from ``lmport.engine``)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from lmport.layers.attention import AttentionMetadata, KVCache


class DecodeGraphRunner(ABC):
    """Captures decode-only steps per batch-size bucket and replays them.

    ``capture`` is called once at warm-up with the KV cache and the bucket sizes;
    ``can_run`` decides per step; ``run`` pads the batch to the next bucket, replays, and
    returns hidden states for the real tokens only.
    """

    @abstractmethod
    def capture(self, kv_caches: list[KVCache], batch_sizes: list[int]) -> None: ...

    @abstractmethod
    def can_run(self, metadata: AttentionMetadata) -> bool: ...

    @abstractmethod
    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        metadata: AttentionMetadata,
    ) -> torch.Tensor: ...


class StaticDecodeMetadata:
    """The fixed-address attention metadata of decode steps up to ``max_batch`` sequences.

    Owned by the core so that a graph runner never builds the core's metadata layout itself:
    ``view(batch)`` is the :class:`AttentionMetadata` a graph of ``batch`` rows is captured with
    (views of static buffers, one set per KV group, and each attention backend's per-step state
    from ``prepare_for_capture``); ``load(metadata, batch)`` copies a real step's metadata in
    (device to device, no sync), pads it to ``batch`` and lets each backend refresh its state
    (``prepare_for_replay``). Padding rows write no K/V (slot -1) and see one key of block 0.
    ``backends`` is ``[(kv_group, backend)]`` for the model's attention layers.
    """

    def __init__(self, max_batch: int, max_blocks: int, block_size: int, device: torch.device, num_groups: int = 1,
                 backends: list[tuple[int, "object"]] = ()) -> None:  # fmt: skip
        self.max_batch, self.max_blocks, self.block_size = max_batch, max_blocks, block_size
        # decode: sequence i owns token i, always, so these never change
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.int64, device=device)
        self.no_slots = torch.full((0,), -1, dtype=torch.int64, device=device)
        # per group: seq_lens and block tables (block 0 always exists; rows never real read it)
        self.seq_lens = [torch.ones(max_batch, dtype=torch.int32, device=device) for _ in range(num_groups)]
        self.block_tables = [torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device) for _ in range(num_groups)]
        # cross groups: each row's key range (specs with ``key_ranges``); padding rows attend nothing
        self.key_ranges = [torch.zeros(max_batch, 2, dtype=torch.int32, device=device) for _ in range(num_groups)]
        self.backends: dict[tuple[int, object], object] = {}
        for group, backend in backends:
            key = backend.metadata_key
            if key is not None and (group, key) not in self.backends:
                self.backends[(group, key)] = backend
                backend.init_capture_graph(max_batch, max_blocks, device)
        self._views: dict[int, AttentionMetadata] = {}

    @property
    def max_seq_len(self) -> int:
        return self.max_blocks * self.block_size

    def _group_view(self, group: int, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: batch + 1],
            seq_lens=self.seq_lens[group][:batch],
            block_tables=self.block_tables[group][:batch],
            slot_mapping=self.slot_mapping[:batch] if group == 0 else self.no_slots,
            query_start_loc_host=list(range(batch + 1)),
            seq_lens_host=[1] * batch,
            max_query_len=1,
            max_seq_len=self.max_seq_len,
            block_size=self.block_size,
            key_ranges=self.key_ranges[group][:batch] if group else None,
        )

    def view(self, batch: int) -> AttentionMetadata:
        if batch not in self._views:
            groups = [self._group_view(g, batch) for g in range(len(self.seq_lens))]
            metadata = groups[0]
            metadata.groups = groups if len(groups) > 1 else []
            for (group, key), backend in self.backends.items():
                target = metadata.group(group)
                target.prepared[key] = backend.prepare_for_capture(target)
            self._views[batch] = metadata
        return self._views[batch]

    def fits(self, metadata: AttentionMetadata) -> bool:
        groups = metadata.groups or [metadata]
        return (
            len(groups) == len(self.seq_lens)
            and metadata.num_seqs <= self.max_batch
            and metadata.block_size == self.block_size
            and all(g.max_seq_len <= self.max_seq_len for g in groups)
        )

    def load(self, metadata: AttentionMetadata, batch: int) -> AttentionMetadata:
        """Copy a step of ``n <= batch`` sequences in and pad it to ``batch``; returns ``view(batch)``."""
        n = metadata.num_seqs
        self.slot_mapping[:n].copy_(metadata.slot_mapping, non_blocking=True)
        for g, source in enumerate(metadata.groups or [metadata]):
            width = min(source.block_tables.shape[1], self.max_blocks)
            self.seq_lens[g][:n].copy_(source.seq_lens, non_blocking=True)
            # columns past `width` keep stale ids: a row reads only the blocks its seq_len covers
            self.block_tables[g][:n, :width].copy_(source.block_tables[:, :width], non_blocking=True)
            if source.key_ranges is not None:
                self.key_ranges[g][:n].copy_(source.key_ranges, non_blocking=True)
                self.key_ranges[g][n:batch].zero_()
            if batch > n:
                # padding: one key; its block-table row holds block 0 or a block a real row used
                # before (still a valid block)
                self.seq_lens[g][n:batch].fill_(1)
        if batch > n:
            self.slot_mapping[n:batch].fill_(-1)  # padding writes nothing
        view = self.view(batch)
        for (group, _), backend in self.backends.items():
            backend.prepare_for_replay(view.group(group), batch)
        return view
