"""Drive the load: Poisson arrivals under a concurrency cap, a progress bar, one run or a sweep."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import asdict, dataclass, field
from typing import AsyncIterator, Sequence

import httpx
import numpy as np
from tqdm.asyncio import tqdm

from lmport.bench.client import RequestResult, stream_completion
from lmport.bench.dataset import BenchRequest
from lmport.bench.metrics import DEFAULT_PERCENTILES, BenchmarkMetrics, compute_metrics


class ServerNotReady(RuntimeError):
    pass


@dataclass(frozen=True)
class LoadSpec:
    """One run: ``num_prompts`` requests arriving at ``request_rate`` per second (inf: all at
    once), at most ``max_concurrency`` in flight (None: no cap)."""

    num_prompts: int
    input_len: int
    output_len: int
    request_rate: float = math.inf
    max_concurrency: int | None = None
    label: str = ""


@dataclass
class RunResult:
    spec: LoadSpec
    metrics: BenchmarkMetrics
    errors: list[str] = field(default_factory=list)  # distinct failure messages, first few

    def to_dict(self) -> dict:
        spec = asdict(self.spec)
        spec["request_rate"] = "inf" if math.isinf(self.spec.request_rate) else self.spec.request_rate
        return {"spec": spec, "metrics": self.metrics.to_dict(), "errors": self.errors}


def completions_url(base_url: str) -> str:
    return base_url.rstrip("/") + "/v1/completions"


async def arrivals(requests: Sequence[BenchRequest], request_rate: float, seed: int) -> AsyncIterator[BenchRequest]:
    """Yield requests with exponential gaps of mean ``1 / request_rate`` (a Poisson process)."""
    rng = np.random.default_rng(seed)
    for i, request in enumerate(requests):
        yield request
        if math.isinf(request_rate) or i == len(requests) - 1:
            continue
        await asyncio.sleep(float(rng.exponential(1.0 / request_rate)))


async def run_load(
    base_url: str,
    requests: Sequence[BenchRequest],
    spec: LoadSpec,
    *,
    model: str | None = None,
    seed: int = 0,
    progress: bool = True,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> RunResult:
    url = completions_url(base_url)
    connections = spec.max_concurrency or len(requests)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    gate = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None
    bar = tqdm(total=len(requests), desc=spec.label or "requests", disable=not progress, leave=False)

    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=60.0), limits=limits) as client:

        async def one(request: BenchRequest) -> RequestResult:
            if gate is None:
                result = await stream_completion(client, url, request, model)
            else:
                async with gate:
                    result = await stream_completion(client, url, request, model)
            bar.update(1)
            return result

        start = time.perf_counter()
        tasks = [asyncio.create_task(one(r)) async for r in arrivals(requests, spec.request_rate, seed)]
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    errors = list(dict.fromkeys(r.error for r in results if not r.success))[:5]
    return RunResult(spec, compute_metrics(results, duration, percentiles), errors)


async def warm_up(base_url: str, request: BenchRequest, model: str | None = None) -> RequestResult:
    """One request before measuring: it must succeed, or the run would measure errors."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=60.0)) as client:
        result = await stream_completion(client, completions_url(base_url), request, model)
    if not result.success:
        raise ServerNotReady(f"the warm-up request failed: {result.error}")
    return result


async def wait_for_server(base_url: str, timeout_s: float) -> None:
    """Poll ``/health`` until it answers 200 (TGI's readiness route)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    async with httpx.AsyncClient(timeout=5.0) as client:
        while True:
            try:
                response = await client.get(base_url.rstrip("/") + "/health")
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            if time.monotonic() > deadline:
                raise ServerNotReady(f"{base_url} not healthy after {timeout_s:.0f} s ({last})")
            await asyncio.sleep(1.0)
