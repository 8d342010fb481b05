"""Hooks of the ROCm backend (entry point ``rocm`` in ``lmport.backends``).

Attention: in this release lmport ships no ROCm kernels, so this plugin answers with the
reference attention (which runs on the GPU through HIP) for every layer it can serve, and
with ``None`` for sliding-window layers, for which the ROCm stack has no kernel: the host then
falls back to the core's reference itself, warns once and lists the fallback in ``/info``.
KV allocation and the weights loader fall through to the core's reference.
"""

from __future__ import annotations

from lmport import hookimpl
from lmport.capabilities import BackendInfo, Capabilities
from lmport.layers.reference_attention import ReferenceAttention
from lmport.memory import MemoryInfo

from lmport_rocm.detection import gfx_name, kfd_gfx_versions, smi_product_names

NAME = "rocm"
PRIORITY = 100


@hookimpl
def lmport_detect_backend(env):
    torch_build = env.torch_build()
    if torch_build.hip is None:  # only a ROCm build of torch drives AMD GPUs
        return None
    gfx = kfd_gfx_versions(env)
    names = smi_product_names(env) or [gfx_name(v) for v in gfx]
    if not names and env.path_exists("/dev/kfd"):
        names = ["AMD GPU"]
    if not names:
        return None
    return BackendInfo(
        name=NAME,
        device_type="cuda",  # torch addresses HIP devices as "cuda"
        priority=PRIORITY,
        description=f"{len(names)} x {', '.join(sorted(set(names)))} (HIP {torch_build.hip})",
        details=(
            ("gpus", tuple(names)),
            ("device_count", len(names)),
            ("gfx_target_versions", tuple(gfx)),
            ("torch_hip", torch_build.hip),
        ),
    )


@hookimpl
def lmport_capabilities(backend: BackendInfo) -> Capabilities | None:
    if backend.name != NAME:
        return None
    return rocm_capabilities()


def rocm_capabilities() -> Capabilities:
    """MI210/MI250 per the seed: paged attention, flash attention v2, GPTQ; no AWQ, no flash
    layer norm, no sliding-window kernel."""
    return Capabilities(
        backend=NAME,
        device_type="cuda",
        dtypes=("bfloat16", "float16", "float32"),
        flash_attention=True,
        paged_attention=True,
        sliding_window_attention=False,
        alibi_attention=False,
        flash_layer_norm=False,
        quantization=frozenset({"gptq"}),
        continuous_batching=True,
        graph_capture=False,
        kv_block_sizes=(16,),
        notes=(
            "flags describe the ROCm kernel stack for MI210/MI250 (gfx90a)",
            "in this release the ROCm plugin runs lmport's reference attention path on the GPU",
            "no sliding-window attention kernel: such layers fall back to the reference path with a warning",
            "no AWQ kernels: AWQ checkpoints are refused at startup",
        ),
    )


@hookimpl
def lmport_attention_backend(spec, capabilities):
    if spec.sliding_window or spec.alibi_slopes:
        return None  # no ROCm kernel: the host falls back to the reference and says so
    return ReferenceAttention(spec)


@hookimpl
def lmport_memory_info(device):
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return MemoryInfo(free_bytes=free, total_bytes=total)


@hookimpl
def lmport_server_info(capabilities):
    import torch

    return {"device_name": torch.cuda.get_device_name(torch.cuda.current_device()), "hip_version": torch.version.hip}
