"""Per-stream read timeouts on HTTP/2 connections (TRAPS.md §10).

httpcore applies ``timeouts.read`` to each socket read of a connection, not to
a stream.  On a multiplexed connection that goes wrong both ways:

* a stream whose upstream answer never comes does not time out as long as
  *other* streams keep the connection busy — every read returns their data;
* when the connection is quiet long enough for one read to time out, httpcore
  stores that error and fails every stream on the connection with it, including
  ones that started a moment ago.

So for requests on a multiplexed connection the pool arms its own deadline
per stream — from when httpcore starts waiting for the response headers, and
between body chunks — and gives httpcore's socket reads a longer backstop.
When a stream's deadline fires only that stream fails (504); if nothing at all
arrived on the connection meanwhile, the connection is presumed dead and
retired.  :class:`WatchedBackend` records when a connection last received bytes.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterable
from typing import Any

import httpcore

# httpcore's own socket read timeout on a multiplexed connection, as a
# multiple of timeouts.read: only a connection silent this long fails as a whole.
BACKSTOP_FACTOR = 2.0
# httpcore's trace events around the wait for a response head, on either
# protocol: it starts once the request (body included) has been sent, and
# ends with the final response head (interim 1xx responses do not end it).
_HEADERS_STARTED = frozenset({"http11.receive_response_headers.started", "http2.receive_response_headers.started"})
_HEADERS_ENDED = frozenset(
    f"{protocol}.receive_response_headers.{end}" for protocol in ("http11", "http2") for end in ("complete", "failed")
)


class HeaderDeadline:
    """httpcore ``trace`` hook that arms ``scope`` while response headers are awaited.

    Used on HTTP/1.1 too: there httpcore's read timeout bounds only the gap
    between two reads, so an upstream sending one header byte (or one
    ``102 Processing``) at a time could hold the request forever.
    """

    __slots__ = ("_scope", "_read")

    def __init__(self, scope: asyncio.Timeout, read: float) -> None:
        self._scope = scope
        self._read = read

    async def __call__(self, name: str, info: dict[str, Any]) -> None:
        if name in _HEADERS_STARTED:
            if not self._scope.expired():  # (an expired scope is already cancelling the request)
                self._scope.reschedule(asyncio.get_running_loop().time() + self._read)
        elif name in _HEADERS_ENDED and not self._scope.expired():
            self._scope.reschedule(None)


def silent_for(conn: httpcore.AsyncHTTPConnection, seconds: float) -> bool:
    """Has ``conn`` received nothing for ``seconds``? False when unknown."""
    stream = getattr(getattr(conn, "_connection", None), "_network_stream", None)
    if not isinstance(stream, WatchedStream):
        return False
    return time.monotonic() - stream.last_read >= seconds


class WatchedStream(httpcore.AsyncNetworkStream):
    """A network stream that remembers when it last received bytes."""

    __slots__ = ("_stream", "last_read")

    def __init__(self, stream: httpcore.AsyncNetworkStream) -> None:
        self._stream = stream
        self.last_read = time.monotonic()

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = await self._stream.read(max_bytes, timeout)
        self.last_read = time.monotonic()
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._stream.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        return WatchedStream(await self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class WatchedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, with every stream a :class:`WatchedStream`."""

    def __init__(self, backend: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._backend = backend or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return WatchedStream(await self._backend.connect_tcp(host, port, timeout, local_address, socket_options))

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        return WatchedStream(await self._backend.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)
