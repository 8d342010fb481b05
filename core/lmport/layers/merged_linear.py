"""A Linear whose output rows stack several checkpoint matrices (q/k/v, gate/up).

One matmul instead of several is what makes fused projections fast on accelerators; the
checkpoint still names the parts apart, so the layer knows where each part's rows go
(``shard_keys``/``shard_view``, used by :mod:`lmport.layers.weight_loading`).
"""

from __future__ import annotations

from typing import Hashable

import torch
from torch import nn


class MergedLinear(nn.Linear):
    """``nn.Linear`` over the concatenation of named output shards, in the order given."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False):
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_sizes = dict(shard_sizes)
        self.shard_slices: dict[str, slice] = {}
        offset = 0
        for name, size in shard_sizes.items():
            self.shard_slices[name] = slice(offset, offset + size)
            offset += size

    def shard_keys(self, param_name: str) -> list[Hashable]:
        return list(self.shard_sizes)

    def shard_view(self, param_name: str, key: Hashable) -> torch.Tensor:
        param = getattr(self, param_name)
        return param.data if key is None else param.data[self.shard_slices[key]]

    def split(self, output: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The forward output cut back into its shards (views, no copy)."""
        return output.split(list(self.shard_sizes.values()), dim=-1)


def per_head_qkv_to_stacked(tensor: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder a fused QKV weight/bias laid out per head (``[h0: q k v, h1: q k v, ...]``, GPT-NeoX,
    multi-head StarCoder) into ``[all q | all k | all v]``, so the forward is a plain split."""
    rest = tensor.shape[1:]
    return tensor.reshape(num_heads, 3, head_dim, *rest).transpose(0, 1).reshape(3 * num_heads * head_dim, *rest)
