"""The CUDA backend's answer to ``lmport_layer_ops``: Triton RMSNorm(+residual), RoPE and SiLU·mul.

Each op falls back to the core's reference for what its kernel does not take (a CPU tensor,
a row too wide for one program, an odd rotary width), so binding these ops never narrows
what a model can run. The checks read shapes and devices only: no host sync.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any, Callable

import torch

from lmport.layers.ops import REFERENCE_OPS

log = logging.getLogger(__name__)


def _triton_runs_on(x: torch.Tensor) -> bool:
    # TRITON_INTERPRET=1 runs the kernels on CPU tensors (the tests' CPU path)
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def fused_layer_ops() -> dict[str, Callable[..., Any]] | None:
    """Op name -> fused implementation, or ``None`` where triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        log.warning("triton is not installed: the CUDA backend runs the reference layer ops")
        return None
    from lmport_cuda.kernels import activation, rms_norm, rotary

    def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if not _triton_runs_on(x) or x.shape[-1] > rms_norm.MAX_FUSED_HIDDEN:
            return REFERENCE_OPS.rms_norm(x, weight, eps)
        return rms_norm.rms_norm(x, weight, eps)

    def fused_add_rms_norm_op(
        x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not _triton_runs_on(x) or x.shape[-1] > rms_norm.MAX_FUSED_HIDDEN or x.shape != residual.shape:
            return REFERENCE_OPS.fused_add_rms_norm(x, residual, weight, eps)
        return rms_norm.fused_add_rms_norm(x, residual, weight, eps)

    def rotary_op(
        query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rotary_dim = cos.shape[-1]
        if not _triton_runs_on(query) or rotary_dim % 2 or rotary_dim > head_dim or query.dim() != 2:
            return REFERENCE_OPS.rotary(query, key, cos, sin, head_dim)
        return rotary.apply_rotary(query, key, cos, sin, head_dim)

    def silu_and_mul_op(gate_up: torch.Tensor) -> torch.Tensor:
        if not _triton_runs_on(gate_up) or gate_up.shape[-1] % 2:
            return REFERENCE_OPS.silu_and_mul(gate_up)
        return activation.silu_and_mul(gate_up)

    return {
        "rms_norm": rms_norm_op,
        "fused_add_rms_norm": fused_add_rms_norm_op,
        "rotary": rotary_op,
        "silu_and_mul": silu_and_mul_op,
    }
