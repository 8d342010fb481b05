"""Prometheus metrics under TGI's names, on a registry per app (tests build several apps).

TGI's exporter writes counters without prometheus_client's ``_total`` suffix
(``tgi_request_count 3``), and dashboards query those names, so counters here are exposed by
a small collector that keeps the exact names. Histograms use TGI's bucket layouts. Engine
gauges (batch size, queue size, KV blocks, prefix-cache hit rate) are read from
``engine.stats()`` at scrape time, so they are never stale.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from lmport.engine.api import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _duration_buckets() -> list[float]:
    value, buckets = 0.0001, []
    for _ in range(35):  # TGI: a geometric sequence from 0.15 ms, ratio 1.5
        value *= 1.5
        buckets.append(value)
    return buckets


def _linear_buckets(maximum: int) -> list[float]:
    return [maximum / 100.0 * (i + 1) for i in range(100)]


class _Counters:
    """Monotonic counters exposed under their exact names (no ``_total``), with labels."""

    def __init__(self, docs: dict[str, str]):
        self._docs = docs
        self._values: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
        self._lock = threading.Lock()

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0.0) + amount

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        """Text exposition with TGI's exact names (prometheus_client would add ``_total``)."""
        with self._lock:
            snapshot = {name: dict(series) for name, series in self._values.items()}
        lines = []
        for name, doc in self._docs.items():
            lines += [f"# HELP {name} {doc}", f"# TYPE {name} counter"]
            for key, value in sorted(snapshot.get(name, {}).items()):
                labels = ",".join(f'{k}="{_escape(v)}"' for k, v in key)
                lines.append(f"{name}{{{labels}}} {value}" if labels else f"{name} {value}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _EngineGauges(Collector):
    def __init__(self, stats: Callable[[], EngineStats | None], in_flight: Callable[[], int], block_size: int | None):
        self._stats = stats
        self._in_flight = in_flight
        self._block_size = block_size

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("lmport_requests_in_flight", "Requests holding a concurrency permit", value=self._in_flight())
        try:
            stats = self._stats()
        except Exception:  # a dead engine must not break the scrape
            stats = None
        if stats is None:
            return
        # the last step's batch while requests run; an idle engine has no batch (it keeps the last step's count)
        batch = (stats.batch_size or stats.running) if stats.running else 0
        yield GaugeMetricFamily("tgi_batch_current_size", "Current batch size", value=batch)
        yield GaugeMetricFamily("tgi_queue_size", "Current queue size", value=stats.waiting)
        if self._block_size:
            yield GaugeMetricFamily("tgi_batch_total_tokens", "Maximum amount of tokens in total.", value=stats.kv_blocks_total * self._block_size)
        yield GaugeMetricFamily("lmport_kv_blocks_total", "KV cache blocks in the pool", value=stats.kv_blocks_total)
        yield GaugeMetricFamily("lmport_kv_blocks_used", "KV cache blocks in use", value=stats.kv_blocks_used)
        yield GaugeMetricFamily("lmport_kv_blocks_free", "KV cache blocks free", value=stats.kv_blocks_total - stats.kv_blocks_used)
        yield GaugeMetricFamily("lmport_prefix_cache_queries", "Prefix-cache lookups (blocks)", value=stats.prefix_cache_queries)
        yield GaugeMetricFamily("lmport_prefix_cache_hits", "Prefix-cache hits (blocks)", value=stats.prefix_cache_hits)
        rate = stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries else 0.0
        yield GaugeMetricFamily("lmport_prefix_cache_hit_rate", "Prefix-cache hits / lookups since start", value=rate)
        if "spec_draft_tokens" in stats.extra:
            yield from _speculation_metrics(stats.extra)


def _speculation_metrics(extra: dict) -> Iterable[Metric]:
    """Speculative decoding: TGI's per-request histogram and lmport's counts and acceptance rate."""
    from lmport.engine.speculative.speculator import SKIPPED_TOKENS_BUCKETS

    drafted, accepted = extra["spec_draft_tokens"], extra["spec_accepted_tokens"]
    yield CounterMetricFamily("lmport_spec_draft_tokens", "Draft tokens verified (speculative decoding)", value=drafted)
    yield CounterMetricFamily("lmport_spec_accepted_tokens", "Draft tokens accepted (speculative decoding)", value=accepted)
    yield CounterMetricFamily("lmport_spec_verify_rows", "Sequence rows that verified drafts", value=extra["spec_verify_rows"])
    yield GaugeMetricFamily("lmport_spec_acceptance_rate", "Accepted / verified draft tokens since start",
                            value=accepted / drafted if drafted else 0.0)  # fmt: skip
    counts = extra["spec_skipped_buckets"]
    cumulative, buckets = 0, []
    for le, count in zip([*map(str, SKIPPED_TOKENS_BUCKETS), "+Inf"], counts):
        cumulative += count
        buckets.append((le, cumulative))
    yield HistogramMetricFamily("tgi_request_skipped_tokens", "Speculated tokens per request", buckets=buckets,
                                sum_value=extra["spec_skipped_sum"])  # fmt: skip


class ServerMetrics:
    """Everything ``/metrics`` shows; one instance per app."""

    def __init__(
        self,
        *,
        max_input_tokens: int,
        max_total_tokens: int,
        engine_stats: Callable[[], EngineStats | None],
        in_flight: Callable[[], int],
        block_size: int | None = None,
    ):
        disable_created_metrics()  # TGI exposes no *_created series
        self.registry = CollectorRegistry()
        self.counters = _Counters({
            "tgi_request_count": "Total number of requests",
            "tgi_request_success": "Number of successful requests",
            "tgi_request_failure": "Number of failed requests",
        })
        self.registry.register(_EngineGauges(engine_stats, in_flight, block_size))
        durations = _duration_buckets()

        def histogram(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(name, doc, registry=self.registry, buckets=buckets)

        self.duration = histogram("tgi_request_duration", "Total time spent processing the request", durations)
        self.validation_duration = histogram("tgi_request_validation_duration", "Time spent validating the request", durations)
        self.queue_duration = histogram("tgi_request_queue_duration", "Time spent in the queue per request", durations)
        self.inference_duration = histogram("tgi_request_inference_duration", "Request inference duration", durations)
        self.time_per_token = histogram("tgi_request_mean_time_per_token_duration", "Mean time per token per request", durations)
        self.input_length = histogram("tgi_request_input_length", "Input token length per request", _linear_buckets(max_input_tokens))
        self.generated_tokens = histogram("tgi_request_generated_tokens", "Generated tokens per request", _linear_buckets(max_total_tokens))
        self.max_new_tokens = histogram("tgi_request_max_new_tokens", "Maximum new tokens per request", _linear_buckets(max_total_tokens))

    def request(self) -> None:
        self.counters.inc("tgi_request_count")

    def failure(self, kind: str) -> None:
        self.counters.inc("tgi_request_failure", err=kind)

    def success(self, *, total: float, validation: float, queue: float, inference: float, generated: int) -> None:
        self.counters.inc("tgi_request_success")
        self.duration.observe(total)
        self.validation_duration.observe(validation)
        self.queue_duration.observe(queue)
        self.inference_duration.observe(inference)
        self.time_per_token.observe(inference / max(generated, 1))
        self.generated_tokens.observe(generated)

    def render(self) -> bytes:
        return self.counters.render().encode() + generate_latest(self.registry)
