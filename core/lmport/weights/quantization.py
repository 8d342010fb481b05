"""Quantization formats and the loaders that read them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch


@dataclass(frozen=True)
class QuantizationMethod:
    """A checkpoint format; ``capability`` must be in the backend's ``Capabilities.quantization``."""

    name: str
    capability: str
    description: str = ""


class WeightsLoader(ABC):
    """Reads a checkpoint's tensors, by Hugging Face name, in the dtype and device asked for."""

    @abstractmethod
    def iter_weights(self, path: Path, dtype: torch.dtype, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]: ...


class QuantizationRegistry:
    """Filled by ``lmport_register_quantization``; a duplicate name is a plugin conflict."""

    def __init__(self) -> None:
        self._methods: dict[str, QuantizationMethod] = {}

    def register(self, method: QuantizationMethod) -> None:
        if method.name in self._methods and self._methods[method.name] != method:
            raise ValueError(f"quantization method '{method.name}' registered twice with different definitions")
        self._methods[method.name] = method

    def get(self, name: str) -> QuantizationMethod | None:
        return self._methods.get(name)

    def names(self) -> list[str]:
        return sorted(self._methods)
