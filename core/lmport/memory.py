"""Device memory as reported by ``lmport_memory_info``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryInfo:
    free_bytes: int
    total_bytes: int
