"""What httpcore's HTTP/2 connection leaves undone when a stream is abandoned.

httpcore 1.0.x sends no RST_STREAM when a response is closed before its end
(encode/httpcore#943, see docs/http2.md): it forgets the stream, drops the
DATA frames that keep arriving for it without acknowledging them, and so
every abandoned download eats up to 16 MiB of the connection's receive
window until no stream on the connection can receive anything, and h2 still
counts the stream as open until "Max outbound streams" is reached.

The fix works on the sans-IO h2 state machine that httpcore keeps per
connection: reset the stream (h2 then acknowledges, at connection level, any
DATA still in flight for it), give back the window held by DATA that was
received but never read, and write the resulting frames out.  Reaching that
state machine goes through sidecar/compat/h2.py; when it cannot
(:func:`~sidecar.compat.h2.h2_state_of` answers None) callers retire the
connection instead.
"""

from __future__ import annotations

import contextlib

import h2.errors
import h2.events
import h2.exceptions
import httpcore

from ..compat import h2 as h2_compat


def cancel_stream(inner: httpcore.AsyncHTTP2Connection, stream_id: int) -> None:
    """Reset one stream whose response is abandoned and release the window its
    unread DATA holds.  Synchronous: call before httpcore forgets the stream."""
    state = h2_compat.state_machine(inner)
    pending = h2_compat.pending_events(inner, stream_id)
    unread = sum(event.flow_controlled_length or 0 for event in pending if isinstance(event, h2.events.DataReceived))
    pending[:] = [event for event in pending if not isinstance(event, h2.events.DataReceived)]
    with contextlib.suppress(h2.exceptions.ProtocolError):
        _reset(inner, stream_id)
        if unread:
            state.acknowledge_received_data(unread, stream_id)


def cancel_orphans(inner: httpcore.AsyncHTTP2Connection) -> int:
    """Reset every stream h2 still holds open that httpcore has forgotten (a
    request that failed or was cancelled before its response headers)."""
    tracked = h2_compat.tracked_streams(inner)
    orphans = [stream_id for stream_id in h2_compat.open_client_streams(inner) if stream_id not in tracked]
    with contextlib.suppress(h2.exceptions.ProtocolError):
        for stream_id in orphans:
            _reset(inner, stream_id)
    return len(orphans)


def _reset(inner: httpcore.AsyncHTTP2Connection, stream_id: int) -> None:
    if h2_compat.stream_is_open(inner, stream_id):
        h2_compat.state_machine(inner).reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
