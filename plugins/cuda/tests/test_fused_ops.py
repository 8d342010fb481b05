"""The CUDA backend's fused layer ops (lmport_layer_ops) against the core's reference ops.

Random inputs at model-like widths; float32 must agree tightly, bf16/fp16 within a few units
of their last place. Residual sums must be bit-exact (both round one float32 add). On a CPU
the kernels run in Triton's interpreter (conftest.py), so the CPU cases stay a few rows long.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lmport.layers.ops import REFERENCE_OPS, LayerOps
from lmport.layers.rotary import RotaryEmbedding

HAS_CUDA = torch.cuda.is_available()
ROWS = 33 if HAS_CUDA else 3
# (rtol, atol) per dtype: reduction order differs, and the fused kernels round once where torch rounds per op
# (the interpreter truncates float32 -> bfloat16, which adds up to two more units over two roundings)
TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-2) if HAS_CUDA else (3.2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def ops(device) -> LayerOps:
    from lmport_cuda.plugin import lmport_layer_ops

    table = lmport_layer_ops(capabilities=None)
    assert set(table) <= set(LayerOps.names())  # what the table leaves out stays the reference
    return LayerOps(**table)


def close(actual: torch.Tensor, expected: torch.Tensor, rounded_to: torch.dtype | None = None) -> None:
    """Within the tolerance of ``rounded_to`` (the narrowest dtype the op rounds through; default the output's)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    rtol, atol = TOLERANCE[rounded_to or expected.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def assert_same_sum(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Both add in float32 and round once: bit-exact on a GPU. Triton's interpreter truncates
    float32 -> bfloat16 instead of rounding to nearest, so there it may be one unit low."""
    if HAS_CUDA or expected.dtype != torch.bfloat16:
        assert torch.equal(actual, expected)
    else:
        ulp = torch.finfo(torch.bfloat16).eps * expected.float().abs()
        assert bool(((actual.float() - expected.float()).abs() <= ulp).all())


def randn(*shape: int, dtype: torch.dtype, device: torch.device, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 80, 2048, 4096, 5120])
def test_rms_norm_matches_the_reference(ops, device, dtype, hidden):
    x = randn(ROWS, hidden, dtype=dtype, device=device, seed=hidden, scale=3.0)
    weight = 1 + randn(hidden, dtype=dtype, device=device, seed=1, scale=0.1)
    before = x.clone()
    close(ops.rms_norm(x, weight, 1e-5), REFERENCE_OPS.rms_norm(x, weight, 1e-5))
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 80, 2048, 4096, 5120])
def test_fused_add_rms_norm_matches_the_reference(ops, device, dtype, hidden):
    x = randn(ROWS, hidden, dtype=dtype, device=device, seed=hidden)
    residual = randn(ROWS, hidden, dtype=dtype, device=device, seed=hidden + 1, scale=4.0)
    weight = 1 + randn(hidden, dtype=dtype, device=device, seed=2, scale=0.1)
    x_before, residual_before = x.clone(), residual.clone()
    normed, summed = ops.fused_add_rms_norm(x, residual, weight, 1e-6)
    ref_normed, ref_summed = REFERENCE_OPS.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert_same_sum(summed, ref_summed)
    close(normed, ref_normed)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)  # functional


def test_rms_norm_takes_strided_rows_3d_input_and_a_float32_weight(ops, device):
    wide = randn(ROWS, 2, 96, dtype=torch.bfloat16, device=device, seed=5)
    x = wide[:, 1]  # rows 192 elements apart
    weight = 1 + randn(96, dtype=torch.float32, device=device, seed=6, scale=0.1)
    out = ops.rms_norm(x, weight, 1e-6)
    assert out.dtype == torch.float32  # promoted as weight * x is
    close(out, REFERENCE_OPS.rms_norm(x, weight, 1e-6), rounded_to=torch.bfloat16)  # normed, then cast back
    x3 = randn(2, 2, 64, dtype=torch.float32, device=device, seed=7)
    close(ops.rms_norm(x3, weight[:64], 1e-6), REFERENCE_OPS.rms_norm(x3, weight[:64], 1e-6))


def rope_cos_sin(head_dim: int, rotary_dim: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin as the model computes them (llama3-scaled frequencies, so halves are not trivially equal)."""
    config = SimpleNamespace(rope_theta=500000.0, max_position_embeddings=8192, rope_scaling=None)
    rope = RotaryEmbedding(config, head_dim, rotary_dim)
    return rope.cos_sin(positions)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, rotary_dim",
    [(4, 2, 64, 64), (4, 1, 128, 128), (3, 3, 80, 32), (4, 2, 128, 64), (2, 2, 96, 96)],
    ids=["d64", "d128-mqa", "phi-partial-32-of-80", "partial-64-of-128", "d96"],
)
def test_rotary_matches_the_reference_on_fused_qkv_views(ops, device, dtype, heads, kv_heads, head_dim, rotary_dim):
    tokens = ROWS + 2
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = randn(tokens, q_size + 2 * kv_size, dtype=dtype, device=device, seed=head_dim + rotary_dim)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)  # strided views, as the model passes them
    positions = torch.tensor([0, 1, 7, 4095, 100000][:tokens] + [3] * max(0, tokens - 5), device=device)
    cos, sin = rope_cos_sin(head_dim, rotary_dim, positions)
    before = qkv.clone()
    q_out, k_out = ops.rotary(q, k, cos, sin, head_dim)
    q_ref, k_ref = REFERENCE_OPS.rotary(q, k, cos, sin, head_dim)
    close(q_out, q_ref)
    close(k_out, k_ref)
    assert torch.equal(qkv, before)
    # pass-through channels of a partial rotary are copied exactly
    keep = q_out.view(tokens, heads, head_dim)[..., rotary_dim:]
    assert torch.equal(keep, q.reshape(tokens, heads, head_dim)[..., rotary_dim:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [64, 80, 1000, 2048, 5120])
def test_silu_and_mul_matches_the_reference(ops, device, dtype, inter):
    gate_up = randn(ROWS, 2 * inter, dtype=dtype, device=device, seed=inter, scale=4.0)
    gate_up[0, :4] = torch.tensor([-100.0, -20.0, 0.0, 30.0], dtype=dtype)  # exp overflow and the flat ends
    before = gate_up.clone()
    close(ops.silu_and_mul(gate_up), REFERENCE_OPS.silu_and_mul(gate_up))
    assert torch.equal(gate_up, before)


def test_empty_batches_launch_nothing(ops, device):
    weight = torch.ones(64, device=device)
    assert ops.rms_norm(torch.empty(0, 64, device=device), weight, 1e-6).shape == (0, 64)
    assert ops.silu_and_mul(torch.empty(0, 128, device=device)).shape == (0, 64)
    cos = sin = torch.empty(0, 64, device=device)
    q, k = ops.rotary(torch.empty(0, 128, device=device), torch.empty(0, 64, device=device), cos, sin, 64)
    assert q.shape == (0, 128) and k.shape == (0, 64)


def test_fused_ops_are_captured_and_replayed_in_a_cuda_graph(cuda_device):
    from lmport_cuda.plugin import lmport_layer_ops

    ops = LayerOps(**lmport_layer_ops(capabilities=None))
    hidden, heads, head_dim, inter = 2048, 32, 64, 8192
    x = randn(8, hidden, dtype=torch.bfloat16, device=cuda_device, seed=0)
    residual = randn(8, hidden, dtype=torch.bfloat16, device=cuda_device, seed=1)
    weight = torch.ones(hidden, dtype=torch.bfloat16, device=cuda_device)
    qkv = randn(8, (heads + 16) * head_dim, dtype=torch.bfloat16, device=cuda_device, seed=2)
    cos, sin = rope_cos_sin(head_dim, head_dim, torch.arange(8, device=cuda_device))
    gate_up = randn(8, 2 * inter, dtype=torch.bfloat16, device=cuda_device, seed=3)

    def step():
        normed, summed = ops.fused_add_rms_norm(x, residual, weight, 1e-5)
        q, k, _ = qkv.split([heads * head_dim, 8 * head_dim, 8 * head_dim], dim=-1)
        q, k = ops.rotary(q, k, cos, sin, head_dim)
        return normed, summed, q, k, ops.silu_and_mul(gate_up)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    x.copy_(randn(8, hidden, dtype=torch.bfloat16, device=cuda_device, seed=9))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outputs, step()):
        assert torch.equal(got, want)


def test_a_tiny_llama_with_the_fused_ops_bound_generates_the_reference_tokens(ops, device, tmp_path):
    from lmport.layers.ops import bind_layer_ops
    from lmport.models.loader import build_native_model, resolve_model_info
    from lmport.plugins import PluginHost
    from lmport.testing.fake_machine import FakeMachine
    from lmport.testing.model_driver import greedy_generate
    from lmport.testing.tiny_models import make_checkpoint

    make_checkpoint("llama", tmp_path)
    host = PluginHost(environ={}, load_entry_points=False, detection_env=FakeMachine.bare())
    host.select_backend()
    model = build_native_model(resolve_model_info(tmp_path), host, torch.float32, device)
    prompts = [[5, 9, 17, 3, 44, 12], [7, 8]]
    reference = greedy_generate(model, prompts, 4, device=device)
    assert bind_layer_ops(model, ops) > 0
    assert greedy_generate(model, prompts, 4, device=device) == reference


def test_the_fused_kernels_compile_for_hopper():
    """Triton's compiler (not only the interpreter) accepts every launch at model shapes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton", reason="triton is not installed")
    if HAS_CUDA:
        pytest.skip("a GPU is here: the other tests compile every launch for real")
    script = Path(__file__).with_name("compile_fused_ops_for_sm90.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(script)], cwd=script.parent, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") == 25, result.stdout
