"""The CUDA backend's quantized-linear kernels against float64 references written from the contract.

``linear_wq``: ``w[k, n] = (q[k, n] - zeros[k // group_size, n]) * scales[k // group_size, n]``
with ``q`` packed GPTQ-style (row k in word ``k // (32 // bits)`` at shift ``bits * (k % (32 // bits))``),
``y = x @ w + bias``. ``linear_fp8``: ``y = x @ (weight.float() * weight_scale[:, None]).T + bias``.
The tests pack and dequantize with their own code (plain integer arithmetic) and compare in
float64. On a CPU the kernels run in Triton's interpreter (conftest.py) at small shapes that hit
every branch (ragged N, split K, group sizes down to 16, per-channel); on a GPU the Llama-3-8B
projection shapes too, and the fp8 tensor-core path (``torch._scaled_mm``).
"""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# relative error of the whole output: one rounding to the output dtype plus float32 sums
# (the interpreter truncates float32 -> bf16 instead of rounding: about twice the error)
REL_TOL = {torch.bfloat16: 8e-3, torch.float16: 1.5e-3, torch.float32: 2e-5}


def pack_gptq(q: torch.Tensor, bits: int) -> torch.Tensor:
    """``q [K, N]`` in 0 .. 2**bits - 1 -> int32 ``[K * bits // 32, N]``, GPTQ order."""
    pack = 32 // bits
    k, n = q.shape
    words = torch.zeros(k // pack, n, dtype=torch.int64)
    for i in range(pack):
        words |= q[i::pack].to(torch.int64) << (bits * i)
    words[words >= 2**31] -= 2**32
    return words.to(torch.int32)


def quantized_operands(m, k, n, bits, group_size, dtype, device, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    groups = k // group_size
    q = torch.randint(0, 2**bits, (k, n), generator=gen)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.005).to(dtype)
    zeros = (torch.rand(groups, n, generator=gen) * (2**bits - 1)).to(dtype)  # float zero points, not integers
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    x, q, scales, zeros, b = to(x), to(q), to(scales), to(zeros), to(b)
    # float64 on the device: a GPU computes the Llama-shape references in milliseconds
    ref = x.double() @ reference_weight(q, scales, zeros, group_size) + (b.double() if bias else 0)
    return x, to(pack_gptq(q.cpu(), bits)), scales, zeros, b, ref


def reference_weight(q, scales, zeros, group_size) -> torch.Tensor:
    """The contract's ``w[k, n]`` in float64."""
    return (q.double() - zeros.double().repeat_interleave(group_size, 0)) * scales.double().repeat_interleave(group_size, 0)


def assert_close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, rel: float | None = None) -> None:
    assert y.dtype == dtype and y.shape == ref.shape
    y, ref = y.double(), ref.to(y.device)
    assert bool(torch.isfinite(y).all())
    rel_err = ((y - ref).norm() / ref.norm()).item()
    limit = rel or REL_TOL[dtype] * (1 if HAS_CUDA else 2)
    assert rel_err < limit, f"relative error {rel_err:.2e} >= {limit:.1e}"
    # elementwise too: no column left unwritten or wrong while the norm hides it
    worst = ((y - ref).abs() / (ref.abs() + ref.abs().mean())).max().item()
    assert worst < 20 * limit, f"worst element off by {worst:.2e} of its size"


def wq_configs(block_k_cap: int):
    from lmport_cuda.kernels.wq_gemm import WqConfig

    bk = min(block_k_cap, 32)
    return [
        None,
        WqConfig(block_n=32, block_k=bk, num_stages=1, prefetch=True),
        WqConfig(block_n=16, block_k=16, split_k=3, num_stages=1),
        WqConfig(block_n=64, block_k=bk, split_k=2, num_stages=2, prefetch=True, fused_reduce=True),
        WqConfig(block_n=16, block_k=16, split_k=4, num_stages=1, fused_reduce=True),
    ]


CASES = [  # m, k, n, bits, group_size, dtype
    (1, 128, 40, 4, 32, torch.bfloat16),
    (1, 96, 64, 4, 96, torch.float16),  # per-channel: one group of all of K
    (1, 64, 48, 4, 32, torch.float32),
    (1, 64, 17, 8, 16, torch.bfloat16),
    (1, 256, 48, 8, 128, torch.float32),
]


@pytest.mark.parametrize("m,k,n,bits,group_size,dtype", CASES)
def test_wq_gemv_matches_the_dequantized_reference(device, dtype, m, k, n, bits, group_size):
    from lmport_cuda.kernels.wq_gemm import wq_gemv

    for i, cfg in enumerate(wq_configs(group_size)):
        x, qw, s, z, b, ref = quantized_operands(m, k, n, bits, group_size, dtype, device, bias=i % 2 == 1, seed=i + k)
        assert_close(wq_gemv(x, qw, s, z, bits, group_size, b, cfg), ref, dtype)
        if bits == 4 and dtype != torch.float32:  # the one-shift-per-value path the 16-bit int4 GEMV skips
            assert_close(wq_gemv(x, qw, s, z, bits, group_size, b, cfg, exact=True), ref, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n,bits,group_size", [(3, 128, 40, 4, 32), (17, 64, 24, 8, 64), (33, 96, 72, 4, 32)])
def test_wq_gemm_matches_the_dequantized_reference(device, dtype, m, k, n, bits, group_size):
    from lmport_cuda.kernels.wq_gemm import WqConfig, wq_gemm

    configs = [None, WqConfig(block_m=16, block_n=32, block_k=16, split_k=2, num_stages=1),
               WqConfig(block_m=32, block_n=16, block_k=32, num_stages=2)]  # fmt: skip
    for i, cfg in enumerate(configs):
        x, qw, s, z, b, ref = quantized_operands(m, k, n, bits, group_size, dtype, device, bias=i != 1, seed=i + m)
        assert_close(wq_gemm(x, qw, s, z, bits, group_size, b, cfg), ref, dtype)


@pytest.mark.parametrize("bits", [4, 8])
def test_wq_dequantize_and_the_dispatch_agree_with_the_reference(device, bits, monkeypatch):
    from lmport_cuda.kernels import wq_gemm

    q = torch.randint(0, 2**bits, (64, 40))
    s, z = torch.rand(2, 40) * 0.1, torch.rand(2, 40) * 2**bits
    w = wq_gemm.dequantize(pack_gptq(q, bits).to(device), s.to(device), z.to(device), bits, 32)
    torch.testing.assert_close(w.double().cpu(), reference_weight(q, s, z, 32), rtol=1e-6, atol=1e-6)
    x, qw, s, z, b, ref = quantized_operands(5, 64, 40, bits, 32, torch.float32, device, bias=True, seed=bits)
    assert_close(wq_gemm.wq_dequant_matmul(x, qw, s, z, bits, 32, b), ref, torch.float32)
    calls = []
    for name in ("wq_gemv", "wq_gemm", "wq_dequant_matmul"):
        real = getattr(wq_gemm, name)
        monkeypatch.setattr(wq_gemm, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    monkeypatch.setattr(wq_gemm, "GEMM_MAX_ROWS", 4)  # the fused GEMM is off by default (measured slower)
    for rows in (1, 4, 5):
        xr, qw, s, z, b, ref = quantized_operands(rows, 64, 40, bits, 32, torch.bfloat16, device, bias=True, seed=rows)
        assert_close(wq_gemm.linear_wq(xr, qw, s, z, bits, 32, b), ref, torch.bfloat16)
    assert calls == ["wq_gemv", "wq_gemm", "wq_dequant_matmul"]


def test_wq_supports_only_the_canonical_layout():
    from lmport_cuda.kernels.wq_gemm import supports

    x = torch.zeros(2, 256, dtype=torch.bfloat16)
    qw, s = torch.zeros(32, 48, dtype=torch.int32), torch.zeros(2, 48, dtype=torch.bfloat16)
    assert supports(x, qw, s, 4, 128)
    assert not supports(x, qw, s, 3, 128)  # 3-bit is not a canonical width
    assert not supports(x, qw.t().contiguous().t(), s, 4, 128)  # N must be contiguous
    assert not supports(x, qw[:16], s, 4, 128)  # K disagrees
    assert not supports(torch.zeros(2, 264, dtype=torch.bfloat16), torch.zeros(33, 48, dtype=torch.int32),
                        torch.zeros(11, 48, dtype=torch.bfloat16), 4, 24)  # group not a multiple of 16  # fmt: skip


def fp8_operands(m, n, k, dtype, device, per_channel, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n, k, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    weight_scale = torch.rand(n if per_channel else (), generator=gen) * 1e-3 + 1e-4
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    x, weight, weight_scale, b = x.to(device), weight.to(device), weight_scale.to(device), None if b is None else b.to(device)
    w = weight.double() * (weight_scale.double()[:, None] if per_channel else weight_scale.double())
    ref = x.double() @ w.T + (b.double() if bias else 0)
    return x, weight, weight_scale, b, ref


def test_fp8_bit_conversion_is_exact_for_every_byte(device):
    from lmport_cuda.kernels.fp8_linear import dequantize

    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    finite = ~torch.isnan(every.float())  # 0x7f and 0xff are e4m3fn's NaNs
    out = dequantize(every.reshape(1, 256).to(device), torch.ones((), device=device), torch.float32)
    assert torch.equal(out.cpu()[0][finite], every.float()[finite])


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("m,n,k,dtype", [(1, 40, 256, torch.bfloat16), (1, 33, 96, torch.float16), (3, 24, 128, torch.bfloat16)])
def test_fp8_gemv_matches_the_reference(device, dtype, per_channel, m, n, k):
    from lmport_cuda.kernels.fp8_linear import fp8_gemv
    from lmport_cuda.kernels.gemv import GemvConfig

    native_ok = device.type == "cuda" and torch.cuda.get_device_capability() >= (8, 9)
    for i, cfg in enumerate([None, GemvConfig(8, 64, num_stages=1), GemvConfig(4, 32, split_k=3, num_stages=1)]):
        x, w, ws, b, ref = fp8_operands(m, n, k, dtype, device, per_channel, bias=i != 1, seed=i + n)
        for native in {False, native_ok}:
            assert_close(fp8_gemv(x, w, ws, b, native=native, config=cfg), ref, dtype)


@pytest.mark.parametrize("per_channel", [True, False])
def test_fp8_weight_only_batches_dequantize_then_matmul(device, per_channel):
    from lmport_cuda.kernels.fp8_linear import dequant_linear, linear_fp8

    x, w, ws, b, ref = fp8_operands(6, 40, 96, torch.bfloat16, device, per_channel, bias=True)
    assert_close(dequant_linear(x, w, ws, b), ref, torch.bfloat16)
    # without fp8 matrix units every batch is weight-only
    assert_close(linear_fp8(x, w, ws, b, fp8_compute=False, rowwise=False), ref, torch.bfloat16)
    x1, w, ws, b, ref1 = fp8_operands(1, 40, 96, torch.float16, device, per_channel, bias=False)
    assert_close(linear_fp8(x1, w, ws, b, fp8_compute=False, rowwise=False), ref1, torch.float16)


# ---- on the GPU only --------------------------------------------------------------------------

LLAMA_8B = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # (K, N): qkv, o, gate_up, down


@pytest.mark.parametrize("k,n", LLAMA_8B)
@pytest.mark.parametrize("m", [1, 16, 256, 1100])
def test_linear_wq_at_llama_shapes_on_the_gpu(cuda_device, m, k, n):
    from lmport_cuda.kernels.wq_gemm import linear_wq, wq_dequant_matmul, wq_gemm

    x, qw, s, z, b, ref = quantized_operands(m, k, n, 4, 128, torch.bfloat16, cuda_device, bias=False, seed=n)
    assert_close(linear_wq(x, qw, s, z, 4, 128), ref, torch.bfloat16)
    if m <= 256:  # every path agrees at the sizes where each may be picked
        assert_close(wq_gemm(x, qw, s, z, 4, 128), ref, torch.bfloat16)
        assert_close(wq_dequant_matmul(x, qw, s, z, 4, 128), ref, torch.bfloat16)


@pytest.mark.parametrize("bits,group_size", [(8, 128), (4, 4096), (8, 4096), (4, 32)])
def test_linear_wq_bits_and_groups_on_the_gpu(cuda_device, bits, group_size):
    from lmport_cuda.kernels.wq_gemm import linear_wq

    for m in (1, 8, 300):
        x, qw, s, z, b, ref = quantized_operands(m, 4096, 1024, bits, group_size, torch.float16, cuda_device, bias=True, seed=m)
        assert_close(linear_wq(x, qw, s, z, bits, group_size, b), ref, torch.float16)


def test_per_token_quantization_on_the_gpu(cuda_device):
    from lmport_cuda.kernels.fp8_linear import quantize_rows

    x = torch.randn(7, 5000, device=cuda_device, dtype=torch.bfloat16) * torch.arange(1, 8, device=cuda_device)[:, None]
    x[3] = 0  # an all-zero row keeps a finite scale
    q, scale = quantize_rows(x)
    assert scale.shape == (7, 1) and bool(torch.isfinite(scale).all())
    torch.testing.assert_close(scale[:, 0], x.float().abs().amax(1).clamp(min=1e-12) / 448.0)
    ref = (x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    # the kernel divides in float32 to within 2 ulp: a value at a rounding tie may land one e4m3 step away
    off = q.float() != ref
    assert off.float().mean().item() < 1e-3
    assert bool(((q.float() - ref).abs()[off] <= ref.abs()[off] * 0.125 + 2**-9).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("rowwise", [True, False])
def test_fp8_scaled_mm_on_the_gpu(cuda_device, dtype, per_channel, rowwise):
    from lmport_cuda.kernels.fp8_linear import scaled_mm_linear

    if torch.cuda.get_device_capability() < ((9, 0) if rowwise else (8, 9)):
        pytest.skip("needs fp8 matrix units (row-wise scales: sm_90)")
    for m in (2, 64, 1000):
        x, w, ws, b, ref = fp8_operands(m, 1024, 4096, dtype, cuda_device, per_channel, bias=m != 64, seed=m)
        # x is quantized to e4m3 per token (3 mantissa bits): a few percent, not a rounding
        assert_close(scaled_mm_linear(x, w, ws, b, rowwise=rowwise), ref, dtype, rel=0.05)


@pytest.mark.parametrize("k,n", LLAMA_8B)
def test_fp8_gemv_at_llama_shapes_on_the_gpu(cuda_device, k, n):
    from lmport_cuda.kernels.fp8_linear import linear_fp8

    x, w, ws, b, ref = fp8_operands(1, n, k, torch.bfloat16, cuda_device, True, bias=False, seed=n)
    assert_close(linear_fp8(x, w, ws, b, fp8_compute=True, rowwise=True), ref, torch.bfloat16)


def test_quantized_kernels_are_captured_by_a_cuda_graph(cuda_device):
    from lmport_cuda.kernels.fp8_linear import linear_fp8
    from lmport_cuda.kernels.wq_gemm import linear_wq

    x, qw, s, z, b, _ = quantized_operands(1, 4096, 4096, 4, 128, torch.bfloat16, cuda_device, bias=True)
    xf, w, ws, bf, _ = fp8_operands(16, 4096, 4096, torch.bfloat16, cuda_device, True, bias=True)
    run = lambda: (linear_wq(x, qw, s, z, 4, 128, b), linear_fp8(xf, w, ws, bf, fp8_compute=True, rowwise=True))  # noqa: E731
    expected = run()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, e) for a, e in zip(out, expected))


# ---- the ops the backend binds (layer_ops.py) -------------------------------------------------


def test_bound_ops_route_to_the_kernels_or_the_reference(device, monkeypatch):
    from types import SimpleNamespace

    from lmport.layers.ops import REFERENCE_OPS
    from lmport_cuda import layer_ops
    from lmport_cuda.kernels import wq_gemm

    calls = []
    real_gemv = wq_gemm.wq_gemv
    monkeypatch.setattr(wq_gemm, "wq_gemv", lambda *a, **kw: calls.append("gemv") or real_gemv(*a, **kw))
    ops = layer_ops.quantized_linear_ops(SimpleNamespace(fp8_compute=False), max_rows=1, runs_on=lambda x: True)
    x, qw, s, z, b, ref = quantized_operands(6, 64, 40, 4, 32, torch.bfloat16, device, bias=True)
    y = ops["linear_wq"](x.reshape(2, 3, 64), qw, s, z, 4, 32, b)  # leading dims are flattened and restored
    assert y.shape == (2, 3, 40)
    assert_close(y.reshape(6, 40), ref, torch.bfloat16)
    assert_close(ops["linear_wq"](x[:1], qw, s, z, 4, 32, b), ref[:1], torch.bfloat16)
    assert calls == ["gemv"]
    # the GEMV switch at 0 keeps one row off the GEMV
    off = layer_ops.quantized_linear_ops(None, max_rows=0, runs_on=lambda x: True)
    assert_close(off["linear_wq"](x[:1], qw, s, z, 4, 32, b), ref[:1], torch.bfloat16)
    assert calls == ["gemv"]
    # what the kernels do not take (by default a CPU tensor) is the core's reference, bit for bit
    cpu_ops = layer_ops.quantized_linear_ops(None, max_rows=1)
    xc, qc, sc, zc, bc = (t.cpu() for t in (x, qw, s, z, b))
    assert torch.equal(cpu_ops["linear_wq"](xc, qc, sc, zc, 4, 32, bc), REFERENCE_OPS.linear_wq(xc, qc, sc, zc, 4, 32, bc))
    xf, w, ws, bf, ref8 = fp8_operands(3, 40, 96, torch.bfloat16, device, True, bias=True)
    assert_close(ops["linear_fp8"](xf, w, ws, bf), ref8, torch.bfloat16)
    xfc, wc, wsc, bfc = (t.cpu() for t in (xf, w, ws, bf))
    assert torch.equal(cpu_ops["linear_fp8"](xfc, wc, wsc, bfc), REFERENCE_OPS.linear_fp8(xfc, wc, wsc, bfc))


def test_the_backend_binds_the_quantized_ops(device):
    from lmport_cuda.plugin import lmport_layer_ops

    table = lmport_layer_ops(capabilities=None)
    assert {"linear_wq", "linear_fp8"} <= set(table)


@pytest.mark.parametrize("n,k,group_size,bits", [(6144, 4096, 128, 4), (4096, 14336, 128, 4), (1024, 4096, 32, 4), (4096, 4096, 4096, 8)])
def test_the_tuner_only_times_configs_the_kernel_takes(n, k, group_size, bits):
    from lmport_cuda.kernels.wq_gemm import gemv_candidates, pick_gemv_config

    candidates = gemv_candidates(n, k, group_size, bits)
    assert len(candidates) == len(set(candidates)) >= 5
    for cfg in [pick_gemv_config(n, k, group_size, bits), *candidates]:
        assert group_size % cfg.block_k == 0 and cfg.block_k % (32 // bits) == 0 and k % cfg.block_k == 0
        assert cfg.fused_reduce == (cfg.split_k > 1) or cfg in (pick_gemv_config(n, k, group_size, bits),)
        assert k // cfg.split_k >= cfg.block_k  # every split has a tile
