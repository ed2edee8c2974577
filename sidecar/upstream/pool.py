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

Connections themselves are httpcore's (``AsyncHTTPConnection``): the HTTP/1.1
and HTTP/2 protocol code is theirs, the pooling decisions are ours.

Why one module over 400 lines: acquire, send and release share the pool's
waiters and connection bookkeeping, and the HTTP/2 paths (stream resets, read
deadlines) act on the same state; their decisions are already out, in
poolstate.py, and the HTTP/1.1 connection in h1conn.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import AsyncIterable, Callable, Coroutine
from typing import Any

import httpcore
import httpx

from ..compat import h2 as h2_compat
from ..compat import httpcore as httpcore_compat
from . import h2deadlines, h2streams
from .h1conn import HTTP11Connection
from .h2conn import HTTP2Connection
from .netio import AsyncioBackend
from .poolstate import Connection, Link, PoolState, PoolStats, Released
from .stream import PooledStream, UpstreamResponse, map_exceptions

# Requests whose exchange can be repeated safely on a fresh connection when a
# kept-alive connection turns out to have been closed by the upstream.
_RETRYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_STALE_CONNECTION_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
_SWEEP_INTERVAL = 1.0
# While a new connection has not yet told us how many streams it allows,
# waiters re-check this often instead of waiting for a release.
_WARMUP_POLL = 0.005


class _Link:
    """An httpcore connection, seen by the pool state through its synchronous reads."""

    __slots__ = ("conn",)

    def __init__(self, conn: httpcore.AsyncHTTPConnection) -> None:
        self.conn = conn

    def is_available(self) -> bool:
        return self.conn.is_available()

    def is_idle(self) -> bool:
        return self.conn.is_idle()

    def is_closed(self) -> bool:
        return self.conn.is_closed()

    def has_expired(self) -> bool:
        return self.conn.has_expired()

    def has_unread_bytes(self) -> bool:
        return httpcore_compat.has_unread_bytes(self.conn)

    def protocol(self) -> str | None:
        return h2_compat.protocol_of(self.conn)

    def granted_streams(self) -> int | None:
        return h2_compat.granted_streams(self.conn)

    async def aclose(self) -> None:
        await self.conn.aclose()


# HTTP/1.1-only origins run on the sidecar's own connection (h1conn.py),
# prior-knowledge HTTP/2 origins on its own HTTP/2 connection (h2conn.py);
# ALPN origins on httpcore's.
OwnConnection = HTTP11Connection | HTTP2Connection
PooledConnection = Connection["HTTP11Connection | HTTP2Connection | _Link"]


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
        http1_ssl_context: ssl.SSLContext | None = None,
        streams_per_connection: int = 100,
    ) -> None:
        self._origin = httpcore.Origin(scheme.encode(), host.encode(), port)
        self._scheme, self._host, self._port = scheme.encode(), host.encode(), port
        self._host_name = host
        self._keepalive_expiry = keepalive_expiry
        self._http1, self._http2 = http1, http2
        self._ssl_context = ssl_context
        # An origin that offers HTTP/2 through ALPN but settles on HTTP/1.1:
        # once it has, new connections offer HTTP/1.1 alone, on a context of
        # their own (httpcore sets ALPN on the one it is given at each connect),
        # and run on the sidecar's own connection.
        self._http1_ssl_context = http1_ssl_context if http1 and http2 else None
        if self._http1_ssl_context is not None:
            self._http1_ssl_context.set_alpn_protocols(["http/1.1"])
        elif http1 and not http2 and ssl_context is not None:
            ssl_context.set_alpn_protocols(["http/1.1"])
        elif http2 and not http1 and ssl_context is not None:
            ssl_context.set_alpn_protocols(["h2"])
        default_port = 443 if scheme == "https" else 80
        # :authority when a request has no Host header (the request path always sends one).
        name = f"[{host}]" if ":" in host else host
        self._authority = (name if port == default_port else f"{name}:{port}").encode("ascii", "replace")
        # Plain asyncio under every connection, not anyio (see netio.py); on
        # httpcore's HTTP/2 connections, watched for the per-stream deadlines.
        self._asyncio_backend = AsyncioBackend()
        self._network_backend: httpcore.AsyncNetworkBackend = (
            h2deadlines.WatchedBackend(self._asyncio_backend) if http2 else self._asyncio_backend
        )
        self._state: PoolState[HTTP11Connection | HTTP2Connection | _Link] = PoolState(
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
        core_request: httpcore.Request | None = None
        may_retry = body is None and method in _RETRYABLE_METHODS
        while True:
            connection, reused = await self._acquire(timeouts.get("pool"))
            link = connection.link
            try:
                if isinstance(link, HTTP11Connection):
                    framer, h1_body = await link.exchange(method_bytes, target, headers, body, timeouts)
                elif isinstance(link, HTTP2Connection):
                    status, h2_headers, h2_body = await link.exchange(method_bytes, target, headers, body, timeouts)
                else:
                    if core_request is None:
                        core_request = self._core_request(method_bytes, target, headers, body)
                    with map_exceptions():
                        response = await self._send(connection, core_request, timeouts)
            except BaseException as exc:
                if connection.multiplexed and core_request is not None:
                    self._forget_abandoned_streams(connection, core_request)
                self.release(connection)
                if isinstance(exc, httpcore.ConnectionNotAvailable):
                    # HTTP/2 GOAWAY below our stream id, or the connection closed
                    # under us: the upstream did not process this request.
                    if may_retry and self._may_repeat():
                        may_retry = False
                        continue
                    raise httpx.RemoteProtocolError(
                        "upstream closed the HTTP/2 connection (GOAWAY) before processing the request"
                    ) from exc
                if may_retry and reused and isinstance(exc, _STALE_CONNECTION_ERRORS) and self._may_repeat():
                    may_retry = False  # once: the kept-alive connection had gone stale
                    continue
                raise
            if isinstance(link, HTTP11Connection):
                version = framer.http_version
                self._report(self._state.response_head(connection, version.encode("ascii"), ()))
                return UpstreamResponse(
                    framer.status,
                    framer.headers,
                    version,
                    PooledStream(h1_body, self, connection, None, None, None),
                )
            if isinstance(link, HTTP2Connection):
                if status > 599:
                    self._state.retire(connection)
                    await h2_body.aclose()
                    self.release(connection)
                    raise httpx.RemoteProtocolError(f"upstream sent status {status}, outside 100-599")
                self._report(self._state.response_head(connection, b"HTTP/2", ()))
                return UpstreamResponse(
                    status, h2_headers, "HTTP/2", PooledStream(h2_body, self, connection, None, None, None)
                )
            if not 100 <= response.status <= 599:
                await self._refuse(connection, response)
                raise httpx.RemoteProtocolError(f"upstream sent status {response.status}, outside 100-599")
            raw_version = response.extensions.get("http_version", b"HTTP/1.1")
            self._report(self._state.response_head(connection, raw_version, response.headers))
            assert core_request is not None
            return UpstreamResponse(
                response.status,
                response.headers,
                raw_version.decode("ascii", "replace"),
                PooledStream(
                    response.stream,  # type: ignore[arg-type]
                    self,
                    connection,
                    core_request,
                    response.extensions.get("stream_id"),
                    timeouts.get("read") if connection.multiplexed else None,
                ),
            )

    def _core_request(
        self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: AsyncIterable[bytes] | None
    ) -> httpcore.Request:
        """The request as httpcore's HTTP/2 (and ALPN) connections take it."""
        return httpcore.Request(
            method=method,
            url=httpcore.URL(scheme=self._scheme, host=self._host, port=self._port, target=target),
            headers=headers,
            content=body,
            extensions={},  # per attempt: "trace" and "timeout" are set by _send
        )

    async def _send(
        self, connection: PooledConnection, request: httpcore.Request, timeouts: dict[str, float | None]
    ) -> httpcore.Response:
        """One attempt on ``connection``.

        The whole wait for the final response head, from when the request and
        its body have been sent, is bounded by ``timeouts.read`` (see
        h2deadlines.HeaderDeadline): httpcore's own read timeout only bounds the
        gap between two reads.  On a multiplexed connection the read timeout
        is the stream's own, httpcore's a longer backstop (see h2deadlines).
        """
        read = timeouts.get("read")
        extensions = request.extensions
        link = connection.link
        assert isinstance(link, _Link)
        conn = link.conn
        if read is None:
            extensions.pop("trace", None)
            extensions["timeout"] = timeouts
            return await conn.handle_async_request(request)
        multiplexed = connection.multiplexed
        extensions["timeout"] = {**timeouts, "read": read * h2deadlines.BACKSTOP_FACTOR} if multiplexed else timeouts
        try:
            async with asyncio.timeout(None) as scope:
                extensions["trace"] = h2deadlines.HeaderDeadline(scope, read)
                return await conn.handle_async_request(request)
        except TimeoutError:
            if not scope.expired():
                raise
            if multiplexed:
                self.read_timed_out(connection, read)
            raise httpx.ReadTimeout("no response headers from the upstream within the read timeout") from None
        finally:
            # The body phases that follow need no callback: spare their calls.
            extensions.pop("trace", None)

    async def _refuse(self, connection: PooledConnection, response: httpcore.Response) -> None:
        """A response not to be relayed: close it, and its connection with it
        (an upstream that breaks HTTP this way is not trusted with another request)."""
        self._state.retire(connection)
        try:
            with contextlib.suppress(Exception):
                await response.aclose()
        finally:
            self.release(connection)

    def read_timed_out(self, connection: PooledConnection, read: float) -> None:
        """A stream's read deadline fired: if its connection received nothing at
        all meanwhile, presume it dead and take no new requests on it."""
        link = connection.link
        if not connection.closed and isinstance(link, _Link) and h2deadlines.silent_for(link.conn, read):
            self._state.retire(connection)

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
        link: Link
        if self._http2 and not self._http1:
            link = HTTP2Connection(
                self._host_name, self._port, self._ssl_context, self._authority, self._keepalive_expiry
            )
        elif self._http1 and not self._http2:
            link = HTTP11Connection(
                self._asyncio_backend,
                self._host_name,
                self._port,
                self._ssl_context,
                self._keepalive_expiry,
            )
        elif self._settled_on_http1():
            link = HTTP11Connection(
                self._asyncio_backend,
                self._host_name,
                self._port,
                self._http1_ssl_context,
                self._keepalive_expiry,
            )
        else:
            link = _Link(
                httpcore.AsyncHTTPConnection(
                    origin=self._origin,
                    ssl_context=self._ssl_context,
                    keepalive_expiry=self._keepalive_expiry,
                    http1=self._http1,
                    http2=self._http2,
                    network_backend=self._network_backend,
                )
            )
        return self._state.opened(link)

    def _settled_on_http1(self) -> bool:
        """ALPN was offered HTTP/2 and chose HTTP/1.1 (see __init__)."""
        return self._http1_ssl_context is not None and self._state.negotiated == "HTTP/1.1"

    def release(self, connection: PooledConnection) -> None:
        """The request on ``connection`` is over: the pool state says what becomes of it."""
        if not connection.multiplexed and isinstance(connection.link, _Link) and self._settled_on_http1():
            # One of httpcore's (h11) connections, opened before the upstream's
            # choice was known: replaced by one of ours once it is free.
            self._state.retire(connection)
        if self._state.release(connection) is Released.DISCARD:
            self._close(connection)
        self._wake_one()

    def abandon_stream(self, connection: PooledConnection, request: httpcore.Request, stream_id: int) -> None:
        """The caller stopped reading an HTTP/2 response: reset its stream now,
        so the upstream stops sending and the connection window is given back
        (see docs/http2.md); retire the connection if we cannot."""
        if connection.closed:
            return
        link = connection.link
        inner = h2_compat.h2_state_of(link.conn) if isinstance(link, _Link) else None
        if inner is None:
            self._state.retire(connection)
            return
        h2streams.cancel_stream(inner, stream_id)
        self._spawn(h2_compat.flush(inner, request))

    def _forget_abandoned_streams(self, connection: PooledConnection, request: httpcore.Request) -> None:
        """Reset streams httpcore dropped without RST_STREAM (a request that
        failed or was cancelled before its response head), or retire the
        connection if its internals are not what we know."""
        if connection.closed:
            return
        link = connection.link
        inner = h2_compat.h2_state_of(link.conn) if isinstance(link, _Link) else None
        if inner is None:
            if connection.http_version is not None:
                self._state.retire(connection)
            return
        if h2streams.cancel_orphans(inner):
            self._spawn(h2_compat.flush(inner, request))

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


async def _close_quietly(link: Link) -> None:
    with contextlib.suppress(Exception):
        await link.aclose()
