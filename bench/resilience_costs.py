"""What a policy stage costs one request, timed in-process (no sockets, no event loop).

    .venv/bin/python -m bench.resilience_costs [--requests 200000]

Each stage is driven the way the request path drives it for a request that
succeeds at the first attempt: ``admit``, ``observe``, ``next_attempt``,
``release`` (the stages' coroutines never suspend on this path, so they are
run by hand).  Reported: microseconds of CPU per request, per stage, and for
the retry and circuit breaker stages together (target: < 5 µs when configured
but not triggered).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from sidecar.config.model import DEFAULT_RETRIES
from sidecar.config.model import CircuitBreaker as BreakerSettings
from sidecar.exchange import Exchange
from sidecar.policy import Stage
from sidecar.policy.breaker import CircuitBreaker, CircuitBreakerStage
from sidecar.policy.retry import RetryPolicy, RetryStage


def _run(coroutine: Coroutine[Any, Any, None]) -> None:
    try:
        coroutine.send(None)
    except StopIteration:
        return
    raise RuntimeError("a stage suspended on the fast path")


def per_request(stages: Sequence[Stage], requests: int) -> float:
    """CPU seconds per request through ``stages``."""
    started = time.process_time()
    for _ in range(requests):
        exchange = Exchange(request_id="r", method="GET", path="/", started=0.0)
        for stage in stages:
            _run(stage.admit(exchange))
        attempt = exchange.begin_attempt(0.0)
        attempt.status = 200
        for stage in stages:
            stage.observe(exchange, attempt)
        for stage in stages:
            stage.next_attempt(exchange, attempt)
        for stage in reversed(stages):
            stage.release(exchange)
    return (time.process_time() - started) / requests


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="per-request cost of the policy stages")
    parser.add_argument("--requests", type=int, default=200_000)
    args = parser.parse_args(argv)
    breaker_on = BreakerSettings(5, ("connect_error", "timeout", 502, 503, 504), 5.0, 120.0)
    cases: list[tuple[str, list[Stage]]] = [
        ("baseline (a request's Exchange and Attempt, no stage)", []),
        ("circuit breaker (failures: 5, closed)", [CircuitBreakerStage(CircuitBreaker("api", breaker_on))]),
        ("retries (default settings, not triggered)", [RetryStage(RetryPolicy("api", DEFAULT_RETRIES))]),
        (
            "circuit breaker + retries",
            [
                CircuitBreakerStage(CircuitBreaker("api", breaker_on)),
                RetryStage(RetryPolicy("api", DEFAULT_RETRIES)),
            ],
        ),
    ]
    baseline = 0.0
    print("| stages | µs CPU per request | over the baseline |")
    print("| --- | ---: | ---: |")
    for name, stages in cases:
        per_request(stages, args.requests // 10)  # warm up
        cost = min(per_request(stages, args.requests) for _ in range(3))
        if not stages:
            baseline = cost
        print(f"| {name} | {cost * 1e6:.2f} | {(cost - baseline) * 1e6:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
