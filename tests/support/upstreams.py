"""Every upstream server the tests talk to, all on 127.0.0.1, port 0.

* :class:`Upstream` — aiohttp HTTP/1.1 server whose handler a test sets; it
  records every request and counts the TCP connections it sees.
* :class:`TLSUpstream` — the same over TLS; records SNI names and client certs.
* :class:`HypercornUpstream` — a real HTTP/2 server (hypercorn): h2c with prior
  knowledge on cleartext, ALPN over TLS.
* :class:`RawH2Server` — the ``h2`` state machine answering by path, for HTTP/2
  misbehaviour a real server won't produce on demand.
* :class:`ScriptedUpstream` — a bare TCP server: either a canned answer per
  request head, recording every byte received, or a per-connection coroutine
  the test writes, for bytes no HTTP framework would send.

All of them are async context managers (``async with Upstream() as up``) and
have ``url`` and ``port``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Self

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from aiohttp import web
from hyperframe.frame import GoAwayFrame

from tests.support import LOOPBACK
from tests.support.tls import TLSFiles

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ConnectionHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

# --------------------------------------------------------------- HTTP/1.1 (aiohttp)


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

    async def start(self, sock: socket.socket | None = None) -> Self:
        """Listen on 127.0.0.1:0, or on ``sock`` (bound by the caller)."""
        app = web.Application(client_max_size=1024**4)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, auto_decompress=False, handler_cancellation=True)
        await self._runner.setup()
        site: web.BaseSite = (
            web.SockSite(self._runner, sock) if sock is not None else web.TCPSite(self._runner, LOOPBACK, 0)
        )
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


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

    async def start(self, sock: socket.socket | None = None) -> Self:
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


# ----------------------------------------------------------- HTTP/2 (hypercorn)


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

    async def start(self) -> Self:
        from hypercorn.asyncio import serve
        from hypercorn.config import Config as HypercornConfig

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


# ----------------------------------------------------------- HTTP/2 (raw h2)


class _H2Protocol(asyncio.Protocol):
    def __init__(self, server: RawH2Server) -> None:
        self.server = server
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.transport: asyncio.Transport | None = None
        self.open_streams: set[int] = set()
        self.highest = 0
        self.closing = False
        self.frozen = False
        self.unread: set[int] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections += 1
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.server.max_concurrent_streams},
        )
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        if self.frozen:
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()
            self.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                headers = dict(event.headers)
                path = headers[b":path"].decode()
                self.server.paths.append(path)
                self.highest = max(self.highest, event.stream_id)
                self.open_streams.add(event.stream_id)
                self.dispatch(event.stream_id, path)
            elif isinstance(event, h2.events.DataReceived):
                if event.stream_id in self.unread:
                    continue  # never read: the window of that stream stays shut
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.open_streams.discard(event.stream_id)
        self.flush()

    def dispatch(self, stream_id: int, path: str) -> None:
        loop = asyncio.get_running_loop()
        if path == "/early":
            self.unread.add(stream_id)
            self.open_streams.discard(stream_id)
            self.h2.send_headers(stream_id, [(":status", "413"), ("content-length", "0")], end_stream=True)
        elif path == "/rst":
            self.open_streams.discard(stream_id)
            self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
        elif path == "/goaway":
            self.open_streams.discard(stream_id)
            self.closing = True
            # Written past h2's state machine: once h2 has sent GOAWAY itself it
            # refuses to answer the streams still open, which a server may (and
            # a graceful one does) finish first (RFC 9113 §6.8).
            self.flush()
            if self.transport is not None:
                self.transport.write(GoAwayFrame(0, last_stream_id=self.highest, error_code=0).serialize())
            self.maybe_close()
        elif path == "/never":
            pass
        elif path == "/stall":
            self.h2.send_headers(stream_id, [(":status", "200"), ("content-length", "10")])
            self.h2.send_data(stream_id, b"12345")
        elif path == "/freeze":
            self.frozen = True
        elif path == "/kill":
            if self.transport is not None:
                self.transport.abort()
        elif path == "/goaway1":
            self.h2.close_connection(h2.errors.ErrorCodes.NO_ERROR, last_stream_id=1)
            self.flush()
            self.close()
        elif path == "/refuse-first" and self.server.paths.count(path) == 1:
            self.open_streams.discard(stream_id)
            self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
        elif path == "/hold":
            loop.call_later(self.server.hold_seconds, self.respond, stream_id, b"held")
        else:
            self.respond(stream_id, b"ok")

    def respond(self, stream_id: int, body: bytes) -> None:
        if self.frozen or stream_id not in self.open_streams or self.transport is None or self.transport.is_closing():
            return
        self.open_streams.discard(stream_id)
        try:
            self.h2.send_headers(stream_id, [(":status", "200"), ("content-length", str(len(body)))], end_stream=False)
            self.h2.send_data(stream_id, body, end_stream=True)
        except h2.exceptions.ProtocolError:
            return
        self.flush()
        self.maybe_close()

    def maybe_close(self) -> None:
        self.flush()
        if self.closing and not self.open_streams:
            self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class RawH2Server:
    """An h2c server (prior knowledge) on 127.0.0.1:0 answering by path.

    Paths:

    * ``/ok``      200 ``ok``
    * ``/hold``    200 ``held`` after ``hold_seconds``
    * ``/rst``     RST_STREAM (INTERNAL_ERROR) instead of a response
    * ``/goaway``  GOAWAY(NO_ERROR, last_stream_id = highest stream seen); the
                   stream is never answered; streams already open are answered,
                   then the TCP connection is closed
    * ``/never``   never answered (the stream stays open)
    * ``/stall``   headers and 5 body bytes of 10, then nothing more
    * ``/freeze``  the connection goes silent: nothing more is read or answered on it
    * ``/kill``    the TCP connection is aborted at once (a read error for every stream on it)
    * ``/goaway1`` GOAWAY(last_stream_id=1) and close at once: streams above 1
                   were not processed
    * ``/early``   413 at once, before the request body, which is never read
                   (the stream's window stays shut)
    * ``/refuse-first`` the first such request gets RST_STREAM(REFUSED_STREAM)
                   (not processed), later ones 200 ``ok``

    ``connections`` counts accepted TCP connections; ``paths`` every request.
    """

    def __init__(self, *, max_concurrent_streams: int = 100, hold_seconds: float = 0.3) -> None:
        self.max_concurrent_streams = max_concurrent_streams
        self.hold_seconds = hold_seconds
        self.connections = 0
        self.paths: list[str] = []
        self.port = 0
        self._server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _H2Protocol(self), LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


# ------------------------------------------------------------- raw TCP (scripted)

OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class ScriptedUpstream:
    """A bare TCP server on 127.0.0.1:0, for bytes no HTTP framework would send.

    ``script`` is either

    * raw bytes (by default a ``200 ok``) written once per ``answer_after`` seen
      on a connection (by default once per request head), or ``None`` to never
      answer; every connection keeps being read until the peer closes, and
      ``received`` holds the bytes of each connection, so a test can prove that
      *nothing* reached the upstream; or
    * a per-connection coroutine ``(reader, writer)`` the test writes: no Server
      or Content-Type header, closing before or in the middle of a response,
      answering one request per connection and dropping the next...

    ``connections`` counts accepted TCP connections.  Subclasses may override
    :meth:`serve` (the per-connection coroutine) and append to ``received``.
    """

    def __init__(
        self, script: ConnectionHandler | bytes | None = OK_RESPONSE, *, answer_after: bytes = b"\r\n\r\n"
    ) -> None:
        self.script = script
        self.answer_after = answer_after
        self.received: list[bytearray] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def all_bytes(self) -> bytes:
        return b"".join(bytes(chunk) for chunk in self.received)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if callable(self.script):
            await self.script(reader, writer)
            return
        data = bytearray()
        self.received.append(data)
        answered = 0
        while chunk := await reader.read(65536):
            data += chunk
            if self.script is not None:
                due = data.count(self.answer_after)
                if due > answered:
                    writer.write(self.script * (due - answered))
                    answered = due
                    await writer.drain()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self.serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._accept, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def unused_port() -> int:
    """A loopback port nothing listens on (bound once, then released): connecting is refused."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class BlackholeUpstream:
    """A listener that never accepts, its backlog filled: further SYNs are
    dropped, so connecting to it hangs until the connect timeout (never refused)."""

    def __init__(self) -> None:
        self.port = 0
        self._listener: socket.socket | None = None
        self._fillers: list[socket.socket] = []

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def __aenter__(self) -> Self:
        self._listener = socket.socket()
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(0)
        self.port = self._listener.getsockname()[1]
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex((LOOPBACK, self.port))
            self._fillers.append(filler)
        await asyncio.sleep(0.1)  # the fillers' handshakes fill the backlog
        return self

    async def __aexit__(self, *exc: object) -> None:
        for filler in self._fillers:
            filler.close()
        self._fillers.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
