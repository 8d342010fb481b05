"""Phase 2 hooks: lmport_register_models, lmport_register_quantization, lmport_weights_loader,
lmport_model_executor."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lmport import hookimpl
from lmport.capabilities import BackendInfo, Capabilities, CapabilityError
from lmport.config import LaunchConfig
from lmport.executor import ModelExecutor
from lmport.models.registry import ModelRegistry
from lmport.plugins import BACKENDS_GROUP, PluginError, PluginHost
from lmport.testing.fake_machine import FakeMachine
from lmport.weights.quantization import QuantizationMethod, QuantizationRegistry, WeightsLoader


def builder_a(hf_config, context):
    raise AssertionError("not built in this test")


def builder_b(hf_config, context):
    raise AssertionError("not built in this test")


class QuantBackend:
    """Claims GPTQ, registers a format of its own, and ships a loader for it only."""

    @hookimpl
    def lmport_detect_backend(self, env):
        return BackendInfo(name="qb", device_type="cpu", priority=1)

    @hookimpl
    def lmport_capabilities(self, backend):
        if backend.name == "qb":
            return Capabilities(backend="qb", device_type="cpu", quantization=frozenset({"gptq", "exl2", "q3"}))

    @hookimpl
    def lmport_register_quantization(self, register):
        register(QuantizationMethod("q3", "q3", "the vendor's 3-bit format"))

    @hookimpl
    def lmport_weights_loader(self, quant, capabilities):
        if quant is not None and quant.name == "q3":
            return Q3Loader()

    @hookimpl
    def lmport_register_models(self, register):
        register("FastForCausalLM", builder_b, priority=5)


class Q3Loader(WeightsLoader):
    def iter_weights(self, path, dtype, device):
        yield "q3.weight", torch.zeros(1)


class Executor(ModelExecutor):
    def kv_cache_spec(self):
        return None

    def initialize_cache(self, num_blocks):
        pass

    def execute(self, step):
        return None


class WholeModel:
    @hookimpl
    def lmport_model_executor(self, model, config, capabilities):
        return Executor()


def make_host(*plugins, backend=True) -> PluginHost:
    host = PluginHost(environ={}, load_entry_points=False, detection_env=FakeMachine.bare())
    for index, plugin in enumerate(plugins):
        host.register(plugin, f"plugin{index}", BACKENDS_GROUP if isinstance(plugin, QuantBackend) else "lmport.plugins")
    host.select_backend()
    return host


def quantization_registry(host) -> QuantizationRegistry:
    registry = QuantizationRegistry()
    host.register_quantization(registry)
    return registry


def test_lmport_register_models_priority_lets_a_backend_override():
    class Core:
        @hookimpl
        def lmport_register_models(self, register):
            register(["FastForCausalLM", "OtherForCausalLM"], builder_a)

    host = make_host(Core(), QuantBackend())
    registry = ModelRegistry()
    host.register_models(registry)
    assert registry.get("FastForCausalLM").builder is builder_b
    assert registry.get("OtherForCausalLM").builder is builder_a


def test_lmport_register_quantization_collects_core_and_plugin_formats():
    registry = quantization_registry(make_host(QuantBackend()))
    assert {"gptq", "awq", "fp8", "bitsandbytes", "q3"} <= set(registry.names())
    assert registry.get("bitsandbytes-nf4").capability == "bitsandbytes"


def test_unsupported_quantization_is_a_startup_error_naming_backend_capability_and_formats():
    host = make_host(QuantBackend())
    with pytest.raises(CapabilityError) as err:
        host.check_quantization("awq", quantization_registry(host))
    assert str(err.value) == "backend 'qb' does not support 'awq' quantization (capability 'awq'); supported: exl2, gptq, q3"


def test_unknown_quantization_lists_the_known_formats():
    host = make_host()
    supported = "awq, bitsandbytes, compressed-tensors, eetq, fp8, gptq"  # the CPU backend's reference kernels
    with pytest.raises(CapabilityError, match=rf"quantization 'q9' \(unknown format\); supported: {supported}; known formats: awq, "):
        host.check_quantization("q9", quantization_registry(host))


def test_lmport_weights_loader_for_a_plugin_format_and_for_unquantized(tmp_path):
    host = make_host(QuantBackend())
    registry = quantization_registry(host)
    q3 = host.check_quantization("q3", registry)
    assert isinstance(host.weights_loader(q3), Q3Loader)
    save_file({"w": torch.ones(2, 2)}, str(tmp_path / "model.safetensors"))
    loaded = dict(host.weights_loader(None).iter_weights(tmp_path, torch.bfloat16, torch.device("cpu")))
    assert loaded["w"].dtype == torch.bfloat16


def test_a_supported_format_without_a_loader_is_a_clear_error():
    host = make_host(QuantBackend())
    exl2 = host.check_quantization("exl2", quantization_registry(host))
    with pytest.raises(PluginError, match="no weights loader for 'exl2' checkpoints on backend 'qb': lmport has no loader"):
        host.weights_loader(exl2)


def test_the_core_reads_the_formats_it_implements_on_any_backend():
    """The core's safetensors loader answers (last) for GPTQ; the format's Linear method does the rest."""
    from lmport.weights.safetensors_loader import SafetensorsLoader

    host = make_host(QuantBackend())
    loader = host.weights_loader(host.check_quantization("gptq", quantization_registry(host)))
    assert isinstance(loader, SafetensorsLoader) and not loader.convert_floats


def test_lmport_model_executor_takes_over_unless_custom_kernels_are_disabled():
    assert make_host().model_executor(model=None, config=LaunchConfig()) is None
    host = make_host(WholeModel())
    assert isinstance(host.model_executor(model=None, config=LaunchConfig()), Executor)
    host.set_custom_kernels(False)
    assert host.model_executor(model=None, config=LaunchConfig()) is None
