"""The response of a pooled request, and httpcore's exceptions as httpx's.

:class:`UpstreamResponse` is what the request path reads of an attempt: the
status, the raw header lines and the body.  Its body, a :class:`PooledStream`,
hands its connection back to the pool when it is closed (the connection's
own body resets an HTTP/2 stream closed before its end: see docs/http2.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

import httpcore
import httpx

if TYPE_CHECKING:
    from .pool import PooledConnection, PoolTransport


class ResponseHeaders:
    """An upstream's response header lines, as received (names in any case)."""

    __slots__ = ("raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.raw = raw

    def get(self, name: str) -> str | None:
        """Every value of ``name`` (lower-case), joined by ", " as one field; None if absent."""
        key = name.encode("latin-1")
        values = [value for field, value in self.raw if field.lower() == key]
        if not values:
            return None
        return b", ".join(values).decode("latin-1")

    def __contains__(self, name: str) -> bool:
        key = name.encode("latin-1")
        return any(field.lower() == key for field, _ in self.raw)


class UpstreamResponse:
    """One attempt's response, read up to its head; closing it gives the connection back."""

    __slots__ = ("status_code", "headers", "http_version", "stream")

    def __init__(self, status_code: int, headers: list[tuple[bytes, bytes]], http_version: str, stream: PooledStream):
        self.status_code = status_code
        self.headers = ResponseHeaders(headers)
        self.http_version = http_version
        self.stream = stream

    def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives (transfer coding removed, content coding kept)."""
        return self.stream.chunks()

    async def aclose(self) -> None:
        await self.stream.aclose()


class ResponseStream(Protocol):
    """A connection's response body (h1conn.ResponseBody, h2conn.ResponseBody):
    raises httpx's errors itself, applies its own read deadline, and ends the
    exchange on its connection when closed (an HTTP/2 stream is reset then)."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...
    async def aclose(self) -> None: ...


class PooledStream(httpx.AsyncByteStream):
    """A response body that gives its connection back to the pool when closed."""

    __slots__ = ("_stream", "_pool", "_connection", "_released")

    def __init__(self, stream: ResponseStream, pool: PoolTransport, connection: PooledConnection) -> None:
        self._stream = stream
        self._pool = pool
        self._connection = connection
        self._released = False

    def chunks(self) -> AsyncIterator[bytes]:
        """The body's chunks, straight from the connection."""
        return aiter(self._stream)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            await self._stream.aclose()
        finally:
            self._pool.release(self._connection)


HTTPCORE_TO_HTTPX: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
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


def as_httpx(error: BaseException) -> BaseException:
    """The network layer's (httpcore's) error as the httpx one callers of AsyncClient expect; others as they are."""
    for core_type, httpx_type in HTTPCORE_TO_HTTPX:
        if isinstance(error, core_type):
            return httpx_type(str(error))
    return error
