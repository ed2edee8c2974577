"""The local rate limit per upstream: ``rate_limit: { rate: 100/s, burst: 20 }``.

:class:`RateCore` is the generic cell rate algorithm (GCRA): a token bucket
kept as one number, the *theoretical arrival time* (``tat``) of the next
request, so there is no timer and no refill loop.  A token is free at
``now`` while ``tat - now`` stays within ``burst`` emission intervals.  It is
plain synchronous code driven by the clock it is given.

:class:`RateLimitStage` is the shell: every attempt sent upstream takes one
token (``admit`` for the first, ``before_retry`` for each retry).  A token
that comes within the request's wait allowance is *reserved* at once and then
waited for (so waiters are served in arrival order and a wait that is known
to be too long is refused at once, never waited out); otherwise 429
``rate_limited`` with ``Retry-After`` = whole seconds until a token is free.
A reservation whose request goes away (cancelled, or refused by a later stage
before any attempt) is given back.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import RateLimited
from . import Stage

if TYPE_CHECKING:
    from ..config import RateLimit, Upstream
    from ..exchange import Attempt, Exchange

RETRY_AFTER_MAX = 3600


class RateCore:
    """GCRA: ``rate`` tokens per second, at most ``burst`` saved up; decides, never waits."""

    __slots__ = ("rate", "burst", "interval", "_tolerance", "_tat")

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self.interval = 1.0 / rate
        # How far ahead of now the next arrival time may run: the full bucket.
        self._tolerance = burst * self.interval
        self._tat = -math.inf  # a full bucket at start

    def reserve(self, now: float, allowed: float) -> tuple[bool, float]:
        """Take the next token if it is free within ``allowed`` seconds.

        Returns ``(True, wait)``: the token is this caller's after ``wait``
        seconds (0: now); or ``(False, wait)``: refused, nothing taken, the
        token would have come after ``wait`` seconds.
        """
        start = self._tat if self._tat > now else now
        tat = start + self.interval
        wait = tat - now - self._tolerance
        if wait <= allowed:
            self._tat = tat
            return True, wait if wait > 0.0 else 0.0
        return False, wait

    def refund(self) -> None:
        """Give back one reserved token that was never used."""
        self._tat -= self.interval

    def tokens(self, now: float) -> float:
        """Tokens free now (0 to burst), for /pools."""
        ahead = self._tat - now if self._tat > now else 0.0
        return max(0.0, (self._tolerance - ahead) / self.interval)

    @staticmethod
    def retry_after(wait: float) -> int:
        """Whole seconds until a token is free (RFC 9110 delay-seconds), at least 1."""
        return max(1, min(RETRY_AFTER_MAX, math.ceil(wait)))


class RateLimitStage(Stage):
    """The shell: takes a token per attempt, waits for it within the allowance, or refuses."""

    __slots__ = ("upstream", "core", "waiting", "_clock")
    name = "rate_limit"

    def __init__(self, upstream: str, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self.upstream = upstream
        self.core = RateCore(limit.rate, limit.burst)
        self.waiting = 0  # requests sleeping until their reserved token
        self._clock = clock

    async def admit(self, exchange: Exchange) -> None:
        await self._take(exchange)

    async def before_retry(self, exchange: Exchange, attempt: Attempt) -> None:
        await self._take(exchange)

    def release(self, exchange: Exchange) -> None:
        if not exchange.attempts:
            # Refused after this stage (no slot, a draining sidecar...): the
            # token was never used upstream, so it goes back.
            self.core.refund()

    async def _take(self, exchange: Exchange) -> None:
        core = self.core
        now = self._clock()
        allowed = exchange.wait_allowance(now)
        granted, wait = core.reserve(now, 0.0 if allowed is None else allowed)
        if not granted:
            raise RateLimited(
                f"rate limit of upstream {self.upstream!r} ({core.rate:g}/s, burst {core.burst}): "
                f"no token within the request's wait allowance (next in {wait:.3f}s)",
                upstream=self.upstream,
                retry_after=core.retry_after(wait),
            )
        if wait > 0.0:
            self.waiting += 1
            try:
                await asyncio.sleep(wait)
            except asyncio.CancelledError:
                core.refund()
                raise
            finally:
                self.waiting -= 1

    def snapshot(self) -> dict[str, float | int]:
        """The /pools entry: the limit, the tokens free now, the requests waiting for one."""
        core = self.core
        return {
            "rate_per_s": core.rate,
            "burst": core.burst,
            "tokens": round(core.tokens(self._clock()), 3),
            "waiting": self.waiting,
        }


def rate_limit_stages(upstream: Upstream) -> list[Stage]:
    """The stage for an upstream's ``rate_limit``; none when it has none."""
    limit = upstream.rate_limit
    return [] if limit is None else [RateLimitStage(upstream.name, limit)]


def rate_limit_of(stages: object) -> RateLimitStage | None:
    """The rate limit stage in an upstream's stack, if it has one."""
    for stage in getattr(stages, "stages", ()):
        if isinstance(stage, RateLimitStage):
            return stage
    return None
