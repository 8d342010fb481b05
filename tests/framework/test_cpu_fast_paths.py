"""The CPU backend's speed paths compute what the plain ones did: the bfloat16 linear (bit-identical
to ``F.linear`` up to 32 rows, equal up to the order of the sums beyond) and the engine's thread count."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from lmport.backends.cpu.plugin import engine_threads
from lmport.layers import prepacked_linear
from lmport.layers.linear import Linear

needs_onednn = pytest.mark.skipif(not prepacked_linear._AVAILABLE, reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 5, 32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_prepacked_bf16_linear_is_bit_identical_to_f_linear(rows, with_bias):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(72, 48, generator=gen).to(torch.bfloat16)
    bias = torch.randn(72, generator=gen).to(torch.bfloat16) if with_bias else None
    x = torch.randn(rows, 96, generator=gen).to(torch.bfloat16)[:, ::2]  # not contiguous
    with torch.inference_mode():
        assert torch.equal(prepacked_linear.linear(x, weight, bias), F.linear(x, weight, bias))
    assert prepacked_linear.PACKED_ATTR in weight.__dict__


@needs_onednn
def test_more_rows_run_in_float32_and_round_once():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(40, 64, generator=gen).to(torch.bfloat16)
    bias = torch.randn(40, generator=gen).to(torch.bfloat16)
    x = torch.randn(33, 64, generator=gen).to(torch.bfloat16)
    with torch.inference_mode():
        out = prepacked_linear.linear(x, weight, bias)
    assert out.dtype == torch.bfloat16 and prepacked_linear.FLOAT32_ATTR in weight.__dict__
    exact = F.linear(x.double(), weight.double(), bias.double())
    torch.testing.assert_close(out.double(), exact, rtol=2**-8, atol=1e-6)  # one bfloat16 rounding
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=2**-7, atol=1e-2)


@needs_onednn
def test_the_packed_copy_is_reused_and_follows_the_weight():
    layer = Linear(16, 24).to(torch.bfloat16)
    layer.weight.data.normal_()
    x = torch.randn(3, 16).to(torch.bfloat16)
    with torch.inference_mode():
        layer(x)
        packed = prepacked_linear.packed_weight(layer.weight)
        layer(x)
        assert prepacked_linear.packed_weight(layer.weight) is packed
    layer.begin_loading()  # a reload writes into .data, which bumps no version: the copy is dropped
    assert prepacked_linear.PACKED_ATTR not in layer.weight.__dict__
    layer.weight.data.mul_(2)
    with torch.inference_mode():
        assert torch.equal(layer(x), F.linear(x, layer.weight))


def test_other_dtypes_and_grad_mode_run_plain_f_linear():
    weight = torch.randn(8, 4)
    x = torch.randn(2, 4)
    assert torch.equal(prepacked_linear.linear(x, weight), F.linear(x, weight))
    assert prepacked_linear.PACKED_ATTR not in weight.__dict__
    trained = torch.randn(8, 4, dtype=torch.bfloat16, requires_grad=True)
    prepacked_linear.linear(x.bfloat16(), trained).sum().backward()
    assert trained.grad is not None and prepacked_linear.PACKED_ATTR not in trained.__dict__


@pytest.mark.parametrize(("cpus", "threads"), [(1, 1), (2, 1), (4, 3), (64, 63)])
def test_on_a_busy_machine_the_cpu_engine_leaves_one_core_to_the_server(cpus, threads):
    assert engine_threads({}, cpus, load=float(cpus)) == threads


def test_on_a_quiet_machine_it_takes_torchs_default_and_omp_num_threads_is_left_to_torch():
    assert engine_threads({}, 2, load=0.5) is None
    assert engine_threads({"OMP_NUM_THREADS": "2"}, 8, load=10.0) is None
