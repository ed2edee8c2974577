"""CPU cost of the per-request accounting: metrics + pool outcome + JSON access line.

    .venv/bin/python -m bench.accounting [requests]

The access line goes to /dev/null through the real structlog configuration
(JSON renderer, secret scrubber with one secret loaded), so the number is what
every proxied request pays on top of forwarding.
"""

from __future__ import annotations

import os
import sys
import time


def main(count: int) -> None:
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    from sidecar.config import parse_config
    from sidecar.exchange import Exchange
    from sidecar.logs import configure_logging
    from sidecar.metrics import Metrics, outcome
    from sidecar.observe import access_log, log_access
    from sidecar.pools import UpstreamPool
    from sidecar.redact import scrubber

    configure_logging("json", "info")
    scrubber.update(frozenset({"a-loaded-secret-value"}))
    pool = UpstreamPool(parse_config("upstreams:\n  api: {url: 'http://127.0.0.1:9'}\n").upstreams[0])
    metrics = Metrics(lambda: [pool])
    access = access_log  # the one the proxy logs with (its line is rendered directly)
    exchanges = []
    for index in range(count):
        exchange = Exchange(f"{index:032x}", "GET", "/api/v1/items", time.monotonic(), upstream="api", pool=pool)
        exchange.status, exchange.queued, exchange.pool_wait = 200, True, 0.00002
        exchange.upstream_time, exchange.http_version, exchange.bytes_out = 0.0004, "HTTP/1.1", 1024
        exchanges.append(exchange)

    def run(with_log: bool) -> float:
        started = time.process_time()
        for exchange in exchanges:
            metrics.observe(exchange, 0.0005)
            pool.outcomes[outcome(exchange)] += 1
            if with_log:
                log_access(access, exchange, 0.0005)
        return (time.process_time() - started) / count * 1e6

    run(True)  # warm up caches
    metrics_only, total = run(False), run(True)
    sys.stdout = sys.__stdout__
    print(f"metrics + outcome: {metrics_only:.1f} us/request; with JSON access line: {total:.1f} us/request")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50_000)
