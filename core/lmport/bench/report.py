"""The table printed on stdout and the JSON written to a file."""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Any, Sequence

from lmport.bench.runner import RunResult

COLUMNS = (
    ("run", 14), ("conc", 5), ("rate", 6), ("ok/fail", 8), ("req/s", 7), ("out tok/s", 10), ("tot tok/s", 10),
    ("TTFT mean", 10), ("TTFT p50", 9), ("TTFT p99", 9), ("TPOT mean", 10), ("TPOT p50", 9), ("TPOT p99", 9),
    ("ITL mean", 9), ("ITL p50", 8), ("ITL p99", 8),
)  # fmt: skip


def format_table(runs: Sequence[RunResult]) -> str:
    """One row per run; latencies in milliseconds."""
    header = " ".join(name.rjust(width) for name, width in COLUMNS)
    lines = [header, "-" * len(header)]
    for run in runs:
        m, s = run.metrics, run.spec
        rate = "inf" if math.isinf(s.request_rate) else f"{s.request_rate:g}"
        cells = [
            s.label or "-", str(s.max_concurrency or "-"), rate, f"{m.completed}/{m.failed}",
            f"{m.request_throughput:.2f}", f"{m.output_throughput:.1f}", f"{m.total_token_throughput:.1f}",
            f"{m.ttft_ms.mean:.1f}", f"{m.ttft_ms.median:.1f}", f"{m.ttft_ms.percentiles.get('p99', 0.0):.1f}",
            f"{m.tpot_ms.mean:.2f}", f"{m.tpot_ms.median:.2f}", f"{m.tpot_ms.percentiles.get('p99', 0.0):.2f}",
            f"{m.itl_ms.mean:.2f}", f"{m.itl_ms.median:.2f}", f"{m.itl_ms.percentiles.get('p99', 0.0):.2f}",
        ]  # fmt: skip
        lines.append(" ".join(cell.rjust(width) for cell, (_, width) in zip(cells, COLUMNS)))
    return "\n".join(lines)


def write_json(path: str | Path, runs: Sequence[RunResult], context: dict[str, Any]) -> None:
    document = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "client_host": platform.node(),
        **context,
        "runs": [run.to_dict() for run in runs],
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(document, indent=2))
