"""Prometheus metrics: one registry per app, an aiohttp middleware timing every route, GET /metrics.

In: every HTTP request (the middleware), the first engine event of each generation (`first_token()`, called by
engine_calls.first_event), and collectors read at scrape time (the engine's counters, the run's status, the
process). Out: the Prometheus text format at GET /metrics. Each app owns its `CollectorRegistry` (never the
process-global default one), so two apps in one process (tests) never share or clash.
"""

import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

disable_created_metrics()  # no `_created` twin of every series: Prometheus does not need it, Grafana ignores it

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SWAP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
CLIENT_CLOSED = "499"  # the client went away before the answer (nginx's convention)


@dataclass
class _Timing:
    metrics: "Metrics"
    route: str
    start: float
    first_token_seen: bool = False


_TIMING: ContextVar[_Timing | None] = ContextVar("paraloop_request_timing", default=None)


class Metrics:
    """The app's registry and the instruments other parts observe (HTTP timings, swap pauses, learner steps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "paraloop_http_requests", "HTTP requests answered", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "paraloop_http_request_duration_seconds",
            "time from request to the end of its answer (streams included)",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "paraloop_http_time_to_first_token_seconds",
            "time from request to the engine's first token",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.swap_pause = Histogram(
            "paraloop_swap_pause_seconds", "decode pause of each adapter swap", buckets=SWAP_BUCKETS, registry=r
        )
        self.step_time = Histogram(
            "paraloop_learner_step_seconds", "wall time of each learner step", buckets=STEP_BUCKETS, registry=r
        )
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total (Linux /proc)
        self.add_collector(memory_families)

    def add_collector(self, collect: Callable[[], Iterator[Metric]]) -> None:
        """Register `collect` (a generator of metric families) to be read at every scrape."""
        self.registry.register(_FunctionCollector(collect))

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _FunctionCollector(Collector):
    def __init__(self, collect: Callable[[], Iterator[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        return self._collect()


METRICS = web.AppKey("paraloop_metrics", Metrics)


def route_of(request: web.Request) -> str:
    """The route's pattern (bounded label values), never the raw path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Count and time every request; a generation's first engine event is timed by `first_token()`."""
    metrics = request.app[METRICS]
    timing = _Timing(metrics, route_of(request), time.perf_counter())
    token = _TIMING.set(timing)
    status = "500"
    try:
        response = await handler(request)
        status = str(response.status)
        return response
    except web.HTTPException as exc:
        status = str(exc.status)
        raise
    except BaseException:
        status = CLIENT_CLOSED if request.transport is None or request.transport.is_closing() else "500"
        raise
    finally:
        _TIMING.reset(token)
        method = request.method if request.method in METHODS else "other"  # a label never takes any client's word
        metrics.requests.labels(timing.route, method, status).inc()
        metrics.latency.labels(timing.route, method).observe(time.perf_counter() - timing.start)


def first_token() -> None:
    """Called where a generation's first engine event arrives: observes time to first token once per request (the
    request is found through a context variable the middleware set, so handlers pass nothing)."""
    timing = _TIMING.get()
    if timing is None or timing.first_token_seen:
        return
    timing.first_token_seen = True
    timing.metrics.ttft.labels(timing.route).observe(time.perf_counter() - timing.start)


def engine_families(stats: dict[str, float]) -> Iterator[Metric]:
    """The engine's counters and gauges, read at scrape time from `engine.stats()`."""
    counters = {
        "generated_tokens": ("paraloop_generated_tokens", "tokens generated by the engine"),
        "requests_served": ("paraloop_engine_requests", "generation requests the engine finished"),
        "swaps": ("paraloop_adapter_swaps", "adapter swaps applied by the engine"),
        "prefix_cache_tokens_saved": (
            "paraloop_prefix_cache_tokens_saved",
            "prompt tokens taken from the prefix cache instead of prefilled",
        ),
        "prefix_cache_prompt_tokens": (
            "paraloop_prefix_cache_prompt_tokens",
            "prefill-able prompt tokens of the requests resolved against the prefix cache",
        ),
        "prefix_cache_lookups": ("paraloop_prefix_cache_lookups", "requests resolved against the prefix cache"),
        "prefix_cache_hits": ("paraloop_prefix_cache_hits", "requests that reused at least one cached prompt token"),
        "prefix_cache_evictions": (
            "paraloop_prefix_cache_evictions",
            "cached KV segments dropped to stay within engine.prefix_cache_mb",
        ),
    }
    for key, (name, help_) in counters.items():
        if key in stats:
            yield CounterMetricFamily(name, help_, value=stats[key])
    gauges = {
        "tokens_per_s": ("paraloop_generation_tokens_per_second", "engine decode tokens per second (last 10 s)"),
        "queue_depth": ("paraloop_engine_requests_admitted", "requests admitted to the engine (waiting or running)"),
        "waiting_requests": ("paraloop_engine_requests_waiting", "requests admitted but not yet decoding"),
        "active_rows": ("paraloop_engine_active_rows", "sequences in the decode batch"),
        "version": ("paraloop_serving_version", "adapter version the engine serves"),
        "prefix_cache_hit_rate": (
            "paraloop_prefix_cache_hit_rate",
            "prompt tokens taken from the prefix cache over all prefill-able prompt tokens",
        ),
        "prefix_cache_bytes": ("paraloop_prefix_cache_bytes", "memory the prefix cache's KV takes"),
        "prefix_cache_max_bytes": (
            "paraloop_prefix_cache_max_bytes",
            "the prefix cache's bound (engine.prefix_cache_mb)",
        ),
        "prefix_cache_entries": ("paraloop_prefix_cache_entries", "cached KV segments (radix tree nodes)"),
        "prefix_cache_stored_tokens": ("paraloop_prefix_cache_stored_tokens", "tokens the cached KV segments hold"),
        "adapters_loaded": ("paraloop_adapters_loaded", "named LoRA adapters served beside the policy"),
        "adapter_bytes": ("paraloop_adapter_bytes", "memory the named adapters' arrays take"),
    }
    for key, (name, help_) in gauges.items():
        if key in stats:
            yield GaugeMetricFamily(name, help_, value=stats[key])


def process_memory() -> dict[str, float]:
    """Resident and peak memory of this process and MLX's allocator, in bytes (where the platform tells)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/statm") as f:
            out["rss_bytes"] = float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        pass  # not Linux: the peak below still tells
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["peak_rss_bytes"] = float(peak if sys.platform == "darwin" else peak * 1024)
    mx = sys.modules.get("mlx.core")  # only when the process already uses MLX
    if mx is not None:
        out["mlx_active_bytes"] = float(mx.get_active_memory())
        out["mlx_peak_bytes"] = float(mx.get_peak_memory())
    return out


def memory_families() -> Iterator[Metric]:
    names = {
        "peak_rss_bytes": ("paraloop_process_peak_resident_memory_bytes", "peak resident memory of the process"),
        "mlx_active_bytes": ("paraloop_mlx_active_memory_bytes", "memory held by MLX arrays"),
        "mlx_peak_bytes": ("paraloop_mlx_peak_memory_bytes", "peak memory held by MLX arrays"),
    }
    memory = process_memory()
    for key, (name, help_) in names.items():
        if key in memory:
            yield GaugeMetricFamily(name, help_, value=memory[key])


async def metrics_route(request: web.Request) -> web.Response:
    body = request.app[METRICS].text()
    return web.Response(
        body=body, content_type="text/plain", charset="utf-8", headers={"X-Content-Type-Options": "nosniff"}
    )
