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
import hashlib
import heapq
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final

from ..errors import Rejected, UpstreamPaused, UpstreamRateLimited
from . import Stage
from .signals import Reading, read_signals

if TYPE_CHECKING:
    from ..config import Pacing
    from ..exchange import Attempt, Exchange

MAX_PARTITIONS: Final = 10_000
# Where a pause came from: it decides the refusal's status and code.
SOURCE_429: Final = "429"
SOURCE_503: Final = "503"
SOURCE_QUOTA: Final = "quota"
SOURCE_PROBE: Final = "probe"  # not a refusal: waiting for the first answer after a pause
# After a pause (or an exhausted budget) ends, the budget is unknown: one
# request goes first and the others wait for its answer, at most this long,
# instead of all of them hitting an upstream that may still be at its limit.
PROBE_WINDOW: Final = 0.5

# Verdicts of PacingCore.take.
GO: Final = 0  # go (after ``seconds``: a reserved spread slot); the budget is taken
WAIT: Final = 1  # nothing taken: ask again after ``seconds`` (a pause ends then)
REFUSE: Final = 2  # the wait is longer than allowed: refuse with Retry-After ``seconds``


class Partition:
    """What was learned for one upstream (or one value of ``partition_by``)."""

    __slots__ = (
        "paused_until",
        "source",
        "remaining",
        "reset_at",
        "next_slot",
        "interval",
        "admitted",
        "after_block",
        "probe_until",
    )

    def __init__(self) -> None:
        self.paused_until = 0.0  # monotonic; in the past: no pause
        self.source = SOURCE_429
        self.remaining: int | None = None  # None: unknown (no quota learned, or past its reset)
        self.reset_at = 0.0
        self.next_slot = 0.0  # spread: the earliest time the next request may go
        self.interval = 0.0  # spread: seconds between two requests until the reset
        self.admitted = 0  # requests let through, ever: tickets for observe
        self.after_block = False  # a pause or an empty budget held requests back; nothing learned since
        self.probe_until = 0.0  # while in the future, one request went first: the others wait for it

    def blocked_until(self, now: float) -> tuple[float, str] | None:
        """When and why requests must not go now; None when they may."""
        if self.paused_until > now:
            return self.paused_until, self.source
        if self.remaining is not None and self.remaining <= 0 and self.reset_at > now:
            return self.reset_at, SOURCE_QUOTA
        return None


class PacingCore:
    """Learned limits of one upstream; decides, never waits."""

    __slots__ = ("max_pause", "spread", "max_partitions", "_partitions", "ignored", "signals", "probing")

    def __init__(self, *, max_pause: float, spread: bool, max_partitions: int = MAX_PARTITIONS) -> None:
        self.max_pause = max_pause
        self.spread = spread
        self.max_partitions = max_partitions
        self._partitions: OrderedDict[bytes | None, Partition] = OrderedDict()
        self.ignored: Counter[str] = Counter()  # malformed fields, by lower-cased name
        self.signals = 0  # responses that taught something
        self.probing = 0  # partitions waiting for the answer to their first request after a pause

    def __len__(self) -> int:
        return len(self._partitions)

    def partitions(self) -> list[Partition]:
        return list(self._partitions.values())

    def peek(self, key: bytes | None) -> Partition | None:
        return self._partitions.get(key)

    def _partition(self, key: bytes | None) -> Partition:
        partitions = self._partitions
        partition = partitions.get(key)
        if partition is None:
            partition = partitions[key] = Partition()
            if len(partitions) > self.max_partitions:
                _, evicted = partitions.popitem(last=False)
                if evicted.probe_until:
                    self.probing -= 1
        elif len(partitions) > 1:
            partitions.move_to_end(key)
        return partition

    def free_ticket(self, key: bytes | None, now: float) -> int:
        """The fast path: when nothing holds this partition back and no budget is
        known, let one request through and return its ticket; else 0 (ask
        :meth:`take`)."""
        partition = self._partitions.get(key)
        if (
            partition is None
            or partition.remaining is not None
            or partition.after_block
            or partition.paused_until > now
        ):
            return 0
        if key is not None:
            self._partitions.move_to_end(key)
        partition.admitted += 1
        return partition.admitted

    def take(self, key: bytes | None, now: float, allowance: float) -> tuple[int, float, str]:
        """May one request go now?  ``(GO, delay, "")`` takes one from the budget
        (send after ``delay``); ``(WAIT, seconds, source)`` asks again later;
        ``(REFUSE, retry_after, source)`` when the wait is over ``allowance``."""
        partition = self._partition(key)
        blocked = partition.blocked_until(now)
        if blocked is not None:
            partition.after_block = True
            until, source = blocked
            left = until - now
            if left <= allowance:
                return WAIT, left, source
            return REFUSE, float(max(1, math.ceil(left))), source
        if partition.after_block:
            if partition.probe_until > now:
                if allowance > 0:
                    return WAIT, min(partition.probe_until - now, allowance), SOURCE_PROBE
                # No time left to wait for that answer: refused rather than sent
                # into a limit that may well still hold.
                return REFUSE, 1.0, partition.source
            if partition.probe_until == 0.0:
                # The first request after the pause: it goes, the others wait for its answer.
                partition.probe_until = now + PROBE_WINDOW
                self.probing += 1
            elif partition.probe_until <= now:
                self._settle(partition)  # no answer in time: back to not knowing
        delay = 0.0
        if partition.remaining is not None:
            if partition.reset_at <= now:
                partition.remaining = None  # past the reset: unknown until told again
            else:
                if self.spread:
                    slot = max(now, partition.next_slot)
                    delay = slot - now
                    if delay > allowance:
                        return REFUSE, float(max(1, math.ceil(delay))), SOURCE_QUOTA
                    partition.next_slot = slot + partition.interval
                partition.remaining -= 1
        partition.admitted += 1
        return GO, delay, ""

    def _settle(self, partition: Partition) -> None:
        if partition.probe_until:
            self.probing -= 1
        partition.after_block = False
        partition.probe_until = 0.0

    def settle(self, key: bytes | None) -> bool:
        """An answer without any signal came: a probe, if any, is over (nothing
        learned, so the budget stays unknown).  True if a probe ended."""
        partition = self._partitions.get(key)
        if partition is None or not partition.probe_until:
            return False
        self._settle(partition)
        return True

    def ticket(self, key: bytes | None) -> int:
        """The count of requests let through so far (read right after a GO)."""
        return self._partition(key).admitted

    def learn(self, key: bytes | None, status: int, reading: Reading, now: float, ticket: int) -> None:
        """Fold one response's signals in.  ``ticket`` is the partition's
        admitted count when that request went: requests let through after it
        were not counted yet in the quota the upstream reports."""
        for name in reading.ignored:
            self.ignored[name] += 1
        if reading.pause is None and reading.quota is None:
            self.settle(key)  # only malformed fields: as good as no signal
            return
        self.signals += 1
        partition = self._partition(key)
        if partition.probe_until:
            # The probe's answer (or another's): what it says decides from now on.
            self.probing -= 1
            partition.probe_until = 0.0
        if reading.pause is not None:
            pause = min(reading.pause, self.max_pause)
            if pause > 0 and now + pause > partition.paused_until:
                partition.paused_until = now + pause
                partition.source = SOURCE_503 if status == 503 else SOURCE_429
            # After the pause the budget is unknown until a response says again.
            partition.remaining = None
            return
        quota = reading.quota
        assert quota is not None
        reset = min(quota.reset, self.max_pause)
        partition.after_block = False  # a quota says what holds from now on
        if reset <= 0:
            partition.remaining = None  # the window resets now: nothing to keep
            return
        later = max(0, partition.admitted - ticket)
        remaining = max(0, quota.remaining - later)
        partition.remaining = remaining
        partition.reset_at = now + reset
        if self.spread:
            # The new budget is spread from now on (a slot already given out stays given).
            partition.interval = reset / remaining if remaining else 0.0


def partition_key(value: str | None) -> bytes | None:
    """The stored form of a ``partition_by`` value: a digest, never the value."""
    if value is None:
        return None
    return hashlib.blake2b(value.encode("utf-8", "surrogateescape"), digest_size=16).digest()


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

    def _key(self, exchange: Exchange) -> bytes | None:
        header = self._partition_by
        if header is None or exchange.request_headers is None:
            return None
        return partition_key(exchange.request_headers.get(header))

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
