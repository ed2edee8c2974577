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
    # Its own session and process group (pid == pgid), for signals sent to the whole group.
    new_session: bool = False
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
            [
                sys.executable,
                "-m",
                "sidecar",
                "run",
                "-c",
                str(self.config_path),
                "--listen",
                f"{LOOPBACK}:0",
                "--admin",
                f"{LOOPBACK}:0",
                "--log-format",
                "json",
                *self.extra_args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=self.new_session,
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

    def __init__(
        self,
        response: bytes | None = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        *,
        answer_after: bytes = b"\r\n\r\n",
    ) -> None:
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


# --------------------------------------------------------------------- HTTP/2
# A real HTTP/2 server (hypercorn, in this process) for the HTTP/2 tests: h2c
# with prior knowledge on cleartext, ALPN over TLS with trustme certificates.


@dataclass
class TLSFiles:
    """A throwaway CA and a server certificate it signed (PEM files)."""

    ca_file: Path
    cert_file: Path  # certificate chain
    key_file: Path


def tls_files(directory: Path, *hostnames: str) -> TLSFiles:
    """A trustme CA in ``directory`` and a server certificate for ``hostnames``."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert(*(hostnames or (LOOPBACK,)))
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca.cert_pem.write_to_path(str(ca_file))
    for blob in cert.cert_chain_pems:
        blob.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    return TLSFiles(ca_file=ca_file, cert_file=cert_file, key_file=key_file)


def tls_server_context(directory: Path, *hostnames: str) -> tuple[Any, Path]:
    """A server-side SSLContext for ``hostnames`` (default 127.0.0.1) signed by a
    fresh trustme CA, and the CA file a client needs to trust it."""
    import ssl

    files = tls_files(directory, *hostnames)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.cert_file, files.key_file)
    return context, files.ca_file


class HypercornUpstream:
    """An ASGI upstream served by hypercorn on 127.0.0.1:0 (HTTP/1.1, h2c, or TLS + ALPN).

    Paths: ``/big?size=N`` streams N bytes in 64 KiB chunks; ``/hold`` answers
    (``ok``, or N bytes with ``?size=N``) only once :attr:`release` is set;
    anything else answers ``ok``.
    ``http_versions`` records the ASGI ``http_version`` of every request and
    ``peers`` every client (ip, port), i.e. one entry per TCP connection.
    """

    def __init__(
        self,
        *,
        tls: TLSFiles | None = None,
        alpn: tuple[str, ...] = ("h2", "http/1.1"),
        max_concurrent_streams: int = 100,
    ) -> None:
        self.tls = tls
        self.alpn = alpn
        self.max_concurrent_streams = max_concurrent_streams
        self.http_versions: list[str] = []
        self.peers: set[tuple[str, int]] = set()
        self.in_handler = 0
        self.max_in_handler = 0
        self.release = asyncio.Event()
        self.port = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._socket: Any = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{LOOPBACK}:{self.port}"

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        self.http_versions.append(scope["http_version"])
        client = scope.get("client") or ("?", 0)
        self.peers.add((client[0], client[1]))
        self.in_handler += 1
        self.max_in_handler = max(self.max_in_handler, self.in_handler)
        try:
            await self._answer(scope, send)
        finally:
            self.in_handler -= 1

    async def _answer(self, scope: dict[str, Any], send: Any) -> None:
        path = scope["path"]
        headers = [(b"content-type", b"text/plain"), (b"x-http-version", scope["http_version"].encode())]
        query = dict(part.split("=", 1) for part in scope["query_string"].decode().split("&") if "=" in part)
        if path == "/hold":
            await self.release.wait()
        if path == "/big" or "size" in query:
            size = int(query.get("size", str(1024 * 1024)))
            headers.append((b"content-length", str(size).encode()))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            chunk = b"x" * 65536
            sent = 0
            while sent < size:
                piece = chunk[: min(len(chunk), size - sent)]
                sent += len(piece)
                await send({"type": "http.response.body", "body": piece, "more_body": sent < size})
            return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    async def start(self) -> HypercornUpstream:
        import socket as socket_module

        from hypercorn.asyncio import serve
        from hypercorn.config import Config as HypercornConfig

        sock = socket_module.socket(socket_module.AF_INET, socket_module.SOCK_STREAM)
        sock.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, 0))
        sock.listen(1024)
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = HypercornConfig()
        config.bind = [f"fd://{sock.fileno()}"]
        config.accesslog = None
        config.errorlog = None
        config.loglevel = "WARNING"
        config.h2_max_concurrent_streams = self.max_concurrent_streams
        config.keep_alive_timeout = 60
        config.graceful_timeout = 1
        if self.tls is not None:
            config.certfile = str(self.tls.cert_file)
            config.keyfile = str(self.tls.key_file)
            config.alpn_protocols = list(self.alpn)
        self._task = asyncio.get_running_loop().create_task(
            serve(self.app, config, shutdown_trigger=self._stop.wait, mode="asgi")  # type: ignore[arg-type]
        )
        await asyncio.sleep(0.1)  # let hypercorn take the socket
        if self._task.done():
            self._task.result()
        return self

    async def stop(self) -> None:
        self.release.set()
        self._stop.set()
        if self._task is not None:
            with suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._task, 5)
            self._task = None
        if self._socket is not None:
            with suppress(OSError):  # hypercorn adopted the descriptor and closed it already
                self._socket.close()
            self._socket = None

    async def __aenter__(self) -> HypercornUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


# --------------------------------------------------------------------------
# Scripted sockets: for bytes no HTTP library would send or accept as-is
# --------------------------------------------------------------------------

ConnectionHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ScriptedUpstream:
    """A TCP server on 127.0.0.1:0 whose per-connection coroutine a test writes.

    For upstream behaviour an HTTP framework will not produce: no Server or
    Content-Type header, closing before or in the middle of a response,
    answering one request per connection and then dropping the next.
    ``connections`` counts accepted TCP connections.
    """

    def __init__(self, handle: ConnectionHandler) -> None:
        self.handle = handle
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            await self.handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]
            writer.close()

    async def __aenter__(self) -> ScriptedUpstream:
        self._server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


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
