"""Architecture name -> model builder, filled by ``lmport_register_models``.

Replaces a long if/elif over model types: each family module registers its own builders, and
a backend may register a faster builder for the same architecture with a higher priority.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from lmport.models.base import ModelBuilder


@dataclass(frozen=True)
class RegisteredModel:
    architecture: str
    builder: ModelBuilder
    priority: int
    source: str


class ModelRegistry:
    def __init__(self) -> None:
        self._models: dict[str, RegisteredModel] = {}

    def register(
        self, architectures: str | Iterable[str], builder: ModelBuilder, priority: int = 0, source: str = ""
    ) -> None:
        names = [architectures] if isinstance(architectures, str) else list(architectures)
        for arch in names:
            entry = RegisteredModel(arch, builder, priority, source or getattr(builder, "__module__", "?"))
            current = self._models.get(arch)
            if current is None or priority > current.priority:
                self._models[arch] = entry
            elif priority == current.priority and current.builder is not builder:
                raise ValueError(
                    f"architecture '{arch}' registered twice at priority {priority} "
                    f"(by {current.source} and {entry.source}); a backend override needs a higher priority"
                )

    def get(self, architecture: str) -> RegisteredModel | None:
        return self._models.get(architecture)

    def architectures(self) -> list[str]:
        return sorted(self._models)
