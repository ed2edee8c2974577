"""The shared limits' stages: a rate limit, concurrency leases and learned pauses in Redis.

Each wraps what the same limit does locally (docs/shared-limits.md): when
Redis answers, the count is the one every replica shares; when it does not
(``shared.timeout``, or a recent failure), ``on_error: local`` uses this
process's own limit and ``on_error: deny`` refuses with 503
``shared_limits_unavailable``.  The decisions are Redis's scripts
(sidecar/shared.py, one atomic round trip each, on the server's clock); these
shells only wait and wake.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config import RateLimit
from ..errors import PoolTimeout, QueueFull, RateLimited
from ..shared import REFUND_WITHIN, SharedRedis, SharedUnavailable, unavailable
from . import Stage
from .pacing import PacingStage
from .rate_limit import RateLimitStage, rate_limit_stages
from .shared_pacing import SharedPacingStage

if TYPE_CHECKING:
    from ..config import Pacing, Upstream
    from ..exchange import Attempt, Exchange
    from ..pools import UpstreamPool

# A waiter for a lease re-checks Redis at least this often even if no release
# message reaches it (the wake-up is a pub/sub message on every release).
LEASE_RECHECK = 0.1


class SharedRateLimitStage(RateLimitStage):
    """``rate_limit.shared: true``: one GCRA script call per attempt; the local limit as fallback.

    A token taken in Redis for an attempt that is then never sent (a later
    stage refused it, or the request went away while waiting for it) is given
    back by the refund script (sidecar/shared.py): refused requests do not
    spend the replicas' shared rate.
    """

    __slots__ = ("shared", "whole", "_take_command", "_refund_command")
    name = "rate_limit"

    def __init__(
        self, upstream: str, limit: RateLimit, shared: SharedRedis, clock: Callable[[], float] = time.monotonic
    ) -> None:
        # The local core is the fallback: with workers: N, this worker's part.
        local = limit if limit.local is None else RateLimit(rate=limit.local[0], burst=limit.local[1])
        super().__init__(upstream, local, clock)
        self.shared = shared
        self.whole = limit  # what every replica (and worker) together may send
        keys = (shared.key(upstream, "rate"), shared.key(upstream, "rate_takes"))
        interval_us = round(1_000_000 / limit.rate)
        # The keys and the fixed arguments are packed once; a call adds the allowance.
        self._take_command = shared.command("gcra", keys, (interval_us, interval_us * limit.burst))
        self._refund_command = shared.command("refund", keys, (interval_us,))

    async def admit(self, exchange: Exchange) -> None:
        exchange.shared_token = await self._take_shared(exchange)

    async def before_retry(self, exchange: Exchange, attempt: Attempt) -> None:
        await self._take_shared(exchange)

    def release(self, exchange: Exchange) -> None:
        token = exchange.shared_token
        if not token:
            super().release(exchange)
        elif not exchange.attempts and self._clock() - exchange.started < REFUND_WITHIN:
            self._refund(token)

    def _refund(self, token: int) -> None:
        self.shared.send("rate_limit_refund", self._refund_command, (token,))

    async def _take_shared(self, exchange: Exchange) -> int:
        """The token's number when it came from Redis; 0 when the local limit gave it."""
        shared = self.shared
        if shared.usable():
            allowed = exchange.wait_allowance(self._clock())
            allowed_us = 0 if allowed is None else int(allowed * 1_000_000)
            try:
                granted, wait_us, token = await shared.run("rate_limit", self._take_command, (allowed_us,))
            except SharedUnavailable:
                pass
            else:
                if not granted:
                    wait = wait_us / 1_000_000
                    raise RateLimited(
                        f"shared rate limit of upstream {self.upstream!r} ({self.whole.rate:g}/s, "
                        f"burst {self.whole.burst}): no token within the request's wait allowance "
                        f"(next in {wait:.3f}s)",
                        upstream=self.upstream,
                        retry_after=self.core.retry_after(wait),
                    )
                if wait_us > 0:
                    self.waiting += 1
                    try:
                        await asyncio.sleep(wait_us / 1_000_000)
                    except asyncio.CancelledError:
                        self._refund(token)  # reserved, never used
                        raise
                    finally:
                        self.waiting -= 1
                return int(token)
        if shared.deny:
            raise unavailable(self.upstream)
        await self._take(exchange)
        return 0

    def snapshot(self) -> dict[str, float | int]:
        entry = super().snapshot()
        entry["shared"] = 1
        return entry


class SharedLeaseStage(Stage):
    """``limits.shared_max_concurrent_requests``: a lease in Redis per request in flight.

    A request that finds every lease taken waits (FIFO in this process: only
    the head of the line asks Redis) until a release message wakes it or
    :data:`LEASE_RECHECK` passes, within its wait allowance; at most
    ``max_pending`` wait.  Leases held are renewed every ``lease / 3`` while
    their requests run; a dead holder's expire after ``lease``.
    """

    __slots__ = (
        "upstream",
        "limit",
        "shared",
        "max_pending",
        "pending",
        "held",
        "_acquire_command",
        "_release_command",
        "_renew_command",
        "_channel",
        "_lease_ms",
        "_ids",
        "_id_prefix",
        "_head",
        "_wake",
        "_listener",
        "_renewer",
        "_clock",
    )
    name = "shared_leases"

    def __init__(
        self,
        upstream: str,
        limit: int,
        shared: SharedRedis,
        max_pending: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self.limit = limit
        self.shared = shared
        self.max_pending = max_pending
        self.pending = 0
        self.held: set[str] = set()
        key = shared.key(upstream, "leases")
        self._channel = shared.key(upstream, "released")
        self._lease_ms = max(1, round(shared.settings.lease * 1000))
        self._acquire_command = shared.command("acquire", (key,), (limit, self._lease_ms))
        self._release_command = shared.command("release", (key, self._channel))
        self._renew_command = shared.command("renew", (key,), (self._lease_ms,))
        # Lease ids: unique across replicas by a random prefix, within this stage by a counter.
        self._id_prefix = secrets.token_hex(8) + ":"
        self._ids = itertools.count(1)
        self._head: asyncio.Lock | None = None
        self._wake: asyncio.Event | None = None
        self._listener: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._clock = clock

    async def admit(self, exchange: Exchange) -> None:
        shared = self.shared
        if not shared.usable():
            return self._fallback()
        head = self._head
        if head is None:
            head = self._head = asyncio.Lock()
            self._wake = asyncio.Event()
        try:
            if not head.locked() and await self._acquire(exchange):
                return None
            await self._wait(exchange, head)
        except SharedUnavailable:
            return self._fallback()
        return None

    def _fallback(self) -> None:
        # on_error: local: the local limits (admission's slots) still hold.
        if self.shared.deny:
            raise unavailable(self.upstream)

    async def _wait(self, exchange: Exchange, head: asyncio.Lock) -> None:
        allowance = exchange.wait_allowance(self._clock()) or 0.0
        if self.pending >= self.max_pending:
            raise QueueFull(
                f"upstream {self.upstream!r}: {self.pending} requests already wait for a shared lease",
                upstream=self.upstream,
            )
        if allowance <= 0.0:
            raise self._timeout()
        self.pending += 1
        self._listen()
        try:
            async with asyncio.timeout(allowance), head:
                wake = self._wake
                assert wake is not None
                while True:
                    wake.clear()
                    if await self._acquire(exchange):
                        return
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), LEASE_RECHECK)
        except TimeoutError:
            raise self._timeout() from None
        finally:
            self.pending -= 1

    def _timeout(self) -> PoolTimeout:
        return PoolTimeout(
            f"upstream {self.upstream!r}: no shared lease ({self.limit} across replicas) "
            "within the request's wait allowance",
            upstream=self.upstream,
        )

    async def _acquire(self, exchange: Exchange) -> bool:
        lease_id = f"{self._id_prefix}{next(self._ids)}"
        confirmed = False
        try:
            granted = await self.shared.run("lease_acquire", self._acquire_command, (lease_id,))
            confirmed = True
        finally:
            if not confirmed:
                # Cancelled (or failed) while the script ran: it may have
                # granted the lease; free it rather than let it wait out `lease`.
                self.shared.send("lease_release", self._release_command, (lease_id,))
        if not granted:
            return False
        exchange.lease_id = lease_id
        self.held.add(lease_id)
        self._renew_soon()
        return True

    def release(self, exchange: Exchange) -> None:
        lease_id = exchange.lease_id
        if lease_id is None:
            return
        exchange.lease_id = None
        self.held.discard(lease_id)
        # Without a reply: at low load, waiting for one costs the sidecar a
        # wake-up of its event loop per request (bench/results/shared.md).
        self.shared.send("lease_release", self._release_command, (lease_id,), reply=False)
        if self._wake is not None:
            # This process's own head waiter needs no message: its next acquire
            # goes out on the same connection after this release, so Redis
            # sees them in that order.
            self._wake.set()

    # ------------------------------------------------ renewal and wake-ups

    def _renew_soon(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        shared = self.shared
        while self.held:
            await asyncio.sleep(shared.settings.lease / 3)
            if self.held:
                with contextlib.suppress(SharedUnavailable):
                    await shared.run("lease_renew", self._renew_command, tuple(self.held))

    def _listen(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(self._subscribe())

    def _released(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _subscribe(self) -> None:
        """Wake the head waiter on every release by any replica, while anyone waits."""
        while self.pending:
            try:
                subscription = await self.shared.subscribe(self._channel, self._released)
            except Exception:  # the bounded re-check still wakes the waiters
                await asyncio.sleep(LEASE_RECHECK)
                continue
            try:
                while self.pending and not subscription.closed.done():
                    await asyncio.wait([subscription.closed], timeout=0.5)
            finally:
                await subscription.aclose()

    def tasks(self) -> int:
        """Background tasks still running (the renewer, the listener)."""
        return sum(1 for task in (self._listener, self._renewer) if task is not None and not task.done())

    async def aclose(self) -> None:
        """The pool is closing: stop renewing and listening (leases still held expire after ``lease``)."""
        tasks = [task for task in (self._listener, self._renewer) if task is not None and not task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def snapshot(self) -> dict[str, object]:
        return {"limit": self.limit, "held": len(self.held), "waiting": self.pending}


# ------------------------------------------------ the stack's three entries


def pacing_stages(upstream_name: str, settings: Pacing, shared: SharedRedis | None) -> list[Stage]:
    """The pacing stage: shared across replicas with ``pacing.shared`` (and a shared: section)."""
    if shared is not None and settings.shared:
        return [SharedPacingStage(upstream_name, settings, shared)]
    return [PacingStage(upstream_name, settings)]


def shared_rate_limit_stages(upstream: Upstream, shared: SharedRedis | None) -> list[Stage]:
    """The rate limit stage: counted in Redis with ``rate_limit.shared``; else the local one."""
    limit = upstream.rate_limit
    if limit is not None and limit.shared and shared is not None:
        return [SharedRateLimitStage(upstream.name, limit, shared)]
    return rate_limit_stages(upstream)


def shared_lease_stages(upstream: Upstream, shared: SharedRedis | None) -> list[Stage]:
    """Leases after the local slot: a request waits for one while holding only its own slot."""
    limit = upstream.limits.shared_max_concurrent_requests
    if limit is None or shared is None:
        return []
    return [SharedLeaseStage(upstream.name, limit, shared, upstream.limits.max_pending)]


def shared_lease_stage(stages: object) -> SharedLeaseStage | None:
    for stage in getattr(stages, "stages", ()):
        if isinstance(stage, SharedLeaseStage):
            return stage
    return None


def shared_snapshot(pool: UpstreamPool) -> dict[str, object] | None:
    """The /pools ``shared`` entry: the state of Redis and which limits are shared; None without shared:."""
    shared = pool.shared
    if shared is None:
        return None
    upstream = pool.upstream
    leases = shared_lease_stage(pool.stages)
    return {
        **shared.snapshot(),
        "rate_limit": upstream.rate_limit is not None and upstream.rate_limit.shared,
        "pacing": upstream.pacing.shared,
        "leases": None
        if leases is None
        else {"limit": leases.limit, "held": len(leases.held), "waiting": leases.pending},
    }


async def close_shared_stages(stages: object) -> None:
    """A pool is closing: its shared stages stop their background work before the client closes."""
    for stage in getattr(stages, "stages", ()):
        if isinstance(stage, SharedLeaseStage | SharedPacingStage):
            await stage.aclose()
