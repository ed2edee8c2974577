"""HTTP over HTTP/2 (RFC 9113 §8): what a request's fields become, what a response head must be.

Plain functions, shared by the connection core (h2core.py), which checks
every response head it receives, and the shell (h2conn.py), which turns the
request path's HTTP/1.1-style header lines into HTTP/2 fields.  The rules, and
why each matters to a proxy, are in docs/http2.md.
"""

from __future__ import annotations

Header = tuple[bytes, bytes]

# HTTP/2 has no connection-specific fields (RFC 9113 §8.2.2).
CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"})
_NOT_FORWARDED = CONNECTION_SPECIFIC | {b"host"}


class MalformedRequest(Exception):
    """A request that cannot be sent as given (the caller gets 502, nothing is sent)."""


class MalformedResponse(Exception):
    """A response head that breaks RFC 9113 §8: its stream is reset."""


def request_fields(
    method: bytes, scheme: bytes, authority: bytes, target: bytes, headers: list[Header]
) -> list[Header]:
    """The request's pseudo-headers, then its fields with lower-case names.

    ``:authority`` is the request's ``Host`` when it has one (else
    ``authority``); connection-specific fields are dropped, and ``TE`` unless
    it is ``trailers``; a CR, LF or NUL in a value (or an empty name) refuses
    the request.
    """
    fields: list[Header] = []
    for name, value in headers:
        lowered = name.lower()
        if lowered in _NOT_FORWARDED:
            if lowered == b"host":
                authority = value
            continue
        if lowered == b"te" and value.strip().lower() != b"trailers":
            continue
        fields.append((lowered, value))
    head = [(b":method", method), (b":scheme", scheme), (b":authority", authority), (b":path", target)]
    head += fields
    for name, value in head:
        if b"\r" in value or b"\n" in value or b"\0" in value or not name:
            raise MalformedRequest("a request header holds a line break or NUL")
    return head


def content_length(headers: list[Header]) -> int | None:
    """The request's Content-Length (the request path has checked it)."""
    for name, value in headers:
        if name.lower() == b"content-length":
            return int(value)
    return None


def response_head(headers: list[Header]) -> tuple[int, list[Header], int | None]:
    """(status, the regular fields, content-length) of a response head; MalformedResponse if it breaks a rule."""
    if not headers or headers[0][0] != b":status":
        raise MalformedResponse("the response head does not start with :status")
    status_text = headers[0][1]
    if len(status_text) != 3 or not status_text.isdigit() or not b"100" <= status_text <= b"599":
        raise MalformedResponse("a :status that is not three digits, 100-599")
    fields = headers[1:]
    length: int | None = None
    for name, value in fields:
        if name[:1] == b":" or not name or name.lower() != name:
            raise MalformedResponse("a pseudo-header, an empty or an upper-case field name")
        if name in CONNECTION_SPECIFIC:
            raise MalformedResponse("a connection-specific field")
        if b"\r" in value or b"\n" in value or b"\0" in value or b":" in name[1:]:
            raise MalformedResponse("CR, LF or NUL in a field value, or a colon in a name")
        if value != value.strip(b" \t"):
            raise MalformedResponse("a field value with leading or trailing whitespace")
        if name == b"content-length":
            if not value.isdigit() or len(value) > 18 or (length is not None and int(value) != length):
                raise MalformedResponse("an invalid or conflicting content-length")
            length = int(value)
    return int(status_text), fields, length
