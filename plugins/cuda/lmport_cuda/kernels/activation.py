"""SiLU(gate) * up over a fused gate_up projection output, in one pass (Triton).

Computes what :func:`lmport.layers.ops.reference_silu_and_mul` does: SiLU in float32
(``x / (1 + exp(-x))``, torch's formula) rounded to the activations' dtype, then the product
with ``up`` rounded once. Grid: one row of programs per token, ``BLOCK`` columns each; shapes
only, no host reads, so a CUDA graph can capture it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr,
    out_ptr,
    stride_gate_up,
    stride_out,
    inter,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(gate_up_ptr + row * stride_gate_up + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_gate_up + inter + cols, mask=mask, other=0.0)
    silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    out = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``[..., 2 * inter]`` -> ``silu(gate_up[..., :inter]) * gate_up[..., inter:]``."""
    inter = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, gate_up.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((rows.shape[0], inter), dtype=gate_up.dtype, device=gate_up.device)
    if rows.shape[0] > 0 and inter > 0:
        grid = (rows.shape[0], triton.cdiv(inter, BLOCK))
        _silu_and_mul_kernel[grid](rows, out, rows.stride(0), out.stride(0), inter, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out.view(*gate_up.shape[:-1], inter)
