"""Weighted fair admission: slots shared between callers in proportion to their weights.

:class:`FairAdmissionCore` is a drop-in for the FIFO :class:`~sidecar.policy.admission.AdmissionCore`
(same calls; each takes the caller as an extra argument, ``other`` when not
given).  It decides, never waits; the asyncio shell in ``admission.py`` does
the waiting.

Slots go by start-time fair queueing: a waiter is stamped on arrival with the
virtual start ``max(V, finish of its caller's previous waiter)`` and its
caller's finish moves on by ``1 / weight``; a freed slot goes to the head
waiter with the smallest stamp and ``V`` becomes that stamp.  Within one
caller that is arrival order.  While several callers stay backlogged their
grants (and, for the same service time, their completions) are proportional
to their weights; a caller alone takes every slot (work-conserving), and one
that was idle starts at ``V``, with no credit saved up while it was away.

The queue (``max_pending``) is shared the same way: while other callers wait,
one caller may hold at most its weighted share of it (at least 1 waiter); when
the queue is full and a caller under its share arrives, the newest waiter of
the caller most over its share makes room (it is refused ``queue_full``).

Callers are the bounded names (the configured ones and ``other``), so the
state here never grows with the number of distinct header values.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Generic, TypeVar

from ..config.scalars import OTHER_CALLER

W = TypeVar("W")

# Retry-After is an estimate of how long the queue ahead needs to drain,
# clamped to this range (whole seconds).
RETRY_AFTER_MIN = 1
RETRY_AFTER_MAX = 60
# Weight of the newest sample in the smoothed slot hold time: about the last
# ten requests count, so the estimate follows a slowing upstream within a
# fraction of a second under load without jumping on one outlier.
_EWMA_WEIGHT = 0.1


class _Caller(Generic[W]):
    __slots__ = ("weight", "queue", "finish", "in_flight")

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.queue: deque[tuple[float, int, W]] = deque()  # (virtual start, arrival number, waiter)
        self.finish = 0.0  # virtual finish of the caller's latest waiter
        self.in_flight = 0


class FairAdmissionCore(Generic[W]):
    """Slots and one FIFO per caller, served by weight; decides, never waits."""

    __slots__ = (
        "capacity",
        "max_pending",
        "in_flight",
        "_weights",
        "_callers",
        "_where",
        "_pending",
        "_vtime",
        "_arrivals",
        "_ewma_hold",
        "_samples",
    )

    def __init__(self, capacity: int, max_pending: int, weights: Mapping[str, float] | None = None) -> None:
        self.capacity = capacity
        self.max_pending = max_pending
        self.in_flight = 0
        self._weights = dict(weights or {})
        self._callers: dict[str, _Caller[W]] = {}
        self._where: dict[W, str] = {}  # queued waiter -> its caller
        self._pending = 0
        self._vtime = 0.0
        self._arrivals = 0
        self._ewma_hold = 0.0
        self._samples = 0

    # ------------------------------------------------------------ state
    @property
    def pending(self) -> int:
        return self._pending

    def caller(self, name: str) -> _Caller[W]:
        state = self._callers.get(name)
        if state is None:
            state = self._callers[name] = _Caller(self._weights.get(name, 1.0))
        return state

    def per_caller(self) -> dict[str, tuple[int, int]]:
        """In flight and pending per caller that has either."""
        return {
            name: (state.in_flight, len(state.queue))
            for name, state in self._callers.items()
            if state.in_flight or state.queue
        }

    def oldest_waiter(self) -> W | None:
        heads = [state.queue[0] for state in self._callers.values() if state.queue]
        return min(heads, key=lambda head: head[1])[2] if heads else None

    # ------------------------------------------------------------ slots
    def try_acquire(self, caller: str = OTHER_CALLER) -> bool:
        """Take a slot at once if one is free and nobody waits."""
        if self.in_flight < self.capacity and not self._pending:
            self.in_flight += 1
            self.caller(caller).in_flight += 1
            return True
        return False

    def share(self, caller: str, joining: str | None = None) -> int:
        """The caller's weighted share of the queue among the callers waiting, itself
        and ``joining`` (a caller about to wait) included."""
        own = self.caller(caller)
        total = own.weight + sum(
            state.weight for name, state in self._callers.items() if name != caller and (state.queue or name == joining)
        )
        return max(1, math.floor(self.max_pending * own.weight / total))

    def can_wait(self, caller: str = OTHER_CALLER) -> bool:
        """May this caller join the queue (possibly by making room, see :meth:`enqueue`)?"""
        own = self.caller(caller)
        others_wait = self._pending > len(own.queue)
        if self._pending < self.max_pending:
            return not others_wait or len(own.queue) < self.share(caller)
        return self.max_pending > 0 and others_wait and len(own.queue) < self.share(caller)

    def enqueue(self, waiter: W, caller: str = OTHER_CALLER) -> W | None:
        """Queue a waiter (after :meth:`can_wait`); returns the waiter evicted to make room, if any."""
        evicted = self._evict_for(caller) if self._pending >= self.max_pending else None
        state = self.caller(caller)
        start = max(self._vtime, state.finish)
        state.finish = start + 1.0 / state.weight
        self._arrivals += 1
        state.queue.append((start, self._arrivals, waiter))
        self._where[waiter] = caller
        self._pending += 1
        return evicted

    def _evict_for(self, caller: str) -> W | None:
        worst: _Caller[W] | None = None
        worst_over = 0
        for name, state in self._callers.items():
            if name == caller or not state.queue:
                continue
            over = len(state.queue) - self.share(name, joining=caller)
            if over > worst_over:
                worst, worst_over = state, over
        if worst is None:
            return None
        _, _, waiter = worst.queue.pop()
        self._forget(waiter, worst)
        return waiter

    def remove(self, waiter: W) -> bool:
        """Drop a waiter that gave up (timeout, cancellation). False if not queued."""
        name = self._where.get(waiter)
        if name is None:
            return False
        state = self._callers[name]
        for index, entry in enumerate(state.queue):
            if entry[2] is waiter:
                del state.queue[index]
                break
        self._forget(waiter, state)
        return True

    def _forget(self, waiter: W, state: _Caller[W]) -> None:
        del self._where[waiter]
        self._pending -= 1
        if not state.queue:
            # Nothing of it waits any more: its unused virtual time is not kept
            # as credit (or debt) for later.
            state.finish = min(state.finish, self._vtime)

    def release(self, held_for: float | None = None, caller: str = OTHER_CALLER) -> W | None:
        """Give a slot back; returns the waiter it was handed to, if any."""
        if self.in_flight <= 0:
            raise RuntimeError("admission slot released twice")
        if held_for is not None:
            self.observe_hold(held_for)
        self.in_flight -= 1
        state = self._callers.get(caller)
        if state is not None and state.in_flight > 0:
            state.in_flight -= 1
        return self._grant_next()

    def caller_of(self, waiter: W) -> str | None:
        return self._where.get(waiter)

    def observe_hold(self, held_for: float) -> None:
        held_for = max(0.0, held_for)
        if self._samples == 0:
            self._ewma_hold = held_for
        else:
            self._ewma_hold += _EWMA_WEIGHT * (held_for - self._ewma_hold)
        self._samples += 1

    def resize(self, capacity: int, max_pending: int) -> list[W]:
        """Change limits at runtime; returns waiters that now get a slot."""
        self.capacity = capacity
        self.max_pending = max_pending
        granted = []
        while (waiter := self._grant_next()) is not None:
            granted.append(waiter)
        return granted

    def _grant_next(self) -> W | None:
        if not self._pending or self.in_flight >= self.capacity:
            return None
        best: _Caller[W] | None = None
        for state in self._callers.values():
            if state.queue and (best is None or state.queue[0][:2] < best.queue[0][:2]):
                best = state
        assert best is not None
        start, _, waiter = best.queue.popleft()
        self._vtime = max(self._vtime, start)
        del self._where[waiter]
        self._pending -= 1
        self.in_flight += 1
        best.in_flight += 1
        return waiter

    def retry_after(self) -> int:
        """Seconds until a retry is likely to find room: the queue's drain time."""
        if self.capacity <= 0:
            return RETRY_AFTER_MAX
        estimate = self._ewma_hold * (self._pending + 1) / self.capacity
        return max(RETRY_AFTER_MIN, min(RETRY_AFTER_MAX, math.ceil(estimate)))
