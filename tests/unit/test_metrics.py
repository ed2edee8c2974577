"""Metrics.observe and the live-state collector, without sockets (docs/observability.md)."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import parse_config
from sidecar.exchange import Exchange
from sidecar.metrics import REJECTION_REASONS, Metrics, method_label, outcome
from sidecar.pools import UpstreamPool

SPEC_METRICS = {
    # family name as the parser reports it (counters without _total): label names
    "sidecar_requests": {"upstream", "method", "status", "caller"},
    "sidecar_request_duration_seconds": {"upstream"},
    "sidecar_pool_wait_seconds": {"upstream", "caller"},
    "sidecar_concurrency_limit": {"upstream"},
    "sidecar_inflight_requests": {"upstream"},
    "sidecar_pending_requests": {"upstream"},
    "sidecar_upstream_connections": {"upstream", "state"},
    "sidecar_rejected_requests": {"upstream", "reason"},
    "sidecar_upstream_errors": {"upstream", "kind"},
    "sidecar_config_reloads": {"result"},
}


def make_pool(name: str = "api", max_connections: int = 4, max_pending: int = 10) -> UpstreamPool:
    config = parse_config(
        f"""
upstreams:
  {name}:
    url: http://127.0.0.1:9
    limits: {{max_connections: {max_connections}, max_pending: {max_pending}}}
"""
    )
    return UpstreamPool(config.upstreams[0])


def exchange(upstream: str | None = "api", method: str = "GET", status: int = 200, **kw: object) -> Exchange:
    result = Exchange(request_id="r", method=method, path="/x", started=time.monotonic(), upstream=upstream)
    result.status = status
    for key, val in kw.items():
        setattr(result, key, val)
    return result


def families(metrics: Metrics) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    return {
        family.name: [(s.name, s.labels, s.value) for s in family.samples]
        for family in text_string_to_metric_families(metrics.render().decode())
    }


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """The samples with these labels, summed over the labels not named (e.g. ``caller``)."""
    total = 0.0
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name == name and labels.items() <= s.labels.items():
                total += float(s.value)
    return total


def test_every_spec_metric_is_exported_with_exactly_its_labels() -> None:
    pool = make_pool()
    metrics = Metrics(lambda: [pool])
    metrics.observe(exchange(queued=True, upstream_time=0.01), 0.02)
    metrics.observe(exchange(status=503, error="queue_full", queued=True), 0.001)
    metrics.observe(exchange(status=502, error="upstream_connect_error", queued=True), 0.001)
    metrics.reloads.labels("success").inc()
    found = families(metrics)
    for name, labels in SPEC_METRICS.items():
        assert name in found, name
        label_sets = {frozenset(s[1]) - {"le"} for s in found[name]}
        assert label_sets == {frozenset(labels)}, (name, label_sets)


def test_unknown_methods_share_one_label_and_never_grow_the_cache() -> None:
    metrics = Metrics(list)
    for index in range(300):
        metrics.observe(exchange(method=f"X{index}"), 0.001)
    metrics.observe(exchange(method="GET"), 0.001)
    assert sample(metrics, "sidecar_requests_total", upstream="api", method="OTHER", status="200") == 300
    assert sample(metrics, "sidecar_requests_total", upstream="api", method="GET", status="200") == 1
    assert len(metrics._request_series) == 1
    assert method_label("PATCH") == "PATCH" and method_label("get") == "OTHER"


def test_status_counted_for_callers_that_left_and_for_unrouted_requests() -> None:
    metrics = Metrics(list)
    metrics.observe(exchange(status=0, error="client_disconnected", aborted=True), 0.5)
    metrics.observe(exchange(upstream=None, status=404, error="no_route"), 0.0001)
    assert sample(metrics, "sidecar_requests_total", upstream="api", method="GET", status="499") == 1
    assert sample(metrics, "sidecar_requests_total", upstream="none", method="GET", status="404") == 1
    assert sample(metrics, "sidecar_rejected_requests_total", upstream="none", reason="no_route") == 1


@pytest.mark.parametrize("reason", sorted(REJECTION_REASONS))
def test_each_refusal_counts_under_its_reason(reason: str) -> None:
    metrics = Metrics(list)
    metrics.observe(exchange(status=503, error=reason), 0.001)
    assert sample(metrics, "sidecar_rejected_requests_total", upstream="api", reason=reason) == 1
    assert sample(metrics, "sidecar_upstream_errors_total", upstream="api", kind=reason) == 0


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("upstream_connect_error", "connect_error"),
        ("upstream_protocol_error", "protocol_error"),
        ("upstream_timeout", "timeout"),
        ("upstream_body_error", "body_error"),
    ],
)
def test_upstream_failures_count_by_kind_not_as_rejections(code: str, kind: str) -> None:
    metrics = Metrics(list)
    metrics.observe(exchange(status=502, error=code), 0.001)
    assert sample(metrics, "sidecar_upstream_errors_total", upstream="api", kind=kind) == 1
    assert not [s for s in families(metrics)["sidecar_rejected_requests"]]


def test_pool_wait_is_observed_for_waits_not_for_instant_refusals() -> None:
    metrics = Metrics(list)
    metrics.observe(exchange(queued=True, pool_wait=0.25), 0.3)
    metrics.observe(exchange(status=503, error="pool_timeout", queued=True, pool_wait=1.0), 1.0)
    metrics.observe(exchange(status=503, error="queue_full", queued=True), 0.0)
    metrics.observe(exchange(status=413, error="request_too_large"), 0.0)
    assert sample(metrics, "sidecar_pool_wait_seconds_count", upstream="api") == 2
    assert sample(metrics, "sidecar_pool_wait_seconds_sum", upstream="api") == pytest.approx(1.25)


def test_upstream_response_time_is_separate_from_total_duration() -> None:
    metrics = Metrics(list)
    metrics.observe(exchange(upstream_time=0.004, bytes_in=10, bytes_out=7), 2.0)
    assert sample(metrics, "sidecar_upstream_response_seconds_sum", upstream="api") == pytest.approx(0.004)
    assert sample(metrics, "sidecar_request_duration_seconds_sum", upstream="api") == pytest.approx(2.0)
    assert sample(metrics, "sidecar_request_bytes_total", upstream="api") == 10
    assert sample(metrics, "sidecar_response_bytes_total", upstream="api") == 7


def test_gauges_read_admission_state_at_scrape_time() -> None:
    pool = make_pool(max_connections=2, max_pending=5)
    metrics = Metrics(lambda: [pool])
    core = pool.admission._core
    assert sample(metrics, "sidecar_inflight_requests", upstream="api") == 0
    assert core.try_acquire() and core.try_acquire() and not core.try_acquire()
    core.enqueue(object())  # type: ignore[arg-type]
    assert sample(metrics, "sidecar_inflight_requests", upstream="api") == 2
    assert sample(metrics, "sidecar_pending_requests", upstream="api") == 1
    assert sample(metrics, "sidecar_max_concurrent_requests", upstream="api") == 2
    assert sample(metrics, "sidecar_max_pending_requests", upstream="api") == 5
    core.release()
    core.release()
    assert sample(metrics, "sidecar_inflight_requests", upstream="api") == 1  # the waiter got the slot
    assert sample(metrics, "sidecar_pending_requests", upstream="api") == 0


def test_a_retiring_pool_adds_its_live_counts_under_the_same_name() -> None:
    current, retiring = make_pool(max_connections=8), make_pool(max_connections=2)
    metrics = Metrics(lambda: [current, retiring])
    current.admission._core.try_acquire()
    retiring.admission._core.try_acquire()
    retiring.admission._core.try_acquire()
    assert sample(metrics, "sidecar_inflight_requests", upstream="api") == 3
    assert sample(metrics, "sidecar_max_connections", upstream="api") == 8  # limits: the current pool's


def test_outcome_names_errors_and_status_classes() -> None:
    assert outcome(exchange(status=204)) == "2xx"
    assert outcome(exchange(status=404)) == "4xx"
    assert outcome(exchange(status=503)) == "5xx"
    assert outcome(exchange(status=503, error="pool_timeout")) == "pool_timeout"
    assert outcome(exchange(status=0, error="client_disconnected")) == "client_disconnected"


def test_loop_families_are_exposed_exactly_as_prometheus_clients_own() -> None:
    """The lock-free counters and histograms write what prometheus_client's Counter and Histogram write."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from sidecar.metrics import LoopCounter, LoopHistogram

    ours, theirs = CollectorRegistry(), CollectorRegistry()
    buckets = (0.001, 0.01, 0.1, 1.0, 10.0)
    counter = LoopCounter("t_requests_total", "Requests", ["upstream", "status"], ours)
    reference_counter = Counter("t_requests_total", "Requests", ["upstream", "status"], registry=theirs)
    doc = "Time \\ with\nnewline"
    histogram = LoopHistogram("t_seconds", doc, ["upstream"], ours, buckets)
    reference_histogram = Histogram("t_seconds", doc, ["upstream"], buckets=buckets, registry=theirs)
    for upstream, status, amount in [("a", 200, 1), ("b", "503", 2.5), ("a", 200, 0.25), ('c"x', 404, 0)]:
        counter.labels(upstream, status).inc(amount)
        reference_counter.labels(upstream, status).inc(amount)
    for upstream, seconds in [("a", 0.0005), ("a", 0.001), ("a", 0.0333), ("b", 99.0), ("a", float("nan")), ("b", 1.0)]:
        histogram.labels(upstream).observe(seconds)
        reference_histogram.labels(upstream).observe(seconds)
    assert generate_latest(ours) == generate_latest(theirs)
    with pytest.raises(ValueError):
        counter.labels("a", 200).inc(-1)
    with pytest.raises(ValueError):
        counter.labels("a")
