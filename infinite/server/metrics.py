"""Prometheus metrics of one front-end, in a registry of its own.

A registry per app (not the process-global default) so that tests and
several apps in one process never collide. Request latencies are measured
here, at the edge, as a client sees them; pool and batch gauges are read from
``engine.stats()`` at scrape time, so they are never stale. Names follow
vLLM's (``vllm:`` becomes ``infinite:``) so existing dashboards port easily.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)

# engine.stats() key -> (metric name, help); one gauge per instance.
_INSTANCE_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("num_running", "infinite:num_requests_running", "Requests in the running batch of the instance."),
    ("num_waiting", "infinite:num_requests_waiting", "Requests waiting for admission on the instance."),
    ("free_blocks", "infinite:kv_blocks_free", "Free KV blocks in the instance's pool."),
    ("used_blocks", "infinite:kv_blocks_used", "KV blocks of the pool used by local requests."),
    ("lent_blocks", "infinite:kv_blocks_lent", "KV blocks of the pool lent to other instances."),
    ("borrowed_blocks", "infinite:kv_blocks_borrowed", "KV blocks the instance's requests hold on other instances."),
)

# engine.stats() key -> (metric name, help); one counter per instance (exposed with a _total suffix).
_INSTANCE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("num_preemptions", "infinite:num_preemptions", "Requests preempted by the instance."),
    ("prefix_cache_queries", "infinite:prefix_cache_queries",
     "Prompt tokens looked up in the prefix cache by the instance's admissions."),
    ("prefix_cache_hits", "infinite:prefix_cache_hits",
     "Prompt tokens whose KV came from the prefix cache (the instance's pool or another's)."),
    ("prefill_groups", "infinite:prefill_groups", "Requests of the instance (their home) prefilled by a group."),
    ("group_recomputes", "infinite:prefill_group_recomputes",
     "Requests of the instance whose group could not start or failed: prefilled by their home alone."),
)


# engine.stats() key in ms -> (metric name, help); one counter of seconds per instance.
_INSTANCE_SECONDS: tuple[tuple[str, str, str], ...] = (
    ("group_compute_ms", "infinite:prefill_group_compute_seconds",
     "Time the instance computed its stripes of prefill groups (the TTFT split's compute)."),
    ("group_wait_ms", "infinite:prefill_group_wait_seconds",
     "Time the instance's group rounds waited for other members' parts (the TTFT split's wait)."),
)


def kv_usage(stats: Mapping[str, Any]) -> float:
    """Fraction of the instance's own pool in use (local or lent)."""
    used = float(stats.get("used_blocks", 0)) + float(stats.get("lent_blocks", 0))
    total = float(stats.get("total_blocks") or stats.get("num_blocks") or used + float(stats.get("free_blocks", 0)))
    return used / total if total > 0 else 0.0


class EngineCollector(Collector):
    """Reads the engine at scrape time; yields nothing while it is still starting."""

    def __init__(self, get_engine: Callable[[], Any]) -> None:
        self._get_engine = get_engine

    def collect(self) -> Iterable[Metric]:
        engine = self._get_engine()
        if engine is None:
            return
        stats = list(engine.stats())
        for key, name, doc in _INSTANCE_GAUGES:
            fam = GaugeMetricFamily(name, doc, labels=["instance"])
            for s in stats:
                if key in s:
                    fam.add_metric([str(s.get("rank", 0))], float(s[key]))
            yield fam
        usage = GaugeMetricFamily("infinite:kv_cache_usage_perc", "KV-cache usage of the instance's pool (0-1).", labels=["instance"])
        step = GaugeMetricFamily("infinite:step_time_seconds", "Duration of the instance's last engine step.", labels=["instance"])
        for s in stats:
            rank = str(s.get("rank", 0))
            usage.add_metric([rank], kv_usage(s))
            if s.get("step_time_ms") is not None:
                step.add_metric([rank], float(s["step_time_ms"]) / 1000.0)
        yield usage
        yield step
        for key, name, doc in _INSTANCE_COUNTERS:
            fam = CounterMetricFamily(name, doc, labels=["instance"])
            for s in stats:
                if s.get(key) is not None:
                    fam.add_metric([str(s.get("rank", 0))], float(s[key]))
            yield fam
        for key, name, doc in _INSTANCE_SECONDS:
            fam = CounterMetricFamily(name, doc, labels=["instance"])
            for s in stats:
                if s.get(key) is not None:
                    fam.add_metric([str(s.get("rank", 0))], float(s[key]) / 1000.0)
            yield fam


class ServerMetrics:
    """The front-end's metrics; ``render()`` is the body of GET /metrics."""

    def __init__(self, get_engine: Callable[[], Any], get_model_name: Callable[[], str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        self._model_name = get_model_name
        r = self.registry
        self.ttft = Histogram("infinite:time_to_first_token_seconds", "Time to first token.", labels, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("infinite:inter_token_latency_seconds", "Time between output tokens.", labels, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("infinite:e2e_request_latency_seconds", "End-to-end request latency.", labels, buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("infinite:prompt_tokens", "Prompt tokens of admitted requests.", labels, registry=r)
        self.generation_tokens = Counter("infinite:generation_tokens", "Tokens generated and delivered.", labels, registry=r)
        self.request_success = Counter("infinite:request_success", "Finished requests by finish reason.", labels + ["finished_reason"], registry=r)
        self.request_errors = Counter("infinite:request_errors", "Requests answered with an HTTP error, by status.", labels + ["status"], registry=r)
        self.aborted = Counter("infinite:request_aborted", "Requests aborted (client went away).", labels, registry=r)
        self.in_flight = Gauge("infinite:front_end_requests_in_flight", "Engine requests admitted by the front-end and not finished.", labels, registry=r)
        r.register(EngineCollector(get_engine))

    def labels(self, metric: Any, *extra: str) -> Any:
        return metric.labels(self._model_name(), *extra)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Latency bookkeeping of one engine request, fed with the clock as outputs arrive."""

    def __init__(self, metrics: ServerMetrics, arrival: float) -> None:
        self.m = metrics
        self.arrival = arrival
        self.last: float | None = None
        self.tokens = 0

    def on_output(self, now: float, num_tokens: int) -> None:
        """``num_tokens`` is the cumulative count; each new token gets one ITL sample."""
        new = num_tokens - self.tokens
        if new <= 0:
            return
        if self.last is None:
            self.m.labels(self.m.ttft).observe(now - self.arrival)
            new_after_first = new - 1
            gap = 0.0
        else:
            new_after_first = new
            gap = (now - self.last) / new
        itl = self.m.labels(self.m.itl)
        for _ in range(new_after_first):
            itl.observe(gap)
        self.m.labels(self.m.generation_tokens).inc(new)
        self.tokens = num_tokens
        self.last = now

    def on_finish(self, now: float, finish_reason: str | None) -> None:
        self.m.labels(self.m.e2e).observe(now - self.arrival)
        self.m.labels(self.m.request_success, finish_reason or "abort").inc()
