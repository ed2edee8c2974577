"""A raw HTTP/1.1 client and parsers for raw bytes.

For what an HTTP library would refuse to send or would tidy up on receipt:
:func:`raw_request` / :func:`read_response` read one response framed the way a
client would frame it; :func:`raw_exchange` collects whatever comes back;
:func:`requests_in` says which requests an upstream's raw bytes frame.
"""

from __future__ import annotations

import asyncio
import json
import re
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from tests.support import LOOPBACK


def request_bytes(target: str, *headers: str, method: str = "GET", host: str = "localhost") -> bytes:
    """A request head (no body) with ``Host`` first and ``headers`` as given."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", *headers, "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _complete_sized_response(received: bytearray) -> bool:
    """True once ``received`` holds a whole response framed by Content-Length."""
    head_end = received.find(b"\r\n\r\n")
    if head_end == -1:
        return False
    match = re.search(rb"\r\ncontent-length:\s*(\d+)", bytes(received[:head_end]).lower())
    return match is not None and len(received) - head_end - 4 >= int(match.group(1))


async def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0, half_close: bool = False) -> bytes:
    """Send raw bytes to 127.0.0.1:port; read until the peer closes, a response
    framed by Content-Length is complete, or ``timeout``."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(data)
        await writer.drain()
        if half_close:
            writer.write_eof()
        received = bytearray()
        with suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(timeout):
                while chunk := await reader.read(65536):
                    received += chunk
                    if _complete_sized_response(received):
                        break
        return bytes(received)
    finally:
        writer.transport.abort()


@dataclass
class FramedRequest:
    method: str
    target: str
    body: bytes
    complete: bool  # the whole message, end of body included, arrived


def requests_in(raw_stream: bytes) -> list[FramedRequest]:
    """Parse what an upstream received the way an HTTP/1.1 server would (h11):
    every request framed in it, and whether its body was complete."""
    import h11

    connection = h11.Connection(h11.SERVER)
    connection.receive_data(raw_stream)
    found: list[FramedRequest] = []
    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError:
            break
        if isinstance(event, h11.Request):
            found.append(FramedRequest(event.method.decode(), event.target.decode(), b"", False))
        elif isinstance(event, h11.Data):
            found[-1].body += event.data
        elif isinstance(event, h11.EndOfMessage):
            found[-1].complete = True
            connection.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
            connection.send(h11.EndOfMessage())
            connection.start_next_cycle()
        else:
            break  # NEED_DATA, PAUSED, ConnectionClosed
    return found


def status_of(raw_response: bytes) -> int:
    """The status code of the first response in raw bytes (0 if none)."""
    match = re.match(rb"HTTP/1\.[01] (\d{3})", raw_response)
    return int(match.group(1)) if match else 0


async def read_request_head(reader: asyncio.StreamReader) -> tuple[str, list[tuple[str, str]]]:
    """One request line and its headers from a raw connection (body left unread)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = [(name, value.strip()) for name, _, value in (line.partition(":") for line in lines[1:] if line)]
    return lines[0], headers


@dataclass
class RawResponse:
    status_line: str
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def status(self) -> int:
        return int(self.status_line.split(" ", 2)[1])

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(reader: asyncio.StreamReader, *, method: str = "GET") -> RawResponse:
    """Read exactly one HTTP/1.1 response, framed as the caller's client would frame it."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = [(name, value.strip()) for name, _, value in (line.partition(":") for line in lines[1:] if line)]
    response = RawResponse(lines[0], headers, b"")
    if method == "HEAD" or response.status in (204, 304) or 100 <= response.status < 200:
        return response
    length = response.header("Content-Length")
    if response.header("Transfer-Encoding") == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        response.body = bytes(body)
    elif length is not None:
        response.body = await reader.readexactly(int(length))
    else:
        response.body = await reader.read()
    return response


async def raw_request(port: int, data: bytes, *, method: str = "GET", timeout: float = 10.0) -> RawResponse:
    """Send raw bytes on a new connection and read one response."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader, method=method), timeout)
    finally:
        writer.close()
