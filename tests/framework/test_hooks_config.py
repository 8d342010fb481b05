"""Phase 1 hooks after detection: lmport_capabilities and lmport_adjust_config."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from lmport import hookimpl
from lmport.capabilities import BackendInfo, Capabilities
from lmport.config import ConfigAdjustment, LaunchConfig
from lmport.plugins import BACKENDS_GROUP, PluginHost
from lmport.testing.fake_machine import FakeMachine


class Accelerator:
    """A backend plugin defined in the test: fixed block size, one extension adjusts too."""

    @hookimpl
    def lmport_detect_backend(self, env):
        return BackendInfo(name="accel", device_type="cpu", priority=10, details=(("cores", 4),))

    @hookimpl
    def lmport_capabilities(self, backend):
        if backend.name == "accel":
            return Capabilities(backend="accel", device_type="cpu", kv_block_sizes=(64,), static_shapes=True)

    @hookimpl
    def lmport_adjust_config(self, config, capabilities):
        if config.block_size != 64:
            return ConfigAdjustment({"block_size": 64}, "accel kernels read 64-token blocks", "accel")


class Extension:
    @hookimpl
    def lmport_adjust_config(self, config):  # takes fewer arguments than the spec: allowed
        return ConfigAdjustment({"max_batch_size": 8}, "extension caps the batch", "ext")


def make_host(*plugins) -> PluginHost:
    host = PluginHost(environ={}, load_entry_points=False, detection_env=FakeMachine.bare())
    for index, plugin in enumerate(plugins):
        host.register(plugin, f"plugin{index}", BACKENDS_GROUP if isinstance(plugin, Accelerator) else "lmport.plugins")
    host.select_backend()
    return host


def test_lmport_capabilities_answers_for_the_selected_backend():
    host = make_host(Accelerator())
    caps = host.capabilities()
    assert (caps.backend, caps.default_block_size, caps.static_shapes) == ("accel", 64, True)
    assert host.backend.detail("cores") == 4
    assert pickle.loads(pickle.dumps(caps)) == caps
    assert host.capabilities() is caps  # asked once, cached


def test_cpu_capabilities_come_from_the_core():
    caps = make_host().capabilities()
    assert caps.backend == "cpu" and caps.paged_attention and caps.sliding_window_attention
    # the formats the core's reference kernels run (marlin names a CUDA kernel, exl2 has no reader)
    assert caps.to_dict()["quantization"] == ["awq", "bitsandbytes", "compressed-tensors", "eetq", "fp8", "gptq"]


def test_lmport_adjust_config_returns_changes_and_never_mutates():
    host = make_host(Accelerator(), Extension())
    original = LaunchConfig(block_size=16)
    adjusted, adjustments = host.adjust_config(original)
    assert original.block_size == 16 and original.max_batch_size is None
    assert (adjusted.block_size, adjusted.max_batch_size) == (64, 8)
    assert sorted(a.plugin for a in adjustments) == ["accel", "ext"]
    assert all(a.reason for a in adjustments)
    with pytest.raises(dataclasses.FrozenInstanceError):
        adjusted.block_size = 1  # type: ignore[misc]


def test_adjusting_an_unknown_setting_is_a_plugin_bug():
    class Bad:
        @hookimpl
        def lmport_adjust_config(self, config):
            return ConfigAdjustment({"warp_speed": 9}, "why not", "bad")

    host = make_host(Bad())
    with pytest.raises(ValueError, match=r"plugin bad adjusts unknown settings \['warp_speed'\]"):
        host.adjust_config(LaunchConfig())
