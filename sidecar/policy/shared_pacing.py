"""``pacing.shared: true``: a pause one replica learns holds on every replica within a second.

A pause (or an empty budget) learned from an upstream response is written to
Redis with its time left (kept only if longer than what is there); every
replica reads it at most every :data:`PAUSE_READ_EVERY` seconds, on its next
request, so an idle replica knows before its first request goes upstream.
Partitions (``partition_by``) stay per replica.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..shared import SharedRedis, SharedUnavailable, unavailable
from .pacing import PacingStage
from .pacing_core import SOURCE_429, SOURCE_503, SOURCE_QUOTA

if TYPE_CHECKING:
    from ..config import Pacing
    from ..exchange import Attempt, Exchange

# How often another replica's learned pause is read (it must hold here within 1 s).
PAUSE_READ_EVERY = 0.5
_SOURCES = frozenset((SOURCE_429, SOURCE_503, SOURCE_QUOTA))


class SharedPacingStage(PacingStage):
    """``pacing.shared: true``: pauses learned here are published; others' are read twice a second."""

    __slots__ = ("shared", "_read_command", "_publish_command", "_next_read", "_reading", "_published_until")

    def __init__(
        self,
        upstream: str,
        settings: Pacing,
        shared: SharedRedis,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(upstream, settings, clock, wall)
        self.shared = shared
        key = shared.key(upstream, "pause")
        self._read_command = shared.command("pause_read", (key,))
        self._publish_command = shared.command("pause", (key,))
        self._next_read = 0.0
        self._reading: asyncio.Future[None] | None = None
        self._published_until = 0.0

    async def admit(self, exchange: Exchange) -> None:
        if self._learn and self._clock() >= self._next_read:
            if self._reading is None:
                self._reading = asyncio.ensure_future(self._read())
            try:
                await asyncio.shield(self._reading)
            except SharedUnavailable:
                if self.shared.deny:
                    raise unavailable(self.upstream) from None
        await super().admit(exchange)

    async def _read(self) -> None:
        try:
            value, ttl = await self.shared.run("pacing_read", self._read_command)
        finally:
            self._reading = None
            self._next_read = self._clock() + PAUSE_READ_EVERY
        source = value.decode() if isinstance(value, bytes) else str(value)
        if source in _SOURCES and int(ttl) > 0:
            until = self._clock() + int(ttl) / 1000
            self._published_until = max(self._published_until, until)
            self.core.impose(None, until, source)

    def observe(self, exchange: Exchange, attempt: Attempt) -> None:
        super().observe(exchange, attempt)
        if exchange.pacing_key is not None:
            return  # partitions (partition_by) are learned per replica
        partition = self.core.peek(None)
        now = self._clock()
        blocked = None if partition is None else partition.blocked_until(now)
        # Publish a pause (or an empty budget) this replica learned and others do not know yet.
        if blocked is not None and blocked[0] > self._published_until + 0.05:
            until, source = blocked
            self._published_until = until
            ms = max(1, round((until - now) * 1000))
            self.shared.send("pacing_publish", self._publish_command, (ms, source))

    async def aclose(self) -> None:
        """The pool is closing: a read of Redis still running is dropped."""
        reading = self._reading
        if reading is not None and not reading.done():
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
