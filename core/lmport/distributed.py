"""Tensor parallelism's process group and communicator (imports nothing from ``lmport.engine``).

A backend names the ``torch.distributed`` backend of its device through
``lmport_distributed_backend`` (:class:`DistributedSpec`): gloo on the CPU (the core's answer),
NCCL on CUDA (RCCL on ROCm builds), HCCL on Gaudi. Sharded layers reduce through a
:class:`Communicator`: the process group's collectives, or a backend's device communicator
(``DistributedSpec.communicator``) in their place. With world size 1 every collective is the
identity, so the sharded layers run unchanged in one process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class DistributedSpec:
    """How workers on one device type join: ``backend`` for ``torch.distributed.init_process_group``;
    ``communicator(group, device) -> Communicator`` replaces the group's collectives (optional)."""

    backend: str
    communicator: Callable[[Any, torch.device], "Communicator"] | None = None


class Communicator:
    """All-reduce and all-gather across the ranks of a tensor-parallel group."""

    def __init__(self, rank: int = 0, world_size: int = 1, group: Any = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.group = group

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (in place where it can be)."""
        if self.world_size == 1:
            return tensor
        torch.distributed.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along ``dim``, in rank order."""
        if self.world_size == 1:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, tensor, group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """``obj`` from rank ``src`` on every rank (pickled: plain data such as a step plan)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def all_min(self, value: int) -> int:
        """The minimum of an integer over ranks (the KV cache's size)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.group)
        return int(t.item())


SINGLE = Communicator()  # one process: every collective is the identity


@dataclass(frozen=True)
class ShardInfo:
    """Which slice of a tensor-parallel layer this process holds."""

    rank: int = 0
    world_size: int = 1
    comm: Communicator = SINGLE

    @property
    def sharded(self) -> bool:
        return self.world_size > 1


UNSHARDED = ShardInfo()


def init_process_group(spec: DistributedSpec, rank: int, world_size: int, device: torch.device,
                       timeout_s: float = 60.0) -> Communicator:  # fmt: skip
    """Join the group (``MASTER_ADDR``/``MASTER_PORT`` from the environment, torch's own rendezvous)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    kwargs: dict[str, Any] = {}
    if device.type != "cpu" and spec.backend != "gloo":
        kwargs["device_id"] = device
    torch.distributed.init_process_group(spec.backend, rank=rank, world_size=world_size,
                                         timeout=datetime.timedelta(seconds=timeout_s), **kwargs)  # fmt: skip
    group = torch.distributed.group.WORLD
    if spec.communicator is not None:
        return spec.communicator(group, device)
    return Communicator(rank, world_size, group)
