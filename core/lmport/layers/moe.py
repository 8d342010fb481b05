"""Sparse mixture-of-experts feed-forward (Mixtral-style top-k routing over SwiGLU experts).

Expert weights are stacked into two 3-D parameters (``w13``: gate and up of every expert,
``w2``: down) so that a backend can hand them to a grouped-GEMM kernel as they are. The
reference forward here groups the (token, expert) assignments by expert and runs one matmul
per expert that received tokens: the Python loop is over experts, never over tokens.
"""

from __future__ import annotations

from typing import Hashable

import torch
from torch import nn
from torch.nn import functional as F

from lmport.layers.activations import get_activation


class FusedMoE(nn.Module):
    """``num_experts`` SwiGLU experts; each token goes to its ``top_k`` experts, weighted by the router.

    Checkpoint shards: ``w13`` takes ``(expert, "w1")`` (gate) and ``(expert, "w3")`` (up),
    ``w2`` takes ``expert`` (down); a whole stacked tensor loads with shard ``None``.
    """

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, activation: str = "silu"):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.intermediate_size = intermediate_size
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act = get_activation(activation)

    def shard_keys(self, param_name: str) -> list[Hashable]:
        if param_name == "w13":
            return [(e, part) for e in range(self.num_experts) for part in ("w1", "w3")]
        return list(range(self.num_experts))

    def shard_view(self, param_name: str, key: Hashable) -> torch.Tensor:
        param = getattr(self, param_name).data
        if key is None:
            return param
        if param_name == "w13":
            expert, part = key
            rows = slice(0, self.intermediate_size) if part == "w1" else slice(self.intermediate_size, None)
            return param[expert, rows]
        return param[key]

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor, renormalize: bool = True) -> torch.Tensor:
        """``hidden [T, H]``, ``router_logits [T, num_experts]`` -> ``[T, H]``."""
        probs = torch.softmax(router_logits.float(), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)  # [T, top_k]
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        flat_experts = experts.flatten()
        order = flat_experts.argsort(stable=True)  # assignments grouped by expert
        token_of = order // self.top_k
        weight_of = weights.flatten()[order]
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()  # one host sync per layer
        out = torch.zeros_like(hidden)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            tokens = token_of[start : start + count]
            x = hidden[tokens]
            gate, up = F.linear(x, self.w13[expert]).chunk(2, dim=-1)
            y = F.linear(self.act(gate) * up, self.w2[expert])
            y = y * weight_of[start : start + count, None]
            out.index_add_(0, tokens, y.to(out.dtype))
            start += count
        return out
