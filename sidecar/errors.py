"""Every response the sidecar makes itself, and the one place that maps to them.

The error tree::

    SidecarError                      status  X-Sidecar-Error
    ├── NoRoute                        404    no_route
    ├── DestinationNotAllowed          403    destination_not_allowed
    ├── ConnectNotSupported            405    connect_not_supported
    ├── BadRequest                     400    bad_request
    │   └── BadFraming                 400    bad_request (and the connection is closed)
    ├── RequestTimeout                 408    request_timeout
    ├── RequestTooLarge                413    request_too_large
    ├── UriTooLong                     414    uri_too_long
    ├── HeadersTooLarge                431    headers_too_large
    ├── HttpVersionNotSupported        505    http_version_not_supported
    ├── Rejected (503, Retry-After)
    │   ├── QueueFull                  503    queue_full
    │   ├── PoolTimeout                503    pool_timeout
    │   ├── Draining                   503    draining
    │   ├── UpstreamRateLimited        429    upstream_rate_limited
    │   └── UpstreamPaused             503    upstream_paused
    └── UpstreamError
        ├── UpstreamConnectError       502    upstream_connect_error
        ├── UpstreamProtocolError      502    upstream_protocol_error
        └── UpstreamTimeout            504    upstream_timeout

Third-party (httpx/httpcore) exceptions are translated into this tree at
exactly one boundary: :func:`from_upstream_exception`.
"""

from __future__ import annotations

import json
import re
import ssl
from typing import Any

import httpx
from aiohttp import web


class SidecarError(Exception):
    """An error the sidecar answers itself, with its status and code (see docs/backpressure.md, "Errors")."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, upstream: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.upstream = upstream


class NoRoute(SidecarError):
    status, code = 404, "no_route"


class DestinationNotAllowed(SidecarError):
    status, code = 403, "destination_not_allowed"


class ConnectNotSupported(SidecarError):
    status, code = 405, "connect_not_supported"


class BadRequest(SidecarError):
    status, code = 400, "bad_request"


class BadFraming(BadRequest):
    """The request body's framing cannot be trusted: nothing after this head can be
    told apart from a next request, so the connection is closed after the answer."""


class RequestTimeout(SidecarError):
    """The caller stalled while sending its request body (inbound.body_idle_timeout)."""

    status, code = 408, "request_timeout"


class RequestTooLarge(SidecarError):
    status, code = 413, "request_too_large"


class UriTooLong(SidecarError):
    status, code = 414, "uri_too_long"


class HeadersTooLarge(SidecarError):
    status, code = 431, "headers_too_large"


class HttpVersionNotSupported(SidecarError):
    """A request in an HTTP version other than 1.0 and 1.1; the connection is closed."""

    status, code = 505, "http_version_not_supported"


class Rejected(SidecarError):
    """Refused for lack of capacity: always 503 with Retry-After."""

    status = 503

    def __init__(self, message: str, *, upstream: str | None = None, retry_after: int = 1) -> None:
        super().__init__(message, upstream=upstream)
        self.retry_after = max(1, retry_after)


class QueueFull(Rejected):
    code = "queue_full"


class PoolTimeout(Rejected):
    code = "pool_timeout"


class Draining(Rejected):
    code = "draining"


class UpstreamRateLimited(Rejected):
    """The upstream announced a limit (a 429 Retry-After, or a quota) still in force."""

    status, code = 429, "upstream_rate_limited"


class UpstreamPaused(Rejected):
    """The upstream asked for a pause with 503 + Retry-After, still in force."""

    code = "upstream_paused"


class UpstreamError(SidecarError):
    """The upstream failed before its response headers arrived."""

    status = 502


class UpstreamConnectError(UpstreamError):
    code = "upstream_connect_error"


class UpstreamProtocolError(UpstreamError):
    code = "upstream_protocol_error"


class UpstreamTimeout(UpstreamError):
    status, code = 504, "upstream_timeout"


def from_upstream_exception(exc: Exception, upstream: str, *, retry_after: int = 1) -> SidecarError:
    """Translate an httpx/OS error raised before response headers into our tree.

    ``retry_after`` is the Retry-After of a refusal for lack of capacity (503).
    """
    if isinstance(exc, httpx.PoolTimeout):
        # The connection pool's own safety net (e.g. an HTTP/2 upstream allows
        # fewer streams than admission let in): capacity, not an upstream fault.
        return PoolTimeout(
            "no upstream connection or stream became free in time", upstream=upstream, retry_after=retry_after
        )
    if isinstance(exc, (httpx.ConnectTimeout, httpx.ReadTimeout, httpx.WriteTimeout)):
        phase = {httpx.ConnectTimeout: "connecting", httpx.ReadTimeout: "waiting for response headers"}
        what = phase.get(type(exc), "sending the request")
        return UpstreamTimeout(f"upstream timed out while {what}", upstream=upstream)
    if isinstance(exc, httpx.ConnectError):
        return UpstreamConnectError(f"cannot connect to upstream: {_reason(exc)}", upstream=upstream)
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout("upstream timed out", upstream=upstream)
    return UpstreamProtocolError(
        f"upstream closed or broke protocol before response headers: {_reason(exc)}", upstream=upstream
    )


def _reason(exc: BaseException) -> str:
    """A short, secret-free reason: the innermost cause's message."""
    cause: BaseException = exc
    while cause.__cause__ is not None or cause.__context__ is not None:
        nxt = cause.__cause__ or cause.__context__
        assert nxt is not None
        cause = nxt
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        return f"TLS handshake failed: {cause.reason or cause}"
    text = str(exc) or str(cause) or type(cause).__name__
    return without_quoted_bytes(text.splitlines()[0])[:300] or type(cause).__name__


# Parser errors (h11, aiohttp) quote the offending bytes; a message must not
# carry them back to a caller (header injection, reflected content).
_QUOTED_BYTES = re.compile(r":?\s*(?:b['\"]|bytearray\().*", re.DOTALL)


def without_quoted_bytes(text: str) -> str:
    """``"illegal header line: bytearray(b'...')"`` → ``"illegal header line"``."""
    return _QUOTED_BYTES.sub("", text).strip().rstrip(":")


class _ErrorResponse(web.Response):
    """A response whose status line can say HTTP/1.1 whatever the request said.

    aiohttp echoes the request's version: it would answer "HTTP/2.0 505" to an
    HTTP/2.0 request, and "HTTP/1.0 400" to a request it could not parse (for
    which it makes up an HTTP/1.0 one). A server answers in the highest version
    it speaks that the caller can read (RFC 9110 §6.2): HTTP/1.1.
    """

    __slots__ = ("_as_http11",)

    def __init__(self, *, as_http11: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._as_http11 = as_http11

    async def _write_headers(self) -> None:
        if not self._as_http11:
            await super()._write_headers()
            return
        writer = self._payload_writer
        assert writer is not None
        await writer.write_headers(f"HTTP/1.1 {self.status} {self.reason}", self._headers)
        if self._send_headers_immediately:
            writer.send_headers()


def error_response(
    error: SidecarError, request_id: str, *, close: bool = False, as_http11: bool = False
) -> web.Response:
    """The response for an error (see docs/backpressure.md, "Errors"): status, X-Sidecar-Error, JSON body.

    ``as_http11``: the status line says HTTP/1.1 whatever the request's version
    (one we do not speak, or unknown because the request could not be parsed).
    """
    body = json.dumps(
        {"error": error.code, "message": error.message, "upstream": error.upstream, "request_id": request_id}
    )
    headers = {"X-Sidecar-Error": error.code, "X-Request-Id": request_id}
    if isinstance(error, Rejected):
        headers["Retry-After"] = str(error.retry_after)
    if close and as_http11:
        # aiohttp only writes it itself in answer to an HTTP/1.1 request.
        headers["Connection"] = "close"
    response = _ErrorResponse(
        as_http11=as_http11, status=error.status, text=body, content_type="application/json", headers=headers
    )
    if close:
        # The header alone would be a lie: aiohttp keeps the connection open
        # unless told to close it, and then writes "Connection: close" itself.
        response.force_close()
    return response
