"""Token embeddings and the output head."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class LMHead(nn.Module):
    """Hidden states -> float32 vocabulary logits; the weight may be the embedding's (tied)."""

    def __init__(self, hidden_size: int, vocab_size: int, bias: bool = False, tied_to: nn.Embedding | None = None):
        super().__init__()
        if tied_to is not None:
            self.weight = tied_to.weight  # the same Parameter: loaded once, under the embedding's name
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if bias else None
        self.tied = tied_to is not None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states, self.weight, self.bias).float()
