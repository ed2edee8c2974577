"""The one observation of every proxied request, made when it ends.

:class:`Observer` is what the proxy handler calls with each finished
:class:`~sidecar.forward.Exchange`: it feeds the request metrics, the pool's
tally of outcomes (``/pools`` totals) and writes the access line.  One call,
in one place, so that every request is counted exactly once whatever way it
ended (answered, refused, failed or abandoned by its caller); see
docs/observability.md for the fields.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .logs import get_logger, json_lines
from .metrics import outcome

if TYPE_CHECKING:
    from .exchange import Exchange
    from .metrics import Metrics

__all__ = ["ACCESS_FIELDS", "Observer", "log_access"]

access_log = get_logger("sidecar.access")
# The access line's fields, in order (docs/observability.md).
ACCESS_FIELDS = (
    "request_id",
    "method",
    "path",
    "upstream",
    "status",
    "duration_ms",
    "pool_wait_ms",
    "upstream_ms",
    "upstream_http_version",
    "bytes_in",
    "bytes_out",
    "error",
    "deadline_ms",
    "attempts",
    "caller",
)


class Observer:
    """Metrics, pool outcome and access line for each finished exchange."""

    __slots__ = ("_metrics", "_log")

    def __init__(self, metrics: Metrics, log: Any = access_log) -> None:
        self._metrics = metrics
        self._log = log

    def __call__(self, exchange: Exchange) -> None:
        duration = time.monotonic() - exchange.started
        self._metrics.observe(exchange, duration)
        if exchange.pool is not None:
            exchange.pool.outcomes[outcome(exchange)] += 1
        log_access(self._log, exchange, duration)


def log_access(logger: Any, exchange: Exchange, duration: float) -> None:
    """The one access event per request, with every field docs/observability.md lists.

    Never the query string, never a header value: the path is logged encoded
    and without its query, and no header is read here at all.
    """
    upstream_time = exchange.upstream_time
    deadline = exchange.deadline
    values = (
        exchange.request_id,
        exchange.method,
        exchange.path,
        exchange.upstream,
        exchange.status or None,
        round(duration * 1000, 3),
        round(exchange.pool_wait * 1000, 3),
        None if upstream_time is None else round(upstream_time * 1000, 3),
        exchange.http_version,
        exchange.bytes_in,
        exchange.bytes_out,
        exchange.error,
        None if deadline is None else round((deadline - exchange.started) * 1000, 3),
        len(exchange.attempts),
        # The caller header's value when valid (visible ASCII, at most 64
        # characters), else "other": unlike the metrics label, not bounded.
        exchange.caller,
    )
    # The same line, written directly when the JSON pipeline is in use (sidecar/logs.py).
    direct = json_lines() if logger is access_log else None
    if direct is None or not direct.write("access", ACCESS_FIELDS, values):
        logger.info("access", **dict(zip(ACCESS_FIELDS, values, strict=True)))
