"""Phase 3 and 4 hooks: lmport_attention_backend, lmport_allocate_kv_cache, lmport_memory_info,
lmport_graph_runner, lmport_server_info."""

from __future__ import annotations

import logging

import pytest
import torch

from lmport import hookimpl
from lmport.capabilities import BackendInfo, Capabilities
from lmport.config import LaunchConfig
from lmport.graphs import DecodeGraphRunner
from lmport.layers.attention import AttentionSpec, KVCacheSpec
from lmport.layers.reference_attention import ReferenceAttention
from lmport.memory import MemoryInfo
from lmport.plugins import BACKENDS_GROUP, PluginHost
from lmport.testing.fake_machine import FakeMachine

PLAIN = AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16, scale=0.25)
WINDOWED = AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16, scale=0.25, sliding_window=8)


class FastAttention(ReferenceAttention):
    is_reference = False


class Runner(DecodeGraphRunner):
    def capture(self, kv_caches, batch_sizes):
        pass

    def can_run(self, metadata):
        return False

    def run(self, input_ids, positions, kv_caches, metadata):
        raise AssertionError


class Accel:
    """Has a kernel for every spec but sliding windows; captures graphs; allocates its own KV."""

    def __init__(self, graph_capture=True):
        self.graph_capture = graph_capture
        self.allocations = 0

    @hookimpl
    def lmport_detect_backend(self, env):
        return BackendInfo(name="accel", device_type="cpu", priority=10)

    @hookimpl
    def lmport_capabilities(self, backend):
        if backend.name == "accel":
            return Capabilities(backend="accel", device_type="cpu", graph_capture=self.graph_capture)

    @hookimpl
    def lmport_attention_backend(self, spec, capabilities):
        return None if spec.sliding_window else FastAttention(spec)

    @hookimpl
    def lmport_allocate_kv_cache(self, spec, num_blocks, device):
        self.allocations += 1
        shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        return [(torch.full(shape, 7.0), torch.full(shape, 7.0)) for _ in range(spec.num_layers)]

    @hookimpl
    def lmport_graph_runner(self, model, config, capabilities):
        return Runner()

    @hookimpl
    def lmport_server_info(self, capabilities):
        return {"device_name": "Accel 9000", "torch_version": "not-the-core's"}

    @hookimpl
    def lmport_memory_info(self, device):
        return MemoryInfo(free_bytes=3, total_bytes=4)


def make_host(plugin=None) -> PluginHost:
    host = PluginHost(environ={}, load_entry_points=False, detection_env=FakeMachine.bare())
    if plugin is not None:
        host.register(plugin, "accel", BACKENDS_GROUP)
    host.select_backend()
    return host


def test_lmport_attention_backend_override_is_used_and_cached():
    host = make_host(Accel())
    impl = host.attention_backend(PLAIN)
    assert type(impl) is FastAttention
    assert host.attention_backend(PLAIN) is impl
    assert host.fallbacks == []


def test_missing_kernel_falls_back_to_the_reference_with_one_warning(caplog):
    host = make_host(Accel())
    with caplog.at_level(logging.WARNING, logger="lmport.plugins"):
        impl = host.attention_backend(WINDOWED)
        host.attention_backend(WINDOWED)
        host.attention_backend(AttentionSpec(4, 2, 16, 0.25, sliding_window=8))  # equal spec
    assert type(impl) is ReferenceAttention
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "backend 'accel' has no attention kernel for head_dim=16, dtype=float32, sliding_window=8; using the reference path"
    ]
    assert host.fallbacks == warnings


def test_cpu_backend_runs_the_reference_without_warning(caplog):
    host = make_host()
    with caplog.at_level(logging.WARNING):
        assert type(host.attention_backend(WINDOWED)) is ReferenceAttention
    assert not caplog.records and host.fallbacks == []


def test_disabling_custom_kernels_uses_the_reference_everywhere():
    plugin = Accel()
    host = make_host(plugin)
    host.set_custom_kernels(False)
    assert type(host.attention_backend(PLAIN)) is ReferenceAttention
    caches = host.allocate_kv_cache(KVCacheSpec(1, 2, 16, 4, torch.float32), 3, torch.device("cpu"))
    assert plugin.allocations == 0 and not caches[0][0].any()
    assert host.graph_runner(model=None, config=LaunchConfig()) is None
    assert host.fallbacks == []


def test_lmport_allocate_kv_cache_from_the_backend_and_the_reference():
    plugin = Accel()
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, block_size=4, dtype=torch.float32)
    caches = make_host(plugin).allocate_kv_cache(spec, 5, torch.device("cpu"))
    assert plugin.allocations == 1 and bool((caches[1][1] == 7).all())
    reference = make_host().allocate_kv_cache(spec, 5, torch.device("cpu"))
    assert len(reference) == 2 and reference[0][0].shape == (5, 4, 2, 16) and not reference[0][0].any()


def test_lmport_memory_info_on_cpu_is_the_machines_memory_and_none_elsewhere():
    info = make_host().memory_info(torch.device("cpu"))
    assert isinstance(info, MemoryInfo) and 0 < info.free_bytes <= info.total_bytes
    assert make_host().memory_info(torch.device("meta")) is None
    assert make_host(Accel()).memory_info(torch.device("cpu")) == MemoryInfo(3, 4)


@pytest.mark.parametrize(
    "graph_capture, cuda_graphs, expected",
    [(True, None, Runner), (True, (1, 2, 4), Runner), (True, (), type(None)), (False, None, type(None))],
)
def test_lmport_graph_runner_only_when_flagged_and_enabled(graph_capture, cuda_graphs, expected):
    host = make_host(Accel(graph_capture=graph_capture))
    assert type(host.graph_runner(model=None, config=LaunchConfig(cuda_graphs=cuda_graphs))) is expected


def test_lmport_server_info_merges_with_the_core_winning_clashes():
    info = make_host(Accel()).server_info()
    assert info["device_name"] == "Accel 9000"
    assert info["torch_version"] == torch.__version__
    assert info["backend"] == "accel"
