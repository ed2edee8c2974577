"""Upstream pacing, the decisions: what was learned per upstream (or partition),
and whether a request goes now, waits until a pause ends, or is refused.

Plain synchronous code with the time passed in, unit-tested with a fake clock;
the asyncio shell that waits and wakes is :mod:`sidecar.policy.pacing`.  See
docs/pacing.md.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING, Final

from .signals import Reading

if TYPE_CHECKING:
    pass

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

    def impose(self, key: bytes | None, until: float, source: str) -> bool:
        """A pause learned elsewhere (another replica): holds here until ``until``.
        True when it extends what was known."""
        partition = self._partition(key)
        if until <= partition.paused_until:
            return False
        partition.paused_until = until
        partition.source = source
        partition.remaining = None
        return True

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
