"""What httpcore's HTTP/2 connection leaves undone when a stream is abandoned.

httpcore 1.0.x sends no RST_STREAM when a response is closed before its end
(encode/httpcore#943, TRAPS.md §9): it forgets the stream, drops the DATA
frames that keep arriving for it without acknowledging them, and so every
abandoned download eats up to 16 MiB of the connection's receive window until
no stream on the connection can receive anything, and h2 still counts the
stream as open until "Max outbound streams" is reached.

The fix works on the sans-IO h2 state machine that httpcore keeps per
connection: reset the stream (h2 then acknowledges, at connection level, any
DATA still in flight for it), give back the window held by DATA that was
received but never read, and write the resulting frames out.  Those are
private attributes of httpcore; :func:`h2_state_of` checks that they are what
we expect, and callers fall back to retiring the connection when they are not.
"""

from __future__ import annotations

import contextlib
from typing import Any

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import httpcore
from httpcore._async.http2 import AsyncHTTP2Connection


def h2_state_of(conn: httpcore.AsyncHTTPConnection) -> AsyncHTTP2Connection | None:
    """httpcore's HTTP/2 connection inside ``conn``, if it has the internals we use."""
    inner = getattr(conn, "_connection", None)
    if not isinstance(inner, AsyncHTTP2Connection):
        return None
    state = getattr(inner, "_h2_state", None)
    if not isinstance(state, h2.connection.H2Connection) or not isinstance(getattr(inner, "_events", None), dict):
        return None
    return inner


def protocol_of(conn: httpcore.AsyncHTTPConnection) -> str | None:
    """The protocol ``conn`` speaks once connected ("HTTP/2" or "HTTP/1.1"), else None."""
    inner = getattr(conn, "_connection", None)
    if inner is None:
        return None
    return "HTTP/2" if isinstance(inner, AsyncHTTP2Connection) else "HTTP/1.1"


def granted_streams(conn: httpcore.AsyncHTTPConnection) -> int | None:
    """Streams httpcore will run at once on ``conn``: min(server's
    MAX_CONCURRENT_STREAMS, 100); None before the connection is set up."""
    granted = getattr(getattr(conn, "_connection", None), "_max_streams", None)
    return granted if isinstance(granted, int) else None


def cancel_stream(inner: AsyncHTTP2Connection, stream_id: int) -> None:
    """Reset one stream whose response is abandoned and release the window its
    unread DATA holds.  Synchronous: call before httpcore forgets the stream."""
    state: h2.connection.H2Connection = inner._h2_state
    pending: list[Any] = inner._events.get(stream_id, [])
    unread = sum(event.flow_controlled_length or 0 for event in pending if isinstance(event, h2.events.DataReceived))
    pending[:] = [event for event in pending if not isinstance(event, h2.events.DataReceived)]
    with contextlib.suppress(h2.exceptions.ProtocolError):
        _reset(state, stream_id)
        if unread:
            state.acknowledge_received_data(unread, stream_id)


def cancel_orphans(inner: AsyncHTTP2Connection) -> int:
    """Reset every stream h2 still holds open that httpcore has forgotten (a
    request that failed or was cancelled before its response headers)."""
    state: h2.connection.H2Connection = inner._h2_state
    orphans = [
        stream_id
        for stream_id, stream in list(state.streams.items())
        if stream_id % 2 == 1 and not stream.closed and stream_id not in inner._events
    ]
    with contextlib.suppress(h2.exceptions.ProtocolError):
        for stream_id in orphans:
            _reset(state, stream_id)
    return len(orphans)


def _reset(state: h2.connection.H2Connection, stream_id: int) -> None:
    stream = state.streams.get(stream_id)
    if stream is not None and not stream.closed:
        state.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)


async def flush(inner: AsyncHTTP2Connection, request: httpcore.Request) -> None:
    """Write out what the state machine has queued (RST_STREAM, WINDOW_UPDATE).
    A failure marks the connection broken in httpcore, so the pool drops it."""
    with contextlib.suppress(Exception):
        await inner._write_outgoing_data(request)
