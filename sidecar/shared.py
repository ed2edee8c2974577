"""Limits shared across replicas: one Redis client per process and its scripts.

Every sidecar that names the same ``shared.redis`` counts its shared limits
there (docs/shared-limits.md): a GCRA rate limit, concurrency leases and
learned pauses.  Each is one atomic Lua script that reads the Redis server's
own clock (``TIME``), so the replicas' clocks never have to agree.  Every key
of one upstream carries the same hash tag (``sidecar:{api}:rate``), so the
scripts also run on Redis Cluster (``shared.cluster: true``).

:class:`SharedHealth` is the plain synchronous decision about Redis being
usable: after a failed call the shared limits are skipped for
:data:`RECHECK_AFTER` seconds (requests use the local limits, or are refused
with ``on_error: deny``) instead of every request paying the timeout again,
and a warning is logged at most once per :data:`WARN_EVERY` seconds.
:class:`SharedRedis` is the thin shell: the connections
(sidecar/redis_wire.py), every call under ``shared.timeout``, and the
bookkeeping of failures.  The pools that use it hold it (:func:`acquire`);
the last one to close closes it, so a reload that retires them, or a
shutdown, leaves no connection behind.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .config.view import redis_url_shown
from .errors import SharedLimitsUnavailable
from .redis_wire import Command, Redis, Script, Subscription, endpoint_from_url

if TYPE_CHECKING:
    from .config import Shared

log = logging.getLogger("sidecar.shared")

# After a failed call, Redis is tried again after this long: back to shared
# within a second or two of Redis returning, well inside the promised 5 s.
RECHECK_AFTER = 1.0
WARN_EVERY = 10.0
# A shared rate-limit token is given back only this soon after it was taken
# (a request refused before it was sent upstream); the takes counter the
# refund relies on outlives every token this young (REFUND_KEEP_MS).
REFUND_WITHIN = 60.0
REFUND_KEEP_MS = 120_000

# Failed calls per operation, for sidecar_shared_errors_total{op} (process-wide:
# one client per process whatever the number of upstreams).
ERRORS: Counter[str] = Counter()

# GCRA (a token bucket kept as one number, the theoretical arrival time) on
# the server's clock, in microseconds.  KEYS: the TAT, the takes counter.
# ARGV: interval, tolerance (burst * interval), the wait the caller may
# accept.  Returns {granted, wait µs, the take's number}.  The counter numbers
# every granted take (starting from the server's time in µs when it is new,
# so that a counter lost with a restarted Redis never runs behind a number
# handed out before); a refund needs to know how many were taken after it.
GCRA = f"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new = tat + interval
local wait = new - now - tolerance
if wait <= tonumber(ARGV[3]) then
  local ttl = math.floor((new - now) / 1000) + 1000
  redis.call('SET', KEYS[1], string.format('%d', new), 'PX', ttl)
  local seq = tonumber(redis.call('GET', KEYS[2]) or '0')
  if seq == 0 then seq = now else seq = seq + 1 end
  redis.call('SET', KEYS[2], string.format('%d', seq), 'PX', ttl + {REFUND_KEEP_MS})
  if wait < 0 then wait = 0 end
  return {{1, wait, seq}}
end
return {{0, wait, 0}}
"""

# Gives back one token that was never used (its request was refused before
# it was sent).  KEYS: the TAT, the takes counter.  ARGV: interval, the
# take's number.  Without that token the TAT would be
# max(TAT - interval, R), R being what the takes after it alone make of it:
# R <= now + (takes after it) * interval.  So the TAT goes to
# max(TAT - interval, min(TAT, that bound)): exactly one token back when the
# bucket was drawn down (the usual case under load), less when it has
# refilled since, and never below what it would be without that token.
# Returns 1 when the TAT moved back.
REFUND = """
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local seq = tonumber(redis.call('GET', KEYS[2]) or '0')
local mine = tonumber(ARGV[2])
if tat == 0 or seq < mine then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local back = now + (seq - mine) * interval
if back > tat then back = tat end
if back < tat - interval then back = tat - interval end
if back >= tat then return 0 end
redis.call('SET', KEYS[1], string.format('%d', back), 'KEEPTTL')
return 1
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

SCRIPTS = {
    name: Script(source)
    for name, source in (
        ("gcra", GCRA),
        ("refund", REFUND),
        ("acquire", ACQUIRE),
        ("release", RELEASE),
        ("renew", RENEW),
        ("pause", PAUSE),
        ("pause_read", PAUSE_READ),
    )
}


def unavailable(upstream: str) -> SharedLimitsUnavailable:
    return SharedLimitsUnavailable(
        f"shared limits of upstream {upstream!r}: Redis is unavailable (on_error: deny)",
        upstream=upstream,
        retry_after=1,
    )


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


def client_name() -> str:
    """How this process's connections are named in Redis's CLIENT LIST (one name per process)."""
    return f"sidecar-{os.getpid()}"


class SharedRedis:
    """The process's Redis client for one ``shared:`` section."""

    def __init__(self, settings: Shared, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.timeout = settings.timeout
        self.deny = settings.on_error == "deny"
        self.health = SharedHealth()
        self._clock = clock
        self.redis = Redis(
            endpoint_from_url(settings.redis, client_name()),
            settings.timeout,
            tuple(SCRIPTS.values()),
            cluster=settings.cluster,
        )
        self.users = 0  # pools holding this client (acquire / release)
        self.closed = False
        self.registered: tuple[Shared, int, int] | None = None  # its key in the process's registry

    def key(self, upstream: str, what: str) -> str:
        # The braces are Redis Cluster's hash tag: one upstream's keys share a slot.
        return f"{self.settings.key_prefix}{{{upstream}}}:{what}"

    def command(self, script: str, keys: Sequence[str], fixed: Sequence[str | int] = ()) -> Command:
        """One script call with its keys and leading arguments packed once (a stage keeps it)."""
        return Command(SCRIPTS[script], keys, fixed)

    def usable(self) -> bool:
        return self.health.usable(self._clock())

    async def run(self, op: str, command: Command, args: Sequence[str | int] = ()) -> Any:
        """One script call under ``shared.timeout``; SharedUnavailable when it fails."""
        if not self.health.usable(self._clock()):
            raise SharedUnavailable("Redis is unavailable (a recent call failed)")
        try:
            result = await self.redis.call(command, args)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a timeout, a refused connection, a script error
            self.failure(op, exc)
            raise SharedUnavailable(f"Redis call {op} failed: {type(exc).__name__}") from None
        self.health.succeeded()
        return result

    def send(self, op: str, command: Command, args: Sequence[str | int] = (), reply: bool = True) -> None:
        """A call nobody waits for (a release, a refund, a published pause); failures are counted.

        Skipped while Redis is down: a lease then expires after ``lease``, a
        token is not given back, a pause is learned by each replica alone.
        ``reply=False`` (a lease's release): Redis sends no reply, so no
        wake-up of an idle sidecar is spent on one; a release that fails on
        an open connection then goes uncounted (and the lease expires).
        """
        if self.closed or not self.health.usable(self._clock()):
            return
        self.redis.send(command, args, lambda exc: self.failure(op, exc), reply)

    async def subscribe(self, channel: str, on_message: Callable[[], None]) -> Subscription:
        return await self.redis.subscribe(channel, on_message)

    def failure(self, op: str, exc: BaseException) -> None:
        ERRORS[op] += 1
        if self.health.failed(self._clock()):
            fallback = "refusing requests (on_error: deny)" if self.deny else "using local limits (on_error: local)"
            # The URL without its password; the exception's text may carry the
            # address but never the password (no error message here quotes it).
            log.warning(
                "shared limits: Redis at %s unavailable (%s: %s); %s",
                redis_url_shown(self.settings.redis),
                op,
                f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__,
                fallback,
            )

    def snapshot(self) -> dict[str, object]:
        """The /pools ``shared`` entry's Redis part."""
        return {
            "redis": redis_url_shown(self.settings.redis),
            "cluster": self.settings.cluster,
            "state": self.health.state,
            "on_error": self.settings.on_error,
            "failures": self.health.failures,
        }

    async def release(self) -> None:
        """One pool is done with the client; the last one closes its connections."""
        self.users -= 1
        if self.users <= 0 and not self.closed:
            if self.registered is not None and _clients.get(self.registered) is self:
                del _clients[self.registered]
            self.closed = True
            await self.redis.aclose()


# One client per settings, process and event loop: its connections belong to
# the loop that opened them (a process has one loop; tests run several in
# turn), and a worker forked from a process that had made one makes its own,
# named after itself.
_clients: dict[tuple[Shared, int, int], SharedRedis] = {}


def acquire(settings: Shared | None) -> SharedRedis | None:
    """The process's one client for these settings, held by the caller until it calls ``release``."""
    if settings is None:
        return None
    try:
        loop = id(asyncio.get_running_loop())
    except RuntimeError:
        loop = 0
    key = (settings, os.getpid(), loop)
    client = _clients.get(key)
    if client is None or client.closed:
        client = _clients[key] = SharedRedis(settings)
        client.registered = key
    client.users += 1
    return client
