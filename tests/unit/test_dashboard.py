"""The shipped Grafana dashboard parses and queries only metrics the sidecar exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import parse_config
from sidecar.metrics import Metrics
from sidecar.pools import UpstreamPool

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "sidecar-dashboard.json"
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported_series() -> set[str]:
    config = parse_config("upstreams:\n  api: {url: 'http://127.0.0.1:9'}\n")
    pool = UpstreamPool(config.upstreams[0])
    text = Metrics(lambda: [pool]).render().decode()
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


def expressions(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for value in node.values() for e in expressions(value)]
    if isinstance(node, list):
        return [e for item in node for e in expressions(item)]
    return []


def test_dashboard_is_valid_json_with_the_promised_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {"Request rate by status", "Latency p99", "In flight and pending", "Upstream connections"} <= titles
    assert "Rejections by reason" in titles
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_references_only_exported_metric_names() -> None:
    exported = exported_series()
    queries = expressions(json.loads(DASHBOARD.read_text()))
    used = {name for expr in queries for name in re.findall(r"sidecar_\w+", expr)}
    assert used, "no queries found"
    assert used <= exported, used - exported
    for needed in (
        "sidecar_requests_total",
        "sidecar_request_duration_seconds_bucket",
        "sidecar_inflight_requests",
        "sidecar_pending_requests",
        "sidecar_upstream_connections",
        "sidecar_rejected_requests_total",
    ):
        assert needed in used, needed
