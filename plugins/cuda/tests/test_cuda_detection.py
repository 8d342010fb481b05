"""CUDA detection and flags on pretend GPUs (runs on any machine; no GPU is touched)."""

from __future__ import annotations

import dataclasses

import pytest

from lmport.plugins import PluginHost
from lmport.testing.fake_machine import FakeMachine
from lmport.testing.installed import require_distribution

require_distribution("lmport-cuda", "pip install -e plugins/cuda")

from lmport_cuda.capabilities import cuda_capabilities  # noqa: E402
from lmport_cuda.detection import GpuInfo, parse_nvidia_smi, visible  # noqa: E402


def select(machine) -> PluginHost:
    host = PluginHost(environ={}, detection_env=machine)
    host.select_backend()
    return host


def test_nvidia_smi_rows_are_parsed():
    out = "NVIDIA H100 80GB HBM3, 9.0, 81559 MiB\nTesla T4, 7.5, 15360 MiB\n\ngarbage line\n"
    assert parse_nvidia_smi(out) == [GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), 81559), GpuInfo("Tesla T4", (7, 5), 15360)]


def test_cuda_visible_devices_filters_by_index():
    gpus = [GpuInfo(f"gpu{i}", (8, 0), 1) for i in range(4)]
    assert visible(gpus, None) == gpus
    assert [g.name for g in visible(gpus, "2,0")] == ["gpu2", "gpu0"]
    assert visible(gpus, "") == [] and visible(gpus, "-1") == []
    assert len(visible(gpus, "GPU-uuid-a,GPU-uuid-b")) == 2


def test_a100_gets_flash_and_paged_attention_bf16_no_fp8():
    host = select(FakeMachine.nvidia("8.0"))
    caps = host.capabilities()
    assert host.backend.name == "cuda" and host.backend.priority == 100
    assert host.backend.description == "1 x NVIDIA A100-SXM4-80GB (sm_80, 80 GiB)"
    assert caps.flash_attention and caps.paged_attention and caps.continuous_batching and caps.graph_capture
    assert caps.supports_dtype("bfloat16") and not caps.fp8_compute
    assert caps.quantization == {"gptq", "awq", "marlin", "bitsandbytes", "eetq", "exl2", "fp8", "compressed-tensors"}
    assert caps.kv_block_sizes == (16, 32, 64)


def test_t4_keeps_continuous_batching_without_the_kernels():
    caps = select(FakeMachine.nvidia("7.5", "Tesla T4", "15360 MiB")).capabilities()
    assert not caps.flash_attention and not caps.paged_attention
    assert caps.continuous_batching and caps.graph_capture
    assert not caps.supports_dtype("bfloat16") and caps.supports_dtype("float16")
    assert "marlin" not in caps.quantization and not caps.fp8_compute
    assert any("reference path" in note for note in caps.notes)


@pytest.mark.parametrize("cap, fp8", [("8.6", False), ("8.9", True), ("9.0", True)])
def test_fp8_from_ada_on(cap, fp8):
    caps = select(FakeMachine.nvidia(cap, "GPU", "24576 MiB")).capabilities()
    # fp8 checkpoints load everywhere (dequantized in the kernel before sm_89); fp8 matrix units from Ada on
    assert caps.fp8_compute is fp8 and "fp8" in caps.quantization and caps.flash_attention


def test_flash_attn_installed_puts_256_token_blocks_first():
    caps = select(FakeMachine.nvidia("9.0", flash_attn=True)).capabilities()
    assert caps.kv_block_sizes == (256, 16, 32, 64) and caps.default_block_size == 256
    assert cuda_capabilities((7, 5), flash_attn_installed=True).kv_block_sizes == (16, 32, 64)


def test_mixed_gpus_are_planned_for_the_weakest():
    rows = "NVIDIA H100, 9.0, 81559 MiB\nTesla T4, 7.5, 15360 MiB\n"
    machine = dataclasses.replace(FakeMachine.nvidia(), commands={"nvidia-smi": rows})
    host = select(machine)
    assert host.backend.detail("compute_capability") == "7.5" and host.backend.detail("device_count") == 2
    assert not host.capabilities().flash_attention


def test_no_gpu_visible_means_not_detected():
    host = PluginHost(environ={}, detection_env=FakeMachine.nvidia("8.0", environ={"CUDA_VISIBLE_DEVICES": ""}))
    assert host.select_backend().backend.name == "cpu"
