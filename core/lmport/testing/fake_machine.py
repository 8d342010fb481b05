"""A pretend machine for detection tests: the real detection hooks, answered from tables.

``PluginHost(detection_env=FakeMachine.nvidia("8.0"))`` runs every installed backend's own
detection code against an A100 that isn't there. Nothing in production builds a FakeMachine:
the host's default probes the real machine, and no environment variable switches to this.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from lmport.detection import DetectionEnv, TorchBuild

CUDA_TORCH = TorchBuild(version="2.13.0+cu128", cuda="12.8")
ROCM_TORCH = TorchBuild(version="2.13.0+rocm6.4", hip="6.4.43482")
CPU_TORCH = TorchBuild(version="2.13.0+cpu")


@dataclass(frozen=True)
class FakeMachine(DetectionEnv):
    """Answers detection probes from its fields instead of the machine it runs on.

    ``commands`` maps a driver tool's name to its stdout (absent: not installed); ``files``
    maps paths to contents (a folder is any prefix of a path); ``modules`` lists importable
    packages; ``distributions`` maps a distribution name to its version.
    """

    commands: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)
    modules: frozenset[str] = frozenset()
    distributions: Mapping[str, str] = field(default_factory=dict)
    torch: TorchBuild = CPU_TORCH
    machine: str = "x86_64"
    system: str = "Linux"

    def module_available(self, name: str) -> bool:
        return name in self.modules

    def run(self, argv: Sequence[str], timeout: float = 5.0) -> str | None:
        return self.commands.get(argv[0])

    def path_exists(self, path: str) -> bool:
        path = path.rstrip("/")
        return any(p == path or p.startswith(path + "/") for p in self.files)

    def glob(self, pattern: str) -> list[str]:
        depth = pattern.count("/")
        candidates = {"/".join(p.split("/")[: depth + 1]) for p in self.files if p.count("/") >= depth}
        return sorted(p for p in candidates if fnmatch.fnmatchcase(p, pattern))

    def read_text(self, path: str) -> str | None:
        return self.files.get(path)

    def distribution_version(self, name: str) -> str | None:
        return self.distributions.get(name)

    def torch_build(self) -> TorchBuild:
        return self.torch

    def with_environ(self, **environ: str) -> "FakeMachine":
        from dataclasses import replace

        return replace(self, environ={**self.environ, **environ})

    # ------------------------------------------------------------------ presets

    @classmethod
    def bare(cls, environ: Mapping[str, str] | None = None) -> "FakeMachine":
        """A CPU-only machine with no accelerator tools."""
        return cls(environ=dict(environ or {}))

    @classmethod
    def nvidia(
        cls,
        compute_cap: str = "8.0",
        name: str = "NVIDIA A100-SXM4-80GB",
        memory: str = "81920 MiB",
        count: int = 1,
        *,
        flash_attn: bool = False,
        environ: Mapping[str, str] | None = None,
    ) -> "FakeMachine":
        """``count`` GPUs as ``nvidia-smi --query-gpu=name,compute_cap,memory.total`` lists them."""
        line = f"{name}, {compute_cap}, {memory}\n"
        return cls(
            environ=dict(environ or {}),
            commands={"nvidia-smi": line * count},
            modules=frozenset({"torch", "triton"} | ({"flash_attn"} if flash_attn else set())),
            torch=CUDA_TORCH,
        )

    @classmethod
    def amd(
        cls, gfx_target_version: int = 90010, count: int = 1, environ: Mapping[str, str] | None = None
    ) -> "FakeMachine":
        """ROCm GPUs as the kfd topology in /sys lists them (90010 is gfx90a: MI210/MI250)."""
        files = {"/sys/class/kfd/kfd/topology/nodes/0/properties": "cpu_cores_count 64\ngfx_target_version 0\n"}
        for i in range(1, count + 1):
            files[f"/sys/class/kfd/kfd/topology/nodes/{i}/properties"] = (
                f"cpu_cores_count 0\nsimd_count 416\ngfx_target_version {gfx_target_version}\n"
            )
        return cls(environ=dict(environ or {}), files=files, modules=frozenset({"torch"}), torch=ROCM_TORCH)

    @classmethod
    def gaudi(cls, name: str = "HL-225", count: int = 8, environ: Mapping[str, str] | None = None) -> "FakeMachine":
        """Gaudi2 cards as ``hl-smi -Q name,memory.total -f csv,noheader`` lists them."""
        return cls(
            environ=dict(environ or {}),
            commands={"hl-smi": f"{name}, 98304 MiB\n" * count},
            modules=frozenset({"torch", "habana_frameworks", "optimum.habana"}),
            distributions={"optimum-habana": "1.21.0"},
        )

    @classmethod
    def inferentia2(cls, count: int = 1, environ: Mapping[str, str] | None = None) -> "FakeMachine":
        """Inferentia2 devices as /dev/neuron* lists them."""
        return cls(
            environ=dict(environ or {}),
            files={f"/dev/neuron{i}": "" for i in range(count)},
            modules=frozenset({"torch", "torch_neuronx", "optimum.neuron"}),
            distributions={"optimum-neuron": "0.4.5", "torch-neuronx": "2.8.0"},
        )
