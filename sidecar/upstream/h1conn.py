"""One HTTP/1.1 upstream connection on llhttp: the I/O shell around h1frame.

The pool (``pool.py``) decides which connection carries a request; this
module carries it: connect (TCP, then TLS), write the request head and body,
feed what the upstream sends to :class:`~sidecar.upstream.h1frame.ResponseFramer`
and hand the body on as it arrives.  What it guarantees (see
docs/http1-upstream.md):

* bytes are forwarded as given: the request target and header lines exactly
  as the request path built them (no case folding, no re-validation beyond
  refusing CR, LF and NUL, which would split a line);
* per-phase timeouts: ``connect``; ``write`` per write; ``read`` bounds the
  *whole* wait for the final response head, from when the request has been
  sent (interim responses and trickled bytes do not restart it), and then
  each gap between body bytes;
* backpressure both ways: a body chunk is read from the caller only once the
  last one has been handed to the socket; the upstream's bytes are read only
  as fast as the caller takes them (the socket stops being read past a
  high-water mark, see netio.py);
* any error, timeout or cancellation mid-exchange closes the connection: it
  is reused only when its last response ended exactly where its framing said
  and nothing else arrived.

Errors are httpx's, as the request path expects of an ``httpx`` transport.
"""

from __future__ import annotations

import enum
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator

import httpcore
import httpx

from .h1frame import FramingError, ResponseFramer
from .netio import AsyncioBackend, AsyncioStream
from .stream import as_httpx

# As much as the socket buffers before it is paused (netio's high-water
# mark): a read takes what arrived whole, never a slice of it (a copy, and a
# second write to the caller for a body that came in one piece).
_READ_SIZE = 256 * 1024
_CHUNKED = b"chunked"
_LAST_CHUNK = b"0\r\n\r\n"
_HEAD_TIMEOUT = "no response headers from the upstream within the read timeout"
_BODY_TIMEOUT = "the upstream sent no body bytes within the read timeout"

Headers = list[tuple[bytes, bytes]]


class _State(enum.Enum):
    NEW = "new"  # not connected yet: its first request connects it
    ACTIVE = "active"  # carrying a request
    IDLE = "idle"  # its last response ended cleanly: may carry another
    CLOSED = "closed"


class HTTP11Connection:
    """An HTTP/1.1 connection to one origin; also the pool state's view of it."""

    __slots__ = (
        "_backend",
        "_host",
        "_port",
        "_ssl_context",
        "_keepalive_expiry",
        "_stream",
        "_state",
        "_framer",
        "_idle_until",
    )

    def __init__(
        self,
        backend: AsyncioBackend,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        keepalive_expiry: float,
        stream: AsyncioStream | None = None,
    ) -> None:
        self._backend = backend
        self._host, self._port = host, port
        self._ssl_context = ssl_context
        self._keepalive_expiry = keepalive_expiry
        # ``stream``: already connected (an ALPN handshake that chose HTTP/1.1, see alpn.py).
        self._stream: AsyncioStream | None = stream
        self._state = _State.NEW if stream is None else _State.IDLE
        self._idle_until = time.monotonic() + keepalive_expiry
        self._framer: ResponseFramer | None = None

    # ------------------------------------------- the pool state's reads

    def is_available(self) -> bool:
        return self._state is _State.IDLE

    def is_idle(self) -> bool:
        return self._state is _State.IDLE

    def is_closed(self) -> bool:
        return self._state is _State.CLOSED

    def has_expired(self) -> bool:
        if self._state is not _State.IDLE:
            return False
        # Bytes or EOF on an idle connection: the upstream closed (or broke) it.
        return time.monotonic() > self._idle_until or self.has_unread_bytes()

    def has_unread_bytes(self) -> bool:
        framer = self._framer
        if framer is not None and framer.trailing:
            return True
        stream = self._stream
        return stream is not None and stream.has_pending()

    def protocol(self) -> str | None:
        return None if self._stream is None else "HTTP/1.1"

    def granted_streams(self) -> int | None:
        return None

    # ---------------------------------------------------------- exchange

    async def exchange(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: AsyncIterable[bytes] | None,
        timeouts: dict[str, float | None],
    ) -> tuple[ResponseFramer, ResponseBody]:
        """Send one request and read its response up to the final head."""
        if self._state is _State.NEW:
            await self._connect(timeouts.get("connect"))
        elif self._state is not _State.IDLE:
            raise httpcore.ConnectionNotAvailable("the connection is not idle")
        stream = self._stream
        assert stream is not None
        self._state = _State.ACTIVE
        framer = self._framer = ResponseFramer(method)
        try:
            head = _request_head(method, target, headers)
            write = timeouts.get("write")
            if body is None:
                await stream.write(head, write)
            else:
                try:
                    await self._send_body(stream, head, headers, body, write)
                except httpcore.WriteError as write_error:
                    # The upstream may have answered before taking the whole
                    # body (a 413, say) and closed: that answer is the one to
                    # relay, if it sent one.  The connection is not reused.
                    framer.close_after = True
                    try:
                        await self._read_head(stream, framer, timeouts.get("read"))
                    except Exception:
                        raise write_error from None
            await self._read_head(stream, framer, timeouts.get("read"))
        except BaseException as error:
            self._close_now()
            raise _as_httpx(error) from None
        return framer, ResponseBody(self, stream, framer, timeouts.get("read"))

    async def _connect(self, timeout: float | None) -> None:
        try:
            stream = await self._backend.connect_tcp(self._host, self._port, timeout)
            if self._ssl_context is not None:
                stream = await stream.start_tls(self._ssl_context, self._host, timeout)
        except BaseException as error:
            self._state = _State.CLOSED
            raise _as_httpx(error) from None
        assert isinstance(stream, AsyncioStream)
        self._stream = stream

    async def _send_body(
        self,
        stream: AsyncioStream,
        head: bytes,
        headers: Headers,
        body: AsyncIterable[bytes],
        write: float | None,
    ) -> None:
        chunked, length = _request_framing(headers)
        await stream.write(head, write)
        sent = 0
        async for chunk in body:
            if not chunk:
                continue
            sent += len(chunk)
            if chunked:
                await stream.write(b"%x\r\n%b\r\n" % (len(chunk), chunk), write)
            else:
                if length is None or sent > length:
                    raise httpx.LocalProtocolError("the request body is longer than its Content-Length")
                await stream.write(chunk, write)
        if chunked:
            await stream.write(_LAST_CHUNK, write)
        elif length is not None and sent != length:
            raise httpx.LocalProtocolError("the request body is shorter than its Content-Length")

    async def _read_head(self, stream: AsyncioStream, framer: ResponseFramer, read: float | None) -> None:
        """Until the final response head: all of it within ``read``."""
        if read is None:
            while not framer.head_done:
                _feed(framer, await stream.read(_READ_SIZE, None))
            return
        loop = stream.loop  # not asyncio.get_running_loop(): a getpid() system call on Python 3.11
        deadline = loop.time() + read
        while not framer.head_done:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise httpx.ReadTimeout(_HEAD_TIMEOUT)
            try:
                data = await stream.read(_READ_SIZE, remaining)
            except httpcore.ReadTimeout:
                raise httpx.ReadTimeout(_HEAD_TIMEOUT) from None
            _feed(framer, data)

    # --------------------------------------------------------- the end

    def response_closed(self, framer: ResponseFramer) -> None:
        """The response was read to its end (or dropped): idle again, or closed."""
        if self._state is not _State.ACTIVE:
            return
        if framer.reusable and self._stream is not None and not self._stream.has_pending():
            self._state = _State.IDLE
            self._idle_until = time.monotonic() + self._keepalive_expiry
        else:
            self._close_now()

    def _close_now(self) -> None:
        self._state = _State.CLOSED
        if self._framer is not None:
            self._framer.release()  # a response cut short: nothing more is fed
        if self._stream is not None:
            self._stream.close_now()

    async def aclose(self) -> None:
        self._close_now()

    def __repr__(self) -> str:
        return f"<HTTP11Connection {self._host}:{self._port} {self._state.value}>"


class ResponseBody:
    """The body of one response, as it arrives; closing it ends the exchange."""

    __slots__ = ("_connection", "_stream", "_framer", "_read", "_done")

    def __init__(
        self, connection: HTTP11Connection, stream: AsyncioStream, framer: ResponseFramer, read: float | None
    ) -> None:
        self._connection = connection
        self._stream = stream
        self._framer = framer
        self._read = read
        self._done = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        framer = self._framer
        while True:
            if framer.body:
                return framer.take_body()
            if framer.complete or self._done:
                await self.aclose()
                raise StopAsyncIteration
            try:
                data = await self._stream.read(_READ_SIZE, self._read)
                _feed(framer, data)
            except BaseException as error:
                self._done = True
                self._connection.response_closed(framer)  # mid-body: closed, never reused
                if isinstance(error, httpcore.ReadTimeout):
                    raise httpx.ReadTimeout(_BODY_TIMEOUT) from None
                raise _as_httpx(error) from None

    async def aclose(self) -> None:
        if self._done:
            return
        self._done = True
        # A response dropped before its end leaves the connection mid-message.
        self._connection.response_closed(self._framer)


def _feed(framer: ResponseFramer, data: bytes) -> None:
    if data:
        framer.feed(data)
    else:
        framer.feed_eof()


def _request_head(method: bytes, target: bytes, headers: Headers) -> bytes:
    lines = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    head = b"".join(lines)
    # One line per header and nothing else: a CR, LF or NUL inside a name or
    # value would let it add lines of its own.
    breaks = len(headers) + 2
    if head.count(b"\n") != breaks or head.count(b"\r") != breaks or b"\0" in head:
        raise httpx.LocalProtocolError("a request header holds a line break or NUL")
    return head


def _request_framing(headers: Headers) -> tuple[bool, int | None]:
    """(the body is sent chunked, its Content-Length)."""
    chunked, length = False, None
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            chunked = value.strip().lower() == _CHUNKED
        elif lowered == b"content-length":
            length = int(value)
    return chunked, length


def _as_httpx(error: BaseException) -> BaseException:
    """The network layer's errors and framing errors as httpx's; others as they are."""
    if isinstance(error, FramingError):
        return httpx.RemoteProtocolError(str(error))
    return as_httpx(error)
