"""A tiny raw HTTP/2 (h2c, prior knowledge) server built on the ``h2`` state
machine, for misbehaviour a real server won't produce on demand.

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
* ``/refuse-first`` the first such request gets RST_STREAM(REFUSED_STREAM)
               (not processed), later ones 200 ``ok``

``connections`` counts accepted TCP connections; ``paths`` every request.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

LOOPBACK = "127.0.0.1"


class _Protocol(asyncio.Protocol):
    def __init__(self, server: RawH2Server) -> None:
        self.server = server
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.transport: asyncio.Transport | None = None
        self.open_streams: set[int] = set()
        self.highest = 0
        self.closing = False
        self.frozen = False

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
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.open_streams.discard(event.stream_id)
        self.flush()

    def dispatch(self, stream_id: int, path: str) -> None:
        loop = asyncio.get_running_loop()
        if path == "/rst":
            self.open_streams.discard(stream_id)
            self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
        elif path == "/goaway":
            self.open_streams.discard(stream_id)
            self.closing = True
            self.h2.close_connection(h2.errors.ErrorCodes.NO_ERROR, last_stream_id=self.highest)
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
            self.h2.send_headers(
                stream_id, [(":status", "200"), ("content-length", str(len(body)))], end_stream=False
            )
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
    """An h2c server on 127.0.0.1:0 answering by path (see module docstring)."""

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

    async def __aenter__(self) -> RawH2Server:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Protocol(self), LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
