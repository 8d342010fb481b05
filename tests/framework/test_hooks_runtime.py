"""lmport_device_runtime and lmport_distributed_backend: the reference answers, a backend's override."""

from __future__ import annotations

import pytest
import torch

from lmport import hookimpl
from lmport.capabilities import BackendInfo, Capabilities
from lmport.distributed import Communicator, DistributedSpec
from lmport.plugins import BACKENDS_GROUP, PluginError, PluginHost
from lmport.runtime import DeviceRuntime
from lmport.testing.fake_machine import FakeMachine


class CountingRuntime(DeviceRuntime):
    def __init__(self, device):
        super().__init__(device)
        self.buffers = 0

    def host_buffer(self, numel, dtype):
        self.buffers += 1
        return super().host_buffer(numel, dtype)


class Accel:
    @hookimpl
    def lmport_detect_backend(self, env):
        return BackendInfo(name="accel", device_type="cpu", priority=10)

    @hookimpl
    def lmport_capabilities(self, backend):
        if backend.name == "accel":
            return Capabilities(backend="accel", device_type="cpu")

    @hookimpl
    def lmport_device_runtime(self, device):
        return CountingRuntime(device)

    @hookimpl
    def lmport_distributed_backend(self, device_type):
        return DistributedSpec("nccl", communicator=lambda group, device: Communicator(0, 1, group)) if device_type == "accel" else None


def make_host(plugin=None) -> PluginHost:
    host = PluginHost(environ={}, load_entry_points=False, detection_env=FakeMachine.bare())
    if plugin is not None:
        host.register(plugin, "accel", BACKENDS_GROUP)
    host.select_backend()
    return host


def test_lmport_device_runtime_reference_on_the_cpu():
    runtime = make_host().device_runtime(torch.device("cpu"))
    assert type(runtime) is DeviceRuntime and runtime.on_host
    t = torch.arange(4.0)
    assert runtime.start_copy_to_host(t) == (t, None) and runtime.to_device(t) is t
    assert not runtime.host_buffer(8, torch.int64).is_pinned()
    assert runtime.device_for_rank(3) == torch.device("cpu")
    assert DeviceRuntime("cuda").device_for_rank(1) == torch.device("cuda", 1)  # no device touched


def test_lmport_device_runtime_override_carries_the_step_to_the_device():
    from lmport.engine.batch import build_flat_batch
    from lmport.plan import PlanEntry, StepPlan
    import numpy as np

    runtime = make_host(Accel()).device_runtime(torch.device("cpu"))
    assert isinstance(runtime, CountingRuntime)
    plan = StepPlan([PlanEntry(0, "r", 0, 3, True, [5, 6, 7], True, 3, block_table_len=1)], np.zeros((1, 1), np.int32))
    batch = build_flat_batch(plan, 4, runtime)
    assert runtime.buffers == 2 and batch.input_ids.tolist() == [5, 6, 7]


def test_lmport_distributed_backend_gloo_on_cpu_and_the_backends_own():
    assert make_host().distributed_backend("cpu").backend == "gloo"
    with pytest.raises(PluginError, match="no torch.distributed backend for device 'cuda'"):
        make_host().distributed_backend("cuda")
    spec = make_host(Accel()).distributed_backend("accel")
    assert spec.backend == "nccl" and spec.communicator(None, torch.device("cpu")).world_size == 1
