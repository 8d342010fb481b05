"""Sparse mixture-of-experts feed-forward (Mixtral-style top-k routing over SwiGLU experts).

Each expert is two :class:`~lmport.layers.linear.Linear` layers (``w13[e]``: gate and up as
the shards ``"w1"``/``"w3"``, ``w2[e]``: down), so experts load and run in any quantization
format like every other projection. The reference forward groups the (token, expert)
assignments by expert and runs one matmul per expert that received tokens: the Python loop is
over experts, never over tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from lmport.layers.activations import get_activation
from lmport.layers.linear import Linear


class FusedMoE(nn.Module):
    """``num_experts`` SwiGLU experts; each token goes to its ``top_k`` experts, weighted by the router.

    Parameters: ``w13.<e>.weight`` (shards ``"w1"`` gate and ``"w3"`` up, ``[2 * inter, hidden]``)
    and ``w2.<e>.weight`` (down, ``[hidden, inter]``) per expert.
    """

    def __init__(
        self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, activation: str = "silu", *, quant=None
    ):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.intermediate_size = intermediate_size
        parts = {"w1": intermediate_size, "w3": intermediate_size}
        # tensor parallel: every expert's intermediate split over the ranks; one all-reduce of the sum
        self.w13 = nn.ModuleList(Linear(hidden_size, parts, quant=quant, parallel="column") for _ in range(num_experts))
        self.w2 = nn.ModuleList(Linear(intermediate_size, hidden_size, quant=quant, parallel="row", reduce=False)
                                for _ in range(num_experts))  # fmt: skip
        self.comm = self.w2[0].comm if num_experts else None
        self.act = get_activation(activation)

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
            gate, up = self.w13[expert](x).chunk(2, dim=-1)
            y = self.w2[expert](self.act(gate) * up)
            y = y * weight_of[start : start + count, None]
            out.index_add_(0, tokens, y.to(out.dtype))
            start += count
        return self.comm.all_reduce(out) if self.comm is not None else out
