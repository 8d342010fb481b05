"""Normalisation layers the native models share."""

from __future__ import annotations

import torch
from torch import nn

from lmport.layers.ops import UsesLayerOps


class RMSNorm(UsesLayerOps, nn.Module):
    """Root-mean-square norm as Llama computes it: statistics in float32, weight applied after the cast back.

    ``norm(x)`` returns the normed ``x``. ``norm(x, residual)`` adds first and returns
    ``(norm(x + residual), x + residual)``: the residual stream of a pre-norm block, which a
    backend's ``fused_add_rms_norm`` does in one kernel instead of an add and a norm.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self.layer_ops.rms_norm(x, self.weight, self.eps)
        return self.layer_ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: scales by ``1 + weight`` (checkpoints store the offset from one), all in
    float32 with one cast back at the end, as transformers' ``Gemma2RMSNorm``/``Gemma3RMSNorm``.

    ``norm(x, residual)`` returns ``(norm(x + residual), x + residual)`` like :class:`RMSNorm`.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            residual = x + residual
            return self.forward(residual), residual
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


# LayerNorm needs nothing beyond torch's own; re-exported so models import norms from one place.
LayerNorm = nn.LayerNorm
