"""A tensor-parallel worker (rank >= 1): ``python -m lmport.engine.shard_worker JOB RANK ERROR_FILE PARENT_PID``.

It loads the same plugins and backend as rank 0, joins the group, builds its slice of the
model on its device, then runs what rank 0 broadcasts: each step's plan (on its own paged
runner, whose samples nobody reads but which keeps the same per-sequence state), the KV
cache's sizing and allocation, and ``stop``. It exits when its parent dies (checked every
second), and writes its error to ``ERROR_FILE`` before it exits on one.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import threading
import time
import traceback

log = logging.getLogger("lmport.engine.shard_worker")


def _exit_with_parent(parent_pid: int) -> None:
    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(3)  # the engine is gone: no collective will ever complete

    threading.Thread(target=watch, name="lmport-parent-watch", daemon=True).start()


def run_worker(job: dict, rank: int) -> None:
    import torch

    from lmport.engine.factory import build_rank_runner
    from lmport.engine.kv_cache_sizing import size_kv_cache
    from lmport.engine.sharded import RankGroup
    from lmport.plugins import PluginHost

    config = job["config"]
    host = PluginHost(environ=job["environ"], load_entry_points=job["load_entry_points"]).load()
    host.select_backend(job["backend"])
    runtime = host.device_runtime(torch.device(host.capabilities().device_type))
    device = runtime.device_for_rank(rank)
    group = RankGroup(host, rank, job["world"], device)
    runtime.use()
    runner, config = build_rank_runner(config, host, job["source"], group.shard, device)
    last = None
    while True:
        kind, payload = group.control.broadcast_object(None)
        if kind == "stop":
            return
        if kind == "execute":
            runner.execute(payload)
        elif kind == "launch":
            plan, feed = payload
            if not feed and last is not None:  # rank 0 waited for that step before planning this one
                last.result()
                last = None
            pending = runner.launch(plan, feed, None)
            if last is not None:
                last.result()  # its sampled tokens: the state penalties read
            last = pending
        elif kind == "release":
            runner.release(payload)
        elif kind == "init":
            runner.initialize_cache(payload)
        elif kind == "kv_blocks":
            blocks = size_kv_cache(config, host, runner.kv_cache_spec(), device, payload)
            group.control.all_min(blocks)
        else:
            raise RuntimeError(f"unknown message {kind!r} from rank 0")


def main(argv: list[str]) -> int:
    job_path, rank, error_file, parent_pid = argv[0], int(argv[1]), argv[2], int(argv[3])
    logging.basicConfig(level=os.environ.get("LMPORT_LOG_LEVEL", "WARNING"), format=f"shard {rank}: %(levelname)s %(name)s: %(message)s")
    _exit_with_parent(parent_pid)
    try:
        with open(job_path, "rb") as f:
            job = pickle.load(f)
        run_worker(job, rank)
    except BaseException as exc:  # noqa: BLE001  (the cause goes to rank 0 through the file)
        time.sleep(0.3)
        if os.getppid() != parent_pid:  # rank 0 is gone, and with it the group: nothing to report
            return 3
        text = traceback.format_exc()
        try:
            with open(error_file, "w") as f:
                f.write(text + f"\n{type(exc).__name__}: {exc}\n")
        except OSError:
            pass
        print(text, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
