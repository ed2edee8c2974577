"""Limits shared across replicas: one Redis client per process and its scripts.

Every sidecar that names the same ``shared.redis`` counts its shared limits
there (docs/shared-limits.md): a GCRA rate limit, concurrency leases and
learned pauses.  Each is one atomic Lua script that reads the Redis server's
own clock (``TIME``), so the replicas' clocks never have to agree.  Every key
of one upstream carries the same hash tag (``sidecar:{api}:rate``), so the
scripts also run on Redis Cluster.

:class:`SharedHealth` is the plain synchronous decision about Redis being
usable: after a failed call the shared limits are skipped for
:data:`RECHECK_AFTER` seconds (requests use the local limits, or are refused
with ``on_error: deny``) instead of every request paying the timeout again,
and a warning is logged at most once per :data:`WARN_EVERY` seconds.
:class:`SharedRedis` is the thin shell: the client, every call under
``shared.timeout``, and the bookkeeping of failures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from .config.view import redis_url_shown
from .errors import SharedLimitsUnavailable

if TYPE_CHECKING:
    from .config import Shared

log = logging.getLogger("sidecar.shared")
T = TypeVar("T")

# After a failed call, Redis is tried again after this long: back to shared
# within a second or two of Redis returning, well inside the promised 5 s.
RECHECK_AFTER = 1.0
WARN_EVERY = 10.0
# Concurrent calls to Redis per process: enough at the latencies Redis has,
# bounded so that an outage cannot open thousands of connections.  Callers
# beyond it wait in a FIFO of our own (redis-py's blocking pool lets a waiter
# starve past any timeout while newer callers take the freed connections).
MAX_CALLS = 32
# The pool's own cap adds room for the pub/sub connections that wake lease
# waiters (one per upstream with shared leases, only while requests wait).
MAX_CONNECTIONS = MAX_CALLS + 32

# Failed calls per operation, for sidecar_shared_errors_total{op} (process-wide:
# one client per process whatever the number of upstreams).
ERRORS: Counter[str] = Counter()

# GCRA (a token bucket kept as one number, the theoretical arrival time) on
# the server's clock, in microseconds.  ARGV: interval, tolerance (burst *
# interval), the wait the caller may accept.  Returns {granted, wait µs}.
GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new = tat + interval
local wait = new - now - tolerance
if wait <= tonumber(ARGV[3]) then
  redis.call('SET', KEYS[1], string.format('%d', new), 'PX', math.floor((new - now) / 1000) + 1000)
  if wait < 0 then wait = 0 end
  return {1, wait}
end
return {0, wait}
"""

# Concurrency leases: a sorted set of lease ids scored by their expiry on the
# server's clock (ms).  Expired leases (a dead holder's) are dropped first.
# KEYS: the set.  ARGV: limit, lease ms, id.  Returns 1 granted, 0 full.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
  return 1
end
return 0
"""
# KEYS: the set, the channel.  ARGV: ids.  Frees them and wakes the waiters.
RELEASE = """
local n = redis.call('ZREM', KEYS[1], unpack(ARGV))
if n > 0 then redis.call('PUBLISH', KEYS[2], n) end
return n
"""
# KEYS: the set.  ARGV: lease ms, ids.  Pushes the expiry of leases still held.
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = 0
for i = 2, #ARGV do
  n = n + redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[1]), ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return n
"""
# Learned pauses: KEYS: the key.  ARGV: ms, source.  Kept only if longer.
PAUSE = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', tonumber(ARGV[1]))
end
return 1
"""
PAUSE_READ = """
local v = redis.call('GET', KEYS[1])
if not v then return {'', 0} end
return {v, redis.call('PTTL', KEYS[1])}
"""


def unavailable(upstream: str) -> SharedLimitsUnavailable:
    return SharedLimitsUnavailable(
        f"shared limits of upstream {upstream!r}: Redis is unavailable (on_error: deny)",
        upstream=upstream,
        retry_after=1,
    )


class Background:
    """Fire-and-forget Redis calls that a synchronous release starts; counted, so none leaks."""

    __slots__ = ("tasks",)

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def start(self, coro: Coroutine[Any, Any, Any]) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:
            coro.close()
            return
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a failed call was already counted


class SharedUnavailable(Exception):
    """Redis did not answer within ``shared.timeout`` (or refused the call)."""


class SharedHealth:
    """Is Redis usable now, and should a failure be logged?  Decides, never waits."""

    __slots__ = ("down_until", "_warned_at", "failures", "state")

    def __init__(self) -> None:
        self.down_until = 0.0  # monotonic; until then the shared limits are skipped
        self._warned_at = -float("inf")
        self.failures = 0
        self.state = "unknown"  # "ok" after a call worked, "down" after one failed

    def usable(self, now: float) -> bool:
        return now >= self.down_until

    def failed(self, now: float) -> bool:
        """One call failed; True when this failure should be logged."""
        self.failures += 1
        self.state = "down"
        self.down_until = now + RECHECK_AFTER
        if now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            return True
        return False

    def succeeded(self) -> None:
        self.state = "ok"
        self.down_until = 0.0


class SharedRedis:
    """The process's Redis client for one ``shared:`` section."""

    def __init__(self, settings: Shared, clock: Callable[[], float] = time.monotonic) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.settings = settings
        self.timeout = settings.timeout
        self.deny = settings.on_error == "deny"
        self.health = SharedHealth()
        self._clock = clock
        self._calls = asyncio.Semaphore(MAX_CALLS)
        # No retries inside the client: the one timeout bounds the whole call,
        # and a failed call falls back (or is refused) at once.
        # A blocking pool: a call beyond MAX_CONNECTIONS waits for a connection
        # (within the same timeout) instead of failing at once, which under a
        # burst of callers would wrongly fall back to the local limits.
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.redis,
            max_connections=MAX_CONNECTIONS,
            timeout=settings.timeout,
            socket_timeout=settings.timeout,
            socket_connect_timeout=settings.timeout,
            health_check_interval=0,
            retry=Retry(NoBackoff(), 0),
        )
        self.client: Any = aioredis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
        self.gcra = self.client.register_script(GCRA)
        self.acquire = self.client.register_script(ACQUIRE)
        self.release = self.client.register_script(RELEASE)
        self.renew = self.client.register_script(RENEW)
        self.pause = self.client.register_script(PAUSE)
        self.pause_read = self.client.register_script(PAUSE_READ)

    def key(self, upstream: str, what: str) -> str:
        # The braces are Redis Cluster's hash tag: one upstream's keys share a slot.
        return f"{self.settings.key_prefix}{{{upstream}}}:{what}"

    def usable(self) -> bool:
        return self.health.usable(self._clock())

    async def call(self, op: str, make: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis call under ``shared.timeout``; SharedUnavailable when it fails."""
        if not self.health.usable(self._clock()):
            raise SharedUnavailable("Redis is unavailable (a recent call failed)")
        try:
            async with asyncio.timeout(self.timeout), self._calls:
                result = await make()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a timeout, a refused connection, a script error
            self.failure(op, exc)
            raise SharedUnavailable(f"Redis call {op} failed: {type(exc).__name__}") from None
        self.health.succeeded()
        return result

    def failure(self, op: str, exc: BaseException) -> None:
        ERRORS[op] += 1
        if self.health.failed(self._clock()):
            fallback = "refusing requests (on_error: deny)" if self.deny else "using local limits (on_error: local)"
            # The URL without its password; the exception's text may carry the
            # address but never the password (redis-py does not print it).
            log.warning(
                "shared limits: Redis at %s unavailable (%s: %s); %s",
                redis_url_shown(self.settings.redis),
                op,
                type(exc).__name__,
                fallback,
            )

    def snapshot(self) -> dict[str, object]:
        """The /pools ``shared`` entry's Redis part."""
        return {
            "redis": redis_url_shown(self.settings.redis),
            "state": self.health.state,
            "on_error": self.settings.on_error,
            "failures": self.health.failures,
        }


# One client per settings and event loop: its connections belong to the loop
# that opened them (a process has one loop; tests run several in turn).
_clients: dict[tuple[Shared, int], SharedRedis] = {}


def shared_redis(settings: Shared | None) -> SharedRedis | None:
    """The process's one client for these settings (pools of every upstream share it)."""
    if settings is None:
        return None
    try:
        loop = id(asyncio.get_running_loop())
    except RuntimeError:
        loop = 0
    client = _clients.get((settings, loop))
    if client is None:
        client = _clients[(settings, loop)] = SharedRedis(settings)
    return client
