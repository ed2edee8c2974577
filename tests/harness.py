"""Real servers on real sockets for the integration tests (always port 0).

* :class:`Upstream` — an aiohttp HTTP/1.1 server whose handler a test sets,
  recording every request and counting the TCP connections it sees.
* :func:`running_sidecar` — the real :class:`~sidecar.server.Sidecar`,
  in-process, on port 0, from YAML text written to a real file.
* :class:`SidecarProcess` — ``python -m sidecar run`` as a child process, for
  signals, exit codes, RSS and file-watch tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from sidecar.config import HostPort, load_config
from sidecar.server import Sidecar

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
LOOPBACK = "127.0.0.1"


@dataclass
class Recorded:
    method: str
    path: str  # raw target as received
    headers: list[tuple[str, str]]
    body: bytes | None
    peer: tuple[str, int]


async def ok_handler(request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok")


class Upstream:
    """A test upstream on 127.0.0.1:0.

    ``handler`` answers; ``read_body`` controls whether the recorder reads the
    body first (set False for streaming handlers that read it themselves).
    ``peers`` holds every client (ip, port) seen: one per TCP connection.
    ``max_open`` is the most connections that were open at once (sampled at
    each request and each new connection).
    """

    def __init__(self, handler: Handler = ok_handler, *, read_body: bool = True) -> None:
        self.handler = handler
        self.read_body = read_body
        self.requests: list[Recorded] = []
        self.peers: set[tuple[str, int]] = set()
        self.max_open = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def open_connections(self) -> int:
        assert self._runner is not None and self._runner.server is not None
        return len(self._runner.server.connections)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else ("?", 0)
        self.peers.add((peer[0], peer[1]))
        self.max_open = max(self.max_open, self.open_connections)
        body = await request.read() if self.read_body else None
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        self.requests.append(Recorded(request.method, request.raw_path, headers, body, (peer[0], peer[1])))
        return await self.handler(request)

    async def start(self) -> Upstream:
        app = web.Application(client_max_size=1024**4)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, auto_decompress=False, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOOPBACK, 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Upstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def write_config(directory: Path, yaml_text: str, name: str = "upstreams.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(yaml_text))
    return path


@asynccontextmanager
async def running_sidecar(directory: Path, yaml_text: str, *, admin: bool = True) -> AsyncIterator[Sidecar]:
    """The real Sidecar in this process, proxy and admin on port 0."""
    path = write_config(directory, yaml_text)
    config = load_config(path)
    sidecar = Sidecar(
        config,
        listen=HostPort(LOOPBACK, 0),
        admin=HostPort(LOOPBACK, 0) if admin else None,
    )
    await sidecar.start()
    try:
        yield sidecar
    finally:
        await sidecar.shutdown()


def proxy_url(sidecar: Sidecar) -> str:
    return f"http://{LOOPBACK}:{sidecar.proxy_port}"


def admin_url(sidecar: Sidecar) -> str:
    return f"http://{LOOPBACK}:{sidecar.admin_port}"


@dataclass
class SidecarProcess:
    """``python -m sidecar run`` in a child process, its ports read from its log."""

    config_path: Path
    env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    proxy_port: int = 0
    admin_port: int | None = None
    lines: list[dict[str, Any]] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.proxy_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    async def start(self, timeout: float = 15.0) -> SidecarProcess:
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "-c", str(self.config_path),
             "--listen", f"{LOOPBACK}:0", "--admin", f"{LOOPBACK}:0", "--log-format", "json", *self.extra_args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self._reader = asyncio.get_running_loop().create_task(self._read())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if line.get("event") == "started":
                    self.proxy_port = int(str(line["listen"]).rsplit(":", 1)[1])
                    admin = line.get("admin")
                    self.admin_port = int(str(admin).rsplit(":", 1)[1]) if admin else None
                    return self
            if self.proc.poll() is not None:
                await asyncio.sleep(0.2)
                raise RuntimeError(f"sidecar exited with {self.proc.returncode}: {self.raw}")
            await asyncio.sleep(0.05)
        raise RuntimeError(f"sidecar did not start: {self.raw}")

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        loop = asyncio.get_running_loop()
        stdout = self.proc.stdout
        while True:
            line = await loop.run_in_executor(None, stdout.readline)
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip("\n")
            self.raw.append(text)
            with suppress(ValueError):
                self.lines.append(json.loads(text))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == name]

    async def wait_for_event(self, name: str, timeout: float = 10.0, count: int = 1) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name)
            if len(found) >= count:
                return found[count - 1]
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {name!r} event within {timeout}s; log: {self.raw[-20:]}")

    def signal(self, signum: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError("sidecar did not exit in time")
            await asyncio.sleep(0.05)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)
        return self.proc.returncode

    def rss_bytes(self) -> int:
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert match
        return int(match.group(1)) * 1024

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await self.wait(20)
            except AssertionError:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()


class RawUpstream:
    """A bare asyncio TCP upstream that records every byte it receives.

    It answers with ``response`` (raw bytes) once per ``answer_after`` seen
    (by default: once per request head; never when ``response`` is None) and
    keeps reading until the peer closes.  ``received`` holds the bytes of each
    connection, so a test can prove that *nothing* reached the upstream.
    """

    def __init__(self, response: bytes | None = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                 *, answer_after: bytes = b"\r\n\r\n") -> None:
        self.response = response
        self.answer_after = answer_after
        self.received: list[bytearray] = []
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def all_bytes(self) -> bytes:
        return b"".join(bytes(chunk) for chunk in self.received)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = bytearray()
        self.received.append(data)
        self._writers.add(writer)
        answered = 0
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                data += chunk
                if self.response is not None:
                    due = data.count(self.answer_after)
                    if due > answered:
                        writer.write(self.response * (due - answered))
                        answered = due
                        await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> RawUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


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


class TLSUpstream(Upstream):
    """:class:`Upstream` served over TLS with ``ssl_context``; records the SNI
    name of every handshake and the client certificate of every request."""

    def __init__(self, ssl_context: Any, handler: Handler = ok_handler) -> None:
        super().__init__(handler)
        self.ssl_context = ssl_context
        self.server_names: list[str | None] = []
        self.client_certs: list[dict[str, Any] | None] = []
        ssl_context.sni_callback = lambda _sock, name, _ctx: self.server_names.append(name)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        self.client_certs.append(transport.get_extra_info("peercert") if transport else None)
        return await super()._dispatch(request)

    async def start(self) -> TLSUpstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOOPBACK, 0, ssl_context=self.ssl_context)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self
