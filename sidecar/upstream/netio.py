"""The plain-asyncio network layer under the sidecar's upstream connections.

One asyncio Protocol per connection buffers what arrives (pausing the socket
past a high-water mark), wakes a single reader, and answers "is anything
pending?" from its own state: an idle connection with data or EOF pending is
one the upstream closed.  Timeouts are ``call_later`` handles; errors are
httpcore's exception types (the connections map them to httpx's).  It keeps
httpcore's network-stream interface, which is also what anyio's backend
would give, but without anyio's per-read and per-write round trips (an
event-loop checkpoint before every write, an ``epoll_ctl`` pair around every
read, a cancel scope each: 10-20 % of a proxied request when measured).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import Iterable
from typing import Any, cast

import httpcore

_HIGH_WATER = 256 * 1024  # stop reading from the socket past this many unread bytes
_LOW_WATER = 64 * 1024


class _Protocol(asyncio.Protocol):
    """Bytes received and not yet read, EOF and errors of one connection."""

    __slots__ = ("chunks", "pending", "eof", "error", "transport", "_loop", "_reader", "_writer", "_paused_reading")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        # What arrived and was not read, as it arrived: a read takes a chunk
        # as it is, without copying it into a buffer and out again.
        self.chunks: deque[bytes] = deque()
        self.pending = 0  # bytes in chunks
        self.eof = False
        self.error: BaseException | None = None
        self._reader: asyncio.Future[bool] | None = None
        self._writer: asyncio.Future[bool] | None = None
        self._paused_reading = False

    # ------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.pending += len(data)
        if self.pending > _HIGH_WATER and not self._paused_reading and self.transport is not None:
            self._paused_reading = True
            self.transport.pause_reading()
        _wake(self._reader, True)

    def eof_received(self) -> bool | None:
        self.eof = True
        _wake(self._reader, True)
        return None  # close the transport: the upstream will send nothing more

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        _wake(self._reader, True)
        _wake(self._writer, True)

    def pause_writing(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = self._loop.create_future()

    def resume_writing(self) -> None:
        _wake(self._writer, True)

    # ------------------------------------------------ waiting

    async def readable(self, timeout: float | None) -> bool:
        """Wait for data or EOF; False if ``timeout`` passed first."""
        waiter: asyncio.Future[bool] = self._loop.create_future()
        self._reader = waiter
        timer = None if timeout is None else self._loop.call_later(timeout, _wake, waiter, False)
        try:
            return await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._reader = None

    async def writable(self, timeout: float | None) -> bool:
        """Wait until the transport's write buffer drained; False on timeout."""
        waiter = self._writer
        if waiter is None or waiter.done():
            return True
        timer = None if timeout is None else self._loop.call_later(timeout, _wake, waiter, False)
        try:
            return bool(await asyncio.shield(waiter))
        finally:
            if timer is not None:
                timer.cancel()

    def take(self, max_bytes: int) -> bytes:
        chunks = self.chunks
        if self.pending <= max_bytes:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
        else:
            data = chunks.popleft()
            if len(data) > max_bytes:
                chunks.appendleft(data[max_bytes:])
                data = data[:max_bytes]
        self.pending -= len(data)
        if self._paused_reading and self.pending < _LOW_WATER and self.transport is not None:
            self._paused_reading = False
            self.transport.resume_reading()
        return data


def _wake(waiter: asyncio.Future[bool] | None, value: bool) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(value)


class AsyncioStream(httpcore.AsyncNetworkStream):
    """One connection as httpcore sees it."""

    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        protocol = self._protocol
        if not protocol.pending and not protocol.eof and not await protocol.readable(timeout):
            raise httpcore.ReadTimeout("timed out reading from the upstream")
        if protocol.pending:
            return protocol.take(max_bytes)
        if protocol.error is not None:
            raise httpcore.ReadError(str(protocol.error) or type(protocol.error).__name__)
        return b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        transport, protocol = self._transport, self._protocol
        if transport.is_closing():
            raise httpcore.WriteError(str(protocol.error) if protocol.error else "the connection is closed")
        transport.write(buffer)
        if not await protocol.writable(timeout):
            raise httpcore.WriteTimeout("timed out writing to the upstream")
        if protocol.error is not None:
            raise httpcore.WriteError(str(protocol.error))

    async def aclose(self) -> None:
        self._transport.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the connection runs on."""
        return self._protocol._loop

    def close_now(self) -> None:
        """Close without waiting: what is buffered is still written, then FIN."""
        self._transport.close()

    def detach(self, protocol: asyncio.Protocol) -> tuple[asyncio.Transport, bytes, bool]:
        """Hand the connection over to ``protocol``: the transport, the bytes
        received and not read, and whether the peer has closed it already."""
        old = self._protocol
        self._transport.set_protocol(protocol)
        data = b"".join(old.chunks)
        old.chunks.clear()
        old.pending = 0
        if old._paused_reading:
            old._paused_reading = False
            self._transport.resume_reading()
        return self._transport, data, old.eof

    def has_pending(self) -> bool:
        """Bytes or EOF that arrived and were not read."""
        protocol = self._protocol
        return protocol.pending > 0 or protocol.eof

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport = await loop.start_tls(
                    self._transport, self._protocol, ssl_context, server_hostname=server_hostname
                )
        except TimeoutError:
            self._transport.abort()
            raise httpcore.ConnectTimeout("timed out in the TLS handshake") from None
        except (OSError, ssl.SSLError) as exc:
            self._transport.abort()
            raise httpcore.ConnectError(str(exc)) from exc
        if transport is None:
            raise httpcore.ConnectError("the connection closed during the TLS handshake")
        return AsyncioStream(transport, self._protocol)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # An idle connection with bytes or EOF waiting has been closed (or
            # broken) by the upstream: no syscall needed to know it.
            protocol = self._protocol
            return protocol.pending > 0 or protocol.eof
        transport = self._transport
        if info == "ssl_object":
            return transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return transport.get_extra_info("sockname")
        if info == "server_addr":
            return transport.get_extra_info("peername")
        if info == "socket":
            return transport.get_extra_info("socket")
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """Opens :class:`AsyncioStream` connections on the running loop."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_connection(
                    lambda: _Protocol(loop),
                    host,
                    port,
                    local_addr=(local_address, 0) if local_address else None,
                )
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"timed out connecting to {host}:{port}") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        sock = transport.get_extra_info("socket")
        if sock is not None:
            for option in socket_options or ():
                sock.setsockopt(*option)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return AsyncioStream(transport, protocol)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_unix_connection(lambda: _Protocol(loop), path)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"timed out connecting to {path}") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        return AsyncioStream(transport, protocol)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
