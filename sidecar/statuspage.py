"""The status page on the admin listener's ``/`` (docs/status-page.md).

One self-contained HTML document, ``sidecar/static/status.html``: inline CSS
and JS, no external assets, so it works offline and under a strict
Content-Security-Policy.  ``script-src`` and ``style-src`` are the hashes of
the page's own inline ``<script>`` and ``<style>``, computed once from the
file: nothing else can run or style the page, and ``connect-src 'self'`` lets
it fetch only from the admin listener that served it.

The page polls ``/pools`` (live state, rendered as is: per-upstream keys it
does not know are shown in its "state" column) and ``/stats`` (below) every
second.  Rates and percentiles are computed *in the page*, by differencing
successive ``/stats`` snapshots of the cumulative counters and histogram
buckets: the sidecar keeps no sampler and no per-viewer state, and every
viewer gets its own window.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .metrics import Metrics

_PAGE = "status.html"
_INLINE = {tag: re.compile(rf"<{tag}>(.*?)</{tag}>", re.DOTALL) for tag in ("script", "style")}
# The status classes always present in /stats, so the page never has to guess a zero.
_CLASSES = ("2xx", "3xx", "4xx", "5xx")


@dataclass(frozen=True)
class StatusPage:
    body: bytes
    headers: dict[str, str]


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@functools.cache
def status_page() -> StatusPage:
    """The page and its response headers, read and hashed once per process."""
    html = resources.files("sidecar").joinpath("static", _PAGE).read_text(encoding="utf-8")
    hashes = {}
    for tag, pattern in _INLINE.items():
        blocks = pattern.findall(html)
        # One block each, exactly as hashed: an edit that adds a second one would
        # be blocked by the browser, and a page that half-works is worse than none.
        if len(blocks) != 1:
            raise RuntimeError(f"{_PAGE}: expected one inline <{tag}>, found {len(blocks)}")
        hashes[tag] = _sha256(blocks[0])
    csp = "; ".join(
        (
            "default-src 'none'",
            f"script-src {hashes['script']}",
            f"style-src {hashes['style']}",
            "connect-src 'self'",
            "img-src 'none'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )
    headers = {
        "Content-Type": "text/html; charset=utf-8",
        "Content-Security-Policy": csp,
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    return StatusPage(html.encode("utf-8"), headers)


def upstream_stats(metrics: Metrics) -> dict[str, dict[str, Any]]:
    """Per-upstream cumulative counters and the request-duration histogram, for /stats.

    Read from the same registry as /metrics, so the two always agree.  Every
    upstream that has counted a request appears (``none``: requests that
    matched no route), including one a reload has since removed.
    """
    rows: dict[str, dict[str, Any]] = {}

    def row(upstream: str) -> dict[str, Any]:
        found = rows.get(upstream)
        if found is None:
            found = rows[upstream] = {
                "requests": 0,
                "responses": dict.fromkeys(_CLASSES, 0),
                "refused": {},
                "upstream_errors": {},
                "duration": {"bounds": [], "cumulative": [], "sum": 0.0},
            }
        return found

    for family in metrics.requests.collect():
        for sample in family.samples:
            entry = row(sample.labels["upstream"])
            count = int(sample.value)
            entry["requests"] += count
            status_class = f"{sample.labels['status'][0]}xx"  # 499 (caller left) is a 4xx
            entry["responses"][status_class] = entry["responses"].get(status_class, 0) + count
    for counter, key, label in (
        (metrics.rejected, "refused", "reason"),
        (metrics.upstream_errors, "upstream_errors", "kind"),
    ):
        for family in counter.collect():
            for sample in family.samples:
                by = row(sample.labels["upstream"])[key]
                by[sample.labels[label]] = by.get(sample.labels[label], 0) + int(sample.value)
    buckets: dict[str, list[tuple[float, int]]] = {}
    for family in metrics.duration.collect():
        for sample in family.samples:
            upstream = sample.labels["upstream"]
            if sample.name.endswith("_bucket"):
                buckets.setdefault(upstream, []).append((float(sample.labels["le"]), int(sample.value)))
            elif sample.name.endswith("_sum"):
                row(upstream)["duration"]["sum"] = sample.value
    for upstream, pairs in buckets.items():
        pairs.sort()
        duration = row(upstream)["duration"]
        # The +Inf bucket sorts last; JSON has no infinity, so it is the one
        # count without a bound: len(cumulative) == len(bounds) + 1.
        duration["bounds"] = [bound for bound, _ in pairs[:-1]]
        duration["cumulative"] = [count for _, count in pairs]
    return rows
