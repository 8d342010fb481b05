"""The CPU backend, and the core's reference implementation of every kernel hook.

The host registers this module like any entry-point plugin (under the name ``cpu``) and
keeps it registered whichever backend is selected: every implementation here is
``trylast``, so an active accelerator backend overrides whichever hooks it implements and
falls through to these for the rest. Its attention and KV allocation are what every other
backend is tested against (``lmport.testing.conformance``).
"""

from __future__ import annotations

import os

import torch

from lmport.capabilities import BackendInfo, Capabilities
from lmport.hookspecs import hookimpl
from lmport.layers.reference_attention import ReferenceAttention
from lmport.memory import MemoryInfo

NAME = "cpu"
# every format the core reads, on the torch reference kernels ("marlin" names a CUDA kernel)
CPU_QUANTIZATION = frozenset({"gptq", "awq", "fp8", "compressed-tensors", "eetq", "bitsandbytes"})


@hookimpl(trylast=True)
def lmport_detect_backend(env):
    return BackendInfo(
        name=NAME,
        device_type="cpu",
        priority=0,
        description=f"CPU ({env.machine}), {os.cpu_count()} logical cores",
        details=(("cores", os.cpu_count()),),
    )


def has_bf16_dot_products(cpuinfo: str | None = None) -> bool:
    """Whether the CPU multiplies bfloat16 natively (AVX512-BF16, AMX): then a bfloat16 matmul runs
    ~2-4x faster than float32 (oneDNN), and the 262k-row LM head of Gemma reads half the bytes."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as handle:
                cpuinfo = handle.read(1 << 16)
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def engine_threads(environ: dict[str, str] | None = None, cpus: int | None = None, load: float | None = None) -> int | None:
    """How many torch threads the CPU engine steps with; None: torch's default (every core).

    On a machine that other work already keeps busy (1-minute load average, ``load``, at least
    half the usable cores when the engine is built): every core but one, which the HTTP server's
    event loop, tokenizer and detokenizer keep (at least one thread). An op split over two
    threads waits at its end for the slower one, and a busy machine deschedules one of them:
    measured on the 2-core dev box under load, a 640x4096 projection took 48 ms with 2 threads and
    0.4 ms with 1, and the engine ran 4-7x faster with 1 thread. On a quiet machine every core:
    there 2 threads ran the same engine 1.77x faster than 1 (docs/benchmarks.md).
    ``OMP_NUM_THREADS`` set: None (torch already follows it).
    """
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS"):
        return None
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = float(cpus)
    if load < cpus / 2:
        return None
    return max(1, cpus - 1)


@hookimpl(trylast=True)
def lmport_capabilities(backend):
    if backend.name != NAME:
        return None
    return Capabilities(
        backend=NAME,
        device_type="cpu",
        dtypes=("float32", "bfloat16", "float16"),
        fast_dtypes=("float32", "bfloat16") if has_bf16_dot_products() else ("float32",),
        paged_attention=True,  # the reference attention reads the paged cache
        sliding_window_attention=True,
        alibi_attention=True,
        kv_block_sizes=(16, 32, 64, 128, 256, 8, 4, 2, 1),
        host_threads=engine_threads(),
        # the torch reference kernels of lmport.layers.quant_ops run every format the core reads
        quantization=CPU_QUANTIZATION,
        notes=("reference kernels in plain torch; the baseline every other backend is tested against",),
    )


@hookimpl(trylast=True)
def lmport_attention_backend(spec):
    return ReferenceAttention(spec)


@hookimpl(trylast=True)
def lmport_layer_ops():
    from lmport.layers.ops import reference_op_table

    return reference_op_table()


@hookimpl(trylast=True)
def lmport_allocate_kv_cache(spec, num_blocks, device):
    """The logical layout every attention backend reads: ``[num_blocks, block_size, kv_heads, head_dim]``."""
    shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    return [
        (torch.zeros(shape, dtype=spec.dtype, device=device), torch.zeros(shape, dtype=spec.dtype, device=device))
        for _ in range(spec.num_layers)
    ]


@hookimpl(trylast=True)
def lmport_memory_info(device):
    # Accelerator memory is the accelerator plugin's to report; the core never touches torch.cuda.
    if torch.device(device).type != "cpu":
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    return MemoryInfo(
        free_bytes=os.sysconf("SC_AVPHYS_PAGES") * page,
        total_bytes=os.sysconf("SC_PHYS_PAGES") * page,
    )


@hookimpl(trylast=True)
def lmport_weights_loader(quant):
    # the core reads every format it implements (the Linear methods do the format's work), on any backend
    from lmport.weights.plugin import CORE_READ_FORMATS
    from lmport.weights.safetensors_loader import SafetensorsLoader

    if quant is None:
        return SafetensorsLoader()
    if quant.name in CORE_READ_FORMATS:
        return SafetensorsLoader(convert_floats=False)  # fp8 weights and float32 scales stay as stored
    return None


@hookimpl(trylast=True)
def lmport_device_runtime(device):
    from lmport.runtime import DeviceRuntime

    return DeviceRuntime(device)


@hookimpl(trylast=True)
def lmport_distributed_backend(device_type):
    from lmport.distributed import DistributedSpec

    return DistributedSpec(backend="gloo") if device_type == "cpu" else None


@hookimpl(trylast=True)
def lmport_server_info(capabilities):
    return {"torch_version": torch.__version__, "backend": capabilities.backend}
