"""The pool's look at a connection's unread bytes fails safe."""

from __future__ import annotations

import httpcore

from sidecar.transport import has_unread_bytes


def test_unknown_internals_count_as_unread() -> None:
    # Not yet connected: there is no HTTP/1.1 parser to ask, so it is not vouched for.
    conn = httpcore.AsyncHTTPConnection(origin=httpcore.Origin(b"http", b"127.0.0.1", 1))
    assert has_unread_bytes(conn) is True
    assert has_unread_bytes(object()) is True  # type: ignore[arg-type]
