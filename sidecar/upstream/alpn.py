"""An upstream connection whose protocol the TLS handshake decides (``http2: true``).

Until it is connected the pool sees it as a connection that takes no further
request; :meth:`NegotiatingConnection.connect` does the TCP and TLS
handshakes offering ``h2`` and ``http/1.1`` (ALPN) and returns the
connection the upstream chose, HTTP/2 (h2conn.py) or HTTP/1.1 (h1conn.py),
which then takes its place in the pool.  Both are the sidecar's own, so an
upstream's choice changes the protocol, never the guarantees.
"""

from __future__ import annotations

import ssl

from .h1conn import HTTP11Connection
from .h2conn import HTTP2Connection
from .netio import AsyncioBackend, AsyncioStream
from .stream import as_httpx


class NegotiatingConnection:
    """A TLS connection to one origin before ALPN has said which protocol it speaks."""

    __slots__ = ("_backend", "_host", "_port", "_ssl_context", "_authority", "_keepalive_expiry", "_failed")

    def __init__(
        self,
        backend: AsyncioBackend,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        authority: bytes,
        keepalive_expiry: float,
    ) -> None:
        self._backend = backend
        self._host, self._port = host, port
        self._ssl_context = ssl_context
        self._authority = authority
        self._keepalive_expiry = keepalive_expiry
        self._failed = False

    # ------------------------------------------- the pool state's reads

    def is_available(self) -> bool:
        return False  # its first request is connecting it

    def is_idle(self) -> bool:
        return False

    def is_closed(self) -> bool:
        return self._failed

    def has_expired(self) -> bool:
        return self._failed

    def has_unread_bytes(self) -> bool:
        return False

    def protocol(self) -> str | None:
        return None

    def granted_streams(self) -> int | None:
        return None

    async def aclose(self) -> None:
        self._failed = True

    # ---------------------------------------------------------- connect

    async def connect(self, timeout: float | None) -> HTTP11Connection | HTTP2Connection:
        """Connect and handshake; the connection of the protocol the upstream chose."""
        try:
            stream = await self._backend.connect_tcp(self._host, self._port, timeout)
            stream = await stream.start_tls(self._ssl_context, self._host, timeout)
        except BaseException as error:
            self._failed = True
            mapped = as_httpx(error)
            if mapped is error:
                raise
            raise mapped from error
        assert isinstance(stream, AsyncioStream)
        ssl_object = stream.get_extra_info("ssl_object")
        chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        if chosen == "h2":
            connection = HTTP2Connection(
                self._host, self._port, self._ssl_context, self._authority, self._keepalive_expiry
            )
            connection.adopt(stream)
            return connection
        return HTTP11Connection(
            self._backend, self._host, self._port, self._ssl_context, self._keepalive_expiry, stream=stream
        )

    def __repr__(self) -> str:
        return f"<NegotiatingConnection {self._host}:{self._port}>"
