"""The circuit breaker's state machine, driven by a fake clock (no sockets, no loop)."""

from __future__ import annotations

import pytest

from sidecar.config.model import CircuitBreaker as Settings
from sidecar.errors import CircuitOpen
from sidecar.exchange import Attempt, Exchange
from sidecar.policy.breaker import BreakerCore, CircuitBreaker, CircuitState, Passage


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _fail(core: BreakerCore, now: float, times: int = 1) -> None:
    for _ in range(times):
        assert core.allow(now) is Passage.PASS
        core.record(now, failed=True, probe=False)


def test_off_when_failures_is_zero() -> None:
    core = BreakerCore(0, 1.0, 10.0)
    for _ in range(100):
        assert core.allow(0.0) is Passage.PASS
        core.record(0.0, failed=True, probe=False)
    assert core.state(0.0) is CircuitState.CLOSED


def test_opens_after_consecutive_failures_only() -> None:
    core = BreakerCore(3, 1.0, 10.0)
    _fail(core, 0.0, 2)
    core.record(0.0, failed=False, probe=False)  # a success resets the count
    _fail(core, 0.0, 2)
    assert core.state(0.0) is CircuitState.CLOSED
    _fail(core, 0.0, 1)
    assert core.state(0.0) is CircuitState.OPEN
    assert core.allow(0.5) is Passage.REFUSED
    assert core.until_half_open(0.25) == pytest.approx(0.75)


def test_half_open_lets_exactly_one_probe_through() -> None:
    core = BreakerCore(1, 1.0, 10.0)
    _fail(core, 0.0)
    assert core.state(1.0) is CircuitState.HALF_OPEN
    passages = [core.allow(1.0) for _ in range(10)]
    assert passages.count(Passage.PROBE) == 1
    assert passages.count(Passage.REFUSED) == 9


def test_a_good_probe_closes_and_resets_the_period() -> None:
    core = BreakerCore(1, 1.0, 10.0)
    _fail(core, 0.0)
    assert core.allow(1.0) is Passage.PROBE
    core.record(1.0, failed=True, probe=True)  # open for 2 s
    assert core.allow(2.9) is Passage.REFUSED
    assert core.allow(3.0) is Passage.PROBE
    core.record(3.0, failed=False, probe=True)
    assert core.state(3.0) is CircuitState.CLOSED
    _fail(core, 4.0)
    assert core.until_half_open(4.0) == pytest.approx(1.0)  # back to open_for


def test_failed_probes_double_the_period_up_to_max_open() -> None:
    core = BreakerCore(1, 1.0, 5.0)
    _fail(core, 0.0)
    now, periods = 0.0, []
    for _ in range(5):
        now += core.until_half_open(now)
        assert core.allow(now) is Passage.PROBE
        core.record(now, failed=True, probe=True)
        periods.append(core.until_half_open(now))
    assert periods == [2.0, 4.0, 5.0, 5.0, 5.0]


def test_an_abandoned_probe_lets_the_next_request_probe() -> None:
    core = BreakerCore(1, 1.0, 10.0)
    _fail(core, 0.0)
    assert core.allow(1.0) is Passage.PROBE
    assert core.allow(1.0) is Passage.REFUSED
    core.abandon_probe()
    assert core.allow(1.0) is Passage.PROBE


def test_late_outcomes_of_attempts_begun_before_opening_are_ignored() -> None:
    core = BreakerCore(1, 1.0, 10.0)
    _fail(core, 0.0)
    core.record(0.5, failed=False, probe=False)  # started while closed
    assert core.state(0.5) is CircuitState.OPEN


def _exchange() -> Exchange:
    return Exchange(request_id="r", method="GET", path="/", started=0.0)


def test_shell_counts_failure_on_and_never_429() -> None:
    clock = Clock()
    breaker = CircuitBreaker("app", Settings(2, ("connect_error", 503), 1.0, 4.0), clock)
    exchange = _exchange()
    for _ in range(10):
        breaker.admit_attempt(exchange)
        breaker.observe(exchange, Attempt(1, 0.0, status=429))
    assert breaker.state() is CircuitState.CLOSED
    for outcome in ({"status": 500}, {"failure": "reset"}, {"error": "request_too_large"}):
        breaker.observe(exchange, Attempt(1, 0.0, **outcome))  # type: ignore[arg-type]
    assert breaker.state() is CircuitState.CLOSED  # not in failure_on, or no verdict
    breaker.observe(exchange, Attempt(1, 0.0, failure="connect_error"))
    breaker.observe(exchange, Attempt(1, 0.0, status=503))
    assert breaker.state() is CircuitState.OPEN
    clock.now += 0.2
    with pytest.raises(CircuitOpen) as refused:
        breaker.admit_attempt(_exchange())
    assert refused.value.status == 503 and refused.value.retry_after == 1
    assert breaker.snapshot()["state"] == "open"


def test_shell_probe_released_without_an_outcome_is_given_back() -> None:
    clock = Clock()
    breaker = CircuitBreaker("app", Settings(1, ("connect_error",), 1.0, 4.0), clock)
    exchange = _exchange()
    breaker.observe(exchange, Attempt(1, 0.0, failure="connect_error"))
    clock.now += 1.0
    probe = _exchange()
    breaker.admit_attempt(probe)
    assert probe.circuit_probe
    with pytest.raises(CircuitOpen):
        breaker.admit_attempt(_exchange())
    breaker.release(probe)  # e.g. refused by a later stage, or cancelled
    other = _exchange()
    breaker.admit_attempt(other)
    assert other.circuit_probe
    breaker.observe(other, Attempt(1, 0.0, status=200))
    assert breaker.state() is CircuitState.CLOSED
    assert breaker.snapshot()["state"] == "closed"
