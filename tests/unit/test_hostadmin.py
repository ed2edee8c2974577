"""Adding up the workers' metrics and pools for the host's admin endpoint."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from sidecar.hostadmin import merge_metrics, merge_pools, render_families
from sidecar.metrics import Metrics
from tests.support.metrics import parse_metrics, value


def _families(metrics: Metrics) -> list[Metric]:
    return list(text_string_to_metric_families(metrics.render().decode()))


def _worker(requests: int, latency: float) -> Metrics:
    metrics = Metrics(lambda: [])
    metrics.requests.labels("api", "GET", "200", "other").inc(requests)
    metrics.requests.labels("api", "GET", "503", "other").inc(1)
    metrics.duration.labels("api").observe(latency)
    return metrics


def test_counters_and_histograms_add_up_and_build_info_stays_one() -> None:
    merged = merge_metrics([(_families(_worker(3, 0.002)), True), (_families(_worker(4, 0.2)), True)])
    samples = parse_metrics(render_families(merged).decode())
    assert value(samples, "sidecar_requests_total", upstream="api", method="GET", status="200") == 7
    assert value(samples, "sidecar_requests_total", upstream="api", method="GET", status="503") == 2
    assert value(samples, "sidecar_request_duration_seconds_count", upstream="api") == 2
    assert value(samples, "sidecar_request_duration_seconds_bucket", upstream="api", le="0.0025") == 1
    assert value(samples, "sidecar_request_duration_seconds_bucket", upstream="api", le="+Inf") == 2
    assert value(samples, "sidecar_request_duration_seconds_sum", upstream="api") == pytest.approx(0.202)
    build = [v for (name, _), v in samples.items() if name == "sidecar_build_info"]
    assert build == [1]


def test_a_stale_worker_keeps_its_counters_but_not_its_gauges() -> None:
    gauges = "# HELP sidecar_inflight_requests x\n# TYPE sidecar_inflight_requests gauge\n"
    fresh = list(text_string_to_metric_families(gauges + 'sidecar_inflight_requests{upstream="api"} 2\n'))
    stale = list(text_string_to_metric_families(gauges + 'sidecar_inflight_requests{upstream="api"} 5\n'))
    merged = merge_metrics(
        [(fresh + _families(_worker(3, 0.01)), True), (stale + _families(_worker(4, 0.01)), False)]
    )
    samples = parse_metrics(render_families(merged).decode())
    assert value(samples, "sidecar_inflight_requests", upstream="api") == 2
    assert value(samples, "sidecar_requests_total", upstream="api", method="GET", status="200") == 7


def _pool(requests: int, max_connections: int, oldest: float) -> dict[str, Any]:
    return {
        "api": {
            "url": "http://a",
            "http2": False,
            "limits": {"max_connections": max_connections, "keepalive_expiry_s": 5.0, "pool_timeout_s": 1.0},
            "in_flight": 1,
            "oldest_wait_s": oldest,
            "http_versions": {"HTTP/1.1": 1},
            "totals": {"requests": requests, "by_outcome": {"2xx": requests}},
        }
    }


def test_pools_add_counts_and_limits_and_keep_settings() -> None:
    total = merge_pools([_pool(3, 3, 0.5), _pool(4, 2, 0.25), {"other": {"in_flight": 0}}])
    api = total["api"]
    assert api["url"] == "http://a" and api["http2"] is False
    assert api["limits"] == {"max_connections": 5, "keepalive_expiry_s": 5.0, "pool_timeout_s": 1.0}
    assert api["in_flight"] == 2
    assert api["oldest_wait_s"] == 0.5
    assert api["http_versions"] == {"HTTP/1.1": 2}
    assert api["totals"] == {"requests": 7, "by_outcome": {"2xx": 7}}
    assert total["other"] == {"in_flight": 0}
