"""Decode-step graph capture, provided by a backend through ``lmport_graph_runner``."""

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
