"""What a backend's detection hook may look at: the environment, passed in explicitly."""

from __future__ import annotations

import importlib.util
import platform
from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class DetectionEnv:
    environ: Mapping[str, str] = field(default_factory=dict)
    machine: str = field(default_factory=platform.machine)
    system: str = field(default_factory=platform.system)

    def module_available(self, name: str) -> bool:
        """True if ``name`` can be imported, without importing it (no device context)."""
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False
