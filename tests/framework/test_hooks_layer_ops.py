"""lmport_layer_ops: the reference ops compute what the layers always computed, a backend's
ops override the reference through the host, and build_native_model binds them into the model."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lmport import hookimpl
from lmport.capabilities import BackendInfo, Capabilities
from lmport.layers.ops import REFERENCE_OPS, LayerOps, bind_layer_ops, reference_fused_add_rms_norm
from lmport.layers.rotary import apply_rotary
from lmport.models.loader import build_native_model, resolve_model_info
from lmport.plugins import BACKENDS_GROUP, PluginError, PluginHost
from lmport.testing.fake_machine import FakeMachine
from lmport.testing.model_driver import greedy_generate
from lmport.testing.tiny_models import make_checkpoint


class CountingOps:
    """A backend whose "fused" ops are the reference with call counters (it leaves rotary out)."""

    def __init__(self, extra: dict | None = None):
        self.calls = {"rms_norm": 0, "fused_add_rms_norm": 0, "silu_and_mul": 0}
        self.extra = extra or {}

    @hookimpl
    def lmport_detect_backend(self, env):
        return BackendInfo(name="opsy", device_type="cpu", priority=10)

    @hookimpl
    def lmport_capabilities(self, backend):
        if backend.name == "opsy":
            return Capabilities(backend="opsy", device_type="cpu")

    @hookimpl
    def lmport_layer_ops(self, capabilities):
        assert capabilities.backend == "opsy"

        def counted(name):
            def op(*args):
                self.calls[name] += 1
                return getattr(REFERENCE_OPS, name)(*args)

            return op

        return {name: counted(name) for name in self.calls} | self.extra


def make_host(plugin=None) -> PluginHost:
    host = PluginHost(environ={}, load_entry_points=False, detection_env=FakeMachine.bare())
    if plugin is not None:
        host.register(plugin, "opsy", BACKENDS_GROUP)
    host.select_backend()
    return host


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_rms_norm_is_transformers_llama_rms_norm_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 48, generator=gen).to(dtype)
    hf = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.1 * torch.randn(48, generator=gen))
    assert torch.equal(REFERENCE_OPS.rms_norm(x, hf.weight, 1e-5), hf(x))


def test_reference_fused_add_rms_norm_is_the_add_then_the_norm():
    gen = torch.Generator().manual_seed(1)
    x, residual = (torch.randn(3, 32, generator=gen).bfloat16() for _ in range(2))
    weight = torch.rand(32, generator=gen).bfloat16()
    normed, summed = reference_fused_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(summed, residual + x)
    assert torch.equal(normed, REFERENCE_OPS.rms_norm(residual + x, weight, 1e-6))
    assert not torch.equal(summed, residual)  # the inputs were not written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_silu_and_mul_is_act2fn_silu_times_up(dtype):
    gate_up = torch.randn(4, 2 * 24, generator=torch.Generator().manual_seed(2)).to(dtype)
    gate, up = gate_up[:, :24], gate_up[:, 24:]
    assert torch.equal(REFERENCE_OPS.silu_and_mul(gate_up), ACT2FN["silu"](gate) * up)
    assert REFERENCE_OPS.rotary is apply_rotary


def test_cpu_backend_answers_lmport_layer_ops_with_the_reference():
    assert make_host().layer_ops() == REFERENCE_OPS
    assert REFERENCE_OPS.overridden() == ()


def test_a_backends_layer_ops_override_the_reference_and_the_rest_stays():
    host = make_host(CountingOps())
    ops = host.layer_ops()
    assert set(ops.overridden()) == {"rms_norm", "fused_add_rms_norm", "silu_and_mul"}
    assert ops.rotary is apply_rotary
    assert host.layer_ops() is ops  # cached


def test_disabling_custom_kernels_gives_the_reference_layer_ops():
    host = make_host(CountingOps())
    assert host.layer_ops().overridden()
    host.set_custom_kernels(False)
    assert host.layer_ops() == REFERENCE_OPS


def test_an_unknown_layer_op_is_a_startup_error():
    host = make_host(CountingOps(extra={"gelu_and_mul": lambda x: x}))
    with pytest.raises(PluginError, match="unknown ops \\['gelu_and_mul'\\]"):
        host.layer_ops()


def test_build_native_model_binds_the_backends_ops_and_tokens_do_not_change(tmp_path):
    make_checkpoint("llama", tmp_path)
    info = resolve_model_info(tmp_path)
    plugin = CountingOps()
    fused = build_native_model(info, make_host(plugin), torch.float32, torch.device("cpu"))
    reference = build_native_model(info, make_host(), torch.float32, torch.device("cpu"))
    prompts = [[5, 9, 17, 3, 44], [7, 8]]
    assert greedy_generate(fused, prompts, 4) == greedy_generate(reference, prompts, 4)
    layers = fused.config.num_hidden_layers
    steps = 4  # one forward per generated token (prefill included)
    assert plugin.calls == {"rms_norm": steps, "fused_add_rms_norm": steps * 2 * layers, "silu_and_mul": steps * layers}
    # rebinding the reference turns every op back
    # norms, attentions, mlps, and the Linears (q/k/v, o, gate/up, down per layer, the head)
    assert bind_layer_ops(fused, LayerOps()) == 2 * layers + 1 + layers + layers + 4 * layers + 1
    assert fused.model.norm.layer_ops == REFERENCE_OPS
