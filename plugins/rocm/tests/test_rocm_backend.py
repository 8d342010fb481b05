"""The ROCm backend on a pretend MI250: detection, flags, the AWQ startup error, and the
sliding-window fallback. No AMD GPU is needed: FakeMachine answers the detection probes."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from lmport.capabilities import CapabilityError
from lmport.layers.attention import AttentionSpec
from lmport.layers.reference_attention import ReferenceAttention
from lmport.plugins import PluginError, PluginHost
from lmport.testing.fake_machine import CUDA_TORCH, FakeMachine
from lmport.testing.installed import require_distribution
from lmport.weights.quantization import QuantizationRegistry

require_distribution("lmport-rocm", "pip install -e plugins/rocm")

from lmport_cuda.attention import TritonPagedAttention  # noqa: E402  (lmport-rocm depends on lmport-cuda)

WINDOWED = AttentionSpec(num_heads=8, num_kv_heads=2, head_dim=128, scale=0.088, dtype="bfloat16", sliding_window=4096)
PLAIN = AttentionSpec(num_heads=8, num_kv_heads=2, head_dim=128, scale=0.088, dtype="bfloat16")


@pytest.fixture
def host() -> PluginHost:
    host = PluginHost(environ={}, detection_env=FakeMachine.amd(count=2))
    host.select_backend()
    return host


@pytest.fixture
def registry(host) -> QuantizationRegistry:
    registry = QuantizationRegistry()
    host.register_quantization(registry)
    return registry


def test_mi250_is_detected_from_the_kfd_topology(host):
    assert host.backend.name == "rocm" and host.backend.device_type == "cuda"
    assert host.backend.description == "2 x MI210/MI250 (gfx90a) (HIP 6.4.43482)"
    assert host.backend.detail("gfx_target_versions") == (90010, 90010)


def test_rocm_smi_names_are_preferred_when_it_answers():
    smi = '{"card0": {"Card Series": "AMD Instinct MI210"}}'
    machine = dataclasses.replace(FakeMachine.amd(), commands={"rocm-smi": smi})
    host = PluginHost(environ={}, detection_env=machine)
    assert host.select_backend().backend.detail("gpus") == ("AMD Instinct MI210",)


def test_a_cuda_build_of_torch_cannot_drive_amd_gpus():
    host = PluginHost(environ={}, detection_env=dataclasses.replace(FakeMachine.amd(), torch=CUDA_TORCH))
    assert host.select_backend().backend.name == "cpu"
    with pytest.raises(PluginError, match="'rocm' is installed but found no usable device"):
        PluginHost(environ={}, detection_env=dataclasses.replace(FakeMachine.amd(), torch=CUDA_TORCH)).select_backend("rocm")


def test_flags_follow_the_seed(host):
    caps = host.capabilities()
    assert caps.paged_attention and caps.flash_attention
    assert caps.quantization == {"gptq"}
    assert not caps.flash_layer_norm and not caps.sliding_window_attention
    assert "attention runs lmport-cuda's Triton paged kernels (shared, compiled by Triton for the GPU)" in caps.notes


def test_awq_is_refused_before_loading_with_backend_capability_and_supported_formats(host, registry):
    with pytest.raises(CapabilityError) as err:
        host.check_quantization("awq", registry)
    assert str(err.value) == "backend 'rocm' does not support 'awq' quantization (capability 'awq'); supported: gptq"
    assert (err.value.backend, err.value.supported) == ("rocm", "gptq")


def test_gptq_passes_the_check_and_the_core_reads_it(host, registry):
    from lmport.weights.safetensors_loader import SafetensorsLoader

    method = host.check_quantization("gptq", registry)
    assert method.capability == "gptq"
    assert isinstance(host.weights_loader(method), SafetensorsLoader)


def test_sliding_window_falls_back_to_the_reference_with_one_warning(host, caplog):
    with caplog.at_level(logging.WARNING, logger="lmport.plugins"):
        first = host.attention_backend(WINDOWED)
        second = host.attention_backend(WINDOWED)
        plain = host.attention_backend(PLAIN)
    assert type(first) is ReferenceAttention and second is first
    assert type(plain) is TritonPagedAttention  # lmport-cuda's kernels, shared (not copied)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        "backend 'rocm' has no attention kernel for head_dim=128, dtype=bfloat16, sliding_window=4096; "
        "using the reference path"
    ]
    assert host.fallbacks == warnings


def test_a_sliding_window_model_builds_on_rocm_with_one_warning_and_generates_like_the_cpu(tmp_path, caplog):
    """Mistral's layers share one sliding-window spec: one warning for the model, reference
    attention in every layer. The tensors stay on the CPU here (no AMD GPU); the host and its
    hooks are the ROCm backend's."""
    import torch

    from lmport.layers.attention import Attention
    from lmport.models.loader import build_native_model, resolve_model_info
    from lmport.testing.model_driver import greedy_generate
    from lmport.testing.tiny_models import make_checkpoint

    make_checkpoint("mistral", tmp_path)
    info = resolve_model_info(tmp_path)
    rocm = PluginHost(environ={}, detection_env=FakeMachine.amd())
    rocm.select_backend()
    with caplog.at_level(logging.WARNING, logger="lmport.plugins"):
        model = build_native_model(info, rocm, torch.float32, torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(layers) == 2 and all(type(layer.backend) is ReferenceAttention for layer in layers)
    assert all(layer.spec.sliding_window == 7 for layer in layers)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "sliding_window=7" in warnings[0] and warnings[0].startswith("backend 'rocm'")

    cpu = PluginHost(environ={}, detection_env=FakeMachine.bare())
    cpu.select_backend()
    reference = build_native_model(info, cpu, torch.float32, torch.device("cpu"))
    prompts = [[1, 5, 9, 33, 2, 70, 71, 72, 80, 81], [1, 200]]
    assert greedy_generate(model, prompts, 6, host=rocm) == greedy_generate(reference, prompts, 6, host=cpu)


def test_the_rocm_path_can_be_forced_on_an_nvidia_gpu_but_is_never_auto_selected():
    h200 = FakeMachine.nvidia("9.0", name="NVIDIA H200")
    forced = FakeMachine.nvidia("9.0", name="NVIDIA H200", environ={"LMPORT_ROCM_FORCE": "1"})
    assert PluginHost(environ={}, detection_env=forced).select_backend().backend.name == "cuda"
    host = PluginHost(environ={}, detection_env=forced)
    backend = host.select_backend("rocm").backend
    assert backend.priority < 0 and backend.detail("forced") is True
    assert "forced with LMPORT_ROCM_FORCE=1" in backend.description
    caps = host.capabilities()
    assert caps.notes[0].startswith("forced with LMPORT_ROCM_FORCE=1 on a CUDA GPU")
    assert caps.quantization == {"gptq"} and not caps.sliding_window_attention
    with pytest.raises(PluginError, match="found no usable device"):
        PluginHost(environ={}, detection_env=h200).select_backend("rocm")  # not forced: a CUDA build is not ROCm


def test_gptq_runs_the_shared_triton_linear_wq_and_no_fused_norm_is_bound(host):
    from lmport.layers.ops import REFERENCE_OPS

    ops = host.layer_ops()
    assert ops.overridden() == ("linear_wq",)
    assert ops.rms_norm is REFERENCE_OPS.rms_norm  # no flash layer-norm kernel on ROCm
