"""The Gaudi backend on a pretend Gaudi2 box: detection, flags, and its config adjustment."""

from __future__ import annotations

import dataclasses

import pytest

from lmport.config import ConfigAdjustment, LaunchConfig
from lmport.plugins import PluginHost
from lmport.testing.fake_machine import FakeMachine
from lmport.testing.installed import require_distribution

require_distribution("lmport-gaudi", "pip install --no-deps -e plugins/gaudi")


@pytest.fixture
def host() -> PluginHost:
    host = PluginHost(environ={}, detection_env=FakeMachine.gaudi(count=8))
    host.select_backend()
    return host


def test_detected_through_habana_frameworks_and_hl_smi(host):
    assert (host.backend.name, host.backend.device_type) == ("gaudi", "hpu")
    assert host.backend.description == "8 x Gaudi HL-225"
    assert host.backend.detail("optimum_habana") == "1.21.0"


@pytest.mark.parametrize("missing", ["module", "hl-smi"])
def test_both_the_runtime_and_a_card_are_needed(missing):
    machine = FakeMachine.gaudi()
    if missing == "module":
        machine = dataclasses.replace(machine, modules=frozenset({"torch"}))
    else:
        machine = dataclasses.replace(machine, commands={})
    assert PluginHost(environ={}, detection_env=machine).select_backend().backend.name == "cpu"


def test_flags_static_shapes_fixed_blocks_and_the_whole_model_executor(host):
    caps = host.capabilities()
    assert caps.static_shapes and caps.kv_block_sizes == (128,)
    assert caps.whole_model_executor and caps.continuous_batching
    assert any("never run on a Gaudi" in note for note in caps.notes)


def test_config_is_adjusted_to_128_token_blocks_with_a_reason(host):
    original = LaunchConfig(block_size=16)
    adjusted, adjustments = host.adjust_config(original)
    assert adjusted.block_size == 128 and original.block_size == 16
    assert not adjusted.enable_prefix_caching
    (adjustment,) = adjustments
    assert isinstance(adjustment, ConfigAdjustment) and adjustment.plugin == "gaudi"
    assert "static shapes" in adjustment.reason
    assert host.adjust_config(adjusted)[1] == []

