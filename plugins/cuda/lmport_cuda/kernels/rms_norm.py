"""RMSNorm, optionally with the residual add before it, one program per token row (Triton).

Computes what :func:`lmport.layers.ops.reference_rms_norm` does, in one pass over the row:
the sum ``x + residual`` is rounded to the model dtype (as an unfused add is) and stored as
the new residual, the statistics are float32, the normed row is cast back to the input dtype
before the weight multiplies it. Outputs are new tensors (the ops are functional: the caller
may still read its inputs), which costs nothing extra in memory traffic. The grid depends
only on the number of rows and nothing is read on the host, so a CUDA graph can capture it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Above this the row no longer fits one program's registers; the caller uses the reference.
MAX_FUSED_HIDDEN = 32768


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    stride_x,
    stride_residual,
    stride_out,
    stride_residual_out,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_residual_out + cols, x, mask=mask)
    h = x.to(tl.float32)
    mean_square = tl.sum(h * h, axis=0) / hidden
    normed = (h * tl.rsqrt(mean_square + eps)).to(x.dtype)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = normed.to(tl.float32) * weight.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_launch_config(hidden: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` for a row of ``hidden``: about 16 elements a thread, 1 to 16 warps."""
    block = triton.next_power_of_2(hidden)
    return block, min(16, max(1, block // 512))


def _rows(x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    x2 = _rows(x)
    normed_dtype = x.dtype
    residual2 = residual_out = None
    if residual is not None:
        residual2 = _rows(residual)
        normed_dtype = torch.promote_types(x.dtype, residual.dtype)
        residual_out = torch.empty(x2.shape, dtype=normed_dtype, device=x.device)
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, normed_dtype), device=x.device)
    if x2.shape[0] > 0:
        block, num_warps = rms_norm_launch_config(hidden)
        has_residual = residual2 is not None
        _rms_norm_kernel[(x2.shape[0],)](
            x2,
            residual2 if has_residual else x2,
            weight,
            out,
            residual_out if has_residual else out,
            x2.stride(0),
            residual2.stride(0) if has_residual else 0,
            out.stride(0),
            residual_out.stride(0) if has_residual else 0,
            hidden,
            float(eps),
            HAS_RESIDUAL=has_residual,
            BLOCK=block,
            num_warps=num_warps,
        )
    shape = x.shape
    return out.view(shape), None if residual_out is None else residual_out.view(shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * rms_normalise(x)``; ``x [..., hidden]``, ``weight [hidden]``."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)`` in one kernel."""
    out, new_residual = _launch(x, residual, weight, eps)
    assert new_residual is not None
    return out, new_residual
