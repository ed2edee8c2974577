"""Waiting for conditions, and the one "the pool is back at rest" check.

After every test that pushes requests through a pool, nothing may stay held:
no admission slot, nobody waiting for one, no request counted as routed there,
no connection checked out of the transport and nobody waiting for one.
Cancelled handlers finish asynchronously, so :func:`assert_at_rest` waits
(bounded) before it fails, and then says which counter is stuck.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

from sidecar.pools import UpstreamPool
from sidecar.server import Sidecar


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout: float = 10.0,
    message: str = "condition not reached in time",
) -> None:
    """Poll ``condition`` (a plain or async callable) until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, message
        await asyncio.sleep(0.005)


def pool_of(sidecar: Sidecar, name: str | None = None) -> UpstreamPool:
    """The current generation's pool for upstream ``name`` (default: the only one)."""
    pools = sidecar.generation().pools
    if name is None:
        (pool,) = pools.values()
        return pool
    return pools[name]


def held(pool: UpstreamPool) -> dict[str, int]:
    """Every counter that must be zero when the pool is at rest."""
    stats = pool.stats()
    return {
        "slots in flight": pool.admission.in_flight,
        "pending for a slot": pool.admission.pending,
        "requests routed here": pool.active,
        "connections active": stats.active,
        "waiting for a connection": stats.waiting,
    }


def is_at_rest(pool: UpstreamPool) -> bool:
    return not any(held(pool).values())


async def assert_at_rest(
    target: Sidecar | UpstreamPool,
    name: str | None = None,
    *,
    timeout: float = 5.0,
    max_connections: int | None = None,
) -> None:
    """Wait until the pool holds nothing (see the module docstring); fail with
    the stuck counters after ``timeout``.  ``target`` is a pool, or a sidecar
    and an upstream ``name`` (default: its only upstream).  With
    ``max_connections``, the pool must also not have opened more than that."""
    pool = target if isinstance(target, UpstreamPool) else pool_of(target, name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_at_rest(pool):
            break
        await asyncio.sleep(0.01)
    stuck = {counter: value for counter, value in held(pool).items() if value}
    assert not stuck, f"pool {pool.upstream.name!r} not at rest: {stuck}"
    if max_connections is not None:
        stats = pool.stats()
        assert stats.connections <= max_connections, stats
