"""The response of a pooled request, and httpcore's exceptions as httpx's.

:class:`UpstreamResponse` is what the request path reads of an attempt: the
status, the raw header lines and the body.  Its body, a :class:`PooledStream`,
hands its connection back to the pool when it is closed, applies the
per-chunk read deadline of a multiplexed connection, and resets the HTTP/2
stream of a response closed before its end (see docs/http2.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

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


class PooledStream(httpx.AsyncByteStream):
    """A response body that gives its connection back to the pool when closed."""

    __slots__ = ("_stream", "_pool", "_connection", "_request", "_stream_id", "_read", "_complete", "_released")

    def __init__(
        self,
        stream: AsyncIterator[bytes],
        pool: PoolTransport,
        connection: PooledConnection,
        request: httpcore.Request | None,
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

    def chunks(self) -> AsyncIterator[bytes]:
        """The body's chunks: straight from the connection when it already
        raises httpx's errors and needs no per-chunk deadline (HTTP/1.1)."""
        if self._request is None and self._read is None:
            return aiter(self._stream)
        return self.__aiter__()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        read = self._read
        with map_exceptions():
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
                        self._pool.read_timed_out(self._connection, read)
                        raise httpx.ReadTimeout("the upstream sent no body bytes within the read timeout") from None
                    yield chunk
        self._complete = True

    async def aclose(self) -> None:
        if self._released:
            return
        self._released = True
        if not self._complete and self._stream_id is not None and self._request is not None:
            # The caller stopped reading an HTTP/2 response: reset its stream
            # now, so the upstream stops sending and the window is given back.
            self._pool.abandon_stream(self._connection, self._request, self._stream_id)
        try:
            closer = getattr(self._stream, "aclose", None)
            if closer is not None:
                with map_exceptions():
                    await closer()
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


@contextlib.contextmanager
def map_exceptions() -> Iterator[None]:
    """httpcore exceptions → the httpx ones callers of AsyncClient expect."""
    try:
        yield
    except Exception as exc:
        for core_type, httpx_type in HTTPCORE_TO_HTTPX:
            if isinstance(exc, core_type):
                raise httpx_type(str(exc)) from exc
        raise
