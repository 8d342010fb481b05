"""Token embeddings and the output head (vocabulary-parallel when the model is built sharded)."""

from __future__ import annotations

from typing import Hashable

import torch
from torch import nn

from lmport.layers.linear import Linear, WeightSpec
from lmport.layers.parallel import current_shard


def _padded(vocab: int, world: int) -> int:
    return -(-vocab // world) * world


class VocabEmbedding(nn.Embedding):
    """``nn.Embedding`` that, built sharded, holds rows ``[rank * V/W, (rank + 1) * V/W)`` of the
    vocabulary (padded up to a multiple of the ranks); a token outside them embeds to zeros
    here, and the all-reduce over ranks gives every rank the whole embedding."""

    def __init__(self, vocab_size: int, hidden_size: int, padding_idx: int | None = None):
        shard = current_shard()
        self.vocab_size = vocab_size
        self.world, self.rank = shard.world_size, shard.rank
        self.per_rank = _padded(vocab_size, self.world) // self.world
        super().__init__(self.per_rank if self.world > 1 else vocab_size, hidden_size, padding_idx=padding_idx)
        self.comm = shard.comm if self.world > 1 else None

    def load_checkpoint_tensor(self, name: str, tensor: torch.Tensor, shard: Hashable | None) -> None:
        """The checkpoint's ``[V, H]`` table -> this rank's rows (weight_loading calls it)."""
        if name != "weight" or shard is not None:
            raise ValueError(f"unexpected tensor {name!r} (shard {shard!r}) for an embedding")
        with torch.no_grad():
            self.weight.copy_(_vocab_rows(tensor, self.vocab_size, self.world, self.rank, self.per_rank))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.comm is None:
            return super().forward(input_ids)
        first = self.rank * self.per_rank
        local = input_ids - first
        outside = (local < 0) | (local >= self.per_rank)
        out = super().forward(local.masked_fill(outside, 0))
        out = out.masked_fill(outside[:, None], 0)
        return self.comm.all_reduce(out)


def _vocab_rows(tensor: torch.Tensor, vocab: int, world: int, rank: int, per_rank: int) -> torch.Tensor:
    if world == 1:
        return tensor
    if tensor.shape[0] != vocab:
        raise ValueError(f"has {tensor.shape[0]} rows, expected the vocabulary's {vocab}")
    first = rank * per_rank
    rows = tensor[first : first + per_rank]
    if rows.shape[0] < per_rank:  # the last rank's padding
        rows = torch.cat([rows, rows.new_zeros(per_rank - rows.shape[0], *rows.shape[1:])])
    return rows


class LMHead(Linear):
    """Hidden states -> float32 vocabulary logits; the weight may be the embedding's (tied).

    A :class:`Linear` that formats leave unquantized, so its matmul is the backend's
    ``layer_ops.linear`` like every other projection's. Built sharded, each rank computes the
    logits of its vocabulary rows and an all-gather joins them.
    """

    def __init__(self, hidden_size: int, vocab_size: int, bias: bool = False, tied_to: nn.Embedding | None = None):
        shard = current_shard()
        self.vocab_size = vocab_size
        self.world, self.rank = shard.world_size, shard.rank
        padded = _padded(vocab_size, self.world) if self.world > 1 else vocab_size
        super().__init__(hidden_size, padded, bias=bias, quantizable=False, parallel="column")
        self.per_rank = self.out_features
        if tied_to is not None:
            # sharded, a tied head needs a VocabEmbedding of the same vocabulary (the loader refuses
            # the families that build another before their weights load)
            self.drop_weight("weight")
            self.weight = tied_to.weight  # the same Parameter: loaded once, under the embedding's name
            self.weight_specs["weight"] = WeightSpec(output_dim=0, input_dim=1)
        self.tied = tied_to is not None

    def _narrow_to_partition(self, tensor: torch.Tensor, spec: WeightSpec, shard: Hashable | None) -> torch.Tensor:
        if self.world == 1:
            return tensor
        return _vocab_rows(tensor, self.vocab_size, self.world, self.rank, self.per_rank)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.method.apply(self, hidden_states).float()
        if self.world == 1:
            return logits
        return self.comm.all_gather(logits, dim=-1)[..., : self.vocab_size]
