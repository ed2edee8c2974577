"""Per-upstream admission: slots, a bounded FIFO of waiters, a pool timeout.

Requests never queue inside httpcore (see docs/backpressure.md): a request is admitted
only while fewer than ``capacity`` are in flight; up to ``max_pending`` more
wait here in arrival order for at most ``timeouts.pool``; anything beyond is
refused at once.

:class:`~sidecar.policy.fair_core.FairAdmissionCore` is the decision logic
(weighted fair between callers; one caller alone is a plain FIFO), plain
synchronous code with no event loop, unit-tested on its own.  :class:`Admission` is the thin asyncio
shell: futures for waiters, a timer per waiter, and the rules for giving a
slot back on every path (success, error, timeout, cancellation).
:class:`AdmissionStage` puts it in a request's stack of stages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from ..config.scalars import OTHER_CALLER
from ..errors import PoolTimeout, QueueFull
from . import Stage
from .deadline import budget_gone, exceeded
from .fair_core import RETRY_AFTER_MAX as RETRY_AFTER_MAX
from .fair_core import RETRY_AFTER_MIN as RETRY_AFTER_MIN
from .fair_core import FairAdmissionCore

if TYPE_CHECKING:
    from ..exchange import Exchange


class Admission:
    """The asyncio shell around :class:`FairAdmissionCore` for one upstream."""

    __slots__ = ("upstream", "pool_timeout", "_core", "_started", "_allowed", "_caller", "_clock")

    def __init__(
        self,
        upstream: str,
        *,
        capacity: int,
        max_pending: int,
        pool_timeout: float,
        weights: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self.pool_timeout = pool_timeout
        # Weighted fair between callers; one caller alone is served FIFO.
        self._core: FairAdmissionCore[asyncio.Future[None]] = FairAdmissionCore(capacity, max_pending, weights)
        self._started: dict[asyncio.Future[None], float] = {}
        self._allowed: dict[asyncio.Future[None], float] = {}  # how long each waiter may wait
        self._caller: dict[asyncio.Future[None], str] = {}  # whose request each waiter is
        self._clock = clock

    @property
    def in_flight(self) -> int:
        return self._core.in_flight

    @property
    def pending(self) -> int:
        return self._core.pending

    @property
    def capacity(self) -> int:
        return self._core.capacity

    @property
    def max_pending(self) -> int:
        return self._core.max_pending

    def per_caller(self) -> dict[str, tuple[int, int]]:
        """In flight and pending per caller (the bounded names) that has either."""
        return self._core.per_caller()

    def oldest_wait(self) -> float:
        """Seconds the longest-waiting request has waited (0 when none)."""
        oldest = self._core.oldest_waiter()
        return 0.0 if oldest is None else self._clock() - self._started.get(oldest, self._clock())

    def try_acquire(self, caller: str = OTHER_CALLER) -> bool:
        """Take a slot at once if one is free and nobody waits; then :meth:`release` is owed."""
        return self._core.try_acquire(caller)

    async def acquire(self, timeout: float | None = None, caller: str = OTHER_CALLER) -> None:
        """Wait for a slot; raises QueueFull or PoolTimeout (503) when refused.

        ``timeout`` is how long this request may wait (what is left of its
        wait allowance); ``timeouts.pool`` when not given.  On return the
        caller holds a slot and must call :meth:`release` exactly once,
        whatever happens next.
        """
        core = self._core
        if core.try_acquire(caller):
            return
        if not core.can_wait(caller):
            raise self._queue_full(caller)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        allowed = self.pool_timeout if timeout is None else max(0.0, timeout)
        evicted = core.enqueue(waiter, caller)
        if evicted is not None and not evicted.done():
            # The queue was full: the newest waiter of the caller most over its
            # share makes room for a caller under its share.
            evicted.set_exception(self._queue_full(self._caller.get(evicted, OTHER_CALLER)))
        self._started[waiter] = self._clock()
        self._allowed[waiter] = allowed
        self._caller[waiter] = caller
        timer = loop.call_later(allowed, self._expire, waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            # Granted in the same tick the caller was cancelled: the slot is
            # ours and must go back, or it leaks.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release(caller=caller)
            else:
                core.remove(waiter)
            raise
        finally:
            timer.cancel()
            self._started.pop(waiter, None)
            self._allowed.pop(waiter, None)
            self._caller.pop(waiter, None)

    def _queue_full(self, caller: str) -> QueueFull:
        core = self._core
        return QueueFull(
            f"{core.pending} requests already wait for upstream {self.upstream!r} "
            f"(max_pending, or the share of caller {caller!r})",
            upstream=self.upstream,
            retry_after=core.retry_after(),
        )

    def _expire(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done() or not self._core.remove(waiter):
            return
        waiter.set_exception(self._timed_out(self._allowed.get(waiter, self.pool_timeout)))

    def _timed_out(self, allowed: float) -> PoolTimeout:
        return PoolTimeout(
            f"no slot for upstream {self.upstream!r} within {allowed:g}s (timeouts.pool)",
            upstream=self.upstream,
            retry_after=self._core.retry_after(),
        )

    def retry_after(self) -> int:
        """Whole seconds for Retry-After on a 503 from this upstream."""
        return self._core.retry_after()

    def release(self, held_for: float | None = None, caller: str = OTHER_CALLER) -> None:
        """Give the slot back; hands it straight to the next live waiter."""
        self._hand_over(self._core.release(held_for, caller))

    def resize(self, capacity: int, max_pending: int, pool_timeout: float) -> None:
        self.pool_timeout = pool_timeout
        for waiter in self._core.resize(capacity, max_pending):
            self._hand_over(waiter)

    def _hand_over(self, waiter: asyncio.Future[None] | None) -> None:
        now: float | None = None
        while waiter is not None:
            if waiter.done():
                # Its task was cancelled (the future with it) but has not run
                # its cleanup yet: skip it and pass the slot along.
                waiter = self._core.release(caller=self._caller.get(waiter, OTHER_CALLER))
                continue
            if now is None:
                now = self._clock()
            allowed = self._allowed.get(waiter, self.pool_timeout)
            if now - self._started.get(waiter, now) >= allowed:
                # Past its deadline, its timer not yet run (a busy loop runs
                # callbacks late): it gets its 503 now, the slot goes on, so
                # no request starts upstream after waiting over its allowance.
                waiter.set_exception(self._timed_out(allowed))
                waiter = self._core.release(caller=self._caller.get(waiter, OTHER_CALLER))
                continue
            waiter.set_result(None)
            return


class AdmissionStage(Stage):
    """The slots stage: waits in the upstream's FIFO, holds a slot until released."""

    __slots__ = ("_admission", "_clock")
    name = "admission"

    def __init__(self, admission: Admission, clock: Callable[[], float] = time.monotonic) -> None:
        self._admission = admission
        self._clock = clock

    def admit_now(self, exchange: Exchange) -> bool:
        # A free slot and nobody waiting: no wait at all (pool_wait stays 0).
        if not self._admission.try_acquire(exchange.caller_label):
            return False
        exchange.queued = True
        exchange.admitted_at = self._clock()
        return True

    async def admit(self, exchange: Exchange) -> None:
        waited_from = self._clock()
        exchange.queued = True
        try:
            await self._admission.acquire(exchange.wait_allowance(waited_from), exchange.caller_label)
        except PoolTimeout:
            if budget_gone(exchange, self._clock()):
                # The caller's deadline, not timeouts.pool, ended the wait.
                raise exceeded(exchange, "while the request waited for a slot") from None
            raise
        finally:
            now = self._clock()
            exchange.pool_wait = now - waited_from
        exchange.admitted_at = now

    def release(self, exchange: Exchange) -> None:
        admitted = exchange.admitted_at
        self._admission.release(None if admitted is None else self._clock() - admitted, exchange.caller_label)
