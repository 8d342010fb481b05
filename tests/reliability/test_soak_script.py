"""benchmarks/soak.py keeps working: a few seconds of its mixed load (streams, plain, chat,
disconnects, bad requests) on a test server meet no unexpected answer, and the server is idle
after it (no KV block, queue or batch left)."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


def load_soak():
    spec = importlib.util.spec_from_file_location("soak_benchmark", SOAK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_short_soak_meets_nothing_unexpected_and_leaves_the_server_idle(serve):
    soak = load_soak()
    server = serve(max_batch_total_tokens=8192)
    args = argparse.Namespace(
        duration=4.0, concurrency=8, mix=soak.DEFAULT_MIX, prompt_words=(2, 12), max_new_tokens=(4, 24),
        sample_every=2.0, request_timeout=60.0, seed=3, launch_args=[],
    )
    raw = asyncio.run(soak.soak(args, server.url, os.getpid()))  # the server runs in this process
    result = soak.summarize(raw, args, {"cpus": os.cpu_count(), "loadavg_start": [], "loadavg_end": []})
    assert result["totals"]["unexpected"] == 0, {k: v["examples"] for k, v in result["kinds"].items()}
    assert set(result["kinds"]) == set(soak.KINDS)  # every kind ran
    assert {int(s) for s in result["kinds"]["bad"]["statuses"]} <= {400, 422}
    assert result["idle_after"]["idle"]
    assert result["samples"] and all(s["rss_mib"] for s in result["samples"])
    soak.print_report(result)
