"""In-process cost of the pacing stage on the request path, per request.

    .venv/bin/python -m bench.pacing_costs

Times CPU (``time.process_time``, so that other jobs on the machine count
less) over many rounds, best of five batches:

* the pre-check every upstream response passes (header names only), on a
  typical response without any rate-limit field;
* a stage that does nothing, for scale (what the seam itself costs);
* the stage's ``admit`` + ``observe`` when nothing was learned and the
  response carries no signal (the common case);
* the same when every response carries a ``RateLimit`` quota (a configured
  upstream that announces its limits): pre-check, parse, learn, take.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from sidecar.config import Pacing
from sidecar.exchange import Attempt, Exchange
from sidecar.policy import Stage
from sidecar.policy.pacing import PacingStage
from sidecar.policy.signals import may_carry_signal

ROUNDS = 50_000
PLAIN = httpx.Headers(
    [
        ("Content-Type", "application/json"),
        ("Content-Length", "512"),
        ("Date", "Tue, 01 Dec 2026 15:52:02 GMT"),
        ("Server", "nginx"),
        ("Cache-Control", "no-store"),
        ("X-Request-Id", "3f2a9c"),
    ]
)
SIGNALLED = httpx.Headers(
    [*PLAIN.raw, (b"RateLimit-Policy", b'"default";q=1000;w=60'), (b"RateLimit", b'"default";r=900;t=60')]
)


def best(run: Callable[[], None], rounds: int = ROUNDS) -> float:
    """Seconds per call, best of five batches."""
    results = []
    for _ in range(5):
        started = time.process_time()
        for _ in range(rounds):
            run()
        results.append((time.process_time() - started) / rounds)
    return min(results)


def stage_round(stage: Stage, headers: httpx.Headers) -> Callable[[], None]:
    def one() -> None:
        exchange = Exchange(request_id="r", method="GET", path="/", started=0.0)
        coroutine = stage.admit(exchange)
        try:  # noqa: SIM105 - contextlib.suppress would add its own cost to what is measured
            coroutine.send(None)  # admit returns without suspending when nothing holds it back
        except StopIteration:
            pass
        attempt = Attempt(number=1, started=0.0, status=200)
        raw = headers.raw
        if may_carry_signal(raw):
            attempt.signal_headers = raw
        stage.observe(exchange, attempt)

    return one


def main() -> None:
    baseline = best(lambda: Exchange(request_id="r", method="GET", path="/", started=0.0) and None)
    attempt_only = best(lambda: Attempt(number=1, started=0.0, status=200) and None)
    precheck = best(lambda: may_carry_signal(PLAIN.raw) and None)
    # What any stage costs on the request path (its coroutine, the seam's calls), pacing or not.
    empty_stage = best(stage_round(Stage(), PLAIN)) - baseline - attempt_only - precheck
    plain = best(stage_round(PacingStage("api", Pacing()), PLAIN)) - baseline - attempt_only
    # A huge quota and reset: the budget never runs out during the measurement.
    signalled = best(stage_round(PacingStage("api", Pacing(max_pause=1e9)), SIGNALLED)) - baseline - attempt_only
    print("| per request | µs |")
    print("| --- | ---: |")
    print(f"| pre-check of a response without a signal (6 headers) | {precheck * 1e6:.2f} |")
    print(f"| a stage that does nothing (admit coroutine + observe call), for scale | {empty_stage * 1e6:.2f} |")
    print(f"| pacing stage, nothing learned, no signal (admit + pre-check + observe) | {plain * 1e6:.2f} |")
    print(f"| pacing stage, every response carries a RateLimit quota | {signalled * 1e6:.2f} |")


if __name__ == "__main__":
    main()
