"""Reference kernels of the quantized linear ops (``LayerOps.linear_wq``, ``LayerOps.linear_fp8``).

Plain torch, on any device: the CPU backend runs them, CI tests them, and a backend's fast
kernels are checked against them. Both dequantize the whole weight and call ``F.linear`` on
it, in ``x``'s dtype, which is what a transformers model holding the dequantized weights
computes (the tests' oracle).

Layouts (the contract with backend kernels, see docs/hooks.md):

- ``linear_wq(x, qweight, scales, zeros, bits, group_size, bias)``: weight-only integers.
  ``x [M, K]``; ``qweight`` int32 ``[K * bits // 32, N]`` packed along K in GPTQ order (row
  ``k`` sits in word ``k // (32 // bits)`` at bit ``bits * (k % (32 // bits))``); ``scales``
  and ``zeros`` ``[K // group_size, N]`` in ``x.dtype`` (float zero points);
  ``w[k, n] = (q[k, n] - zeros[k // group_size, n]) * scales[k // group_size, n]``;
  ``y = x @ w + bias``. Every integer format is repacked into this at load.
- ``linear_fp8(x, weight, weight_scale, bias)``: ``weight`` float8_e4m3fn ``[N, K]``,
  ``weight_scale`` float32 ``[]`` or ``[N]``; ``y = x @ (weight.float() * weight_scale[:, None]).T + bias``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn import functional as F


def unpack_int_rows(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[K * bits // 32, N]`` (GPTQ order) -> int32 ``[K, N]`` of values in ``[0, 2**bits)``."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, device=qweight.device, dtype=torch.int32)
    values = (qweight.unsqueeze(1) >> shifts.view(1, per_word, 1)) & ((1 << bits) - 1)
    return values.reshape(qweight.shape[0] * per_word, qweight.shape[1])


def pack_int_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of :func:`unpack_int_rows`: ``[K, N]`` ints in ``[0, 2**bits)`` -> int32 ``[K * bits // 32, N]``."""
    per_word = 32 // bits
    rows, cols = values.shape
    if rows % per_word:
        raise ValueError(f"{rows} rows do not pack into int32 words of {per_word} values")
    grouped = values.to(torch.int64).reshape(rows // per_word, per_word, cols)
    shifts = torch.arange(0, 32, bits, device=values.device, dtype=torch.int64).view(1, per_word, 1)
    packed = (grouped << shifts).sum(dim=1)
    return (packed - ((packed >> 31) << 32)).to(torch.int32)  # wrap into int32's range


def dequantize_wq(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The float weight ``[N, K]`` (nn.Linear's layout) of ``linear_wq``'s operands, in ``scales.dtype``."""
    q = unpack_int_rows(qweight, bits)  # [K, N]
    groups = torch.arange(q.shape[0], device=q.device) // group_size
    w = (q.to(scales.dtype) - zeros[groups]) * scales[groups]
    return w.t().contiguous()


def reference_linear_wq(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x @ dequant(qweight).T + bias`` (see the module docstring for the layout)."""
    return F.linear(x, dequantize_wq(qweight, scales.to(x.dtype), zeros.to(x.dtype), bits, group_size), bias)


def dequantize_fp8(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """float32 ``[N, K]``: ``weight * weight_scale`` per tensor (``[]``) or per output row (``[N]``)."""
    scale = weight_scale.float()
    return weight.float() * (scale if scale.dim() == 0 else scale[:, None])


def reference_linear_fp8(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ (weight * weight_scale).T + bias`` with the dequantized weight in ``x``'s dtype."""
    return F.linear(x, dequantize_fp8(weight, weight_scale).to(x.dtype), bias)


# (x, qweight, scales, zeros, bits, group_size, bias) -> y
LinearWqOp = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int, "torch.Tensor | None"], torch.Tensor
]
# (x, weight, weight_scale, bias) -> y
LinearFp8Op = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
