"""Prometheus metrics: names, labels and a registry of our own (SPEC §7).

Gauges that describe live state (in flight, pending, connections) are not
updated per request: a collector reads them from the pools at scrape time,
so they can never drift from the truth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .pools import UpstreamPool

# Latency buckets from 1 ms to 60 s: proxied calls range from loopback to slow APIs.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# *_created series double the output and no dashboard uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]


class _PoolCollector(Collector):
    """Reads live per-upstream state from the pools at scrape time."""

    def __init__(self, pools: Callable[[], Iterable[UpstreamPool]]) -> None:
        self._pools = pools

    def collect(self) -> Iterator[Metric]:
        inflight = GaugeMetricFamily(
            "sidecar_inflight_requests", "Requests holding a slot, per upstream", labels=["upstream"]
        )
        pending = GaugeMetricFamily(
            "sidecar_pending_requests", "Requests waiting for a slot, per upstream", labels=["upstream"]
        )
        connections = GaugeMetricFamily(
            "sidecar_upstream_connections", "Open upstream TCP connections", labels=["upstream", "state"]
        )
        capacity = GaugeMetricFamily(
            "sidecar_max_concurrent_requests", "Configured in-flight cap, per upstream", labels=["upstream"]
        )
        for pool in self._pools():
            stats = pool.stats()
            inflight.add_metric([pool.name], pool.admission.in_flight)
            pending.add_metric([pool.name], pool.admission.pending)
            connections.add_metric([pool.name, "active"], stats.active)
            connections.add_metric([pool.name, "idle"], stats.idle)
            capacity.add_metric([pool.name], pool.admission.capacity)
        yield from (inflight, pending, connections, capacity)


class Metrics:
    """The sidecar's metrics, in a registry of their own (not the global one)."""

    def __init__(self, pools: Callable[[], Iterable[UpstreamPool]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sidecar_requests_total", "Requests answered", ["upstream", "method", "status"], registry=r
        )
        self.duration = Histogram(
            "sidecar_request_duration_seconds",
            "Time from request to the end of the response",
            ["upstream"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "sidecar_upstream_response_seconds",
            "Time from sending upstream to its response headers",
            ["upstream"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.pool_wait = Histogram(
            "sidecar_pool_wait_seconds",
            "Time waiting for a slot",
            ["upstream"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "sidecar_rejected_requests_total",
            "Requests refused by admission or drain",
            ["upstream", "reason"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "sidecar_upstream_errors_total", "Upstream failures", ["upstream", "kind"], registry=r
        )
        self.bytes_in = Counter(
            "sidecar_request_bytes_total", "Request body bytes received from callers", ["upstream"], registry=r
        )
        self.bytes_out = Counter(
            "sidecar_response_bytes_total", "Response body bytes sent to callers", ["upstream"], registry=r
        )
        self.reloads = Counter("sidecar_config_reloads_total", "Config reloads by result", ["result"], registry=r)
        r.register(_PoolCollector(pools))

    def render(self) -> bytes:
        return generate_latest(self.registry)
