"""Prometheus metrics: names, labels and a registry of our own (see docs/observability.md).

Gauges that describe live state (in flight, pending, connections) are not
updated per request: a collector reads them from the pools at scrape time,
so they can never drift from the truth.

Per-request accounting (:meth:`Metrics.observe`) is on the hot path: label
children are looked up once per label set and cached, and every label has
a bounded set of values (methods outside the standard set count as
``OTHER``; requests that matched no upstream count under ``none``).  The
per-request counters and histograms are :class:`LoopCounter` and
:class:`LoopHistogram`: the exposition of prometheus_client's own, without
its lock per update (everything that updates or reads them runs on the
event loop's thread).

Why one module over 400 lines: every metric's name, labels and buckets are
declared here together with the lock-free per-request updates and their
exposition, so the contract (docs/observability.md) can be read in one place.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import __version__
from .errors import ClientDisconnected, client_error_codes, codes_counted_as
from .policy.pacing import pacing_stage
from .pools import UpstreamPool
from .shared import ERRORS as SHARED_ERRORS

if TYPE_CHECKING:
    from .exchange import Exchange

# Latency buckets from 1 ms to 60 s: proxied calls range from loopback to slow APIs.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Pool waits are short by design (timeouts.pool defaults to 1 s); finer at the low end.
_WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

NO_UPSTREAM = "none"
OTHER_METHOD = "OTHER"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})
# nginx's "client closed request": counted so that request rates add up, never sent.
CLIENT_CLOSED_STATUS = ClientDisconnected.status
# Errors answered by the sidecar without an upstream response: the `reason` of
# sidecar_rejected_requests_total. Upstream failures go to
# sidecar_upstream_errors_total. Both sets come from the error tree.
REJECTION_REASONS = codes_counted_as("rejected")
UPSTREAM_ERRORS = codes_counted_as("upstream")
# The kind label of sidecar_upstream_errors_total: the code without this.
_UPSTREAM_ERROR_PREFIX = "upstream_"
RETRY_RESULTS = ("sent", "budget_exhausted", "no_time")

# *_created series double the output and no dashboard uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]


def method_label(method: str) -> str:
    """The request method as a label value: a fixed set, so cardinality stays bounded."""
    return method if method in KNOWN_METHODS else OTHER_METHOD


def status_label(exchange: Exchange) -> int:
    """The status counted for a request; 499 when the caller left before any response."""
    if exchange.status:
        return exchange.status
    return CLIENT_CLOSED_STATUS if exchange.aborted else 500


# Request-level client errors also counted in sidecar_client_errors_total, next
# to the connection-level ones the proxy protocol reports (header_timeout,
# bad_request, uri_too_long, headers_too_large, http_version_not_supported).
# A 505 is either, depending on which parser refused the version: counted alike.
CLIENT_ERROR_KINDS = client_error_codes()


def outcome(exchange: Exchange) -> str:
    """One word for how a request ended, for /pools totals: the error code or the status class."""
    if exchange.error is not None:
        return exchange.error
    return f"{exchange.status // 100}xx" if exchange.status else "unknown"


class _Live:
    """One upstream's live numbers, summed over its current and retiring pools."""

    __slots__ = (
        "in_flight",
        "pending",
        "oldest_wait",
        "active",
        "idle",
        "opened",
        "closed",
        "capacity",
        "max_pending",
        "max_connections",
    )

    def __init__(self, current: UpstreamPool) -> None:
        self.in_flight = self.pending = self.active = self.idle = self.opened = self.closed = 0
        self.oldest_wait = 0.0
        self.capacity = current.admission.capacity
        self.max_pending = current.admission.max_pending
        self.max_connections = current.upstream.limits.max_connections

    def add(self, pool: UpstreamPool) -> None:
        stats, admission = pool.stats(), pool.admission
        self.in_flight += admission.in_flight
        self.pending += admission.pending
        self.oldest_wait = max(self.oldest_wait, admission.oldest_wait())
        self.active += stats.active
        self.idle += stats.idle
        self.opened += stats.opened_total
        self.closed += stats.closed_total


class _PoolCollector(Collector):
    """Reads live per-upstream state from the pools at scrape time.

    A reload may leave a replaced pool draining next to its successor under
    the same name; both are summed, since both hold connections and slots.
    """

    def __init__(self, pools: Callable[[], Iterable[UpstreamPool]]) -> None:
        self._pools = pools

    def collect(self) -> Iterator[Metric]:
        def gauge(name: str, documentation: str, labels: tuple[str, ...] = ("upstream",)) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, documentation, labels=labels)

        inflight = gauge("sidecar_inflight_requests", "Requests holding a slot, per upstream")
        pending = gauge("sidecar_pending_requests", "Requests waiting for a slot, per upstream")
        oldest = gauge("sidecar_oldest_pending_seconds", "How long the longest-waiting request has waited")
        connections = gauge(
            "sidecar_upstream_connections", "Open upstream TCP connections by state", ("upstream", "state")
        )
        capacity = gauge("sidecar_max_concurrent_requests", "Configured in-flight cap, per upstream")
        max_pending = gauge("sidecar_max_pending_requests", "Configured waiting-queue cap, per upstream")
        max_connections = gauge("sidecar_max_connections", "Configured connection cap, per upstream")
        opened = CounterMetricFamily(
            "sidecar_upstream_connections_opened", "Upstream connections opened", labels=["upstream"]
        )
        closed = CounterMetricFamily(
            "sidecar_upstream_connections_closed", "Upstream connections closed", labels=["upstream"]
        )
        retries = CounterMetricFamily(
            "sidecar_retries", "Retries by result: sent, budget_exhausted, no_time", labels=["upstream", "result"]
        )
        circuit = gauge("sidecar_circuit_state", "Circuit breaker state: 0 closed, 1 open, 2 half-open")
        concurrency = gauge("sidecar_concurrency_limit", "In-flight limit now (the adaptive one with limits.adaptive)")
        live: dict[str, _Live] = {}
        resilience: dict[str, UpstreamPool] = {}  # the current pool: its circuit is the one requests meet
        for pool in self._pools():
            resilience.setdefault(pool.name, pool)
            row = live.get(pool.name)
            if row is None:  # the current pool comes first: its limits are the ones shown
                row = live[pool.name] = _Live(pool)
            row.add(pool)
        for name, row in live.items():
            inflight.add_metric([name], row.in_flight)
            pending.add_metric([name], row.pending)
            oldest.add_metric([name], row.oldest_wait)
            connections.add_metric([name, "active"], row.active)
            connections.add_metric([name, "idle"], row.idle)
            capacity.add_metric([name], row.capacity)
            max_pending.add_metric([name], row.max_pending)
            max_connections.add_metric([name], row.max_connections)
            opened.add_metric([name], row.opened)
            closed.add_metric([name], row.closed)
        for name, pool in resilience.items():
            for result in RETRY_RESULTS:
                retries.add_metric([name, result], pool.retries.results[result])
            circuit.add_metric([name], int(pool.circuit.state()))
            concurrency.add_metric([name], pool.admission.capacity)
        paused = gauge("sidecar_upstream_paused", "1 while a learned pause or an exhausted quota holds requests back")
        quota = gauge("sidecar_upstream_quota_remaining", "Requests the upstream's announced quota still allows")
        ignored = CounterMetricFamily(
            "sidecar_pacing_signals_ignored",
            "Malformed rate-limit header fields from the upstream, ignored",
            labels=["upstream", "field"],
        )
        pacing_rows: dict[str, tuple[int, int | None, Mapping[str, int]]] = {}
        for pool in self._pools():
            stage = pacing_stage(pool.stages.stages)
            if stage is None or pool.name in pacing_rows:  # the current pool comes first
                continue
            pacing_rows[pool.name] = (min(1, stage.paused_partitions()), stage.quota_remaining(), stage.core.ignored)
        for name, (is_paused, remaining, ignored_fields) in pacing_rows.items():
            paused.add_metric([name], is_paused)
            if remaining is not None:
                quota.add_metric([name], remaining)
            for field_name, count in sorted(ignored_fields.items()):
                ignored.add_metric([name, field_name], count)
        info = gauge("sidecar_build_info", "Always 1; the version as a label", ("version",))
        info.add_metric([__version__], 1)
        yield from (
            inflight,
            pending,
            oldest,
            connections,
            capacity,
            max_pending,
            max_connections,
            opened,
            closed,
            retries,
            circuit,
            concurrency,
            paused,
            quota,
            ignored,
            info,
        )


class _Count:
    """One labelled counter's value."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.value += amount


class _Observations:
    """One labelled histogram's bucket counts (not cumulative) and sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.sum += amount
        if amount == amount:  # NaN falls in no bucket (prometheus_client's rule too)
            self.counts[bisect_left(self.bounds, amount)] += 1


class _LoopFamily(Collector):
    """A labelled metric registered like prometheus_client's, updated without its locks."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        registry.register(self)

    def labels(self, *values: object) -> Any:
        key = tuple(str(value) for value in values)
        if len(key) != len(self._labelnames):
            raise ValueError(f"{self._name} takes labels {self._labelnames}, not {key}")
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._child()
        return child

    def _child(self) -> Any:
        raise NotImplementedError

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def _family(self) -> Metric:
        raise NotImplementedError


class LoopCounter(_LoopFamily):
    """A counter exposed exactly as ``prometheus_client.Counter`` (created series disabled)."""

    def _child(self) -> _Count:
        return _Count()

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for values, child in self._children.items():
            family.add_metric(values, child.value)
        return [family]


class LoopHistogram(_LoopFamily):
    """A histogram exposed exactly as ``prometheus_client.Histogram`` (created series disabled)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        buckets: Sequence[float],
    ) -> None:
        bounds = [float(bound) for bound in buckets]
        if bounds[-1] != math.inf:
            bounds.append(math.inf)
        self._bounds = tuple(bounds)
        self._le = tuple(floatToGoString(bound) for bound in bounds)  # type: ignore[no-untyped-call]
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> _Observations:
        return _Observations(self._bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for values, child in self._children.items():
            cumulative, total = [], 0.0
            for le, count in zip(self._le, child.counts, strict=True):
                total += count
                cumulative.append((le, total))
            family.add_metric(values, cumulative, child.sum)
        return [family]


class _UpstreamSeries:
    """The per-upstream label children, resolved once (labels() is a locked dict lookup)."""

    __slots__ = ("upstream", "duration", "upstream_duration", "pool_wait", "_pool_wait", "bytes_in", "bytes_out")

    def __init__(self, metrics: Metrics, upstream: str) -> None:
        self.upstream = upstream
        self.duration = metrics.duration.labels(upstream)
        self.upstream_duration = metrics.upstream_duration.labels(upstream)
        self.pool_wait = metrics.pool_wait
        self._pool_wait: dict[str, Any] = {}  # per caller label (bounded)
        self.bytes_in = metrics.bytes_in.labels(upstream)
        self.bytes_out = metrics.bytes_out.labels(upstream)

    def wait_of(self, caller: str) -> Any:
        child = self._pool_wait.get(caller)
        if child is None:
            child = self._pool_wait[caller] = self.pool_wait.labels(self.upstream, caller)
        return child


class _SharedErrorsCollector(Collector):
    """sidecar_shared_errors_total{op}: failed Redis calls of the shared limits (docs/shared-limits.md)."""

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "sidecar_shared_errors", "Redis calls of the shared limits that failed or timed out", labels=["op"]
        )
        for op, count in sorted(SHARED_ERRORS.items()):
            family.add_metric([op], count)
        yield family


class Metrics:
    """The sidecar's metrics, in a registry of their own (not the global one)."""

    def __init__(self, pools: Callable[[], Iterable[UpstreamPool]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = LoopCounter(
            "sidecar_requests_total", "Requests answered", ["upstream", "method", "status", "caller"], r
        )
        self.duration = LoopHistogram(
            "sidecar_request_duration_seconds",
            "Time from request to the end of the response, as the caller sees it",
            ["upstream"],
            r,
            _LATENCY_BUCKETS,
        )
        self.upstream_duration = LoopHistogram(
            "sidecar_upstream_response_seconds",
            "Time from sending upstream to its response headers",
            ["upstream"],
            r,
            _LATENCY_BUCKETS,
        )
        self.pool_wait = LoopHistogram(
            "sidecar_pool_wait_seconds",
            "Time waiting for a slot (admitted or timed out)",
            ["upstream", "caller"],
            r,
            _WAIT_BUCKETS,
        )
        self.rejected = LoopCounter(
            "sidecar_rejected_requests_total",
            "Requests the sidecar refused itself, without an upstream response",
            ["upstream", "reason"],
            r,
        )
        self.upstream_errors = LoopCounter(
            "sidecar_upstream_errors_total", "Upstream failures by kind", ["upstream", "kind"], r
        )
        self.bytes_in = LoopCounter(
            "sidecar_request_bytes_total", "Request body bytes received from callers", ["upstream"], r
        )
        self.bytes_out = LoopCounter(
            "sidecar_response_bytes_total", "Response body bytes sent to callers", ["upstream"], r
        )
        self.client_errors = Counter(
            "sidecar_client_errors_total",
            "Connections or requests refused for what the caller sent (or failed to send in time)",
            ["kind"],
            registry=r,
        )
        self.reloads = Counter("sidecar_config_reloads_total", "Config reloads by result", ["result"], registry=r)
        r.register(_PoolCollector(pools))
        r.register(_SharedErrorsCollector())
        self._request_series: dict[tuple[str, str, int, str], Any] = {}
        self._upstream_series: dict[str, _UpstreamSeries] = {}

    def observe(self, exchange: Exchange, duration: float) -> None:
        """Count one finished request (called once per request, on the hot path)."""
        upstream = exchange.upstream or NO_UPSTREAM
        # The caller label is bounded: a configured caller name or "other".
        caller = exchange.caller_label
        key = (upstream, exchange.method, status_label(exchange), caller)
        counter = self._request_series.get(key)
        if counter is None:
            counter = self.requests.labels(upstream, method_label(key[1]), str(key[2]), caller)
            if key[1] in KNOWN_METHODS:  # arbitrary method tokens must not grow the cache
                self._request_series[key] = counter
        counter.inc()
        series = self._upstream_series.get(upstream)
        if series is None:
            series = self._upstream_series[upstream] = _UpstreamSeries(self, upstream)
        error = exchange.error
        series.duration.observe(duration)
        if exchange.queued and error != "queue_full":
            series.wait_of(caller).observe(exchange.pool_wait)
        if exchange.upstream_time is not None:
            series.upstream_duration.observe(exchange.upstream_time)
        if exchange.bytes_in:
            series.bytes_in.inc(exchange.bytes_in)
        if exchange.bytes_out:
            series.bytes_out.inc(exchange.bytes_out)
        if error is not None:
            if error in REJECTION_REASONS:
                self.rejected.labels(upstream, error).inc()
            elif error in UPSTREAM_ERRORS:
                self.upstream_errors.labels(upstream, error[len(_UPSTREAM_ERROR_PREFIX) :]).inc()
            if error in CLIENT_ERROR_KINDS:
                self.client_errors.labels(error).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
