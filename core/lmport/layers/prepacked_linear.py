"""``F.linear`` for bfloat16 weights on a CPU, each row count on the kernel that is fastest for it.

On a CPU, torch runs a bfloat16 ``F.linear`` as a oneDNN (brgemm) matmul that reads the
weight in its plain ``[out, in]`` layout and reorders it on every call. Measured on the 2-core
AVX512-BF16 dev box (one thread, Gemma-3-270M's shapes):

- **up to** :data:`PACKED_MAX_ROWS` **rows** (decode): the weight reordered once
  (``torch.ops.mkldnn._reorder_linear_weight``, what inductor's CPU freezing does) and
  ``_linear_pointwise`` on that copy: bit-identical to ``F.linear``, 1.45x faster for the
  262k-row LM head at one row, 1.2-2x for the layer projections at 1-16 rows;
- **more rows** (prefill): this CPU's bfloat16 GEMM peaks at ~85 GFLOP/s, MKL's float32 GEMM at
  ~125, so the rows are multiplied in float32 by a float32 copy of the weight and rounded back to
  bfloat16 once: 1.6-1.75x faster at 64-2048 rows. A product of two bfloat16 numbers is exact in
  float32 and both kernels accumulate in float32, so the results equal ``F.linear``'s up to the
  order of the sums.

Other dtypes, devices, or grad mode run plain ``F.linear``. The copies are kept on the weight
tensor itself (``weight.__dict__``), keyed by its storage and version, so a tied LM head shares
its embedding's and they go with the weight; :meth:`lmport.layers.linear.Linear.begin_loading`
drops them before a reload. They cost RAM: the packed copy one more bfloat16 weight, the float32
copy (made only for a weight that sees more than :data:`PACKED_MAX_ROWS` rows, and only while
the free memory is over four times its size) two more.
"""

from __future__ import annotations

import os

import torch
from torch.nn import functional as F

PACKED_ATTR = "_lmport_onednn_packed"
FLOAT32_ATTR = "_lmport_float32_copy"
PACKED_MAX_ROWS = 32  # measured crossover: at 32 rows both kernels take the same time


def _can_pack() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


_AVAILABLE = _can_pack()


def _cached(weight: torch.Tensor, attr: str, make) -> torch.Tensor:
    key = (weight.data_ptr(), weight._version)
    cached = weight.__dict__.get(attr)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        copy = make(weight.detach())
    weight.__dict__[attr] = (key, copy)
    return copy


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """The oneDNN-reordered copy of ``weight`` (made on first use, again if the weight changed)."""
    return _cached(weight, PACKED_ATTR, lambda w: torch.ops.mkldnn._reorder_linear_weight(w, 16))  # any row count runs


def _float32_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` in float32 (cached like :func:`packed_weight`), or None while memory is short."""
    cached = weight.__dict__.get(FLOAT32_ATTR)
    if cached is None and not _memory_for(4 * weight.numel() * 4):
        return None
    return _cached(weight, FLOAT32_ATTR, lambda w: w.float())


def _memory_for(nbytes: int) -> bool:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") > nbytes
    except (AttributeError, ValueError, OSError):
        return False


def forget_packed(weight: torch.Tensor | None) -> None:
    """Drop ``weight``'s copies (before its data is replaced in place)."""
    if weight is not None:
        weight.__dict__.pop(PACKED_ATTR, None)
        weight.__dict__.pop(FLOAT32_ATTR, None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; on a CPU in bfloat16 through the kernel for its row count (see the module doc)."""
    if (
        _AVAILABLE
        and weight.dtype == torch.bfloat16
        and x.dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and x.device.type == "cpu"
        and weight.dim() == 2
        and (bias is None or bias.dtype == torch.bfloat16)
        and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
    ):
        if x.numel() > PACKED_MAX_ROWS * x.shape[-1]:
            full = _float32_weight(weight)
            if full is not None:
                return F.linear(x.float(), full, None if bias is None else bias.float()).to(torch.bfloat16)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed_weight(weight), bias, "none", [], "")
    return F.linear(x, weight, bias)
