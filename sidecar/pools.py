"""One shared, bounded pool per upstream: its httpx client, admission and counts."""

from __future__ import annotations

import asyncio
import http.cookiejar
import ssl
import time
from collections import Counter
from collections.abc import Mapping

import httpx

from .config import HTTP2Mode, Shared, Upstream
from .config.scalars import OTHER_CALLER, caller_name
from .policy.adaptive import GradientLimit
from .policy.admission import Admission
from .policy.breaker import CircuitBreaker
from .policy.retry import RetryPolicy
from .policy.shared import close_shared_stages
from .policy.stack import upstream_stages
from .reload import uses_shared
from .shared import SharedRedis, acquire
from .upstream.pool import PoolTransport
from .upstream.poolstate import PoolStats


class _NoCookies(http.cookiejar.CookieJar):
    """A jar that never stores: callers sharing a client must never see each
    other's cookies (httpx's client keeps one jar for every request it
    sends), and storing them costs CPU for nothing."""

    def extract_cookies(self, response: object, request: object) -> None:  # type: ignore[override,unused-ignore]
        return None

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        return None


class _InertCookies(httpx.Cookies):
    """Cookies that are never read from responses: httpx builds urllib
    compatibility objects (copying every header) for each response before the
    jar gets a chance to ignore them — a few percent of a proxied request."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


class _SharedClient(httpx.AsyncClient):
    """The per-upstream client: no cookie jar at all (one client serves every caller)."""

    _no_cookies = _InertCookies(_NoCookies())

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies: object) -> None:
        return None


def ssl_context_for(upstream: Upstream) -> ssl.SSLContext | None:
    """The TLS settings of an https upstream; None for http://."""
    if upstream.scheme != "https":
        return None
    tls = upstream.tls
    context = ssl.create_default_context(cafile=tls.ca_file)
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.client_cert is not None:
        context.load_cert_chain(tls.client_cert, tls.client_key)
    return context


class UpstreamPool:
    """Everything the sidecar holds for one upstream, opened inside the loop."""

    def __init__(self, upstream: Upstream, shared: Shared | None = None) -> None:
        self.upstream = upstream
        limits, timeouts = upstream.limits, upstream.timeouts
        self.admission = Admission(
            upstream.name,
            capacity=limits.max_concurrent_requests,
            max_pending=limits.max_pending,
            pool_timeout=timeouts.pool,
            weights=dict(upstream.callers.weights),
        )
        # limits.adaptive: the in-flight limit that follows the latency (sidecar/policy/adaptive.py).
        self.concurrency = (
            GradientLimit(limits.min_concurrent, limits.max_concurrent_requests, time.monotonic())
            if limits.adaptive
            else None
        )
        self.caller_header = upstream.callers.header
        self.caller_names = frozenset(name for name, _ in upstream.callers.weights)
        mode = upstream.http2
        self.transport = PoolTransport(
            scheme=upstream.scheme,
            host=upstream.host,
            port=upstream.port,
            max_connections=limits.max_connections,
            max_idle=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=mode is not HTTP2Mode.PRIOR_KNOWLEDGE,
            http2=mode is not HTTP2Mode.OFF and upstream.speaks_http2,
            ssl_context=ssl_context_for(upstream),
        )
        self.transport.on_stream_limit = self._streams_granted
        self.client: httpx.AsyncClient = _SharedClient(
            transport=self.transport,
            trust_env=False,
            follow_redirects=False,
        )
        # The pool timeout here is a safety net only: admission already waited.
        self.timeout_extension = {
            "connect": timeouts.connect,
            "read": timeouts.read,
            "write": timeouts.write,
            "pool": timeouts.pool,
        }
        self.base_url = httpx.URL(f"{upstream.scheme}://{upstream.host_header}/")
        # The upstream's header rules, prepared once here rather than on every
        # request: the Host line, the lines `headers.set` adds, and the
        # lower-cased names those replace or `headers.remove` drops.
        rules = upstream.headers
        self.host_header = (b"Host", upstream.host_header.encode("utf-8"))
        self.headers_set = tuple((name.encode("latin-1"), value.encode("utf-8")) for name, value in rules.set)
        # The caller header is the sidecar's own: never forwarded upstream.
        self.headers_not_forwarded = frozenset(
            name.lower() for name in (*rules.remove, *(n for n, _ in rules.set), upstream.callers.header)
        )
        # Per-upstream resilience state, shared by every request (docs/resilience.md).
        self.circuit = CircuitBreaker(upstream.name, upstream.circuit_breaker)
        self.retries = RetryPolicy(upstream.name, upstream.retries)
        # The pool's own repeat of a request whose kept-alive connection had
        # gone stale is bounded by the same budget as every retry.
        self.transport.spend_retry = self.retries.spend_for_connection
        # The process's Redis client when this upstream has a shared limit
        # (docs/shared-limits.md); held until aclose() gives it back.  Taken
        # last, once nothing above can fail: a pool that is never built must
        # not hold it.
        self.shared: SharedRedis | None = acquire(shared) if uses_shared(upstream) else None
        # The policies every request to this upstream passes (sidecar/policy/stack.py).
        self.stages = upstream_stages(self)
        self.outcomes: Counter[str] = Counter()
        self.active = 0  # requests routed here and not finished: waiting or in flight
        self._idle = asyncio.Event()
        self._idle.set()
        self.closed = False

    @property
    def name(self) -> str:
        return self.upstream.name

    def _streams_granted(self, per_connection: int) -> None:
        """The upstream told us how many requests a connection carries (HTTP/2
        SETTINGS, or ALPN settling on HTTP/1.1): never admit more than the
        pool's connections can carry, so the excess waits in admission's FIFO,
        not in the connection pool, where httpcore makes an HTTP/2 stream over
        the server's limit wait with no timeout (see docs/backpressure.md)."""
        limits = self.upstream.limits
        capacity = min(limits.max_concurrent_requests, per_connection * limits.max_connections)
        if self.concurrency is not None:
            self.concurrency.set_ceiling(capacity)
            capacity = self.concurrency.capacity
        if capacity != self.admission.capacity:
            self.admission.resize(capacity, limits.max_pending, self.upstream.timeouts.pool)

    def caller_of(self, headers: Mapping[str, str]) -> tuple[str, str]:
        """Who calls (the header's value when valid, else ``other``) and its
        bounded label (a configured name, else ``other``)."""
        value = headers.get(self.caller_header)
        if value is None or not caller_name(value):
            return OTHER_CALLER, OTHER_CALLER
        return value, value if value in self.caller_names else OTHER_CALLER

    def stats(self) -> PoolStats:
        return self.transport.stats()

    def request_started(self) -> None:
        self.active += 1
        self._idle.clear()

    def request_finished(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Wait until nothing is in flight or waiting; True if it got there in time."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        await self.client.aclose()
        if self.shared is not None:
            # The shared stages' background work ends before the client does;
            # the last pool holding the client closes its connections.
            await close_shared_stages(self.stages)
            await self.shared.release()
