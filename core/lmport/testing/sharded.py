"""Run a function as every rank of a gloo group on this machine (tests of tensor parallelism on the CPU)."""

from __future__ import annotations

import multiprocessing
import os
import traceback
from typing import Any, Callable

from lmport.engine.sharded import free_port


def _rank_main(fn: Callable, rank: int, world: int, port: int, args: tuple, results: Any) -> None:
    import datetime

    import torch

    from lmport.distributed import Communicator, ShardInfo

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        torch.set_num_threads(1)
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
        shard = ShardInfo(rank, world, Communicator(rank, world, torch.distributed.group.WORLD))
        results.put((rank, "ok", fn(shard, *args)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """``fn(shard, *args)`` in ``world`` spawned processes (``fn`` importable by name); each rank's result.

    Raises with the failing rank's traceback; a rank that does not answer in ``timeout`` seconds
    is killed and reported.
    """
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, args, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    answers: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, status, value = results.get(timeout=timeout)
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            answers[rank] = value
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
    return [answers[r] for r in range(world)]
