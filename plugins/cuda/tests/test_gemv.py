"""The Triton GEMV (``y = x @ W.T + b`` for 1..16 rows) against a float32 torch reference.

On a CPU it runs in Triton's interpreter (conftest.py) at small shapes chosen to hit every
branch: N and K off the block sizes, split-K, both kernels (fma and dot), bias or not. On a
GPU it also runs the Llama-3 shapes against ``F.linear``. Tolerance: one bf16/fp16 rounding
of the output (the interpreter truncates instead of rounding: up to two units there).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

HAS_CUDA = torch.cuda.is_available()
ULPS = 1 if HAS_CUDA else 2


def operands(m, n, k, dtype, device, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    w = (torch.randn(n, k, generator=gen) * k**-0.5).to(dtype).to(device)
    b = torch.randn(n, generator=gen).to(dtype).to(device) if bias else None
    return x, w, b


def assert_one_rounding(y: torch.Tensor, x, w, b, slack: float = 1e-3) -> None:
    """Within ``ULPS`` units of the float32 result (+ float32 summation-order slack)."""
    ref = x.float() @ w.float().T + (b.float() if b is not None else 0)
    assert y.shape == ref.shape and y.dtype == x.dtype
    err = (y.float() - ref).abs()
    bound = ULPS * torch.finfo(x.dtype).eps * ref.abs() + slack
    assert bool((err <= bound).all()), f"max error {err.max().item()} (max |ref| {ref.abs().max().item()})"


def configs():
    from lmport_cuda.kernels.gemv import GemvConfig

    return [
        None,  # the rule
        GemvConfig(8, 64, num_stages=1),
        GemvConfig(4, 32, split_k=3, num_stages=1),
        GemvConfig(16, 32, num_stages=2, use_dot=True),
        GemvConfig(16, 64, split_k=2, num_stages=2, use_dot=True),
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m,n,k", [(1, 37, 200), (2, 64, 256), (3, 24, 96), (5, 40, 128), (8, 17, 64), (16, 33, 160)])
def test_gemv_matches_a_float32_reference(device, dtype, bias, m, n, k):
    from lmport_cuda.kernels.gemv import gemv

    x, w, b = operands(m, n, k, dtype, device, bias, seed=m * 1000 + n + k)
    for cfg in configs():
        assert_one_rounding(gemv(x, w, b, cfg), x, w, b)


def test_gemv_reads_strided_rows_and_leaves_inputs_alone(device):
    from lmport_cuda.kernels.gemv import gemv

    big, w, b = operands(4, 48, 2 * 128, torch.bfloat16, device, True)
    x = big[:, :128]  # row stride 256
    w = w[:, :128].contiguous()
    before = x.clone()
    assert_one_rounding(gemv(x, w, b), x, w, b)
    assert torch.equal(x, before)


def test_supports_only_what_the_kernel_takes():
    from lmport_cuda.kernels.gemv import supports

    x, w = torch.zeros(2, 64, dtype=torch.bfloat16), torch.zeros(32, 64, dtype=torch.bfloat16)
    assert supports(x, w, None) and supports(x, w, torch.zeros(32, dtype=torch.bfloat16))
    assert not supports(x.float(), w.float(), None)  # float32 stays with cuBLAS
    assert not supports(x, w.half(), None)
    assert not supports(torch.zeros(17, 64, dtype=torch.bfloat16), w, None)
    assert not supports(x, w.t().contiguous().t(), None)  # column-major weight
    assert not supports(x[None], w, None)


def test_the_linear_op_routes_by_rows_and_the_env_switch(device, monkeypatch):
    from lmport_cuda import layer_ops
    from lmport_cuda.kernels import gemv

    assert layer_ops.gemv_max_rows({}) == layer_ops.DEFAULT_GEMV_MAX_ROWS == 1
    assert layer_ops.gemv_max_rows({"LMPORT_CUDA_GEMV_MAX_ROWS": "0"}) == 0
    assert layer_ops.gemv_max_rows({"LMPORT_CUDA_GEMV_MAX_ROWS": "64"}) == gemv.MAX_ROWS
    assert layer_ops.gemv_max_rows({"LMPORT_CUDA_GEMV_MAX_ROWS": "x"}) == layer_ops.DEFAULT_GEMV_MAX_ROWS
    calls = []
    monkeypatch.setattr(gemv, "gemv", lambda *a: calls.append(a[0].shape[0]) or F.linear(*a))
    op = layer_ops.gemv_linear_op(4, runs_on=lambda x: True)
    for rows in (1, 4, 5):
        x, w, b = operands(rows, 16, 32, torch.bfloat16, device, True)
        assert torch.equal(op(x, w, b), F.linear(x, w, b))
    assert calls == [1, 4]
    monkeypatch.setenv("LMPORT_CUDA_GEMV_MAX_ROWS", "0")
    from lmport.layers.ops import REFERENCE_OPS
    from lmport_cuda.plugin import lmport_layer_ops

    assert lmport_layer_ops(capabilities=None)["linear"] is REFERENCE_OPS.linear  # GEMV off: the core's linear


LLAMA_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096), (3072, 2048), (2048, 8192)]


@pytest.mark.parametrize("n,k", LLAMA_SHAPES)
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16])
def test_gemv_on_the_gpu_matches_cublas_at_llama_shapes(cuda_device, m, n, k):
    from lmport_cuda.kernels.gemv import gemv

    x, w, _ = operands(m, n, k, torch.bfloat16, cuda_device, False, seed=n)
    y = gemv(x, w)
    assert_one_rounding(y, x, w, None)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1.6e-2, atol=1e-2)


def test_gemv_is_captured_by_a_cuda_graph(cuda_device):
    from lmport_cuda.kernels.gemv import gemv

    x, w, b = operands(2, 4096, 4096, torch.bfloat16, cuda_device, True)
    expected = gemv(x, w, b)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        gemv(x, w, b)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gemv(x, w, b)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, expected)
