"""Retries with a budget (see docs/resilience.md).

Plain synchronous cores, unit-tested with a fake clock and a fixed random
source:

* :class:`RetryBudget` — Linkerd's budget: retries in the last 10 s may not
  exceed ``ratio * requests in the last 10 s + min_per_second * 10``;
* :func:`decide` — may this attempt be repeated, and after how long?

:class:`RetryPolicy` is one upstream's shell (settings, budget, clock, the
counts behind ``sidecar_retries_total``); :class:`RetryStage` puts it last
in a request's stages, where :meth:`~RetryStage.next_attempt` is asked after
every attempt.  The attempt loop itself (replaying the body, closing a
retried response, sleeping the delay) is in ``forward.py``.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from typing import TYPE_CHECKING

from . import Stage
from .breaker import failure_of

if TYPE_CHECKING:
    from ..config.model import Retries
    from ..exchange import Attempt, Exchange

BUDGET_WINDOW = 10.0  # seconds
_BUCKETS = 10  # one per second of the window
# RFC 9110 §9.2.2: the methods whose repetition has the effect of one request.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Statuses whose Retry-After says when the upstream wants to be asked again.
_RETRY_AFTER_STATUSES = (429, 503)


class RetryBudget:
    """Requests and retries over a sliding 10 s window, in one-second buckets."""

    __slots__ = ("ratio", "min_per_second", "_requests", "_retries", "_epoch")

    def __init__(self, ratio: float, min_per_second: float) -> None:
        self.ratio = ratio
        self.min_per_second = min_per_second
        self._requests = [0] * _BUCKETS
        self._retries = [0] * _BUCKETS
        self._epoch = 0  # the whole second the newest bucket stands for

    def _advance(self, now: float) -> int:
        second = math.floor(now)
        gap = second - self._epoch
        if gap > 0:
            for step in range(1, min(gap, _BUCKETS) + 1):
                slot = (self._epoch + step) % _BUCKETS
                self._requests[slot] = self._retries[slot] = 0
            self._epoch = second
        return self._epoch % _BUCKETS

    def request(self, now: float) -> None:
        """An original request (not a retry) was made."""
        self._requests[self._advance(now)] += 1

    def remaining(self, now: float) -> float:
        """Retries still allowed in the window now (may be fractional)."""
        self._advance(now)
        allowed = self.ratio * sum(self._requests) + self.min_per_second * BUDGET_WINDOW
        return max(0.0, allowed - sum(self._retries))

    def try_spend(self, now: float) -> bool:
        """Take one retry from the budget if it has one."""
        if self.remaining(now) < 1:
            return False
        self._retries[self._epoch % _BUCKETS] += 1
        return True


@dataclass(frozen=True, slots=True)
class Decision:
    """Retry after ``delay`` seconds (``result`` "sent"), or not (``delay`` None).

    ``result`` is what ``sidecar_retries_total`` counts: "sent", or why an
    eligible retry was not made ("budget_exhausted", "no_time"); None when the
    attempt was not one to retry at all.
    """

    delay: float | None
    result: str | None


NO_RETRY = Decision(None, None)


def parse_retry_after(value: str | None, now_wall: float) -> float | None:
    """Retry-After in seconds (delay-seconds or an HTTP-date); None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now_wall)


def decide(
    settings: Retries,
    *,
    condition: str | int | None,
    attempt_number: int,
    idempotent: bool,
    replayable: bool,
    retry_after: float | None,
    deadline_left: float | None,
    budget: RetryBudget,
    now: float,
    rand: Callable[[], float],
) -> Decision:
    """May the attempt numbered ``attempt_number`` (1 = the first) be repeated?

    The checks, in order: the condition is in ``retry_on``; attempts are left;
    a request that may have reached the upstream (``reset``, ``timeout``, a
    status) is repeated only when ``idempotent``; the body can be replayed;
    a Retry-After must fit ``backoff.max``; the deadline must cover the delay
    (else ``no_time``); the budget must have a retry (else ``budget_exhausted``).
    """
    if condition is None or condition not in settings.retry_on or attempt_number > settings.attempts:
        return NO_RETRY
    if condition != "connect_error" and not idempotent:
        return NO_RETRY
    if not replayable:
        return NO_RETRY
    backoff = settings.backoff
    if retry_after is not None and condition in _RETRY_AFTER_STATUSES:
        if retry_after > backoff.max:
            return NO_RETRY  # the upstream asked for longer than we wait: relayed as is
        delay = retry_after
    else:
        # Full jitter: uniform(0, min(max, base·2^n)), n = retries made so far.
        delay = rand() * min(backoff.max, backoff.base * 2 ** (attempt_number - 1))
    if deadline_left is not None and delay >= deadline_left:
        return Decision(None, "no_time")
    if not budget.try_spend(now):
        return Decision(None, "budget_exhausted")
    return Decision(delay, "sent")


class RetryPolicy:
    """One upstream's retries: its settings, budget and counts."""

    __slots__ = ("upstream", "settings", "budget", "results", "_clock", "_rand", "_retry_on")

    def __init__(
        self,
        upstream: str,
        settings: Retries,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.upstream = upstream
        self.settings = settings
        self.budget = RetryBudget(settings.budget.ratio, settings.budget.min_per_second)
        self.results: Counter[str] = Counter()  # sidecar_retries_total by result
        self._clock = clock
        self._rand = rand
        self._retry_on = frozenset(settings.retry_on)

    @property
    def enabled(self) -> bool:
        return self.settings.attempts > 0 and bool(self.settings.retry_on)

    def request(self) -> None:
        # Counted even with retries off: the connection pool's own repeat of a
        # request on a fresh connection (spend_for_connection) spends from it too.
        self.budget.request(self._clock())

    def spend_for_connection(self) -> bool:
        """May the connection pool repeat a request once on a fresh connection?

        It does so when a kept-alive connection turns out closed, or an HTTP/2
        GOAWAY says the request was never processed: an attempt more at the
        upstream all the same, so it is counted and bounded by the same budget
        as every retry (else a flaky upstream sees more load than the budget
        allows).  Without budget the request fails as it is.
        """
        if self.budget.try_spend(self._clock()):
            self.results["sent"] += 1
            return True
        self.results["budget_exhausted"] += 1
        return False

    def next_attempt(self, exchange: Exchange, attempt: Attempt) -> float | None:
        if not self.enabled:
            return None
        condition = failure_of(attempt)
        if condition is None or condition not in self._retry_on:
            return None  # the common case, decided without a clock read
        now = self._clock()
        decision = decide(
            self.settings,
            condition=condition,
            attempt_number=attempt.number,
            idempotent=exchange.idempotent,
            replayable=exchange.replayable,
            retry_after=attempt.retry_after,
            deadline_left=None if exchange.deadline is None else exchange.deadline - now,
            budget=self.budget,
            now=now,
            rand=self._rand,
        )
        if decision.result is not None:
            self.results[decision.result] += 1
        return decision.delay

    def snapshot(self) -> dict[str, object]:
        """The /pools entry: the settings that matter and the budget left."""
        return {
            "attempts": self.settings.attempts,
            "budget_remaining": math.floor(self.budget.remaining(self._clock())) if self.enabled else 0,
            "results": dict(sorted(self.results.items())),
        }


def idempotent(method: str, has_idempotency_key: bool) -> bool:
    return method in IDEMPOTENT_METHODS or has_idempotency_key


class RetryStage(Stage):
    """The last stage: counts original requests for the budget and decides retries."""

    __slots__ = ("_policy",)
    name = "retries"

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy

    def admit_now(self, exchange: Exchange) -> bool:
        self._policy.request()
        return True

    def next_attempt(self, exchange: Exchange, attempt: Attempt) -> float | None:
        return self._policy.next_attempt(exchange, attempt)
