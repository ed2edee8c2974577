"""The proxy handler: route → admit → send (streaming) → stream back (docs/routing-and-forwarding.md).

Ownership rules that keep every slot and connection accounted for:

* the admission slot is taken by ``Admission.acquire`` and given back in one
  ``finally``, synchronously, so neither an error nor a (double) cancellation
  can skip it;
* the upstream response is closed in a ``finally`` before that; the pool's
  own release of the connection is synchronous too, and a connection that is
  not cleanly idle is closed by the pool in the background.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
from aiohttp import HttpVersion10, HttpVersion11, StreamReader, hdrs, web

from .compat.aiohttp import RelayedResponse
from .config import Inbound
from .errors import (
    BadFraming,
    ConnectNotSupported,
    Draining,
    HttpVersionNotSupported,
    RequestTimeout,
    RequestTooLarge,
    SidecarError,
    UpstreamProtocolError,
    error_response,
    from_upstream_exception,
)
from .pools import UpstreamPool
from .routing import RouteMatch, Router

# RFC 9110 §7.6.1 hop-by-hop headers, plus Proxy-Authorization/Authenticate,
# which belong to the hop between the caller and us.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        # RFC 9113 §3.2.1: HTTP2-Settings only means something on the hop of an h2c upgrade.
        "http2-settings",
    }
)
# Not forwarded upstream either: Host is rewritten, Expect is answered here,
# X-Request-Id is set by us (kept if the caller sent one).
_NOT_FORWARDED = HOP_BY_HOP | {"host", "expect", "x-request-id"}
_BODY_CHUNK = 64 * 1024
# What aiohttp refuses to write in a header (and what no header value may hold):
# letting it through would fail in prepare() with a 500 and a traceback.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_BODYLESS_STATUS = (204, 304)
# Response headers only the sidecar sets: X-Request-Id is ours, and
# X-Sidecar-Error tells callers the upstream was never reached, so an upstream
# must not be able to claim it (a caller would retry a POST it executed).
_OURS = frozenset({"x-request-id", "x-sidecar-error"})
# Errors after which the connection is closed. For CONNECT, untrusted framing
# and an HTTP version we do not speak, what follows the head cannot be trusted
# to be a next request: for CONNECT it is tunnel data (or a body the parser may
# not even frame), and reading it as a request would forward bytes the caller's
# side never inspected as one.
_CLOSES_THE_CONNECTION = (Draining, RequestTimeout, ConnectNotSupported, BadFraming, HttpVersionNotSupported)
# Refused before their body is read, and what follows their head is not to be
# read at all (see _refuse_to_read_on).
_UNREAD = (ConnectNotSupported, BadFraming, HttpVersionNotSupported)
_SPOKEN_VERSIONS = (HttpVersion10, HttpVersion11)


@dataclass(slots=True)
class Generation:
    """One loaded config's routing and pools; swapped whole on reload."""

    router: Router
    pools: dict[str, UpstreamPool]
    inbound: Inbound


@dataclass(slots=True)
class Exchange:
    """What happened to one request: the access log line and the metrics."""

    request_id: str
    method: str
    path: str
    started: float
    upstream: str | None = None
    pool: UpstreamPool | None = None
    status: int = 0
    queued: bool = False  # reached admission (pool_wait is meaningful)
    pool_wait: float = 0.0
    upstream_time: float | None = None
    http_version: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    error: str | None = None
    aborted: bool = False


def _connection_tokens(value: str | None) -> frozenset[str]:
    if not value:
        return frozenset()
    return frozenset(token.strip().lower() for token in value.split(",") if token.strip())


def new_request_id() -> str:
    return uuid.uuid4().hex


_MAX_REQUEST_ID = 200


def _caller_request_id(value: str | None) -> str | None:
    """The caller's X-Request-Id if it is safe to echo, log and forward: visible ASCII."""
    if value and len(value) <= _MAX_REQUEST_ID and value.isascii() and value.isprintable() and " " not in value:
        return value
    return None


def _header_text(raw: bytes) -> str:
    """A response header value as aiohttp will write it back: UTF-8 round-trips byte
    for byte; other bytes (obs-text) are read as ISO-8859-1, HTTP's historical charset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class Forwarder:
    """The aiohttp handler of the proxy port."""

    def __init__(
        self,
        generation: Callable[[], Generation],
        finished: Callable[[Exchange], None],
        draining: Callable[[], bool],
    ) -> None:
        self._generation = generation
        self._finished = finished
        self._draining = draining

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        exchange = Exchange(
            request_id=_caller_request_id(request.headers.get("X-Request-Id")) or new_request_id(),
            method=request.method,
            # Encoded and without the query: no secrets in query strings, no
            # control characters from percent-decoding in a log line.
            path=request.rel_url.raw_path,
            started=time.monotonic(),
        )
        try:
            return await self._handle(request, exchange)
        except SidecarError as error:
            exchange.status, exchange.error = error.status, error.code
            exchange.upstream = exchange.upstream or error.upstream
            close = isinstance(error, _CLOSES_THE_CONNECTION) or _asks_upgrade(request)
            if isinstance(error, _UNREAD):
                _refuse_to_read_on(request)
            as_http11 = request.version not in _SPOKEN_VERSIONS
            return error_response(error, exchange.request_id, close=close, as_http11=as_http11)
        except (asyncio.CancelledError, ConnectionResetError):
            exchange.error = exchange.error or "client_disconnected"
            exchange.aborted = True
            raise
        except Exception:
            # aiohttp answers 500 (or aborts, past the headers); account for it.
            exchange.error = exchange.error or "internal_error"
            exchange.status = exchange.status or 500
            raise
        finally:
            self._finished(exchange)

    async def _handle(self, request: web.BaseRequest, exchange: Exchange) -> web.StreamResponse:
        _check_version(request)
        _check_framing(request)
        if self._draining():
            raise Draining("the sidecar is shutting down; retry on another instance", retry_after=1)
        generation = self._generation()
        match = generation.router.resolve(request.method, request.raw_path, request.headers.get(hdrs.HOST))
        pool = generation.pools[match.upstream.name]
        exchange.upstream, exchange.pool = pool.name, pool
        inbound = generation.inbound
        declared = request.content_length
        if inbound.max_request_body is not None and declared is not None and declared > inbound.max_request_body:
            raise RequestTooLarge(
                f"request body of {declared} bytes is over the limit of {inbound.max_request_body}",
                upstream=pool.name,
            )
        # Counted before the first await: a reload that retires this pool
        # must see the request, or it could close the pool under it.
        pool.request_started()
        try:
            waited_from = time.monotonic()
            exchange.queued = True
            try:
                await pool.admission.acquire()
            finally:
                admitted = time.monotonic()
                exchange.pool_wait = admitted - waited_from
            try:
                return await self._exchange(request, match, pool, exchange)
            finally:
                pool.admission.release(time.monotonic() - admitted)
        finally:
            pool.request_finished()

    async def _exchange(
        self, request: web.BaseRequest, match: RouteMatch, pool: UpstreamPool, exchange: Exchange
    ) -> web.StreamResponse:
        upstream_request = self._upstream_request(request, match, pool, exchange)
        sent = time.monotonic()
        try:
            response = await pool.client.send(upstream_request, stream=True)
        except httpx.TransportError as exc:
            raise from_upstream_exception(exc, pool.name, retry_after=pool.admission.retry_after()) from None
        try:
            exchange.upstream_time = time.monotonic() - sent
            exchange.http_version = response.http_version
            return await self._relay(request, response, exchange)
        finally:
            await response.aclose()

    def _upstream_request(
        self, request: web.BaseRequest, match: RouteMatch, pool: UpstreamPool, exchange: Exchange
    ) -> httpx.Request:
        # Every Connection line counts: a second one may name more hop-by-hop headers.
        named = _connection_tokens(",".join(request.headers.getall(hdrs.CONNECTION, ())))
        skipped = pool.headers_not_forwarded
        # The caller's header bytes as received (aiohttp's str view would have to be
        # re-encoded, and httpx encodes str values as ASCII: non-ASCII bytes broke it).
        headers: list[tuple[bytes, bytes]] = [pool.host_header]
        for raw_name, raw_value in request.raw_headers:
            lower = raw_name.decode("latin-1").lower()
            if lower in _NOT_FORWARDED or lower in skipped or (named and lower in named):
                continue
            headers.append((raw_name, raw_value))
        headers.extend(pool.headers_set)
        headers.append((b"X-Request-Id", exchange.request_id.encode("ascii")))
        content = None
        if request.body_exists:
            content = self._body(request, exchange, self._generation().inbound)
        return httpx.Request(
            request.method,
            pool.base_url,
            headers=headers,
            content=content,
            extensions={"timeout": self._timeouts(pool, exchange), "target": match.target.encode("latin-1")},
        )

    @staticmethod
    def _timeouts(pool: UpstreamPool, exchange: Exchange) -> dict[str, float]:
        # The connection pool may only wait for what is left of timeouts.pool
        # after the admission queue, so no request waits longer in total.
        left = max(0.0, pool.admission.pool_timeout - exchange.pool_wait)
        return {**pool.timeout_extension, "pool": left}

    async def _body(self, request: web.BaseRequest, exchange: Exchange, inbound: Inbound) -> AsyncIterator[bytes]:
        """The caller's body, chunk by chunk as it arrives, never buffered whole.

        A caller that pauses longer than ``body_idle_timeout`` while we wait for
        its next bytes gets 408; one that sends more than ``max_request_body``
        gets 413.  Either way the upstream only ever saw an unfinished body on a
        connection that is then closed, never a complete request.
        """
        if request.version >= HttpVersion11 and request.headers.get(hdrs.EXPECT, "").lower() == "100-continue":
            # Only now that the upstream is connected and wants the body: a caller
            # refused earlier (404, 503, 502) gets its final answer without uploading.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        limit = inbound.max_request_body
        stream = request.content
        watchdog = _IdleWatchdog(stream, inbound.body_idle_timeout)
        try:
            while True:
                watchdog.waiting()
                try:
                    chunk = await stream.readany()
                except BodyIdle:
                    raise RequestTimeout(
                        f"request body stalled for more than {inbound.body_idle_timeout:g}s",
                        upstream=exchange.upstream,
                    ) from None
                watchdog.got_data()
                if not chunk:
                    return
                exchange.bytes_in += len(chunk)
                if limit is not None and exchange.bytes_in > limit:
                    raise RequestTooLarge(
                        f"request body is over the limit of {limit} bytes", upstream=exchange.upstream
                    )
                yield chunk
        finally:
            watchdog.cancel()

    async def _relay(
        self, request: web.BaseRequest, response: httpx.Response, exchange: Exchange
    ) -> web.StreamResponse:
        """Stream the upstream response back; abort the caller's connection on failure."""
        raw_headers = response.headers.raw
        named = _connection_tokens(response.headers.get("connection"))
        # The body is relayed as it was framed by Transfer-Encoding (which is
        # hop-by-hop): a Content-Length beside it describes nothing we send
        # (RFC 9112 §6.3), and forwarding it would cut or hang the caller's body.
        drop_length = "transfer-encoding" in response.headers
        seen_content_type = seen_server = False
        downstream_headers: list[tuple[str, str]] = []
        for raw_name, raw_value in raw_headers:
            name = raw_name.decode("latin-1")
            lower = name.lower()
            if lower in HOP_BY_HOP or lower in named or lower in _OURS:
                continue
            if drop_length and lower == "content-length":
                continue
            value = _header_text(raw_value)
            if _CONTROL_CHARACTER.search(value):
                raise UpstreamProtocolError(
                    f"upstream sent an invalid value for header {name!r}", upstream=exchange.upstream
                )
            seen_content_type = seen_content_type or lower == "content-type"
            seen_server = seen_server or lower == "server"
            downstream_headers.append((name, value))
        invented = tuple(
            name for name, seen in (("Content-Type", seen_content_type), ("Server", seen_server)) if not seen
        )
        downstream = RelayedResponse(response.status_code, invented)
        for name, value in downstream_headers:
            downstream.headers.add(name, value)
        downstream.headers["X-Request-Id"] = exchange.request_id
        if _asks_upgrade(request):
            # Never tunnelled: the Upgrade header was not forwarded and the
            # answer is an ordinary response. aiohttp's C parser stops parsing
            # a connection after an upgrade request, so it cannot be reused.
            downstream.force_close()
        await downstream.prepare(request)
        # Only now has the caller been sent a status: a caller gone before the
        # headers went out (prepare raising ConnectionResetError) counts as 499.
        exchange.status = response.status_code
        try:
            if request.method != "HEAD" and response.status_code not in _BODYLESS_STATUS:
                async for chunk in response.aiter_raw():
                    exchange.bytes_out += len(chunk)
                    await downstream.write(chunk)
            else:
                # Read the (empty) body to its end all the same: a response that
                # was never read to its end closes its connection instead of
                # returning it to the pool.  Body bytes an upstream sends anyway
                # are not part of this response; the pool sees them and does
                # not reuse the connection.
                async for _ in response.aiter_raw():
                    pass
        except httpx.TransportError:
            # Headers are out: the only honest signal left is to abort, so the
            # caller cannot mistake a truncated body for a complete one.
            exchange.error = "upstream_body_error"
            exchange.aborted = True
            _abort(request)
            return downstream
        await downstream.write_eof()
        return downstream


class BodyIdle(TimeoutError):
    """Set on a request body stream whose caller stopped sending.

    A TimeoutError, so that aiohttp's lingering read after the response treats
    it as the end of waiting rather than an unhandled error.
    """


class _IdleWatchdog:
    """One timer per request body instead of a ``wait_for`` per chunk.

    It only counts time spent waiting *for the caller*: while the upstream is
    slow to take the bytes we already have, the caller is not at fault.
    """

    __slots__ = ("_stream", "_timeout", "_loop", "_since", "_timer")

    def __init__(self, stream: StreamReader, timeout: float) -> None:
        self._stream = stream
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._since: float | None = None
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(timeout, self._check)

    def waiting(self) -> None:
        self._since = self._loop.time()

    def got_data(self) -> None:
        self._since = None

    def _check(self) -> None:
        now = self._loop.time()
        since = self._since
        if since is not None and now - since >= self._timeout:
            self._timer = None
            self._stream.set_exception(BodyIdle())
            return
        self._timer = self._loop.call_at((since if since is not None else now) + self._timeout, self._check)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _check_version(request: web.BaseRequest) -> None:
    """Only HTTP/1.0 and 1.1: both parsers let other versions through (llhttp reads a
    request line without one as HTTP/0.9), and aiohttp would answer in that version."""
    version = request.version
    if version not in _SPOKEN_VERSIONS:
        raise HttpVersionNotSupported(
            f"HTTP/{version.major}.{version.minor} is not supported: the sidecar speaks HTTP/1.1 (and 1.0)"
        )


def _check_framing(request: web.BaseRequest) -> None:
    """Refuse a Transfer-Encoding other than one ``chunked`` on an HTTP/1.1 request.

    Both aiohttp parsers only look at the last coding: ``gzip, chunked`` was read
    as chunked and forwarded without its gzip coding (a corrupted body), and the
    pure-Python one takes ``chunked, chunked`` as well. Any other list is a
    framing the caller and the sidecar may not agree on (RFC 9112 §6.3), and in
    an HTTP/1.0 request Transfer-Encoding means faulty framing (RFC 9112 §6.1).
    """
    codings = request.headers.getall(hdrs.TRANSFER_ENCODING, ())
    if not codings:
        return
    if request.version != HttpVersion11:
        raise BadFraming("Transfer-Encoding is not allowed in an HTTP/1.0 request")
    if len(codings) != 1 or codings[0].strip(" \t").lower() != "chunked":
        raise BadFraming("the only request Transfer-Encoding accepted is a single 'chunked'")


class NotRead(TimeoutError):
    """Set on the body stream of a request whose remaining bytes we will not read.

    A TimeoutError for the same reason as :class:`BodyIdle`: aiohttp's lingering
    read of an unread body then stops at once instead of reading (and
    discarding) for up to its lingering time before closing.
    """


def _refuse_to_read_on(request: web.BaseRequest) -> None:
    """Let the connection close right after the answer, not after aiohttp's lingering
    read: a refused CONNECT is followed by the tunnel the caller thinks it opened,
    which may never end, and a body with untrusted framing has no known end."""
    stream = request.content
    if not stream.is_eof():
        stream.set_exception(NotRead())


def _asks_upgrade(request: web.BaseRequest) -> bool:
    return hdrs.UPGRADE in request.headers


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
