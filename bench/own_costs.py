"""What the sidecar's own code costs per proxied request, outside the upstream exchange (in-process).

    .venv/bin/python -m bench.own_costs [--rounds 50000] [--out FILE]

The end-to-end figure (``bench/run``) moves by ±10 % between runs of the same
code on a shared machine; these cases time the sidecar's own per-request
work alone, in a tight loop, best of five, so that a change of a microsecond
shows:

* **request path**: ``Forwarder.__call__`` for a 1 KiB GET, every stage of a
  default upstream, routing, the metrics and the access line, with the
  upstream exchange itself (send, relay) replaced by a stub that answers at
  once; the access line goes to /dev/null through the real JSON logging setup;
* **access line** and **metrics** on their own (as ``bench.accounting``);
* **request headers** / **response headers**: the header rules for a typical
  caller request and upstream response (``sidecar/headers.py``);
* **stages**: an upstream's stages with nothing configured (the defaults),
  admit to release, for one attempt; and with every Part II stage that needs
  no Redis (a deadline, a named caller with weights, a rate limit that never
  refuses, retries, a circuit breaker), as ``bench/run``'s Part II row.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

_CONFIG = """
upstreams:
  api: {url: 'http://127.0.0.1:9'}
"""

_ALL_STAGES = """
callers: {header: X-Sidecar-Caller, weights: {checkout: 9, batch: 1}}
upstreams:
  api:
    url: 'http://127.0.0.1:9'
    rate_limit: {rate: 10000000/s, burst: 1000000}
    retries: {attempts: 1, retry_on: [connect_error, reset, 502, 503, 504]}
    circuit_breaker: {failures: 5}
"""

_REQUEST_HEAD = [
    (b"Host", b"127.0.0.1:8088"),
    (b"User-Agent", b"wrk"),
    (b"Accept", b"*/*"),
]
_RESPONSE_HEAD = [
    (b"Server", b"nginx/1.22.1"),
    (b"Date", b"Tue, 01 Dec 2026 18:17:08 GMT"),
    (b"Content-Type", b"application/octet-stream"),
    (b"Content-Length", b"1024"),
    (b"Last-Modified", b"Tue, 01 Dec 2026 18:17:00 GMT"),
    (b"Connection", b"keep-alive"),
    (b"ETag", b'"674c9d2c-400"'),
    (b"Accept-Ranges", b"bytes"),
]


def _run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("suspended: this case measures the path that does not wait")


def _best(case: Callable[[], None], rounds: int) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for _ in range(rounds):
            case()
        best = min(best, (time.process_time() - started) / rounds)
    return best


def cases() -> dict[str, Callable[[], None]]:
    from aiohttp.test_utils import make_mocked_request
    from multidict import CIMultiDict

    from sidecar.config import parse_config
    from sidecar.exchange import Exchange, Generation
    from sidecar.forward import Forwarder
    from sidecar.headers import downstream_headers, upstream_headers
    from sidecar.logs import configure_logging
    from sidecar.metrics import Metrics
    from sidecar.observe import Observer, log_access
    from sidecar.pools import UpstreamPool
    from sidecar.routing import Router

    configure_logging("json", "info")
    config = parse_config(_CONFIG)
    pool = UpstreamPool(config.upstreams[0])
    generation = Generation(router=Router(config.upstreams), pools={"api": pool}, inbound=config.inbound)
    metrics = Metrics(lambda: [pool])
    observer = Observer(metrics)
    answer = object()

    class Stubbed(Forwarder):
        """The request path with the upstream exchange answered at once (what _attempts would record)."""

        async def _attempts(self, request: Any, exchange: Exchange, pool: UpstreamPool) -> Any:
            attempt = exchange.begin_attempt(time.monotonic())
            attempt.status = exchange.status = 200
            attempt.headers_after = exchange.upstream_time = time.monotonic() - attempt.started
            exchange.http_version = "HTTP/1.1"
            pool.stages.observe(exchange, attempt)
            pool.stages.next_attempt(exchange, attempt)
            exchange.bytes_out = 1024
            return answer

    forwarder = Stubbed(lambda: generation, observer, lambda: False)
    headers = CIMultiDict((name.decode(), value.decode()) for name, value in _REQUEST_HEAD)
    request = make_mocked_request("GET", "/api/1k", headers=headers)

    def request_path() -> None:
        _run(forwarder(request))

    sample = Exchange("0" * 32, "GET", "/api/1k", time.monotonic(), upstream="api", pool=pool)
    sample.status, sample.queued, sample.pool_wait = 200, True, 0.00002
    sample.upstream_time, sample.http_version, sample.bytes_out = 0.0004, "HTTP/1.1", 1024
    sample.begin_attempt(0.0)

    def access_line() -> None:
        log_access(observer._log, sample, 0.0005)

    def metrics_only() -> None:
        metrics.observe(sample, 0.0005)

    def request_headers() -> None:
        upstream_headers(_REQUEST_HEAD, (), pool, sample.request_id)

    def response_headers() -> None:
        downstream_headers(_RESPONSE_HEAD, "keep-alive", framed_by_coding=False, upstream="api")

    def stages_of(pool: UpstreamPool, deadline: float | None, caller: str) -> Callable[[], None]:
        def stages() -> None:
            exchange = Exchange("0" * 32, "GET", "/api/1k", time.monotonic())
            exchange.generation, exchange.pool, exchange.upstream = generation, pool, "api"
            exchange.waiting_since = exchange.started
            if deadline is not None:
                exchange.deadline = exchange.started + deadline
            exchange.caller = exchange.caller_label = caller
            _run(pool.stages.admit(exchange))
            attempt = exchange.begin_attempt(exchange.started)
            attempt.status = 200
            pool.stages.observe(exchange, attempt)
            pool.stages.next_attempt(exchange, attempt)
            pool.stages.release(exchange)

        return stages

    every = UpstreamPool(parse_config(_ALL_STAGES).upstreams[0])

    return {
        "request path (no upstream exchange)": request_path,
        "access line": access_line,
        "metrics": metrics_only,
        "request headers": request_headers,
        "response headers": response_headers,
        "stages, nothing configured": stages_of(pool, None, "other"),
        "stages, every Part II stage but shared (deadline, caller)": stages_of(every, 5.0, "checkout"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="per-request cost of the sidecar's own code")
    parser.add_argument("--rounds", type=int, default=50_000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    lines = ["| case | µs per request |", "| --- | ---: |"]
    stdout = sys.stdout
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the access lines go here
    try:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # aiohttp's mocked request wants one
        for name, case in cases().items():
            case()  # warm up caches (label children, loggers)
            lines.append(f"| {name} | {_best(case, args.rounds) * 1e6:.2f} |")
            print(lines[-1], file=stdout, flush=True)
    finally:
        sys.stdout = stdout
    lines += ["", f"Python {platform.python_version()}, best of five runs of {args.rounds:,} calls each (CPU time)."]
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
