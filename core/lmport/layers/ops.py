"""The small per-layer ops a backend may replace with fused kernels (``lmport_layer_ops``).

:class:`LayerOps` holds one callable per op; its defaults are the core's reference
implementations in plain torch, written to compute exactly what the layers computed before
ops were pluggable (same float32 statistics, same casts), so a CPU model's tokens do not
depend on whether ops were bound. Layers that accept ops inherit :class:`UsesLayerOps`;
:func:`bind_layer_ops` hands a model's modules the host's ops after the model is built, so no
model constructor has to take them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from lmport.layers import prepacked_linear
from lmport.layers.quant_ops import LinearFp8Op, LinearWqOp, reference_linear_fp8, reference_linear_wq
from lmport.layers.rotary import apply_rotary


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: statistics in float32, the weight applied after the cast back."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def reference_fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``; the sum is rounded to the model dtype first, as an unfused add would be."""
    residual = x + residual
    return reference_rms_norm(residual, weight, eps), residual


def reference_silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` along the last dim (what ``ACT2FN['silu']`` computes)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


RmsNormOp = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
FusedAddRmsNormOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
# (query, key, cos, sin, head_dim) -> (query, key): see lmport.layers.rotary.apply_rotary
RotaryOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
SiluAndMulOp = Callable[[torch.Tensor], torch.Tensor]
# (x, weight, bias) -> x @ weight.T + bias: nn.Linear's layout
LinearOp = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class LayerOps:
    """One implementation per op. Every op is functional: it returns new tensors and never writes its inputs.

    - ``rms_norm(x, weight, eps)``: ``x [..., hidden]`` -> normed, dtype of ``weight * x``.
    - ``fused_add_rms_norm(x, residual, weight, eps)`` -> ``(normed, x + residual)``.
    - ``rotary(query, key, cos, sin, head_dim)``: neox-style RoPE on ``[tokens, heads * head_dim]``
      with per-token float32 ``cos``/``sin`` of ``[tokens, rotary_dim]``; channels past
      ``rotary_dim`` pass through (see :func:`lmport.layers.rotary.apply_rotary`).
    - ``silu_and_mul(gate_up)``: ``[tokens, 2 * inter]`` -> ``silu(gate) * up``, ``[tokens, inter]``.
    - ``linear(x, weight, bias)``: ``F.linear`` (``weight [out, in]``, ``bias`` may be ``None``); the
      unquantized projections and heads of every family run through it (:class:`~lmport.layers.linear.Linear`),
      so a backend can swap in a skinny GEMM for decode's few rows. The reference is
      ``F.linear``; on a CPU in bfloat16 (:mod:`lmport.layers.prepacked_linear`) up to 32 rows
      run on a once-reordered oneDNN weight (bit-identical), more rows in float32 on a float32
      copy of the weight (the same exact products, summed in another order).
    - ``linear_wq(x, qweight, scales, zeros, bits, group_size, bias)``: weight-only int4/int8
      (GPTQ, AWQ, compressed-tensors W4A16/W8A16, EETQ, bitsandbytes int8 are all repacked to
      its layout at load); ``linear_fp8(x, weight, weight_scale, bias)``: float8 e4m3 weights
      with per-tensor or per-channel scales. Layouts in :mod:`lmport.layers.quant_ops`.
    """

    rms_norm: RmsNormOp = reference_rms_norm
    fused_add_rms_norm: FusedAddRmsNormOp = reference_fused_add_rms_norm
    rotary: RotaryOp = apply_rotary
    silu_and_mul: SiluAndMulOp = reference_silu_and_mul
    linear: LinearOp = prepacked_linear.linear
    linear_wq: LinearWqOp = reference_linear_wq
    linear_fp8: LinearFp8Op = reference_linear_fp8

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **ops: Callable) -> "LayerOps":
        return dataclasses.replace(self, **ops)

    def overridden(self) -> tuple[str, ...]:
        """The ops that are not the core's reference (for logs and ``/info``)."""
        return tuple(name for name in self.names() if getattr(self, name) is not getattr(REFERENCE_OPS, name))


REFERENCE_OPS = LayerOps()


def reference_op_table() -> dict[str, Callable]:
    """The reference ops by name: what the core's ``cpu`` plugin answers ``lmport_layer_ops`` with."""
    return {name: getattr(REFERENCE_OPS, name) for name in LayerOps.names()}


class UsesLayerOps:
    """Mixin for modules that run ops from :class:`LayerOps`; they use the reference until bound."""

    layer_ops: LayerOps = REFERENCE_OPS

    def bind_layer_ops(self, ops: LayerOps) -> None:
        self.layer_ops = ops


def bind_layer_ops(model: nn.Module, ops: LayerOps) -> int:
    """Give every :class:`UsesLayerOps` module of ``model`` the ops; returns how many were bound."""
    bound = 0
    for module in model.modules():
        if isinstance(module, UsesLayerOps):
            module.bind_layer_ops(ops)
            bound += 1
    return bound
