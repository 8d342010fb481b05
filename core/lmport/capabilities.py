"""What a backend is and what it can do: the data the core plans with.

Both classes are frozen and picklable, so they can cross a process boundary (an engine
process) and be shown by ``/info`` and ``lmport backends`` unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class BackendInfo:
    """One backend found by ``lmport_detect_backend``.

    ``priority`` orders automatic selection (highest wins); the CPU backend reports 0.
    ``details`` holds what detection learned cheaply (device names, compute capability ...);
    detection must not create a device context to learn it.
    """

    name: str
    device_type: str
    priority: int = 0
    description: str = ""
    details: tuple[tuple[str, Any], ...] = ()

    def detail(self, key: str, default: Any = None) -> Any:
        return dict(self.details).get(key, default)


@dataclass(frozen=True)
class Capabilities:
    """Feature flags of one backend, reported through ``lmport_capabilities``.

    A flag is a promise that the backend has a kernel for it. A missing attention kernel
    makes the core fall back to the reference path (with a warning); a missing quantization
    format is a startup error.
    """

    backend: str
    device_type: str
    dtypes: tuple[str, ...] = ("float32",)
    # the dtypes the device computes at full speed, first = the default; None: all of ``dtypes``.
    # A checkpoint's own dtype is served only when it is one of them (a CPU without bf16 dot
    # products runs a bfloat16 checkpoint in float32)
    fast_dtypes: tuple[str, ...] | None = None
    # attention kernels
    flash_attention: bool = False
    paged_attention: bool = False
    sliding_window_attention: bool = False
    alibi_attention: bool = False
    attention_head_sizes: tuple[int, ...] = ()  # empty: any head size
    # other kernels
    flash_layer_norm: bool = False
    quantization: frozenset[str] = frozenset()
    fp8_compute: bool = False
    fp8_kv_cache: bool = False
    # execution
    continuous_batching: bool = True
    graph_capture: bool = False
    static_shapes: bool = False
    whole_model_executor: bool = False
    max_batch_size: int | None = None
    kv_block_sizes: tuple[int, ...] = (16,)
    # torch intra-op threads the engine steps with (the core calls torch.set_num_threads with it
    # when it builds the engine); None: torch's default (OMP_NUM_THREADS, else every core). The
    # CPU backend picks cores - 1 on a machine already busy at start, else None
    host_threads: int | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def default_block_size(self) -> int:
        return self.kv_block_sizes[0]

    def supports_dtype(self, dtype: str) -> bool:
        return dtype in self.dtypes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready flags (frozensets become sorted lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, frozenset):
                value = sorted(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


class CapabilityError(RuntimeError):
    """The active backend lacks something the requested configuration needs."""

    def __init__(self, backend: str, missing: str, supported: str):
        self.backend = backend
        self.missing = missing
        self.supported = supported
        super().__init__(f"backend '{backend}' does not support {missing}; supported: {supported}")
