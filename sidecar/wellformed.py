"""What a request must look like before anything of it is forwarded.

Checks on the request as parsed, before routing: an HTTP version the sidecar
speaks, and body framing the caller and the sidecar cannot disagree on (see
docs/routing-and-forwarding.md, "What a request must look like").  And, for
a request refused that way, the rule that nothing after its head is read.
"""

from __future__ import annotations

from aiohttp import HttpVersion10, HttpVersion11, hdrs, web

from .errors import BadFraming, ConnectNotSupported, Draining, HttpVersionNotSupported, RequestTimeout

SPOKEN_VERSIONS = (HttpVersion10, HttpVersion11)
# Errors after which the connection is closed. For CONNECT, untrusted framing
# and an HTTP version we do not speak, what follows the head cannot be trusted
# to be a next request: for CONNECT it is tunnel data (or a body the parser may
# not even frame), and reading it as a request would forward bytes the caller's
# side never inspected as one.
CLOSES_THE_CONNECTION = (Draining, RequestTimeout, ConnectNotSupported, BadFraming, HttpVersionNotSupported)
# Refused before their body is read, and what follows their head is not to be
# read at all (see refuse_to_read_on).
UNREAD = (ConnectNotSupported, BadFraming, HttpVersionNotSupported)


def check_version(request: web.BaseRequest) -> None:
    """Only HTTP/1.0 and 1.1: both parsers let other versions through (llhttp reads a
    request line without one as HTTP/0.9), and aiohttp would answer in that version."""
    version = request.version
    if version not in SPOKEN_VERSIONS:
        raise HttpVersionNotSupported(
            f"HTTP/{version.major}.{version.minor} is not supported: the sidecar speaks HTTP/1.1 (and 1.0)"
        )


def check_framing(request: web.BaseRequest) -> None:
    """Refuse a Transfer-Encoding other than one ``chunked`` on an HTTP/1.1 request.

    Both aiohttp parsers only look at the last coding: ``gzip, chunked`` was read
    as chunked and forwarded without its gzip coding (a corrupted body), and the
    pure-Python one takes ``chunked, chunked`` as well. Any other list is a
    framing the caller and the sidecar may not agree on (RFC 9112 §6.3), and in
    an HTTP/1.0 request Transfer-Encoding means faulty framing (RFC 9112 §6.1).
    """
    codings = request.headers.getall(hdrs.TRANSFER_ENCODING, ())
    if not codings:
        return
    if request.version != HttpVersion11:
        raise BadFraming("Transfer-Encoding is not allowed in an HTTP/1.0 request")
    if len(codings) != 1 or codings[0].strip(" \t").lower() != "chunked":
        raise BadFraming("the only request Transfer-Encoding accepted is a single 'chunked'")


class NotRead(TimeoutError):
    """Set on the body stream of a request whose remaining bytes we will not read.

    A TimeoutError so that aiohttp's lingering read of an unread body stops at
    once instead of reading (and discarding) for up to its lingering time before
    closing.
    """


def refuse_to_read_on(request: web.BaseRequest) -> None:
    """Let the connection close right after the answer, not after aiohttp's lingering
    read: a refused CONNECT is followed by the tunnel the caller thinks it opened,
    which may never end, and a body with untrusted framing has no known end."""
    stream = request.content
    if not stream.is_eof():
        stream.set_exception(NotRead())


def asks_upgrade(request: web.BaseRequest) -> bool:
    return hdrs.UPGRADE in request.headers
