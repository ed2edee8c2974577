"""What the sidecar reads and changes inside httpcore and h11, and the checks that it still can.

httpcore's connection classes are public, but what the pool needs to know of
a connection is not: whether its HTTP/1.1 parser holds bytes past the last
response, which network stream it reads, how its locks are built.  Each of
those reads is a named function here, failing safe when the internals are
not what we know; the checks at the bottom verify them on the installed
versions (see sidecar/compat/__init__.py), and switch to the fallback when
they are not.
"""

from __future__ import annotations

from typing import Any

import anyio
import h11
import httpcore
from httpcore import _synchronization

from .checks import SelfCheck, register

# httpcore's trace events around the wait for a response head, on either
# protocol: it starts once the request (body included) has been sent, and
# ends with the final response head (interim 1xx responses do not end it).
HEADERS_STARTED = frozenset({"http11.receive_response_headers.started", "http2.receive_response_headers.started"})
HEADERS_ENDED = frozenset(
    f"{protocol}.receive_response_headers.{end}" for protocol in ("http11", "http2") for end in ("complete", "failed")
)

# Switched off by a failed self-check: the reads below then give their safe answer.
_h11_buffer_visible = True
_network_stream_visible = True
_fast_locks_usable = True

_ORIGIN = httpcore.Origin(b"http", b"127.0.0.1", 1)


# ------------------------------------------------------------ the reads


def inner_connection(conn: httpcore.AsyncHTTPConnection) -> object | None:
    """The protocol connection (HTTP/1.1 or HTTP/2) inside ``conn``; None before it connected."""
    return getattr(conn, "_connection", None)


def has_unread_bytes(conn: httpcore.AsyncHTTPConnection) -> bool:
    """Has this HTTP/1.1 connection received bytes beyond its last complete response?

    httpcore does not say, so this reads its parser's buffer (h11's
    ``trailing_data``: the unparsed bytes and whether the peer closed).  When
    those internals are not what we know, the answer is "yes": a connection
    we cannot vouch for is not reused.
    """
    if not _h11_buffer_visible:
        return True
    try:
        state = conn._connection._h11_state  # type: ignore[union-attr]
        data, closed = state.trailing_data
    except (AttributeError, TypeError, ValueError):
        return True
    if not isinstance(data, (bytes, bytearray)) or not isinstance(closed, bool):
        return True
    return bool(data) or closed


def network_stream_of(conn: httpcore.AsyncHTTPConnection) -> httpcore.AsyncNetworkStream | None:
    """The network stream ``conn`` reads and writes, once connected; None when unknown."""
    if not _network_stream_visible:
        return None
    stream = getattr(inner_connection(conn), "_network_stream", None)
    return stream if isinstance(stream, httpcore.AsyncNetworkStream) else None


def install_fast_locks() -> None:
    """Make httpcore's asyncio locks skip anyio's yield on an uncontended acquire (idempotent).

    httpcore takes up to three ``anyio.Lock``s per request, and anyio yields to
    the loop on every *uncontended* acquire unless the lock was built with
    ``fast_acquire=True``.  The pool never runs two requests on one HTTP/1.1
    connection, so those locks are uncontended; a fast acquire still honours
    cancellation.  Process-wide: done once at start-up.
    """
    if not _fast_locks_usable:
        return
    lock_class = _synchronization.AsyncLock
    if getattr(lock_class, "_sidecar_fast", False):
        return
    original_setup = lock_class.setup

    def setup(self: _synchronization.AsyncLock) -> None:
        original_setup(self)
        if self._backend == "asyncio":
            self._anyio_lock = anyio.Lock(fast_acquire=True)

    lock_class.setup = setup  # type: ignore[method-assign]
    lock_class._sidecar_fast = True  # type: ignore[attr-defined]


# ------------------------------------------------------------ self-checks


def inner_connection_problem() -> str | None:
    """What is wrong with :func:`inner_connection` on this httpcore, or None."""
    conn = httpcore.AsyncHTTPConnection(origin=_ORIGIN)
    if not hasattr(conn, "_connection") or conn._connection is not None:
        return "AsyncHTTPConnection has no _connection (None until connected)"
    return None


def _exchange(response: bytes) -> tuple[httpcore.HTTP11Connection, list[str]]:
    """One offline HTTP/1.1 exchange on httpcore's sync twin of the async
    connection (generated from the same source), and the trace events it emitted."""
    seen: list[str] = []
    conn = httpcore.HTTP11Connection(origin=_ORIGIN, stream=httpcore.MockStream([response]))
    request = httpcore.Request(
        b"GET", "http://127.0.0.1:1/", headers=[(b"Host", b"127.0.0.1")], extensions={"trace": _recorder(seen)}
    )
    reply = conn.handle_request(request)
    reply.read()
    reply.close()
    return conn, seen


def _recorder(seen: list[str]) -> Any:
    def trace(name: str, info: dict[str, Any]) -> None:
        seen.append(name)

    return trace


def _check_h11_buffer() -> str | None:
    problem = inner_connection_problem()
    if problem is not None:
        return problem
    conn = httpcore.AsyncHTTP11Connection(origin=_ORIGIN, stream=httpcore.AsyncMockStream([]))
    state = getattr(conn, "_h11_state", None)
    if not isinstance(state, h11.Connection):
        return "AsyncHTTP11Connection has no _h11_state (an h11.Connection)"
    if getattr(state, "trailing_data", None) != (b"", False):
        return "h11.Connection.trailing_data is not (unparsed bytes, peer closed)"
    twin, _ = _exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA")
    if getattr(getattr(twin, "_h11_state", None), "trailing_data", None) != (b"EXTRA", False):
        return "bytes past a complete response are not in h11's trailing_data"
    return None


def _check_header_events() -> str | None:
    _, seen = _exchange(b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    expected = ["http11.receive_response_headers.started", "http11.receive_response_headers.complete"]
    heads = [name for name in seen if name.startswith("http11.receive_response_headers.")]
    if heads != expected:
        return f"trace events around the response head are {heads}, not {expected}"
    return None


def _check_network_stream() -> str | None:
    problem = inner_connection_problem()
    if problem is not None:
        return problem
    for cls in (httpcore.AsyncHTTP11Connection, httpcore.AsyncHTTP2Connection):
        stream = httpcore.AsyncMockStream([])
        if getattr(cls(origin=_ORIGIN, stream=stream), "_network_stream", None) is not stream:
            return f"{cls.__name__} has no _network_stream"
    return None


def _check_fast_locks() -> str | None:
    lock_class = getattr(_synchronization, "AsyncLock", None)
    setup = getattr(lock_class, "setup", None)
    names = getattr(getattr(setup, "__code__", None), "co_names", ())
    if lock_class is None or not {"_backend", "_anyio_lock"} <= set(names):
        return "httpcore._synchronization.AsyncLock.setup does not build _anyio_lock"
    try:
        anyio.Lock(fast_acquire=True)
    except TypeError:
        return "anyio.Lock takes no fast_acquire"
    return None


def _no_h11_buffer() -> None:
    global _h11_buffer_visible
    _h11_buffer_visible = False


def _no_network_stream() -> None:
    global _network_stream_visible
    _network_stream_visible = False


def _no_fast_locks() -> None:
    global _fast_locks_usable
    _fast_locks_usable = False


H11_BUFFER = register(
    SelfCheck(
        ("httpcore", "h11"),
        "the HTTP/1.1 parser's unread bytes",
        _check_h11_buffer,
        "no HTTP/1.1 connection is reused after its response",
        _no_h11_buffer,
    )
)
HEADER_EVENTS = register(
    SelfCheck(("httpcore",), "the trace events around the response-head wait (timeouts.read)", _check_header_events)
)
NETWORK_STREAM = register(
    SelfCheck(
        ("httpcore",),
        "the network stream of a connection",
        _check_network_stream,
        "a stream's read timeout never retires its HTTP/2 connection (httpcore's own read timeout still does)",
        _no_network_stream,
    )
)
FAST_LOCKS = register(
    SelfCheck(
        ("httpcore", "anyio"),
        "how httpcore builds its asyncio locks",
        _check_fast_locks,
        "httpcore's locks are left as they are (one more event-loop round trip per lock)",
        _no_fast_locks,
    )
)
