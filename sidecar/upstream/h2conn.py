"""One HTTP/2 upstream connection: the asyncio shell around h2core.

The pool (``pool.py``) decides which connection carries a request and counts
its streams; this module carries them, many at once: connect (TCP, then TLS
offering ``h2``), write each request's HEADERS and DATA as the send windows
allow, feed what arrives to :class:`~sidecar.upstream.h2core.ClientCore` and
wake the stream each event is for.  What it guarantees (see docs/http2.md):

* ``timeouts.read`` is per stream: the whole wait for the final response
  head, then each gap between body chunks; other streams' traffic does not
  extend it, and a stream timing out fails alone.  A connection on which
  nothing at all arrived during a stream's timeout is presumed dead and takes
  no new streams;
* a response the caller stops reading is reset (RST_STREAM CANCEL) and the
  window its unread bytes held is given back: the connection goes on;
* backpressure: a stream's receive window is given back only as its caller
  consumes the body; request bodies wait for the send windows;
* GOAWAY: streams above its last stream id fail as not processed
  (``httpcore.ConnectionNotAvailable``, which the pool may repeat), the rest
  finish; REFUSED_STREAM is not processed either; any connection error or a
  lost connection fails every stream still open, and the connection is done.

Errors are httpx's, as the request path expects of an ``httpx`` transport.

Why one module over 400 lines: the asyncio callbacks, each stream's waits and
the writes share the connection's state (its streams, windows, pending
output); the protocol is already out, in h2core.py and h2fields.py.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import cast

import httpcore
import httpx

from . import h2core
from .h2core import ClientCore
from .h2fields import MalformedRequest, content_length, request_fields
from .netio import AsyncioStream

Headers = list[tuple[bytes, bytes]]

_HEAD_TIMEOUT = "no response headers from the upstream within the read timeout"
_BODY_TIMEOUT = "the upstream sent no body bytes within the read timeout"
_NOT_PROCESSED = "the upstream did not process the request (HTTP/2 GOAWAY or REFUSED_STREAM)"


class _Stream:
    """One request in flight: what arrived for it, and who waits; its response head, once in."""

    http_version = "HTTP/2"
    __slots__ = ("id", "status", "headers", "chunks", "unread", "ended", "error", "waiter")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.status = 0
        self.headers: Headers = []
        self.chunks: deque[bytes] = deque()
        self.unread = 0  # bytes in chunks
        self.ended = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class HTTP2Connection(asyncio.Protocol):
    """An HTTP/2 connection to one origin; also the pool state's view of it."""

    def __init__(
        self, host: str, port: int, ssl_context: ssl.SSLContext | None, authority: bytes, keepalive_expiry: float
    ) -> None:
        self._host, self._port = host, port
        self._ssl_context = ssl_context
        self._scheme = b"https" if ssl_context is not None else b"http"
        self._authority = authority
        self._keepalive_expiry = keepalive_expiry
        self._core = ClientCore()
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Future[None] | None = None
        self._streams: dict[int, _Stream] = {}
        self._window_waiters: list[asyncio.Future[None]] = []
        self._drain: asyncio.Future[None] | None = None
        self._flush_scheduled = False
        self._closed = False
        self._retired = False  # presumed dead: no new streams
        self._last_received = time.monotonic()

    # ------------------------------------------- the pool state's reads

    def is_available(self) -> bool:
        core = self._core
        if self._closed or self._retired or not core.can_open_stream():
            return False
        limit = core.max_concurrent_streams
        return limit is None or len(self._streams) < limit

    def is_idle(self) -> bool:
        return not self._streams

    def is_closed(self) -> bool:
        return self._closed

    def has_expired(self) -> bool:
        return self._closed

    def has_unread_bytes(self) -> bool:
        return False

    def protocol(self) -> str | None:
        return "HTTP/2"

    def granted_streams(self) -> int | None:
        """Streams the server allows at once; None until its SETTINGS arrived."""
        if not self._core.settings_received:
            return None
        limit = self._core.max_concurrent_streams
        return 2**31 - 1 if limit is None else limit

    def silent_for(self, seconds: float) -> bool:
        return time.monotonic() - self._last_received >= seconds

    # ------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._last_received = time.monotonic()
        streams = self._streams
        for kind, stream_id, a, b in self._core.receive(data):
            if kind == h2core.DATA:
                stream = streams.get(stream_id)
                if stream is None:  # abandoned meanwhile
                    self._core.give_back(len(cast(bytes, a)))
                    continue
                stream.chunks.append(cast(bytes, a))
                stream.unread += len(cast(bytes, a))
                stream.wake()
            elif kind == h2core.HEAD:
                stream = streams.get(stream_id)
                if stream is not None:
                    stream.status = cast(int, a)
                    stream.headers = cast(Headers, b)
                    stream.wake()
            elif kind == h2core.END:
                stream = streams.get(stream_id)
                if stream is not None:
                    stream.ended = True
                    stream.wake()
                    self._wake_senders()  # an upload waiting for a window has been answered
            elif kind == h2core.RESET:
                code = cast(int, a)
                if code == h2core.REFUSED_STREAM:
                    self._fail(stream_id, httpcore.ConnectionNotAvailable(_NOT_PROCESSED))
                else:
                    self._fail(stream_id, httpx.RemoteProtocolError(cast(str, b)))
            elif kind == h2core.WINDOW:
                self._wake_senders()
            elif kind == h2core.GOAWAY:
                for other in [s for s in streams if s > stream_id]:
                    self._fail(other, httpcore.ConnectionNotAvailable(_NOT_PROCESSED))
            elif kind == h2core.TERMINATED:
                self._lose(httpx.RemoteProtocolError(f"HTTP/2 connection error: {b}"))
        self._flush()

    def eof_received(self) -> bool | None:
        self._lose(httpx.RemoteProtocolError("the upstream closed the HTTP/2 connection"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        error = httpx.ReadError(str(exc) or type(exc).__name__) if exc else None
        self._lose(error or httpx.RemoteProtocolError("the upstream closed the HTTP/2 connection"))
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        if self._loop is not None and (self._drain is None or self._drain.done()):
            self._drain = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # ---------------------------------------------------------- exchange

    async def exchange(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: AsyncIterable[bytes] | None,
        timeouts: dict[str, float | None],
    ) -> tuple[_Stream, ResponseBody]:
        """Send one request on a new stream and wait for its final response head."""
        if self._transport is None:
            await self._connect(timeouts.get("connect"))
        if not self.is_available():
            raise httpcore.ConnectionNotAvailable("the HTTP/2 connection takes no new streams")
        core = self._core
        try:
            request_head = request_fields(method, self._scheme, self._authority, target, headers)
        except MalformedRequest as error:
            raise httpx.LocalProtocolError(str(error)) from None
        stream_id = core.start_request(request_head, end_stream=body is None)
        stream = self._streams[stream_id] = _Stream(stream_id)
        try:
            if body is None:
                self._flush_soon()
            else:
                self._flush()
                await self._send_body(stream, headers, body, timeouts.get("write"))
            await self._wait(stream, timeouts.get("read"), _HEAD_TIMEOUT, lambda: stream.status != 0)
        except BaseException:
            self.abandon(stream)
            raise
        return stream, ResponseBody(self, stream, timeouts.get("read"))

    async def _connect(self, timeout: float | None) -> None:
        if self._connecting is not None:  # another request is connecting it
            await asyncio.shield(self._connecting)
            return
        loop = self._loop = asyncio.get_running_loop()
        self._connecting = loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(
                    lambda: self,
                    self._host,
                    self._port,
                    ssl=self._ssl_context,
                    server_hostname=self._host if self._ssl_context is not None else None,
                )
        except BaseException as error:
            self._closed = True
            if isinstance(error, TimeoutError):
                failure: BaseException = httpx.ConnectTimeout(f"timed out connecting to {self._host}:{self._port}")
            elif isinstance(error, OSError):
                failure = httpx.ConnectError(str(error) or type(error).__name__)
                failure.__cause__ = error
            else:  # cancelled: whoever else waits for this connection tries another
                failure = httpcore.ConnectionNotAvailable("the connection attempt was abandoned")
            self._connecting.set_exception(failure)
            self._connecting.exception()  # retrieved: the others may not be waiting
            if failure is not error and not isinstance(error, asyncio.CancelledError):
                raise failure from error
            raise
        transport = self._transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._flush()  # the preface and our SETTINGS
        self._connecting.set_result(None)

    def adopt(self, stream: AsyncioStream) -> None:
        """Take over a connection whose TLS handshake chose h2 (ALPN, see alpn.py)."""
        loop = self._loop = stream.loop
        transport, received, closed = stream.detach(self)
        self.connection_made(transport)
        self._connecting = loop.create_future()
        self._connecting.set_result(None)
        self._flush()  # the preface and our SETTINGS
        if received:
            self.data_received(received)
        if closed:
            self.eof_received()

    async def _send_body(
        self, stream: _Stream, headers: Headers, body: AsyncIterable[bytes], write: float | None
    ) -> None:
        length = content_length(headers)
        sent = 0
        core = self._core
        async for chunk in body:
            if not chunk:
                continue
            sent += len(chunk)
            if length is not None and sent > length:
                raise httpx.LocalProtocolError("the request body is longer than its Content-Length")
            view = memoryview(chunk)
            while view:
                if stream.error is not None or stream.ended:
                    return  # reset, or answered early: the answer (or the error) is what counts
                room = core.sendable(stream.id)
                if room <= 0:
                    await self._wait_for_window(write)
                    continue
                core.send_data(stream.id, bytes(view[:room]), end_stream=False)
                view = view[room:]
                self._flush()
                await self._drained(write)
        if length is not None and sent != length:
            raise httpx.LocalProtocolError("the request body is shorter than its Content-Length")
        if stream.error is None and not stream.ended:
            core.send_data(stream.id, b"", end_stream=True)
            self._flush()

    async def _wait_for_window(self, write: float | None) -> None:
        assert self._loop is not None
        waiter = self._loop.create_future()
        self._window_waiters.append(waiter)
        try:
            async with asyncio.timeout(write):
                await waiter
        except TimeoutError:
            raise httpx.WriteTimeout("the upstream's flow-control window stayed closed") from None
        if self._closed:
            raise httpx.WriteError("the HTTP/2 connection closed")

    async def _drained(self, write: float | None) -> None:
        drain = self._drain
        if drain is None or drain.done():
            return
        try:
            async with asyncio.timeout(write):
                await asyncio.shield(drain)
        except TimeoutError:
            raise httpx.WriteTimeout("timed out writing to the upstream") from None

    async def _wait(self, stream: _Stream, read: float | None, message: str, check: Callable[[], bool]) -> None:
        """Until ``check()`` holds for ``stream`` (or it failed), all within ``read``."""
        loop = self._loop
        assert loop is not None
        deadline = None if read is None else loop.time() + read
        while not check() and stream.error is None:
            waiter = stream.waiter = loop.create_future()
            timer = None if deadline is None else loop.call_at(deadline, _expire, waiter)
            try:
                await waiter
            finally:
                stream.waiter = None
                if timer is not None:
                    timer.cancel()
            if deadline is not None and loop.time() >= deadline and not check() and stream.error is None:
                if read is not None and self.silent_for(read):
                    self._retired = True  # nothing at all for a whole read timeout: presumed dead
                raise httpx.ReadTimeout(message)
        if stream.error is not None:
            raise stream.error

    async def next_chunk(self, stream: _Stream, read: float | None) -> bytes | None:
        """The stream's next body chunk, within ``read``; None at its end."""
        if not stream.chunks and not stream.ended and stream.error is None:
            await self._wait(stream, read, _BODY_TIMEOUT, lambda: bool(stream.chunks) or stream.ended)
        if stream.chunks:
            chunk = stream.chunks.popleft()
            stream.unread -= len(chunk)
            self._core.consumed(stream.id, len(chunk))  # the window back to the upstream, as the caller reads
            self._flush()
            return chunk
        if stream.error is not None:
            raise stream.error
        return None

    # --------------------------------------------------------- the end

    def abandon(self, stream: _Stream) -> None:
        """The stream's caller is gone (or it failed): reset it unless it ended."""
        if self._streams.pop(stream.id, None) is None:
            return
        unread, stream.unread = stream.unread, 0
        stream.chunks.clear()
        if stream.ended:
            self._core.give_back(unread)
        else:  # (a stream the peer reset is already gone from the core: no RST then)
            self._core.reset(stream.id, h2core.CANCEL, unread)
        self._flush()

    def _fail(self, stream_id: int, error: BaseException) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None and stream.error is None:
            stream.error = error
            stream.wake()
            self._wake_senders()  # an upload waiting for a window has lost its stream

    def _lose(self, error: BaseException) -> None:
        """The connection is over: fail every stream still open."""
        self._retired = True
        for stream_id in list(self._streams):
            self._fail(stream_id, error)
        self._wake_senders()
        if self._transport is not None and not self._closed:
            self._flush()
            self._transport.close()
        self._closed = True

    def _wake_senders(self) -> None:
        waiters, self._window_waiters = self._window_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _flush_soon(self) -> None:
        """Write what is queued once this turn of the event loop is over: the
        requests that start in the same turn share one write (one system call)."""
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self._core.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    async def aclose(self) -> None:
        if not self._closed:
            self._core.close()
            self._lose(httpx.RemoteProtocolError("the HTTP/2 connection was closed"))

    def __repr__(self) -> str:
        return f"<HTTP2Connection {self._host}:{self._port} streams={len(self._streams)}>"


class ResponseBody:
    """One stream's response body, as it arrives; closing it ends the stream."""

    __slots__ = ("_connection", "_stream", "_read", "_done")

    def __init__(self, connection: HTTP2Connection, stream: _Stream, read: float | None) -> None:
        self._connection = connection
        self._stream = stream
        self._read = read
        self._done = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        try:
            chunk = await self._connection.next_chunk(self._stream, self._read)
        except BaseException:
            await self.aclose()
            raise
        if chunk is None:
            await self.aclose()
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        if self._done:
            return
        self._done = True
        self._connection.abandon(self._stream)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
