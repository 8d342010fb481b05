"""What the core asks of a device besides kernels: host buffers, copies, events, its index per rank.

:class:`DeviceRuntime` is the reference, answered by ``lmport_device_runtime`` (the core's
trylast implementation returns it): on the CPU every copy is a no-op; on any other device it
pins host buffers, copies without blocking and marks a copy's end with a generic
:class:`torch.Event`, so a non-CUDA accelerator keeps async scheduling. A backend returns a
subclass where its device needs something else (its own event type, a stream). This module
imports nothing from ``lmport.engine``.
"""

from __future__ import annotations

from typing import Any

import torch


class DeviceRuntime:
    """Host buffers and copies for one device (``device``; ``rank``'s device index when sharded)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.on_host = self.device.type == "cpu"

    def device_for_rank(self, local_rank: int) -> torch.device:
        """The device worker ``local_rank`` runs on (the CPU has one device for every rank)."""
        return self.device if self.on_host else torch.device(self.device.type, local_rank)

    def device_count(self) -> int:
        """How many devices of this type the process sees (the CPU: one)."""
        if self.on_host:
            return 1
        return torch.accelerator.device_count() if hasattr(torch, "accelerator") else 1

    def use(self) -> None:
        """Make ``device`` this process's current device (a worker's, before it builds its slice)."""
        if not self.on_host and self.device.index is not None and hasattr(torch, "accelerator"):
            torch.accelerator.set_device_index(self.device.index)

    def host_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A host buffer to copy to the device from: pinned where the device is not the host."""
        return torch.empty(numel, dtype=dtype, pin_memory=not self.on_host)

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """Start copying ``host`` (from :meth:`host_buffer`) to the device; no wait."""
        return host if self.on_host else host.to(self.device, non_blocking=True)

    def start_copy_to_host(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Start copying a device tensor to the host; returns ``(host tensor, event or None)``:
        read the host tensor after ``event.synchronize()``."""
        if tensor.device.type == "cpu":
            return tensor, None
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        try:
            event = torch.Event(device=tensor.device)
            event.record()
        except (RuntimeError, TypeError, AttributeError):  # a device without generic events: wait now
            torch.accelerator.synchronize(tensor.device) if hasattr(torch, "accelerator") else None
            return host, None
        return host, event


def reference_runtime(device: torch.device | str) -> DeviceRuntime:
    return DeviceRuntime(device)
