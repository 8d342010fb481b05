"""Hooks of the ROCm backend (entry point ``rocm`` in ``lmport.backends``).

Attention runs the CUDA plugin's Triton paged kernels (``lmport_cuda.attention.TritonPagedAttention``;
Triton compiles them for AMD GPUs as well): lmport-rocm depends on lmport-cuda for its kernels
and never copies them. lmport-cuda's own entry point is never selected on a ROCm machine (its
detection needs a CUDA build of torch). Sliding-window and ALiBi layers are answered with
``None`` (the ROCm stack flags no kernel for them): the host falls back to the core's reference
with one warning and lists the fallback in ``/info``. GPTQ runs the shared Triton ``linear_wq``;
AWQ is refused at start-up; no fused layer norm is bound (no flash layer-norm kernel).

``LMPORT_ROCM_FORCE=1`` detects this backend on an NVIDIA GPU with a CUDA build of torch, at a
negative priority (never chosen automatically; select it with ``--backend rocm``), so its code
path runs on hardware that lmport's CI can reach. Torch addresses both as ``"cuda"`` devices.
"""

from __future__ import annotations

from lmport import hookimpl
from lmport.capabilities import BackendInfo, Capabilities
from lmport.memory import MemoryInfo

from lmport_rocm.detection import gfx_name, kfd_gfx_versions, smi_product_names

NAME = "rocm"
PRIORITY = 100
FORCE_ENV = "LMPORT_ROCM_FORCE"
FORCED_PRIORITY = -1  # never auto-selected: --backend rocm / LMPORT_BACKEND=rocm picks it
BLOCK_SIZES = (16, 32, 64)  # the Triton paged kernels run well at 16-64 tokens per block


@hookimpl
def lmport_detect_backend(env):
    torch_build = env.torch_build()
    if torch_build.hip is None:  # only a ROCm build of torch drives AMD GPUs
        return forced_on_cuda(env) if env.environ.get(FORCE_ENV) == "1" else None
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


def forced_on_cuda(env) -> BackendInfo | None:
    """``LMPORT_ROCM_FORCE=1`` with a CUDA build of torch: the ROCm code path on NVIDIA GPUs."""
    from lmport_cuda.detection import find_gpus

    if env.torch_build().cuda is None:
        return None
    gpus, _ = find_gpus(env)
    if not gpus:
        return None
    names = sorted({g.name for g in gpus})
    return BackendInfo(
        name=NAME,
        device_type="cuda",
        priority=FORCED_PRIORITY,
        description=f"{len(gpus)} x {', '.join(names)} (forced with {FORCE_ENV}=1: the ROCm code path on CUDA)",
        details=(("gpus", tuple(g.name for g in gpus)), ("device_count", len(gpus)), ("forced", True),
                 ("torch_cuda", env.torch_build().cuda)),
    )


@hookimpl
def lmport_capabilities(backend: BackendInfo) -> Capabilities | None:
    if backend.name != NAME:
        return None
    return rocm_capabilities(forced=bool(backend.detail("forced", False)))


def rocm_capabilities(forced: bool = False) -> Capabilities:
    """MI210/MI250 per the seed: paged attention, flash attention v2, GPTQ; no AWQ, no flash
    layer norm, no sliding-window kernel."""
    notes = [
        "flags describe the ROCm kernel stack for MI210/MI250 (gfx90a)",
        "attention runs lmport-cuda's Triton paged kernels (shared, compiled by Triton for the GPU)",
        "no sliding-window attention kernel: such layers fall back to the reference path with a warning",
        "no AWQ kernels: AWQ checkpoints are refused at startup",
        "GPTQ runs lmport-cuda's Triton linear_wq kernel",
    ]
    if forced:
        notes.insert(0, f"forced with {FORCE_ENV}=1 on a CUDA GPU: the ROCm code path, not a ROCm device")
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
        kv_block_sizes=BLOCK_SIZES,
        notes=tuple(notes),
    )


@hookimpl
def lmport_attention_backend(spec, capabilities):
    if spec.sliding_window or spec.alibi_slopes:
        return None  # no ROCm kernel: the host falls back to the reference and says so
    # imported here: the kernels pull in triton, which only a GPU process needs
    from lmport_cuda.attention import TritonPagedAttention, unsupported_reason

    if unsupported_reason(spec) is not None:
        return None
    return TritonPagedAttention(spec)


@hookimpl
def lmport_layer_ops(capabilities):
    """GPTQ's ``linear_wq`` from lmport-cuda's Triton kernels (on GPU tensors; the reference
    elsewhere). No fused norms: the ROCm stack has no flash layer-norm kernel."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return None
    from lmport_cuda.layer_ops import gemv_max_rows, quantized_linear_ops

    return {"linear_wq": quantized_linear_ops(capabilities, gemv_max_rows())["linear_wq"]}


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

    return {
        "device_name": torch.cuda.get_device_name(torch.cuda.current_device()),
        "hip_version": torch.version.hip,  # None where the ROCm path is forced on a CUDA build
    }


@hookimpl
def lmport_distributed_backend(device_type):
    # tensor-parallel workers join through NCCL (a ROCm build of torch maps it to RCCL)
    from lmport.distributed import DistributedSpec

    return DistributedSpec(backend="nccl") if device_type == "cuda" else None
