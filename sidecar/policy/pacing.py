"""Upstream pacing: honour the limits an upstream announces in its responses.

:class:`PacingCore` holds what was learned per upstream (or per value of the
``partition_by`` header, hashed, at most 10,000 kept, least recently used
dropped): a pause (``Retry-After`` on a 429/503, or a quota of 0) and a
remaining budget until a reset.  It decides, synchronously, with the time
passed in: go now (maybe after a reserved ``spread`` slot), wait until a
pause ends, or refuse at once with an honest ``Retry-After``.

:class:`PacingStage` is the asyncio shell: it asks the core for the first
attempt (:meth:`admit`) and every later one (:meth:`before_retry`), sleeps
for as long as the core says, and feeds every attempt's response into the
core (:meth:`observe`).  Responses are read only when a cheap look at the
header names found a possible signal (``Attempt.signal_headers``), so
responses without one cost nothing here.  See docs/pacing.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ..errors import Rejected, UpstreamPaused, UpstreamRateLimited
from . import Stage
from .pacing_core import GO, REFUSE, SOURCE_503, SOURCE_PROBE, PacingCore, partition_key
from .signals import read_signals

if TYPE_CHECKING:
    from ..config import Pacing
    from ..exchange import Attempt, Exchange


class _Sleepers:
    """Requests waiting until a time, woken in order of (time, arrival).

    Waiters for the same pause end all wake at that time; plain sleeps would
    resume them in whatever order the loop's timer heap gives equal times.
    Here times are rounded up to the millisecond, so they tie, and ties go
    by arrival: a request keeps its place in the queue across a pause.
    One loop timer serves them all.
    """

    __slots__ = ("_heap", "_arrivals", "_timer", "_timer_at", "_clock")

    def __init__(self, clock: Callable[[], float]) -> None:
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._arrivals = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._clock = clock

    async def sleep(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        when = math.ceil((self._clock() + seconds) * 1000) / 1000
        self._arrivals += 1
        heapq.heappush(self._heap, (when, self._arrivals, future))
        self._arm(loop)
        # A cancelled waiter's future is cancelled with it and skipped when its time comes.
        await future

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        heap = self._heap
        if not heap:
            return
        first = heap[0][0]
        if self._timer is not None:
            if self._timer_at <= first:
                return
            self._timer.cancel()
        self._timer_at = first
        self._timer = loop.call_later(max(0.0, first - self._clock()), self._fire, loop)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        heap = self._heap
        # Half a millisecond early is on time: loop timers have about that resolution.
        due = self._clock() + 0.0005
        while heap and heap[0][0] <= due:
            future = heapq.heappop(heap)[2]
            if not future.done():
                future.set_result(None)
        self._arm(loop)

    def __len__(self) -> int:
        return len(self._heap)


class PacingStage(Stage):
    """The pacing stage of one upstream (see the module docstring)."""

    __slots__ = (
        "upstream",
        "settings",
        "core",
        "waiting",
        "_learn",
        "_partition_by",
        "_clock",
        "_wall",
        "_answered",
        "_sleepers",
    )
    name = "pacing"

    def __init__(
        self,
        upstream: str,
        settings: Pacing,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.upstream = upstream
        self.settings = settings
        self.core = PacingCore(max_pause=settings.max_pause, spread=settings.spread)
        self.waiting = 0  # requests sleeping in this stage now
        # Read on every request: plain attributes, not a walk through the settings.
        self._learn = settings.learn
        self._partition_by = settings.partition_by
        self._clock = clock
        self._wall = wall
        # Set (and replaced) when a probe's answer arrives: its waiters go on at once.
        self._answered: asyncio.Event | None = None
        self._sleepers = _Sleepers(clock)

    @property
    def active(self) -> bool:
        return self._learn  # learn: false forwards everything and learns nothing

    def _key(self, exchange: Exchange) -> bytes | None:
        header = self._partition_by
        if header is None or exchange.request_headers is None:
            return None
        return partition_key(exchange.request_headers.get(header))

    def admit_now(self, exchange: Exchange) -> bool:
        # Nothing learned holds this partition back (the common case): go.
        if not self._learn:
            return True
        key = exchange.pacing_key = None if self._partition_by is None else self._key(exchange)
        ticket = self.core.free_ticket(key, self._clock())
        if ticket:
            exchange.pacing_ticket = ticket
            return True
        return False

    async def admit(self, exchange: Exchange) -> None:
        if not self._learn:
            return
        key = None if self._partition_by is None else self._key(exchange)
        exchange.pacing_key = key
        await self._pass(exchange, key)

    async def before_retry(self, exchange: Exchange, attempt: Attempt) -> None:
        if self._learn:
            await self._pass(exchange, exchange.pacing_key)

    async def _pass(self, exchange: Exchange, key: bytes | None) -> None:
        core = self.core
        ticket = core.free_ticket(key, self._clock())
        if ticket:
            exchange.pacing_ticket = ticket
            return
        while True:
            now = self._clock()
            allowance = exchange.wait_allowance(now) or 0.0
            verdict, seconds, source = core.take(key, now, allowance)
            if verdict == GO:
                exchange.pacing_ticket = core.ticket(key)
                if seconds > 0:
                    await self._sleep(seconds)
                return
            if verdict == REFUSE:
                raise self._refusal(source, int(seconds))
            await self._sleep(seconds, probe=source == SOURCE_PROBE)

    async def _sleep(self, seconds: float, *, probe: bool = False) -> None:
        self.waiting += 1
        try:
            if probe:
                if self._answered is None:
                    self._answered = asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._answered.wait(), seconds)
            else:
                await self._sleepers.sleep(seconds)
        finally:
            self.waiting -= 1

    @property
    def scheduled(self) -> int:
        """Wake-ups still scheduled (a cancelled waiter's goes at its time)."""
        return len(self._sleepers)

    def _wake_probe_waiters(self) -> None:
        answered, self._answered = self._answered, None
        if answered is not None:
            answered.set()

    def _refusal(self, source: str, retry_after: int) -> Rejected:
        if source == SOURCE_503:
            return UpstreamPaused(
                f"upstream {self.upstream!r} asked for a pause (503 Retry-After); {retry_after}s left",
                upstream=self.upstream,
                retry_after=retry_after,
            )
        return UpstreamRateLimited(
            f"upstream {self.upstream!r} is at its announced rate limit; {retry_after}s until it resets",
            upstream=self.upstream,
            retry_after=retry_after,
        )

    def observe(self, exchange: Exchange, attempt: Attempt) -> None:
        raw = attempt.signal_headers
        core = self.core
        if raw is None or attempt.status is None or not self._learn:
            if core.probing and core.settle(exchange.pacing_key):
                self._wake_probe_waiters()
            return
        probing = core.probing
        reading = read_signals(attempt.status, raw, self._wall())
        if not reading.empty:
            core.learn(exchange.pacing_key, attempt.status, reading, self._clock(), exchange.pacing_ticket)
        elif probing:
            core.settle(exchange.pacing_key)
        if probing and core.probing < probing:
            self._wake_probe_waiters()

    def snapshot(self) -> dict[str, object]:
        """The /pools entry: the shared partition's state, and how many are kept."""
        now = self._clock()
        partition = self.core.peek(None)
        paused_s: float = 0.0
        source: str | None = None
        remaining: int | None = None
        reset_s: float | None = None
        if partition is not None:
            blocked = partition.blocked_until(now)
            if blocked is not None:
                paused_s, source = round(blocked[0] - now, 3), blocked[1]
            if partition.remaining is not None and partition.reset_at > now:
                remaining, reset_s = partition.remaining, round(partition.reset_at - now, 3)
        return {
            "learn": self.settings.learn,
            "paused_s": paused_s,
            "source": source,
            "remaining": remaining,
            "reset_s": reset_s,
            "partitions": len(self.core),
            "paused_partitions": self.paused_partitions(now),
            "waiting": self.waiting,
        }

    def paused_partitions(self, now: float | None = None) -> int:
        now = self._clock() if now is None else now
        return sum(1 for partition in self.core.partitions() if partition.blocked_until(now) is not None)

    def quota_remaining(self) -> int | None:
        """The learned ``r`` of the shared partition; None when unknown."""
        partition = self.core.peek(None)
        if partition is None or partition.remaining is None or partition.reset_at <= self._clock():
            return None
        return partition.remaining


def pacing_stage(stages: Iterable[Stage]) -> PacingStage | None:
    """The pacing stage among an upstream's stages (for /pools and the metrics)."""
    for stage in stages:
        if isinstance(stage, PacingStage):
            return stage
    return None
