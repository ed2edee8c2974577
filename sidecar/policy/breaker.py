"""The circuit breaker: fail fast while an upstream is down (see docs/resilience.md).

:class:`BreakerCore` is the state machine, plain synchronous code driven by
the times it is given (unit-tested with a fake clock)::

    closed ──(``failures`` consecutive failed attempts)──▶ open
    open ──(the period passes)──▶ half-open: exactly one probe goes through
    half-open ──probe succeeds──▶ closed (period reset)
    half-open ──probe fails──▶ open for twice the last period (≤ max_open)

:class:`CircuitBreaker` is the per-upstream shell (the core plus a clock and
the outcome rules); :class:`CircuitBreakerStage` puts it in a request's
stages: it gates every attempt (:meth:`~CircuitBreakerStage.admit` for the
first, :meth:`~CircuitBreakerStage.before_retry` for the others) and learns
from every attempt in :meth:`~CircuitBreakerStage.observe`.  It never waits:
a refusal is immediate, 503 ``circuit_open`` with Retry-After.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import CircuitOpen
from . import Stage

if TYPE_CHECKING:
    from ..config.model import CircuitBreaker as CircuitBreakerSettings
    from ..exchange import Attempt, Exchange


class CircuitState(enum.IntEnum):
    """The values of ``sidecar_circuit_state``."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class Passage(enum.Enum):
    """What :meth:`BreakerCore.allow` decided for one attempt."""

    PASS = "pass"  # closed: go
    PROBE = "probe"  # half-open: this attempt is the one probe
    REFUSED = "refused"


class BreakerCore:
    """Consecutive-failures breaker with one probe; decides, never waits."""

    __slots__ = ("failures", "open_for", "max_open", "consecutive", "_state", "_opened_at", "_period", "_probing")

    def __init__(self, failures: int, open_for: float, max_open: float) -> None:
        self.failures = failures  # 0: off, every attempt passes
        self.open_for = open_for
        self.max_open = max(max_open, open_for)
        self.consecutive = 0
        self._state = CircuitState.CLOSED
        self._opened_at = 0.0
        self._period = open_for
        self._probing = False  # the probe is out and has not reported

    def state(self, now: float) -> CircuitState:
        """The state as a caller arriving at ``now`` would find it."""
        if self._state is CircuitState.OPEN and now >= self._opened_at + self._period:
            return CircuitState.HALF_OPEN
        return self._state

    def until_half_open(self, now: float) -> float:
        """Seconds until the next probe may go (0 when closed or half-open)."""
        if self._state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self._period - now)

    def allow(self, now: float) -> Passage:
        if self.failures <= 0 or self._state is CircuitState.CLOSED:
            return Passage.PASS
        if self.state(now) is CircuitState.HALF_OPEN and not self._probing:
            self._state = CircuitState.HALF_OPEN
            self._probing = True
            return Passage.PROBE
        return Passage.REFUSED

    def record(self, now: float, *, failed: bool, probe: bool) -> None:
        """One attempt's outcome: ``failed`` per ``failure_on``, else a success."""
        if self.failures <= 0:
            return
        if probe:
            self._probing = False
            if failed:
                self._open(now, min(self.max_open, self._period * 2))
            else:
                self._close()
            return
        if self._state is not CircuitState.CLOSED:
            # An attempt that started before the circuit opened: the probe
            # alone decides while it is open.
            return
        if failed:
            self.consecutive += 1
            if self.consecutive >= self.failures:
                self._open(now, self.open_for)
        else:
            self.consecutive = 0

    def abandon_probe(self) -> None:
        """The probe ended without an outcome (cancelled, refused by a later
        stage, a caller-side error): the next request may probe instead."""
        self._probing = False

    def _open(self, now: float, period: float) -> None:
        self._state = CircuitState.OPEN
        self._opened_at = now
        self._period = period
        self.consecutive = 0

    def _close(self) -> None:
        self._state = CircuitState.CLOSED
        self._period = self.open_for
        self.consecutive = 0


def failure_of(attempt: Attempt) -> str | int | None:
    """The condition an attempt ended in, in ``retry_on``/``failure_on`` terms:
    ``connect_error``, ``reset``, ``timeout``, or its response status; None
    for an attempt that ended for a reason of the sidecar's or the caller's."""
    if attempt.status is not None:
        return attempt.status
    return attempt.failure


class CircuitBreaker:
    """One upstream's breaker: the core, its clock and what counts as a failure."""

    __slots__ = ("upstream", "settings", "core", "_clock", "_failure_on")

    def __init__(
        self, upstream: str, settings: CircuitBreakerSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.upstream = upstream
        self.settings = settings
        self.core = BreakerCore(settings.failures, settings.open_for, settings.max_open)
        self._clock = clock
        self._failure_on = frozenset(settings.failure_on)

    @property
    def enabled(self) -> bool:
        return self.settings.failures > 0

    def state(self) -> CircuitState:
        return self.core.state(self._clock())

    def until_half_open(self) -> float:
        return self.core.until_half_open(self._clock())

    def admit_attempt(self, exchange: Exchange) -> None:
        """Let this attempt go (perhaps as the probe) or raise CircuitOpen."""
        if not self.enabled:
            return
        now = self._clock()
        passage = self.core.allow(now)
        if passage is Passage.REFUSED:
            wait = self.core.until_half_open(now)
            raise CircuitOpen(
                f"the circuit to upstream {self.upstream!r} is open after repeated failures",
                upstream=self.upstream,
                retry_after=max(1, math.ceil(wait)),
            )
        exchange.circuit_probe = passage is Passage.PROBE

    def observe(self, exchange: Exchange, attempt: Attempt) -> None:
        if not self.enabled:
            return
        condition = failure_of(attempt)
        probe, exchange.circuit_probe = exchange.circuit_probe, False
        if condition is None:
            # No verdict on the upstream (the caller's body failed, the pool
            # had no room): a probe gives its turn to the next request.
            if probe:
                self.core.abandon_probe()
            return
        # 429 is never in failure_on (the config refuses it): pacing, not failure.
        self.core.record(self._clock(), failed=condition in self._failure_on, probe=probe)

    def release(self, exchange: Exchange) -> None:
        if exchange.circuit_probe:
            exchange.circuit_probe = False
            self.core.abandon_probe()

    def snapshot(self) -> dict[str, object]:
        """The /pools entry: state, seconds to half-open, consecutive failures."""
        now = self._clock()
        return {
            "state": self.core.state(now).name.lower().replace("_", "-"),
            "half_open_in_s": round(self.core.until_half_open(now), 3),
            "consecutive_failures": self.core.consecutive,
            "failures_to_open": self.settings.failures,
        }


class CircuitBreakerStage(Stage):
    """Gates every attempt on the circuit; learns from every attempt."""

    __slots__ = ("_breaker",)
    name = "circuit_breaker"

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker

    @property
    def active(self) -> bool:
        return self._breaker.enabled  # failures: 0 (the default) is no breaker

    def admit_now(self, exchange: Exchange) -> bool:
        self._breaker.admit_attempt(exchange)
        return True

    async def before_retry(self, exchange: Exchange, attempt: Attempt) -> None:
        self._breaker.admit_attempt(exchange)

    def observe(self, exchange: Exchange, attempt: Attempt) -> None:
        self._breaker.observe(exchange, attempt)

    def release(self, exchange: Exchange) -> None:
        self._breaker.release(exchange)
