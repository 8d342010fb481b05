"""Token embeddings and the output head."""

from __future__ import annotations

import torch
from torch import nn

from lmport.layers.linear import Linear, WeightSpec


class LMHead(Linear):
    """Hidden states -> float32 vocabulary logits; the weight may be the embedding's (tied).

    A :class:`Linear` that formats leave unquantized, so its matmul is the backend's
    ``layer_ops.linear`` like every other projection's.
    """

    def __init__(self, hidden_size: int, vocab_size: int, bias: bool = False, tied_to: nn.Embedding | None = None):
        super().__init__(hidden_size, vocab_size, bias=bias, quantizable=False)
        if tied_to is not None:
            self.drop_weight("weight")
            self.weight = tied_to.weight  # the same Parameter: loaded once, under the embedding's name
            self.weight_specs["weight"] = WeightSpec(output_dim=0, input_dim=1)
        self.tied = tied_to is not None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states).float()
