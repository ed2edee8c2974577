"""The connection pool under each upstream's ``httpx.AsyncClient``: the I/O shell.

httpx's stock pool re-runs an O(N) pass over every connection (polling each
idle socket) on every request start and finish, restarts its pool-timeout wait
when a waiter loses a race, and can leak a slot when a queued request is
cancelled (see docs/backpressure.md).  This pool keeps what it needs in O(1).
Its decisions (which connection, when to open one, what a release does) are
:class:`~sidecar.upstream.poolstate.PoolState`'s; this module does what they
require: it runs the exchange on the chosen connection, opens and closes
connections, and makes requests wait, with a deadline, when none can be
opened (the admission layer above normally makes this impossible; it is a
safety net so that nothing ever waits without a bound).

Connections are the sidecar's own: HTTP/1.1 (h1conn.py), HTTP/2 (h2conn.py),
and, for ``http2: true``, one that lets the TLS handshake choose between them
(alpn.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import AsyncIterable, Callable, Coroutine
from typing import Any, TypeAlias

import httpcore
import httpx

from .alpn import NegotiatingConnection
from .h1conn import HTTP11Connection
from .h2conn import HTTP2Connection
from .netio import AsyncioBackend
from .poolstate import Connection, PoolState, PoolStats, Released
from .stream import PooledStream, UpstreamResponse

# Requests whose exchange can be repeated safely on a fresh connection when a
# kept-alive connection turns out to have been closed by the upstream.
_RETRYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_STALE_CONNECTION_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
_SWEEP_INTERVAL = 1.0
# While a new connection has not yet told us how many streams it allows,
# waiters re-check this often instead of waiting for a release.
_WARMUP_POLL = 0.005


# The connections a pool holds: HTTP/1.1 and HTTP/2, and an ALPN connection
# until its handshake has said which of the two it is.
AnyLink: TypeAlias = HTTP11Connection | HTTP2Connection | NegotiatingConnection
PooledConnection = Connection[AnyLink]


class PoolTransport(httpx.AsyncBaseTransport):
    """A bounded, O(1) connection pool for a single upstream origin."""

    def __init__(
        self,
        *,
        scheme: str,
        host: str,
        port: int,
        max_connections: int,
        max_idle: int,
        keepalive_expiry: float,
        http1: bool = True,
        http2: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        streams_per_connection: int = 100,
    ) -> None:
        self._origin = f"{scheme}://{host}:{port}"
        self._port = port
        self._host_name = host
        self._keepalive_expiry = keepalive_expiry
        self._http1, self._http2 = http1, http2
        self._ssl_context = ssl_context
        if ssl_context is not None:
            ssl_context.set_alpn_protocols(["h2", "http/1.1"] if http1 and http2 else ["h2"] if http2 else ["http/1.1"])
        default_port = 443 if scheme == "https" else 80
        # :authority when a request has no Host header (the request path always sends one).
        name = f"[{host}]" if ":" in host else host
        self._authority = (name if port == default_port else f"{name}:{port}").encode("ascii", "replace")
        # Plain asyncio under every connection, not anyio (see netio.py).
        self._asyncio_backend = AsyncioBackend()
        self._state: PoolState[AnyLink] = PoolState(
            max_connections=max_connections,
            max_idle=max_idle,
            keepalive_expiry=keepalive_expiry,
            http2=http2,
            prior_knowledge=http2 and not http1,
            streams_per_connection=streams_per_connection,
        )
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        # Told how many requests one connection carries once the upstream has
        # said so (HTTP/2 SETTINGS, or ALPN choosing HTTP/1.1), so that the
        # admission layer never admits more than the connections can carry.
        self.on_stream_limit: Callable[[int], None] | None = None
        # Asked before the pool repeats a request on a fresh connection (a stale
        # kept-alive connection, an HTTP/2 GOAWAY): that repeat is an attempt
        # more at the upstream, so it spends from the upstream's retry budget.
        self.spend_retry: Callable[[], bool] | None = None

    def _may_repeat(self) -> bool:
        return self.spend_retry is None or self.spend_retry()

    # ---------------------------------------------------------------- stats

    def stats(self) -> PoolStats:
        return self._state.stats(waiting=len(self._waiters))

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"<PoolTransport {self._origin} connections={s.connections}/{self._state.max_connections} "
            f"active={s.active} idle={s.idle} waiting={s.waiting}>"
        )

    # ---------------------------------------------------------- the request

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """The httpx transport interface, for the upstream's ``AsyncClient``:
        the request path itself calls :meth:`send`, without httpx's models."""
        headers = request.headers
        framed = "content-length" in headers or "transfer-encoding" in headers
        response = await self.send(
            request.method,
            request.extensions.get("target") or request.url.raw_path,
            list(headers.raw),
            request.stream if framed else None,  # type: ignore[arg-type]
            request.extensions.get("timeout", {}),
        )
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers.raw,
            stream=response.stream,
            extensions={"http_version": response.http_version.encode("ascii")},
        )

    async def send(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterable[bytes] | None,
        timeouts: dict[str, float | None],
    ) -> UpstreamResponse:
        """One request to the upstream, answered up to its response head.

        ``headers`` are sent as given, ``Host`` included, framing (Content-Length
        or Transfer-Encoding) included when there is a ``body``.
        """
        method_bytes = method.encode("ascii")
        may_retry = body is None and method in _RETRYABLE_METHODS
        while True:
            connection, reused = await self._acquire(timeouts.get("pool"))
            try:
                link = connection.link
                if isinstance(link, NegotiatingConnection):
                    link = connection.link = await link.connect(timeouts.get("connect"))
                head, response_body = await link.exchange(method_bytes, target, headers, body, timeouts)
            except BaseException as exc:
                self.release(connection)
                if isinstance(exc, httpcore.ConnectionNotAvailable):
                    # HTTP/2 GOAWAY below our stream id, REFUSED_STREAM, or the
                    # connection closed under us: the upstream did not process it.
                    if may_retry and self._may_repeat():
                        may_retry = False
                        continue
                    raise httpx.RemoteProtocolError(str(exc)) from exc
                if may_retry and reused and isinstance(exc, _STALE_CONNECTION_ERRORS) and self._may_repeat():
                    may_retry = False  # once: the kept-alive connection had gone stale
                    continue
                raise
            version = head.http_version
            self._report(self._state.response_head(connection, version.encode("ascii"), ()))
            return UpstreamResponse(head.status, head.headers, version, PooledStream(response_body, self, connection))

    # -------------------------------------------------- acquire and release

    async def _acquire(self, timeout: float | None) -> tuple[PooledConnection, bool]:
        """A connection that can take one more request now, and whether it was reused."""
        self._start_sweeper()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            choice = self._state.choose()
            for gone in choice.discarded:
                self._close(gone)
            self._report(choice.stream_limit)
            if choice.connection is not None:
                return choice.connection, True
            if choice.open:
                return self._open(), False
            if self._state.closing:
                raise httpx.PoolTimeout("the pool is closed")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise httpx.PoolTimeout("no upstream connection became free in time")
            # Asked only here: on Python 3.11 asking for the running loop is a getpid() system call.
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            warming = choice.warming
            wait = remaining if not warming else min(_WARMUP_POLL, _WARMUP_POLL if remaining is None else remaining)
            try:
                await asyncio.wait_for(waiter, wait)
            except TimeoutError:
                if warming:
                    continue  # a new connection may have learnt its stream limit
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken in the same tick as the timeout: pass the turn on
                raise httpx.PoolTimeout("no upstream connection became free in time") from None
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # we were woken but leave: pass the turn on
                raise
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def _open(self) -> PooledConnection:
        link: AnyLink
        if self._http2 and not self._http1:
            link = HTTP2Connection(
                self._host_name, self._port, self._ssl_context, self._authority, self._keepalive_expiry
            )
        elif self._http2 and self._ssl_context is not None:
            link = NegotiatingConnection(
                self._asyncio_backend,
                self._host_name,
                self._port,
                self._ssl_context,
                self._authority,
                self._keepalive_expiry,
            )
        else:
            link = HTTP11Connection(
                self._asyncio_backend,
                self._host_name,
                self._port,
                self._ssl_context,
                self._keepalive_expiry,
            )
        return self._state.opened(link)

    def release(self, connection: PooledConnection) -> None:
        """The request on ``connection`` is over: the pool state says what becomes of it."""
        if self._state.release(connection) is Released.DISCARD:
            self._close(connection)
        self._wake_one()

    def _report(self, limit: int | None) -> None:
        if limit is not None and self.on_stream_limit is not None:
            self.on_stream_limit(limit)

    def _close(self, connection: PooledConnection) -> None:
        """Close a connection the pool state discarded, in the background."""
        self._spawn(_close_quietly(connection.link))

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --------------------------------------------------- housekeeping

    def _start_sweeper(self) -> None:
        if self._sweeper is None and not self._state.closing:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """Close idle connections past keepalive_expiry, so they don't linger."""
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL)
            for connection in self._state.expired():
                self._close(connection)

    async def aclose(self) -> None:
        """Close every connection now (in-flight requests fail)."""
        self._state.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for connection in self._state.close():
            self._close(connection)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


async def _close_quietly(link: AnyLink) -> None:
    with contextlib.suppress(Exception):
        await link.aclose()
