"""Tensor parallelism: one process per device, rank 0 in the engine, the others workers.

``--num-shard N`` (or ``--sharded``): the engine's process is rank 0. It starts ranks
``1 .. N-1`` as worker processes (``python -m lmport.engine.shard_worker``), joins them in one
``torch.distributed`` group (the backend named by ``lmport_distributed_backend``: gloo on the
CPU, NCCL on CUDA; the plans travel over a gloo group beside it), and builds its own slice of
the model. Rank 0 schedules; every step its plan (plain data, :mod:`lmport.plan`) is broadcast
and every rank runs it on its own :class:`PagedModelRunner`; rank 0's samples are the ones the
engine reads (every rank samples the same tokens from the same gathered logits). The KV cache
is sized by the minimum over ranks.

A worker that dies is seen within a second by a monitor thread: :meth:`failure` names the
cause (exit code, the worker's last error line), the engine loop turns it into a dead engine
(``/health`` 503, in-flight requests fail) and no collective waits past the group's timeout
(``LMPORT_SHARD_TIMEOUT``, seconds, default 120). :meth:`close` stops the workers, and kills
what does not stop.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import torch

from lmport.distributed import Communicator, ShardInfo, init_process_group
from lmport.executor import ExecutorOutput, ModelExecutor
from lmport.plan import StepPlan

log = logging.getLogger(__name__)

_MONITOR_PERIOD_S = 0.5


def shard_timeout_s() -> float:
    return float(os.environ.get("LMPORT_SHARD_TIMEOUT", "120"))


def free_port() -> int:
    """A free TCP port on the loopback (the group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankGroup:
    """This process's place in the tensor-parallel group: the device communicator and the gloo
    group that carries plans (the same group on the CPU)."""

    def __init__(self, host: Any, rank: int, world_size: int, device: torch.device) -> None:
        spec = host.distributed_backend(device.type)
        timeout = shard_timeout_s()
        self.comm = init_process_group(spec, rank, world_size, device, timeout_s=timeout)
        if spec.backend == "gloo":
            self.control = Communicator(rank, world_size, torch.distributed.group.WORLD)
        else:
            # connect the device communicator now, before any graph capture records a collective
            torch.distributed.all_reduce(torch.zeros(1, device=device))
            import datetime

            group = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
            self.control = Communicator(rank, world_size, group)
        self.shard = ShardInfo(rank, world_size, self.comm)
        self.rank, self.world_size = rank, world_size


class ShardedExecutor(ModelExecutor):
    """Rank 0's executor: broadcasts each plan to the workers and runs it on its own runner."""

    takes_plan = True
    supports_async_scheduling = True

    def __init__(self, runner: Any, group: RankGroup, workers: list["_Worker"]) -> None:
        self.runner = runner
        self.group = group
        self.workers = workers
        self.world_size = group.world_size
        self.accepts_images = runner.accepts_images
        self._failure: str | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._monitor = threading.Thread(target=self._watch, name="lmport-shard-monitor", daemon=True)
        self._monitor.start()
        # an executor dropped without close() (or the interpreter exiting) leaves no worker behind
        weakref.finalize(self, _kill_workers, list(workers))

    # ------------------------------------------------------------------ building

    @classmethod
    def start(cls, config: Any, host: Any, source: Any, build_runner: Any) -> "ShardedExecutor":
        """Start the workers, join the group, build rank 0's runner (``build_runner(shard, device)``)."""
        world = config.num_shard
        runtime = host.device_runtime(torch.device(host.capabilities().device_type))
        device = runtime.device_for_rank(0)
        port = free_port()
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        workdir = Path(tempfile.mkdtemp(prefix="lmport-shards-"))
        job = workdir / "job.pkl"
        job.write_bytes(pickle.dumps({
            "config": config, "source": source, "backend": host.backend.name, "world": world,
            "environ": dict(host.environ), "load_entry_points": host.loads_entry_points,
        }))  # fmt: skip
        workers = [_Worker.spawn(rank, job, workdir, env) for rank in range(1, world)]
        try:
            group = RankGroup(host, 0, world, device)
            log.info("tensor parallel: %d shards (%s), rank 0 on %s", world, torch.distributed.get_backend(), device)
            runtime.use()
            runner = build_runner(group.shard, device)
        except BaseException:
            for worker in workers:
                worker.kill()
            raise
        return cls(runner, group, workers)

    # ------------------------------------------------------------------ the executor

    def kv_cache_spec(self) -> Any:
        return self.runner.kv_cache_spec()

    def min_kv_blocks(self, blocks: int, max_positions: int) -> int:
        """The KV cache's size: the minimum of every rank's own sizing (rank 0's is ``blocks``)."""
        self._send(("kv_blocks", max_positions))
        return self.group.control.all_min(blocks)

    def initialize_cache(self, num_blocks: int) -> None:
        self._send(("init", num_blocks))
        self.runner.initialize_cache(num_blocks)

    def prepare_sequence(self, seq: Any) -> None:
        self.runner.prepare_sequence(seq)

    def release(self, seq_ids) -> None:
        self._send(("release", list(seq_ids)))
        self.runner.release(seq_ids)

    def execute(self, step: StepPlan) -> ExecutorOutput:
        self._send(("execute", _crossable(step)))
        return self._guarded(self.runner.execute, step)

    def launch(self, step: StepPlan, feed=(), previous=None):
        self._send(("launch", (_crossable(step), list(feed))))
        return self._guarded(self.runner.launch, step, feed, previous)

    def _guarded(self, run, *args):
        """Run rank 0's share of a step. Any failure is fatal: the other ranks are inside (or past)
        collectives this rank did not reach, and the group cannot fall back into step."""
        try:
            return run(*args)
        except Exception as exc:
            self._wait_for_dead_worker(1.0)  # a worker's death is the better cause to report
            self._fail(f"a tensor-parallel step failed on rank 0: {type(exc).__name__}: {exc}")
            raise

    @property
    def model(self) -> Any:
        return self.runner.model

    def __getattr__(self, name: str) -> Any:  # kv_caches, graph_runner ...: rank 0's runner's
        if name.startswith("__") or name == "runner":
            raise AttributeError(name)
        return getattr(self.runner, name)

    # ------------------------------------------------------------------ health and shutdown

    def failure(self) -> str | None:
        """Why the group cannot run steps any more (a worker died), or None."""
        return self._failure

    def _send(self, message: Any) -> None:
        if self._failure is not None:
            raise RuntimeError(self._failure)
        try:
            self.group.control.broadcast_object(message)
        except Exception as exc:
            self._wait_for_dead_worker(1.0)  # a worker's death is the better cause to report
            self._fail(f"tensor-parallel group broken: {type(exc).__name__}: {exc}")
            raise RuntimeError(self._failure) from exc

    def _fail(self, cause: str) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = cause
                log.error("%s", cause)

    def _watch(self) -> None:
        while not self._closed and not self._check_workers():
            time.sleep(_MONITOR_PERIOD_S)

    def _check_workers(self) -> bool:
        for worker in self.workers:
            code = worker.proc.poll()
            if code is not None and not self._closed:
                self._fail(f"shard {worker.rank} (pid {worker.proc.pid}) exited with {_describe_exit(code)}"
                           f"{worker.last_error()}")  # fmt: skip
                return True
        return False

    def _wait_for_dead_worker(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._check_workers():
            time.sleep(0.05)

    def close(self, timeout: float = 10.0) -> None:
        """Stop every worker (asked first, then terminated, then killed) and leave the group."""
        if self._closed:
            return
        self._closed = True
        if self._failure is None:
            try:
                self.group.control.broadcast_object(("stop", None))
            except Exception:  # a broken group: the workers are stopped below
                pass
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            worker.stop(max(0.1, deadline - time.monotonic()))
        try:
            torch.distributed.destroy_process_group()
        except Exception:
            pass


def _crossable(plan: StepPlan) -> StepPlan:
    """``plan`` without the live logits processors of its new sequences (they stay in this process:
    a worker's samples are never read, and a sequence with a grammar reads its tokens on the host,
    so the worker is fed rank 0's tokens in the plan, never its own)."""
    if not any(new.processors for new in plan.new):
        return plan
    return dataclasses.replace(plan, new=[dataclasses.replace(new, processors=()) for new in plan.new])


def _kill_workers(workers: list["_Worker"]) -> None:
    for worker in workers:
        try:
            worker.kill()
        except Exception:
            pass


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class _Worker:
    """One worker process (rank >= 1) and the file its last error goes to."""

    def __init__(self, rank: int, proc: subprocess.Popen, error_file: Path) -> None:
        self.rank, self.proc, self.error_file = rank, proc, error_file

    @classmethod
    def spawn(cls, rank: int, job: Path, workdir: Path, env: dict[str, str]) -> "_Worker":
        error_file = workdir / f"rank{rank}.error"
        argv = [sys.executable, "-m", "lmport.engine.shard_worker", str(job), str(rank), str(error_file), str(os.getpid())]
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)
        return cls(rank, proc, error_file)

    def last_error(self) -> str:
        try:
            text = self.error_file.read_text().strip()
        except OSError:
            return ""
        return f": {text.splitlines()[-1]}" if text else ""

    def stop(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5.0)
