"""What the admission stages cost per request, in-process (no sockets, no event loop).

    .venv/bin/python -m bench.stage_costs [--rounds 200000] [--out bench/results/stage_costs.md]

Each case times the calls one request makes into a stage, in a tight loop,
best of five runs.  A stage's ``admit`` that does not wait completes without
suspending, so it is driven with ``coroutine.send(None)``: the figure is the
stage's own cost, without the event loop's.

Cases:

* **deadline, no header**: what every request pays for the deadline feature
  when the caller sends no ``X-Sidecar-Timeout`` (the header lookup, the
  deadline stage's admit, the forwarded-budget check);
* **deadline, with a header**: parsing it, the stage, the budget forwarded;
* **rate limit**: a configured limit with a token free (reserve + release),
  the time read included.

Targets: no signal < 2 µs per request; a configured rate limit < 5 µs.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from multidict import CIMultiDict

from sidecar.config import RateLimit
from sidecar.exchange import Exchange
from sidecar.policy.deadline import DeadlineStage, caller_deadline, forwarded_budget
from sidecar.policy.rate_limit import RateLimitStage

ROOT = Path(__file__).resolve().parent.parent


def _run(coroutine: Coroutine[Any, Any, None]) -> None:
    try:
        coroutine.send(None)
    except StopIteration:
        return
    raise RuntimeError("the stage suspended: this case measures the path that does not wait")


def _best(case: Callable[[], None], rounds: int) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(rounds):
            case()
        best = min(best, (time.perf_counter() - started) / rounds)
    return best


def cases() -> dict[str, Callable[[], None]]:
    plain = CIMultiDict({"Host": "api", "Accept": "*/*", "User-Agent": "bench"})
    with_budget = CIMultiDict({"Host": "api", "Accept": "*/*", "X-Sidecar-Timeout": "2500ms"})
    deadline_stage = DeadlineStage()
    limiter = RateLimitStage("api", RateLimit(rate=1e12, burst=1_000_000))
    exchange = Exchange(request_id="r", method="GET", path="/", started=time.monotonic())
    sent = Exchange(request_id="r", method="GET", path="/", started=time.monotonic())
    sent.begin_attempt(0.0)

    def baseline() -> None:
        exchange.deadline = None

    def no_header() -> None:
        exchange.deadline = caller_deadline(plain, exchange.started)
        _run(deadline_stage.admit(exchange))
        forwarded_budget(exchange, exchange.started)

    def header() -> None:
        exchange.deadline = caller_deadline(with_budget, exchange.started)
        _run(deadline_stage.admit(exchange))
        forwarded_budget(exchange, exchange.started)

    def rate_limit() -> None:
        _run(limiter.admit(sent))
        limiter.release(sent)

    return {
        "baseline (an attribute store)": baseline,
        "deadline, no header": no_header,
        "deadline, with a header": header,
        "rate limit configured, token free": rate_limit,
    }


TARGETS = {"deadline, no header": 2e-6, "rate limit configured, token free": 5e-6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="per-request cost of the admission stages")
    parser.add_argument("--rounds", type=int, default=200_000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "stage_costs.md")
    args = parser.parse_args(argv)
    lines = [
        "# Per-request cost of the admission stages (in-process microbenchmark)",
        "",
        f"Reproduce: `.venv/bin/python -m bench.stage_costs --rounds {args.rounds}`",
        "",
        "| case | µs per request | target |",
        "| --- | ---: | --- |",
    ]
    for name, case in cases().items():
        cost = _best(case, args.rounds)
        target = TARGETS.get(name)
        verdict = "" if target is None else f"< {target * 1e6:g} µs: {'met' if cost < target else 'NOT met'}"
        lines.append(f"| {name} | {cost * 1e6:.3f} | {verdict} |")
        print(lines[-1], flush=True)
    lines += [
        "",
        f"Machine: {platform.machine()}, Python {platform.python_version()}; best of five runs of "
        f"{args.rounds:,} calls each, on a machine shared with other jobs.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
