"""What the sidecar reads and drives inside httpcore's HTTP/2 connection and its h2 state machine.

Two things the pool needs are not in httpcore's public API: how many streams
a connection grants (httpcore caps them at the server's
MAX_CONCURRENT_STREAMS and makes extra streams wait with no timeout), and the
h2 state machine it keeps per connection (to reset a stream whose response
was abandoned, which httpcore does not do: see docs/http2.md).  Each read is a
named function here that answers "unknown" when the internals are not what
we know; the checks at the bottom verify them on the installed versions (see
sidecar/compat/__init__.py) and switch to the fallback when they are not.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Container
from typing import Any

import h2.connection
import h2.settings
import hpack
import httpcore
from hyperframe.frame import DataFrame, HeadersFrame, SettingsFrame

from .checks import SelfCheck, register
from .httpcore import inner_connection, inner_connection_problem

# Switched off by a failed self-check: the reads below then answer "unknown".
_grant_visible = True
_state_visible = True

_ORIGIN = httpcore.Origin(b"https", b"127.0.0.1", 1)
_CHECK_STREAMS = 7  # MAX_CONCURRENT_STREAMS the offline exchange's server grants


# ------------------------------------------------------------ the reads


def protocol_of(conn: httpcore.AsyncHTTPConnection) -> str | None:
    """The protocol ``conn`` speaks once connected ("HTTP/2" or "HTTP/1.1"), else None."""
    inner = inner_connection(conn)
    if inner is None:
        return None
    return "HTTP/2" if isinstance(inner, httpcore.AsyncHTTP2Connection) else "HTTP/1.1"


def granted_streams(conn: httpcore.AsyncHTTPConnection) -> int | None:
    """Streams httpcore will run at once on ``conn``: min(server's
    MAX_CONCURRENT_STREAMS, 100); None before the connection is set up, or unknown."""
    if not _grant_visible:
        return None
    granted = getattr(inner_connection(conn), "_max_streams", None)
    return granted if isinstance(granted, int) else None


def h2_state_of(conn: httpcore.AsyncHTTPConnection) -> httpcore.AsyncHTTP2Connection | None:
    """httpcore's HTTP/2 connection inside ``conn``, if it has the internals the functions below use."""
    if not _state_visible:
        return None
    inner = inner_connection(conn)
    if not isinstance(inner, httpcore.AsyncHTTP2Connection):
        return None
    state = getattr(inner, "_h2_state", None)
    if not isinstance(state, h2.connection.H2Connection) or not isinstance(getattr(inner, "_events", None), dict):
        return None
    return inner


def state_machine(inner: httpcore.AsyncHTTP2Connection) -> h2.connection.H2Connection:
    """The h2 state machine of a connection :func:`h2_state_of` returned."""
    state: h2.connection.H2Connection = inner._h2_state
    return state


def pending_events(inner: httpcore.AsyncHTTP2Connection, stream_id: int) -> list[Any]:
    """The events httpcore received for a stream and has not handed out yet (the list itself)."""
    events: list[Any] = inner._events.get(stream_id, [])
    return events


def tracked_streams(inner: httpcore.AsyncHTTP2Connection) -> Container[int]:
    """The stream ids httpcore still has a request waiting on."""
    tracked: dict[int, Any] = inner._events
    return tracked


def open_client_streams(inner: httpcore.AsyncHTTP2Connection) -> list[int]:
    """Streams we opened that h2 still counts as open."""
    streams = state_machine(inner).streams
    return [stream_id for stream_id, stream in list(streams.items()) if stream_id % 2 == 1 and not stream.closed]


def stream_is_open(inner: httpcore.AsyncHTTP2Connection, stream_id: int) -> bool:
    stream = state_machine(inner).streams.get(stream_id)
    return stream is not None and not stream.closed


async def flush(inner: httpcore.AsyncHTTP2Connection, request: httpcore.Request) -> None:
    """Write out what the state machine has queued (RST_STREAM, WINDOW_UPDATE).
    A failure marks the connection broken in httpcore, so the pool drops it."""
    with contextlib.suppress(Exception):
        await inner._write_outgoing_data(request)


# ------------------------------------------------------------ self-checks


def _exchange() -> tuple[httpcore.HTTP2Connection, list[str]]:
    """One offline HTTP/2 exchange on httpcore's sync twin of the async
    connection (generated from the same source), and the trace events it emitted."""
    server = (
        SettingsFrame(0, settings={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: _CHECK_STREAMS}).serialize()
        + HeadersFrame(1, data=hpack.Encoder().encode([(":status", "200")]), flags=["END_HEADERS"]).serialize()
        + DataFrame(1, b"ok", flags=["END_STREAM"]).serialize()
    )
    seen: list[str] = []

    def trace(name: str, info: dict[str, Any]) -> None:
        seen.append(name)

    conn = httpcore.HTTP2Connection(origin=_ORIGIN, stream=httpcore.MockStream([server], http2=True))
    request = httpcore.Request(b"GET", "https://127.0.0.1:1/", headers=[(b"Host", b"127.0.0.1")])
    request.extensions["trace"] = trace
    reply = conn.handle_request(request)
    reply.read()
    return conn, seen


def _sets(cls: type, method: str, attribute: str) -> bool:
    function = getattr(cls, method, None)
    return attribute in getattr(getattr(function, "__code__", None), "co_names", ())


def _check_grant() -> str | None:
    cls = httpcore.AsyncHTTP2Connection
    if not (
        _sets(cls, "handle_async_request", "_max_streams")
        and _sets(cls, "_receive_remote_settings_change", "_max_streams")
    ):
        return "AsyncHTTP2Connection does not keep the streams it grants in _max_streams"
    problem = inner_connection_problem()
    if problem is not None:
        return problem
    twin, _ = _exchange()
    granted = getattr(twin, "_max_streams", None)
    if granted != _CHECK_STREAMS:
        return f"_max_streams is {granted!r} after the server granted {_CHECK_STREAMS} streams"
    return None


def _check_state() -> str | None:
    inner = httpcore.AsyncHTTP2Connection(origin=_ORIGIN, stream=httpcore.AsyncMockStream([]))
    if not isinstance(getattr(inner, "_h2_state", None), h2.connection.H2Connection):
        return "AsyncHTTP2Connection has no _h2_state (an h2.connection.H2Connection)"
    if not isinstance(getattr(inner, "_events", None), dict):
        return "AsyncHTTP2Connection has no _events (pending events per stream id)"
    if not inspect.iscoroutinefunction(getattr(inner, "_write_outgoing_data", None)):
        return "AsyncHTTP2Connection has no async _write_outgoing_data(request)"
    twin, _ = _exchange()
    stream = getattr(getattr(twin, "_h2_state", None), "streams", {}).get(1)
    if stream is None or not isinstance(getattr(stream, "closed", None), bool):
        return "h2.connection.H2Connection.streams does not hold the streams with their closed state"
    if 1 not in getattr(twin, "_events", {}):
        return "_events is not keyed by the stream ids of requests in progress"
    return None


def _check_header_events() -> str | None:
    _, seen = _exchange()
    expected = ["http2.receive_response_headers.started", "http2.receive_response_headers.complete"]
    heads = [name for name in seen if name.startswith("http2.receive_response_headers.")]
    if heads != expected:
        return f"trace events around the response head are {heads}, not {expected}"
    return None


def _no_grant() -> None:
    global _grant_visible
    _grant_visible = False


def _no_state() -> None:
    global _state_visible
    _state_visible = False


STREAM_GRANT = register(
    SelfCheck(
        ("httpcore", "h2"),
        "the number of streams an HTTP/2 connection grants",
        _check_grant,
        "one request at a time per HTTP/2 connection",
        _no_grant,
    )
)
STREAM_STATE = register(
    SelfCheck(
        ("httpcore", "h2"),
        "the HTTP/2 state machine (to reset abandoned streams)",
        _check_state,
        "a connection whose response is abandoned takes no new requests and closes once its streams end",
        _no_state,
    )
)
HEADER_EVENTS = register(
    SelfCheck(
        ("httpcore", "h2"),
        "the trace events around the HTTP/2 response-head wait (timeouts.read)",
        _check_header_events,
    )
)
