"""Hooks of the CUDA backend (entry point ``cuda`` in ``lmport.backends``).

Only detection runs on every machine. Everything else runs after the host selected this
backend, so it may touch the GPU. Hooks left out here (KV allocation, the weights loader)
fall through to the core's reference, which already runs on a CUDA device.
"""

from __future__ import annotations

from lmport import hookimpl
from lmport.capabilities import BackendInfo, Capabilities
from lmport.memory import MemoryInfo

from lmport_cuda.capabilities import cuda_capabilities
from lmport_cuda.detection import NVIDIA_SMI_QUERY, find_gpus, parse_compute_capability

NAME = "cuda"
PRIORITY = 100


@hookimpl
def lmport_detect_backend(env):
    torch_build = env.torch_build()
    if torch_build.cuda is None:  # a CPU or ROCm build of torch cannot drive an NVIDIA GPU
        return None
    gpus, source = find_gpus(env)
    if not gpus:
        return None
    weakest = min(gpus, key=lambda g: g.compute_capability)
    names = sorted({g.name for g in gpus})
    return BackendInfo(
        name=NAME,
        device_type="cuda",
        priority=PRIORITY,
        description=f"{len(gpus)} x {', '.join(names)} ({weakest.sm}, {weakest.memory_mib // 1024} GiB)",
        details=(
            ("gpus", tuple(g.name for g in gpus)),
            ("device_count", len(gpus)),
            ("compute_capability", ".".join(map(str, weakest.compute_capability))),
            ("memory_mib", weakest.memory_mib),
            ("torch_cuda", torch_build.cuda),
            ("flash_attn", env.module_available("flash_attn")),
            ("probe", source),
        ),
    )


@hookimpl
def lmport_capabilities(backend: BackendInfo) -> Capabilities | None:
    if backend.name != NAME:
        return None
    return cuda_capabilities(
        parse_compute_capability(backend.detail("compute_capability", "0.0")),
        flash_attn_installed=bool(backend.detail("flash_attn", False)),
    )


@hookimpl
def lmport_attention_backend(spec, capabilities):
    # Imported here: the kernels pull in triton/flash-attn, which only a GPU process needs.
    from lmport_cuda.attention import cuda_attention_backend

    return cuda_attention_backend(spec, capabilities)


@hookimpl
def lmport_layer_ops(capabilities):
    # Imported here for the same reason as the attention kernels: only a GPU process needs triton.
    from lmport_cuda.layer_ops import fused_layer_ops

    return fused_layer_ops(capabilities)


@hookimpl
def lmport_graph_runner(model, config, capabilities):
    from lmport_cuda.graphs import make_graph_runner

    return make_graph_runner(model, config, capabilities)


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

    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {
        "device_name": torch.cuda.get_device_name(index),
        "device_count": torch.cuda.device_count(),
        "compute_capability": f"{major}.{minor}",
        "cuda_version": torch.version.cuda,
        "driver_version": driver_version(),
    }


def driver_version() -> str | None:
    """The NVIDIA driver's version from nvidia-smi, or ``None`` where it does not answer."""
    from lmport.detection import DetectionEnv

    output = DetectionEnv().run([NVIDIA_SMI_QUERY[0], "--query-gpu=driver_version", "--format=csv,noheader"])
    return output.splitlines()[0].strip() if output else None


@hookimpl
def lmport_distributed_backend(device_type):
    # tensor-parallel workers join through NCCL (a ROCm build of torch maps it to RCCL)
    from lmport.distributed import DistributedSpec

    return DistributedSpec(backend="nccl") if device_type == "cuda" else None
