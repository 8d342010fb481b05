"""From per-request timings to the numbers ``bench serve`` reports (same definitions as vLLM).

- TTFT: sending a request to its first streamed token.
- TPOT: per request, ``(latency - ttft) / (output_tokens - 1)``; requests of one token have none.
- ITL: every gap between successive streamed chunks, all requests pooled.
- E2EL: sending a request to the end of its stream.
- Throughput: completed requests and tokens over the wall time of the whole run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from lmport.bench.client import RequestResult

DEFAULT_PERCENTILES = (50.0, 99.0)


@dataclass(frozen=True)
class Distribution:
    """Milliseconds: mean, median and the asked percentiles."""

    mean: float
    median: float
    percentiles: dict[str, float]  # "p99" -> ms

    @classmethod
    def of(cls, seconds: Sequence[float], percentiles: Sequence[float]) -> "Distribution":
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        if ms.size == 0:
            return cls(0.0, 0.0, {_name(p): 0.0 for p in percentiles})
        return cls(float(ms.mean()), float(np.median(ms)), {_name(p): float(np.percentile(ms, p)) for p in percentiles})


@dataclass(frozen=True)
class BenchmarkMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # requests / s
    output_throughput: float  # generated tokens / s
    total_token_throughput: float  # (prompt + generated) tokens / s
    max_concurrent_requests: int  # the most requests in flight at once, measured
    ttft_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution
    e2el_ms: Distribution

    def to_dict(self) -> dict:
        return asdict(self)


def compute_metrics(results: Sequence[RequestResult], duration_s: float, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> BenchmarkMetrics:
    done = [r for r in results if r.success]
    input_tokens = sum(r.prompt_len for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    itls = [gap for r in done for gap in r.itl]
    duration = max(duration_s, 1e-9)
    return BenchmarkMetrics(
        completed=len(done),
        failed=len(results) - len(done),
        duration_s=duration_s,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=len(done) / duration,
        output_throughput=output_tokens / duration,
        total_token_throughput=(input_tokens + output_tokens) / duration,
        max_concurrent_requests=peak_concurrency(done),
        ttft_ms=Distribution.of([r.ttft for r in done], percentiles),
        tpot_ms=Distribution.of(tpots, percentiles),
        itl_ms=Distribution.of(itls, percentiles),
        e2el_ms=Distribution.of([r.latency for r in done], percentiles),
    )


def peak_concurrency(results: Sequence[RequestResult]) -> int:
    """The most requests that were in flight at the same moment."""
    events = sorted([(r.start, 1) for r in results] + [(r.start + r.latency, -1) for r in results])
    peak = level = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def _name(p: float) -> str:
    return f"p{p:g}"
