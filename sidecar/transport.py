"""The connection pool under each upstream's ``httpx.AsyncClient``.

httpx's stock pool re-runs an O(N) pass over every connection (polling each
idle socket) on every request start and finish, restarts its pool-timeout wait
when a waiter loses a race, and can leak a slot when a queued request is
cancelled (TRAPS.md §1-§6).  This pool keeps what it needs in O(1):

* HTTP/1.1 connections that are idle sit on a LIFO stack (the warmest is
  reused first; the coldest expire);
* multiplexed (HTTP/2) connections carry up to ``streams`` requests each;
* a connection is opened only when none can take the request and fewer than
  ``max_connections`` exist;
* when none can be opened the request waits in a FIFO with a deadline (the
  admission layer above normally makes this impossible; it is a safety net
  so that nothing ever waits without a bound).

Connections themselves are httpcore's (``AsyncHTTPConnection``): the HTTP/1.1
and HTTP/2 protocol code is theirs, the pooling decisions are ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from . import h2deadlines, h2streams
from .netio import AsyncioBackend, install_fast_locks

# Requests whose exchange can be repeated safely on a fresh connection when a
# kept-alive connection turns out to have been closed by the upstream.
_RETRYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_STALE_CONNECTION_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
_SWEEP_INTERVAL = 1.0
# While a new connection has not yet told us how many streams it allows (its
# SETTINGS frame, read by httpcore while serving the first request), waiters
# re-check this often instead of waiting for a release.
_WARMUP_POLL = 0.005
_ids = itertools.count(1)


@dataclass(slots=True)
class PoolStats:
    """A point-in-time view of one pool, read by /pools and the metrics."""

    connections: int
    active: int
    idle: int
    connecting: int
    http_versions: dict[str, int]
    opened_total: int
    closed_total: int
    waiting: int


class _Connection:
    """One upstream connection and what the pool knows about it."""

    __slots__ = ("conn", "id", "streams", "multiplexed", "http_version", "idle_since", "closed", "retiring")

    def __init__(self, conn: httpcore.AsyncHTTPConnection, multiplexed: bool) -> None:
        self.conn = conn
        self.id = next(_ids)
        self.streams = 0  # requests in progress on it
        self.multiplexed = multiplexed  # known to be HTTP/2 (or will be: prior knowledge)
        self.http_version: str | None = None  # None until the first response
        self.idle_since = time.monotonic()
        self.closed = False
        self.retiring = False  # takes no new requests; closed when its last one ends


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
        network_backend: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self._origin = httpcore.Origin(scheme.encode(), host.encode(), port)
        self._scheme, self._host, self._port = scheme.encode(), host.encode(), port
        self._max_connections = max_connections
        self._max_idle = max_idle
        self._keepalive_expiry = keepalive_expiry
        self._http1, self._http2 = http1, http2
        self._prior_knowledge = http2 and not http1
        # What the upstream chose last time ALPN was asked: once it said
        # HTTP/1.1, new connections open in parallel like any HTTP/1.1 pool.
        self._negotiated: str | None = "HTTP/2" if self._prior_knowledge else None
        self._ssl_context = ssl_context
        self._streams = streams_per_connection
        if network_backend is None:
            # Plain asyncio under httpcore's protocol code, not anyio (see netio.py).
            network_backend = AsyncioBackend()
            if http2:
                network_backend = h2deadlines.WatchedBackend(network_backend)
        self._network_backend = network_backend
        install_fast_locks()
        self._all: dict[int, _Connection] = {}
        self._idle: list[_Connection] = []  # HTTP/1.1 only; LIFO
        self._shared: dict[int, _Connection] = {}  # multiplexed, with stream capacity
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._opened_total = 0
        self._closed_total = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False
        self._background: set[asyncio.Task[None]] = set()
        # Told how many requests one connection carries once the upstream has
        # said so (HTTP/2 SETTINGS, or ALPN choosing HTTP/1.1), so that the
        # admission layer never admits more than the connections can carry.
        self.on_stream_limit: Callable[[int], None] | None = None
        self._stream_limit_reported: int | None = None

    # ---------------------------------------------------------------- stats

    def stats(self) -> PoolStats:
        active = idle = connecting = 0
        versions: dict[str, int] = {}
        for connection in self._all.values():
            if connection.http_version is None and connection.streams:
                connecting += 1
            if connection.streams:
                active += 1
            else:
                idle += 1
            if connection.http_version is not None:
                versions[connection.http_version] = versions.get(connection.http_version, 0) + 1
        return PoolStats(
            connections=len(self._all),
            active=active,
            idle=idle,
            connecting=connecting,
            http_versions=versions,
            opened_total=self._opened_total,
            closed_total=self._closed_total,
            waiting=len(self._waiters),
        )

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"<PoolTransport {self._origin} connections={s.connections}/{self._max_connections} "
            f"active={s.active} idle={s.idle} waiting={s.waiting}>"
        )

    # ---------------------------------------------------------- the request

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        target = request.extensions.get("target") or request.url.raw_path
        core_request = httpcore.Request(
            method=request.method.encode("ascii"),
            url=httpcore.URL(scheme=self._scheme, host=self._host, port=self._port, target=target),
            headers=request.headers.raw,
            content=request.stream,
            extensions=dict(request.extensions),  # per attempt: "trace" and "timeout" change
        )
        headers = request.headers
        may_retry = (
            request.method in _RETRYABLE_METHODS
            and "content-length" not in headers
            and "transfer-encoding" not in headers
        )
        while True:
            connection, reused = await self._acquire(timeouts.get("pool"))
            try:
                with _map_exceptions():
                    response = await self._send(connection, core_request, timeouts)
            except BaseException as exc:
                if connection.multiplexed:
                    self._forget_abandoned_streams(connection, core_request)
                self._release(connection)
                if isinstance(exc, httpcore.ConnectionNotAvailable):
                    # HTTP/2 GOAWAY below our stream id, or the connection closed
                    # under us: the upstream did not process this request.
                    if may_retry:
                        may_retry = False
                        continue
                    raise httpx.RemoteProtocolError(
                        "upstream closed the HTTP/2 connection (GOAWAY) before processing the request"
                    ) from exc
                if may_retry and reused and isinstance(exc, _STALE_CONNECTION_ERRORS):
                    may_retry = False  # once: the kept-alive connection had gone stale
                    continue
                raise
            if not 100 <= response.status <= 599:
                await self._refuse(connection, response)
                raise httpx.RemoteProtocolError(f"upstream sent status {response.status}, outside 100-599")
            if not connection.multiplexed and _length_is_ambiguous(response.headers):
                # Content-Length and Transfer-Encoding both: the body is framed by
                # the chunked coding, but the upstream's framing is not to be
                # trusted again on this connection (RFC 9112 §6.3).
                self._retire(connection)
            if connection.http_version is None:
                version = response.extensions.get("http_version", b"HTTP/1.1")
                connection.http_version = version.decode("ascii", "replace")
                self._negotiated = "HTTP/2" if version == b"HTTP/2" else "HTTP/1.1"
                if version == b"HTTP/2" and not connection.multiplexed:
                    connection.multiplexed = True
                    self._shared[connection.id] = connection
                if version == b"HTTP/2":
                    self._report_stream_limit(self._stream_limit(connection))  # SETTINGS precede responses
                elif self._http2:
                    self._report_stream_limit(1)  # ALPN chose HTTP/1.1: one request per connection
            return httpx.Response(
                status_code=response.status,
                headers=response.headers,
                stream=_PooledStream(
                    response.stream,  # type: ignore[arg-type]
                    self,
                    connection,
                    core_request,
                    response.extensions.get("stream_id"),
                    timeouts.get("read") if connection.multiplexed else None,
                ),
                extensions=response.extensions,
            )

    async def _send(
        self, connection: _Connection, request: httpcore.Request, timeouts: dict[str, float | None]
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
        if read is None:
            extensions.pop("trace", None)
            extensions["timeout"] = timeouts
            return await connection.conn.handle_async_request(request)
        multiplexed = connection.multiplexed
        extensions["timeout"] = {**timeouts, "read": read * h2deadlines.BACKSTOP_FACTOR} if multiplexed else timeouts
        try:
            async with asyncio.timeout(None) as scope:
                extensions["trace"] = h2deadlines.HeaderDeadline(scope, read)
                return await connection.conn.handle_async_request(request)
        except TimeoutError:
            if not scope.expired():
                raise
            if multiplexed:
                self._read_timed_out(connection, read)
            raise httpx.ReadTimeout("no response headers from the upstream within the read timeout") from None
        finally:
            # The body phases that follow need no callback: spare their calls.
            extensions.pop("trace", None)

    async def _refuse(self, connection: _Connection, response: httpcore.Response) -> None:
        """A response not to be relayed: close it, and its connection with it
        (an upstream that breaks HTTP this way is not trusted with another request)."""
        self._retire(connection)
        try:
            with contextlib.suppress(Exception):
                await response.aclose()
        finally:
            self._release(connection)

    def _read_timed_out(self, connection: _Connection, read: float) -> None:
        """A stream's read deadline fired: if its connection received nothing at
        all meanwhile, presume it dead and take no new requests on it."""
        if not connection.closed and h2deadlines.silent_for(connection.conn, read):
            self._retire(connection)

    # -------------------------------------------------- acquire and release

    async def _acquire(self, timeout: float | None) -> tuple[_Connection, bool]:
        """A connection that can take one more request now, and whether it was reused."""
        self._start_sweeper()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            found = self._take_available()
            if found is not None:
                return found
            if self._closing:
                raise httpx.PoolTimeout("the pool is closed")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise httpx.PoolTimeout("no upstream connection became free in time")
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            warming = self._http2 and self._warming()
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

    def _warming(self) -> bool:
        """Is a new connection still learning whether (and how far) it multiplexes?

        An ALPN connection whose handshake chose h2 is shared from here on, before
        its first response.  Requests wait for a warming connection rather than
        open another one (HTTP/2 is there to need fewer connections), unless the
        upstream last negotiated HTTP/1.1.
        """
        warming = False
        for connection in self._all.values():
            if connection.http_version is not None or connection.closed or connection.retiring:
                continue
            protocol = h2streams.protocol_of(connection.conn)
            if protocol is not None:
                self._negotiated = protocol
            if protocol == "HTTP/1.1" or (protocol is None and self._negotiated == "HTTP/1.1"):
                continue
            if protocol == "HTTP/2" and not connection.multiplexed:
                connection.multiplexed = True
                self._shared[connection.id] = connection
            granted = h2streams.granted_streams(connection.conn)
            if protocol is None or granted in (None, 1):
                warming = True
            elif granted is not None:
                self._report_stream_limit(min(granted, self._streams))
        return warming

    def _take_available(self) -> tuple[_Connection, bool] | None:
        for connection in self._shared.values():
            if connection.streams < self._stream_limit(connection) and connection.conn.is_available():
                connection.streams += 1
                return connection, True
        while self._idle:
            connection = self._idle.pop()
            if connection.conn.has_expired() or not self._reusable(connection):
                self._discard(connection)
                continue
            connection.streams = 1
            return connection, True
        if len(self._all) < self._max_connections and not (self._http2 and self._warming()):
            return self._open(), False
        return None

    def _open(self) -> _Connection:
        conn = httpcore.AsyncHTTPConnection(
            origin=self._origin,
            ssl_context=self._ssl_context,
            keepalive_expiry=self._keepalive_expiry,
            http1=self._http1,
            http2=self._http2,
            network_backend=self._network_backend,
        )
        connection = _Connection(conn, multiplexed=self._prior_knowledge)
        connection.streams = 1
        self._all[connection.id] = connection
        if connection.multiplexed:
            self._shared[connection.id] = connection
        self._opened_total += 1
        return connection

    def _stream_limit(self, connection: _Connection) -> int:
        # httpcore caps streams at min(server MAX_CONCURRENT_STREAMS, 100) and
        # makes extra streams wait on a semaphore with no timeout; never ask for
        # more than it will grant (TRAPS.md §8).  Until the connection is set up
        # it grants one stream (so do we); it raises the limit when the server's
        # SETTINGS arrive, which waiting requests notice (see _WARMUP_POLL).
        granted = h2streams.granted_streams(connection.conn)
        if granted is None or granted < 1:
            return 1
        return min(granted, self._streams)

    def _forget_abandoned_streams(self, connection: _Connection, request: httpcore.Request) -> None:
        """Reset streams httpcore dropped without RST_STREAM (TRAPS.md §9), or
        retire the connection if its internals are not what we know."""
        if connection.closed:
            return
        inner = h2streams.h2_state_of(connection.conn)
        if inner is None:
            if connection.http_version is not None:
                self._retire(connection)
            return
        if h2streams.cancel_orphans(inner):
            self._spawn(h2streams.flush(inner, request))

    @staticmethod
    def _reusable(connection: _Connection) -> bool:
        """May this HTTP/1.1 connection carry another request?

        Only when its last response ended cleanly *and* nothing beyond that
        response has been received: bytes past the end of a response (more than
        its Content-Length, a body on a 204, a second response nobody asked
        for) would otherwise be read as the answer to the next request, which
        may be another caller's.
        """
        conn = connection.conn
        return conn.is_idle() and not has_unread_bytes(conn)

    def _retire(self, connection: _Connection) -> None:
        """Take no new requests on ``connection``; close it once its last one ends."""
        connection.retiring = True
        self._shared.pop(connection.id, None)

    def _release(self, connection: _Connection) -> None:
        """The request on ``connection`` is over: idle it, share it or drop it."""
        connection.streams -= 1
        conn = connection.conn
        if connection.closed:
            pass
        elif connection.retiring:
            if connection.streams == 0:
                self._discard(connection)
        elif conn.is_closed() or (not connection.multiplexed and not self._reusable(connection)):
            self._discard(connection)
        elif connection.multiplexed:
            if connection.streams == 0:
                connection.idle_since = time.monotonic()
            if not conn.is_available() and connection.streams == 0:
                self._discard(connection)
        elif self._closing or len(self._idle) >= self._max_idle:
            self._discard(connection)
        else:
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        self._wake_one()

    def _discard(self, connection: _Connection) -> None:
        """Forget a connection and close it in the background."""
        if connection.closed:
            return
        connection.closed = True
        self._all.pop(connection.id, None)
        self._shared.pop(connection.id, None)
        with contextlib.suppress(ValueError):
            self._idle.remove(connection)
        self._closed_total += 1
        self._spawn(_close_quietly(connection.conn))

    def _report_stream_limit(self, limit: int) -> None:
        if limit != self._stream_limit_reported:
            self._stream_limit_reported = limit
            if self.on_stream_limit is not None:
                self.on_stream_limit(limit)

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
        if self._sweeper is None and not self._closing:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """Close idle connections past keepalive_expiry, so they don't linger."""
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL)
            now = time.monotonic()
            for connection in list(self._all.values()):
                if connection.streams:
                    continue
                if now - connection.idle_since > self._keepalive_expiry or connection.conn.is_closed():
                    self._discard(connection)

    async def aclose(self) -> None:
        """Close every connection now (in-flight requests fail)."""
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for connection in list(self._all.values()):
            self._discard(connection)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def _length_is_ambiguous(headers: list[tuple[bytes, bytes]]) -> bool:
    """Does an HTTP/1.1 response carry both Content-Length and Transfer-Encoding?"""
    names = {name.lower() for name, _ in headers}
    return b"transfer-encoding" in names and b"content-length" in names


def has_unread_bytes(conn: httpcore.AsyncHTTPConnection) -> bool:
    """Has this HTTP/1.1 connection received bytes beyond its last complete response?

    httpcore does not say, so this reads its parser's buffer (h11's
    ``trailing_data``: the unparsed bytes and whether the peer closed).  When
    those internals are not what we know, the answer is "yes": a connection
    we cannot vouch for is not reused.
    """
    try:
        state = conn._connection._h11_state  # type: ignore[union-attr]
        data, closed = state.trailing_data
    except (AttributeError, TypeError, ValueError):
        return True
    if not isinstance(data, (bytes, bytearray)) or not isinstance(closed, bool):
        return True
    return bool(data) or closed


async def _close_quietly(conn: httpcore.AsyncHTTPConnection) -> None:
    with contextlib.suppress(Exception):
        await conn.aclose()


class _PooledStream(httpx.AsyncByteStream):
    """A response body that gives its connection back to the pool when closed."""

    __slots__ = ("_stream", "_pool", "_connection", "_request", "_stream_id", "_read", "_complete", "_released")

    def __init__(
        self,
        stream: AsyncIterator[bytes],
        pool: PoolTransport,
        connection: _Connection,
        request: httpcore.Request,
        stream_id: int | None,
        read: float | None,
    ) -> None:
        self._stream = stream
        self._read = read  # per-chunk deadline on multiplexed connections
        self._pool = pool
        self._connection = connection
        self._request = request
        self._stream_id = stream_id
        self._complete = False
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        read = self._read
        with _map_exceptions():
            if read is None:
                async for chunk in self._stream:
                    yield chunk
            else:
                chunks = aiter(self._stream)
                while True:
                    try:
                        async with asyncio.timeout(read):
                            chunk = await anext(chunks)
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        self._pool._read_timed_out(self._connection, read)
                        raise httpx.ReadTimeout("the upstream sent no body bytes within the read timeout") from None
                    yield chunk
        self._complete = True

    async def aclose(self) -> None:
        if self._released:
            return
        self._released = True
        if not self._complete and self._stream_id is not None:
            self._abandon_stream(self._stream_id)
        try:
            closer = getattr(self._stream, "aclose", None)
            if closer is not None:
                with _map_exceptions():
                    await closer()
        finally:
            self._pool._release(self._connection)

    def _abandon_stream(self, stream_id: int) -> None:
        """The caller stopped reading an HTTP/2 response: reset its stream now,
        so the upstream stops sending and the connection window is given back
        (TRAPS.md §9); retire the connection if we cannot."""
        connection, pool = self._connection, self._pool
        if connection.closed:
            return
        inner = h2streams.h2_state_of(connection.conn)
        if inner is None:
            pool._retire(connection)
            return
        h2streams.cancel_stream(inner, stream_id)
        pool._spawn(h2streams.flush(inner, self._request))


_EXCEPTION_MAP: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.ProtocolError, httpx.ProtocolError),
    (httpcore.NetworkError, httpx.NetworkError),
)


@contextlib.contextmanager
def _map_exceptions() -> Iterator[None]:
    """httpcore exceptions → the httpx ones callers of AsyncClient expect."""
    try:
        yield
    except Exception as exc:
        for core_type, httpx_type in _EXCEPTION_MAP:
            if isinstance(exc, core_type):
                raise httpx_type(str(exc)) from exc
        raise
