"""Caller deadlines: ``X-Sidecar-Timeout`` (see docs/deadlines-and-rate-limits.md).

A caller may give its whole budget, from the moment its request headers are
in until the upstream's response headers arrive.  It is parsed once per
request (:func:`caller_deadline`) into ``Exchange.deadline``, an absolute
monotonic time; from there:

* every wait in the stages is bounded by it (``Exchange.wait_allowance``);
* :class:`DeadlineStage`, first in an upstream's stack, refuses a request
  (or a retry) whose budget is already gone;
* each attempt's wait for response headers is bounded by what is left, and
  the rest is forwarded upstream as ``X-Sidecar-Timeout: <n>ms``
  (:func:`forwarded_budget`) so a chain of services shares one deadline.

The decisions are plain functions of (header, now); the request path only
calls them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from ..config.scalars import parse_duration
from ..errors import BadRequest, DeadlineExceeded
from . import Stage

if TYPE_CHECKING:
    from ..exchange import Attempt, Exchange

HEADER = "X-Sidecar-Timeout"
HEADER_BYTES = b"X-Sidecar-Timeout"
# A timer may fire up to a clock tick early, and a wait ended by the
# deadline is judged a moment after it fired: within this much of the
# deadline, the budget is what ran out.
SLACK = 0.002


def parse_budget(value: str) -> float:
    """The header's value → seconds; ValueError for anything but a positive duration."""
    return parse_duration(value)


def caller_deadline(headers: Mapping[str, str], started: float) -> float | None:
    """The absolute monotonic time the caller's budget ends, or None without the header.

    Raises :class:`BadRequest` (400) naming the header when the value does not
    parse or is not positive.
    """
    value = headers.get(HEADER)
    if value is None:
        return None
    try:
        return started + parse_budget(value)
    except ValueError as exc:
        raise BadRequest(f"{HEADER}: {exc}") from None


def budget_gone(exchange: Exchange, now: float) -> bool:
    """True when the request has a deadline and it has (all but) passed."""
    deadline = exchange.deadline
    return deadline is not None and now >= deadline - SLACK


def exceeded(exchange: Exchange, what: str) -> DeadlineExceeded:
    budget = "" if exchange.deadline is None else f" of {round((exchange.deadline - exchange.started) * 1000)} ms"
    return DeadlineExceeded(f"the caller's {HEADER}{budget} ran out {what}", upstream=exchange.upstream)


def forwarded_budget(exchange: Exchange, now: float) -> bytes | None:
    """The ``X-Sidecar-Timeout`` value sent upstream: whole milliseconds left, rounded down.

    None when the caller gave no deadline.  Raises DeadlineExceeded when less
    than one millisecond is left: ``0ms`` is not a budget anyone can use (and
    would be refused by the next sidecar as a bad header).
    """
    deadline = exchange.deadline
    if deadline is None:
        return None
    left = math.floor((deadline - now) * 1000)
    if left < 1:
        raise exceeded(exchange, "before the request could be sent upstream")
    return b"%dms" % left


class DeadlineStage(Stage):
    """First in an upstream's stack: a request whose budget is gone goes no further."""

    __slots__ = ("_clock",)
    name = "deadline"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock

    def admit_now(self, exchange: Exchange) -> bool:
        if exchange.deadline is not None and budget_gone(exchange, self._clock()):
            raise exceeded(exchange, "before the request reached its upstream's stages")
        return True

    async def before_retry(self, exchange: Exchange, attempt: Attempt) -> None:
        if exchange.deadline is not None and budget_gone(exchange, self._clock()):
            raise exceeded(exchange, f"before attempt {attempt.number}")
