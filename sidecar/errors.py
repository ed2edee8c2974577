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
    │   ├── RateLimited                429    rate_limited
    │   ├── UpstreamRateLimited        429    upstream_rate_limited
    │   ├── UpstreamPaused             503    upstream_paused
    │   └── CircuitOpen                503    circuit_open
    ├── DeadlineExceeded               504    deadline_exceeded
    ├── UpstreamError
    │   ├── UpstreamConnectError       502    upstream_connect_error
    │   ├── UpstreamProtocolError      502    upstream_protocol_error
    │   ├── UpstreamTimeout            504    upstream_timeout
    │   └── UpstreamBodyError          —      upstream_body_error (after the headers: the caller's
    │                                         connection is aborted, nothing is answered)
    ├── ClientDisconnected             (499)  client_disconnected (the caller left: nothing is sent)
    └── InternalError                  500    internal_error

Every way a request can end is a member of this tree: its ``code`` is the
access log's ``error`` and the ``/pools`` outcome, and ``counted_as`` says
which metric counts it (:func:`codes_counted_as`; ``sidecar/metrics.py``
derives its label sets from it).  Third-party exceptions are translated into
this tree at exactly one boundary each: :func:`from_upstream_exception`
(httpx/httpcore) and :func:`from_parser_error` (aiohttp's request parser).
"""

from __future__ import annotations

import json
import re
import ssl
from typing import ClassVar, Literal

import httpcore
import httpx
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine, HttpProcessingError, LineTooLong

from .compat.aiohttp import Http11Response


class SidecarError(Exception):
    """An error the sidecar answers itself, with its status and code (see docs/backpressure.md, "Errors")."""

    status: int = 500
    code: str = "internal_error"
    # Which metric counts a request that ended so: "rejected" (answered by the
    # sidecar without an upstream response: sidecar_rejected_requests_total),
    # "upstream" (the upstream failed: sidecar_upstream_errors_total), or
    # neither.  ``client_error``: also counted in sidecar_client_errors_total.
    counted_as: ClassVar[Literal["rejected", "upstream"] | None] = None
    client_error: ClassVar[bool] = False

    def __init__(self, message: str, *, upstream: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.upstream = upstream


class NoRoute(SidecarError):
    status, code = 404, "no_route"
    counted_as = "rejected"


class DestinationNotAllowed(SidecarError):
    status, code = 403, "destination_not_allowed"
    counted_as = "rejected"


class ConnectNotSupported(SidecarError):
    status, code = 405, "connect_not_supported"
    counted_as = "rejected"


class BadRequest(SidecarError):
    status, code = 400, "bad_request"
    counted_as = "rejected"


class BadFraming(BadRequest):
    """The request body's framing cannot be trusted: nothing after this head can be
    told apart from a next request, so the connection is closed after the answer."""


class RequestTimeout(SidecarError):
    """The caller stalled while sending its request body (inbound.body_idle_timeout)."""

    status, code = 408, "request_timeout"
    client_error = True


class RequestTooLarge(SidecarError):
    status, code = 413, "request_too_large"
    counted_as = "rejected"
    client_error = True


class UriTooLong(SidecarError):
    status, code = 414, "uri_too_long"


class HeadersTooLarge(SidecarError):
    status, code = 431, "headers_too_large"


class HttpVersionNotSupported(SidecarError):
    """A request in an HTTP version other than 1.0 and 1.1; the connection is closed."""

    status, code = 505, "http_version_not_supported"
    client_error = True


class Rejected(SidecarError):
    """Refused for lack of capacity: 503 (429 for a rate limit), always with Retry-After."""

    status = 503
    counted_as = "rejected"

    def __init__(self, message: str, *, upstream: str | None = None, retry_after: int = 1) -> None:
        super().__init__(message, upstream=upstream)
        self.retry_after = max(1, retry_after)


class QueueFull(Rejected):
    code = "queue_full"


class PoolTimeout(Rejected):
    code = "pool_timeout"


class Draining(Rejected):
    code = "draining"


class RateLimited(Rejected):
    """The upstream's configured rate limit has no token within the request's wait allowance."""

    status, code = 429, "rate_limited"


class DeadlineExceeded(SidecarError):
    """The caller's own ``X-Sidecar-Timeout`` budget ran out before response headers."""

    status, code = 504, "deadline_exceeded"
    counted_as = "rejected"


class CircuitOpen(Rejected):
    """The upstream's circuit is open (or half-open with its probe out);
    Retry-After is the time until it half-opens."""

    code = "circuit_open"


class UpstreamRateLimited(Rejected):
    """The upstream announced a limit (a 429 Retry-After, or a quota) still in force."""

    status, code = 429, "upstream_rate_limited"


class UpstreamPaused(Rejected):
    """The upstream asked for a pause with 503 + Retry-After, still in force."""

    code = "upstream_paused"


class SharedLimitsUnavailable(Rejected):
    """Redis, where the shared limits are counted, did not answer (``on_error: deny``)."""

    code = "shared_limits_unavailable"


class UpstreamError(SidecarError):
    counted_as = "upstream"
    """The upstream failed before its response headers arrived."""

    status = 502


class UpstreamConnectError(UpstreamError):
    code = "upstream_connect_error"


class UpstreamProtocolError(UpstreamError):
    code = "upstream_protocol_error"


class UpstreamTimeout(UpstreamError):
    status, code = 504, "upstream_timeout"


class UpstreamBodyError(UpstreamError):
    """The upstream failed after its response headers went to the caller: the
    caller's connection is aborted (never answered), so no truncated body can
    pass for a complete one."""

    code = "upstream_body_error"


class ClientDisconnected(SidecarError):
    """The caller left before its answer was complete: nothing is sent.

    Counted with status 499 (nginx's "client closed request") so that request
    rates add up; the access log shows ``status: null``.
    """

    status, code = 499, "client_disconnected"


class InternalError(SidecarError):
    """A bug of the sidecar's: 500, and its traceback in the log."""

    status, code = 500, "internal_error"


def _members(root: type[SidecarError]) -> list[type[SidecarError]]:
    found = [root]
    for child in root.__subclasses__():
        found.extend(_members(child))
    return found


def _coded() -> list[type[SidecarError]]:
    # Classes that name their own code; abstract groups (Rejected,
    # UpstreamError) only inherit the base's.
    return [member for member in _members(SidecarError) if "code" in vars(member)]


def codes_counted_as(kind: Literal["rejected", "upstream"]) -> frozenset[str]:
    """The codes a metric counts, from the tree itself (never a copied list)."""
    return frozenset(member.code for member in _coded() if member.counted_as == kind)


def client_error_codes() -> frozenset[str]:
    """The request-level codes also counted in sidecar_client_errors_total."""
    return frozenset(member.code for member in _coded() if member.client_error)


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


def attempt_failure(exc: BaseException) -> str | None:
    """How an attempt failed before response headers, in ``retry_on`` terms.

    ``connect_error``: the request never reached the upstream (refused, DNS,
    TLS, connect timeout, an HTTP/2 stream refused with REFUSED_STREAM or cut
    by a GOAWAY above it), so it is safe to send again whatever the method.
    ``timeout``: no response head within the read (or write) timeout.
    ``reset``: the connection broke after the request went out.  None: not
    the upstream's failure (the connection pool had no room).
    """
    if isinstance(exc, httpx.PoolTimeout):
        return None
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)) or _not_processed(exc):
        return "connect_error"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.TransportError):
        return "reset"
    return None


def _not_processed(exc: BaseException) -> bool:
    """An HTTP/2 refusal that guarantees the upstream did not process the request."""
    cause: BaseException | None = exc
    for _ in range(8):  # a short chain: httpx error ← httpcore error ← the event
        if cause is None:
            return False
        if isinstance(cause, httpcore.ConnectionNotAvailable):
            return True  # GOAWAY below our stream id, REFUSED_STREAM, or closed before the stream opened
        cause = cause.__cause__ or cause.__context__
    return False


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


def from_parser_error(
    exc: HttpProcessingError, *, line_too_long: bool, max_line_size: int, max_field_size: int, max_headers: int
) -> SidecarError:
    """Translate a request the HTTP parser refused into our tree.

    ``line_too_long``: the request line alone was over ``max_line_size`` (the
    parser says "line too long" for a header as well: 414 versus 431).
    """
    if isinstance(exc, LineTooLong):
        if line_too_long:
            return UriTooLong(f"request line is longer than {max_line_size} bytes")
        return HeadersTooLarge(f"a request header is longer than {max_field_size} bytes")
    text = exc.message if isinstance(exc.message, str) else str(exc)
    if isinstance(exc, BadHttpMessage) and text.startswith("Too many headers"):
        return HeadersTooLarge(f"more than {max_headers} request headers")
    if isinstance(exc, BadStatusLine) and "Invalid HTTP version" in text:
        # llhttp's word for a well-formed HTTP/x.y it does not speak (HTTP/1.2,
        # HTTP/3.0); the pure-Python parser lets those through to the handler,
        # which answers 505 too.
        return HttpVersionNotSupported("only HTTP/1.1 (and 1.0) requests are supported")
    first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    reason = without_quoted_bytes(first_line)[:120]
    return BadRequest(f"malformed request: {reason or type(exc).__name__}")


def without_quoted_bytes(text: str) -> str:
    """``"illegal header line: bytearray(b'...')"`` → ``"illegal header line"``."""
    return _QUOTED_BYTES.sub("", text).strip().rstrip(":")


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
    response = Http11Response(
        as_http11=as_http11, status=error.status, text=body, content_type="application/json", headers=headers
    )
    if close:
        # The header alone would be a lie: aiohttp keeps the connection open
        # unless told to close it, and then writes "Connection: close" itself.
        response.force_close()
    return response
