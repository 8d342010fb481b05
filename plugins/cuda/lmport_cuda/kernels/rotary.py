"""Rotary position embedding (neox / rotate-half style) on queries and keys in one launch (Triton).

Computes what :func:`lmport.layers.rotary.apply_rotary` does: the first ``rotary_dim``
channels of each head rotate by the per-token ``cos``/``sin`` rows (``[tokens, rotary_dim]``,
float32, rounded to the activations' dtype first as the reference and transformers do), the
rest pass through. One program per token rotates all its query and key heads, so cos/sin are
read once per token. Inputs may be the strided q/k views of a fused qkv output; outputs are
new contiguous tensors. Shapes only, no host reads: CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    src_ptr,
    dst_ptr,
    stride_src,
    stride_dst,
    c1,
    c2,
    s1,
    s2,
    NUM_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr,
    PASS_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = ROTARY_DIM // 2
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HALF_PAD)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HALF)
    src = src_ptr + token * stride_src + heads * HEAD_DIM
    dst = dst_ptr + token * stride_dst + heads * HEAD_DIM
    x1 = tl.load(src + dims, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + dims, mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * c1 - x2 * s1
    out2 = x2 * c2 + x1 * s2
    tl.store(dst + dims, out1.to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF + dims, out2.to(dst_ptr.dtype.element_ty), mask=mask)
    if ROTARY_DIM < HEAD_DIM:  # partial rotary: the other channels are copied
        rest = ROTARY_DIM + tl.arange(0, PASS_PAD)[None, :]
        rest_mask = (heads < NUM_HEADS) & (rest < HEAD_DIM)
        tl.store(dst + rest, tl.load(src + rest, mask=rest_mask, other=0.0), mask=rest_mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_out_ptr,
    stride_q,
    stride_k,
    stride_cos,
    stride_sin,
    stride_q_out,
    stride_k_out,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    K_HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr,
    PASS_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = ROTARY_DIM // 2
    dims = tl.arange(0, HALF_PAD)[None, :]
    mask = dims < HALF
    act = q_out_ptr.dtype.element_ty
    # cos/sin rounded to the activations' dtype first, as the reference (and transformers) do
    c1 = tl.load(cos_ptr + token * stride_cos + dims, mask=mask, other=0.0).to(act).to(tl.float32)
    c2 = tl.load(cos_ptr + token * stride_cos + HALF + dims, mask=mask, other=0.0).to(act).to(tl.float32)
    s1 = tl.load(sin_ptr + token * stride_sin + dims, mask=mask, other=0.0).to(act).to(tl.float32)
    s2 = tl.load(sin_ptr + token * stride_sin + HALF + dims, mask=mask, other=0.0).to(act).to(tl.float32)
    _rotate_heads(q_ptr, q_out_ptr, stride_q, stride_q_out, c1, c2, s1, s2,
                  NUM_Q_HEADS, Q_HEADS_PAD, HEAD_DIM, ROTARY_DIM, HALF_PAD, PASS_PAD)  # fmt: skip
    _rotate_heads(k_ptr, k_out_ptr, stride_k, stride_k_out, c1, c2, s1, s2,
                  NUM_K_HEADS, K_HEADS_PAD, HEAD_DIM, ROTARY_DIM, HALF_PAD, PASS_PAD)  # fmt: skip


def rotary_constexprs(num_q_heads: int, num_k_heads: int, head_dim: int, rotary_dim: int) -> dict[str, int]:
    return dict(
        NUM_Q_HEADS=num_q_heads,
        NUM_K_HEADS=num_k_heads,
        Q_HEADS_PAD=triton.next_power_of_2(num_q_heads),
        K_HEADS_PAD=triton.next_power_of_2(num_k_heads),
        HEAD_DIM=head_dim,
        ROTARY_DIM=rotary_dim,
        HALF_PAD=triton.next_power_of_2(max(rotary_dim // 2, 1)),
        PASS_PAD=triton.next_power_of_2(max(head_dim - rotary_dim, 1)),
    )


def rotary_num_warps(num_q_heads: int, head_dim: int) -> int:
    """About 8 query elements a thread: 1 warp for a few small heads, up to 8 for many large ones."""
    return min(8, max(1, triton.next_power_of_2(num_q_heads) * head_dim // 256))


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def apply_rotary(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``[tokens, heads * head_dim]`` queries and keys by per-token ``cos``/``sin`` ``[tokens, rotary_dim]``."""
    tokens, rotary_dim = query.shape[0], cos.shape[-1]
    if rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim {rotary_dim} must be even and at most head_dim {head_dim}")
    query, key, cos, sin = (_token_rows(t) for t in (query, key, cos, sin))
    q_out = torch.empty((tokens, query.shape[1]), dtype=query.dtype, device=query.device)
    k_out = torch.empty((tokens, key.shape[1]), dtype=key.dtype, device=key.device)
    if tokens == 0:
        return q_out, k_out
    num_q_heads, num_k_heads = query.shape[1] // head_dim, key.shape[1] // head_dim
    _rotary_kernel[(tokens,)](
        query, key, cos, sin, q_out, k_out,
        query.stride(0), key.stride(0), cos.stride(0), sin.stride(0), q_out.stride(0), k_out.stride(0),
        **rotary_constexprs(num_q_heads, num_k_heads, head_dim, rotary_dim),
        num_warps=rotary_num_warps(num_q_heads, head_dim),
    )  # fmt: skip
    return q_out, k_out
