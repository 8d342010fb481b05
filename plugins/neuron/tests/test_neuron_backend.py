"""The Neuron backend on a pretend Inferentia2: detection and flags."""

from __future__ import annotations

import dataclasses

from lmport.config import LaunchConfig
from lmport.plugins import PluginHost
from lmport.testing.fake_machine import FakeMachine
from lmport.testing.installed import require_distribution

require_distribution("lmport-neuron", "pip install --no-deps -e plugins/neuron")


def test_detected_through_torch_neuronx_and_dev_neuron():
    host = PluginHost(environ={}, detection_env=FakeMachine.inferentia2(count=2))
    backend = host.select_backend().backend
    assert (backend.name, backend.device_type, backend.detail("device_count")) == ("neuron", "xla", 2)
    assert backend.detail("optimum_neuron") == "0.4.5"


def test_neuron_ls_counts_devices_when_dev_is_not_visible():
    machine = dataclasses.replace(FakeMachine.inferentia2(), files={}, commands={"neuron-ls": '[{"neuron_device": 0}]'})
    assert PluginHost(environ={}, detection_env=machine).select_backend().backend.name == "neuron"


def test_no_device_or_no_runtime_means_not_detected():
    for machine in (
        dataclasses.replace(FakeMachine.inferentia2(), files={}),
        dataclasses.replace(FakeMachine.inferentia2(), modules=frozenset({"torch"})),
    ):
        assert PluginHost(environ={}, detection_env=machine).select_backend().backend.name == "cpu"


def test_flags_say_static_shapes_fixed_slots_and_the_whole_model_executor():
    host = PluginHost(environ={}, detection_env=FakeMachine.inferentia2())
    host.select_backend()
    caps = host.capabilities()
    assert caps.static_shapes and caps.whole_model_executor and not caps.continuous_batching
    assert any("never run on an Inferentia2" in note for note in caps.notes)
    config, (adjustment,) = host.adjust_config(LaunchConfig())
    assert not config.enable_prefix_caching and "own KV cache" in adjustment.reason
