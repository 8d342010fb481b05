"""Find NVIDIA GPUs without creating a CUDA context.

``nvidia-smi`` first (a subprocess with a short timeout), NVML through ``pynvml`` where the
tool is missing. Never ``torch.cuda.*``: that initialises the driver in every process that
merely lists backends, and forks after it break.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmport.detection import DetectionEnv

NVIDIA_SMI_QUERY = ["nvidia-smi", "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader"]


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]
    memory_mib: int

    @property
    def sm(self) -> str:
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"


def parse_compute_capability(text: str) -> tuple[int, int]:
    major, _, minor = text.strip().partition(".")
    return int(major), int(minor or 0)


def parse_nvidia_smi(output: str) -> list[GpuInfo]:
    """Rows like ``NVIDIA A100-SXM4-80GB, 8.0, 81920 MiB``; unparsable rows are skipped."""
    gpus = []
    for line in output.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3:
            continue
        name, cap, memory = fields
        try:
            gpus.append(GpuInfo(name, parse_compute_capability(cap), int(memory.split()[0])))
        except (ValueError, IndexError):
            continue
    return gpus


def query_nvml() -> list[GpuInfo]:
    """The same rows through NVML (``pynvml``), which talks to the driver, not to CUDA."""
    import pynvml

    pynvml.nvmlInit()
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            cap = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            gpus.append(GpuInfo(name, (int(cap[0]), int(cap[1])), int(total) // 2**20))
        return gpus
    finally:
        pynvml.nvmlShutdown()


def visible(gpus: list[GpuInfo], cuda_visible_devices: str | None) -> list[GpuInfo]:
    """Honour ``CUDA_VISIBLE_DEVICES`` given as indices; UUID lists are taken as "all listed"."""
    if cuda_visible_devices is None:
        return gpus
    entries = [e.strip() for e in cuda_visible_devices.split(",") if e.strip()]
    if not entries or entries[0] == "-1":
        return []
    if all(e.isdigit() for e in entries):
        return [gpus[int(e)] for e in entries if int(e) < len(gpus)]
    return gpus[: len(entries)]


def find_gpus(env: DetectionEnv) -> tuple[list[GpuInfo], str]:
    """Visible GPUs and the probe that found them (``nvidia-smi``, ``nvml`` or ``none``)."""
    output = env.run(NVIDIA_SMI_QUERY)
    if output is not None:
        gpus, source = parse_nvidia_smi(output), "nvidia-smi"
    elif env.module_available("pynvml"):
        try:
            gpus, source = query_nvml(), "nvml"
        except Exception:  # no driver: NVML raises its own error types
            gpus, source = [], "none"
    else:
        gpus, source = [], "none"
    return visible(gpus, env.environ.get("CUDA_VISIBLE_DEVICES")), source
