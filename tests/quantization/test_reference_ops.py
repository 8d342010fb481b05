"""The reference quantized matmuls (``LayerOps.linear_wq``, ``linear_fp8``) against a plain
dequantize-then-matmul written out here, for every bit width, group size and dtype of the contract."""

from __future__ import annotations

import pytest
import torch

from lmport.layers.quant_ops import pack_int_rows, reference_linear_fp8, reference_linear_wq, unpack_int_rows


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_puts_row_k_in_word_k_over_per_word_at_its_shift(bits):
    values = torch.randint(0, 1 << bits, (64, 5))
    packed = pack_int_rows(values, bits)
    per_word = 32 // bits
    k, n = 37, 3
    word = int(packed[k // per_word, n]) & 0xFFFFFFFF
    assert (word >> (bits * (k % per_word))) & ((1 << bits) - 1) == values[k, n]
    assert torch.equal(unpack_int_rows(packed, bits), values.to(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits, group_size", [(4, 32), (4, 128), (8, 64), (4, 256), (8, 256)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_wq_is_dequantize_then_matmul(dtype, bits, group_size, bias):
    gen = torch.Generator().manual_seed(bits * group_size)
    k, n, m = 256, 48, 5
    q = torch.randint(0, 1 << bits, (k, n), generator=gen)
    scales = (torch.rand(k // group_size, n, generator=gen) * 0.02 + 0.001).to(dtype)
    zeros = torch.randint(0, 1 << bits, (k // group_size, n), generator=gen).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    w = torch.empty(k, n, dtype=torch.float64)
    for row in range(k):
        g = row // group_size
        w[row] = (q[row].double() - zeros[g].double()) * scales[g].double()
    want = x.double() @ w + (b.double() if bias else 0)
    got = reference_linear_wq(x, pack_int_rows(q, bits), scales, zeros, bits, group_size, b)
    assert got.dtype == dtype and got.shape == (m, n)
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    torch.testing.assert_close(got.double(), want, atol=tol * want.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_channel", [False, True])
def test_linear_fp8_is_dequantize_then_matmul(dtype, per_channel):
    gen = torch.Generator().manual_seed(7)
    n, k = 40, 96
    weight = (torch.randn(n, k, generator=gen) * 100).to(torch.float8_e4m3fn)
    scale = torch.rand(n, generator=gen) * 0.01 if per_channel else torch.tensor(0.004)
    x = torch.randn(3, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    w = weight.double() * (scale.double()[:, None] if per_channel else scale.double())
    want = x.double() @ w.t() + b.double()
    got = reference_linear_fp8(x, weight, scale, b)
    assert got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), want, atol=tol * want.abs().max().item(), rtol=tol)
