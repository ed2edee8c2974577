"""The proxy port's connection protocol: a header-read deadline and our own parse-error answers.

aiohttp's server bounds how long an *idle* keep-alive connection may stay open,
but not how long a caller may take to send a request head: a client trickling
one header byte every few seconds (slowloris) would hold its connection, its
buffers and its task forever.  :class:`GuardedRequestHandler` adds that
deadline (``inbound.header_timeout``):

* it starts when a connection is accepted, and again with the first byte of
  every later request head on a keep-alive connection;
* it stops when the parser has the complete head;
* trickling more bytes never extends it; when it fires the connection is closed.

One loop timer per connection serves every head: it is not cancelled when a
head completes, and a timer that fires with no head in progress, or before the
current head's deadline, does nothing or waits on to it (a timer set and
cancelled for every request costs more than the rest of this guard).

It also answers requests the HTTP parser rejects with the sidecar's own error
responses (``X-Sidecar-Error`` and a JSON body, see docs/routing-and-forwarding.md) instead of aiohttp's
text pages, which echo the offending bytes and always say 400: a request line
over ``inbound.max_line_size`` gets 414, a header over ``max_field_size`` or
more than ``max_headers`` headers get 431, a well-formed version other than
HTTP/1.0 and 1.1 gets 505, anything else malformed gets 400, always with an
HTTP/1.1 status line. An HTTP/0.9 request line (no version) is answered 400 as
soon as it ends, without waiting for a blank line its client never sends.
Each is logged as one concise line, never a traceback.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from .compat.aiohttp import (
    handler_arguments,
    last_parsed_payload,
    lighten_message_queue,
    parsed_request_count,
    queue_parse_error,
)
from .errors import InternalError, SidecarError, error_response, from_parser_error
from .headers import new_request_id
from .logs import get_logger

log = get_logger("sidecar.inbound")

ClientErrorHook = Callable[[str], None]
# "method target" and nothing else: an HTTP/0.9 request line.
_HTTP09_REQUEST_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [^ \r\n]+\r?")


class GuardedRequestHandler(RequestHandler):
    """aiohttp's per-connection protocol with a request-head deadline."""

    __slots__ = (
        "_header_timeout",
        "_on_client_error",
        "_event_loop",
        "_head_timer",
        "_timer_at",
        "_head_deadline",
        "_last_payload",
        "_line_bytes",
        "_line_start",
        "_in_request_line",
        "_line_too_long",
        "_refused",
    )

    def __init__(
        self,
        manager: web.Server,
        *,
        header_timeout: Callable[[], float],
        on_client_error: ClientErrorHook,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        lighten_message_queue(self)  # idle keep-alive connections are many: see MessageQueue
        # The loop the server hands every handler (asking asyncio for the
        # running loop is a getpid() system call on Python 3.11).
        self._event_loop: asyncio.AbstractEventLoop = kwargs["loop"]
        self._header_timeout = header_timeout
        self._on_client_error = on_client_error
        self._head_timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # loop time the armed timer fires at
        self._head_deadline: float | None = None  # loop time the head in progress must be in by
        self._last_payload: Any = None  # the body stream of the last parsed request
        self._line_bytes = 0
        self._line_start = b""  # the request line's bytes so far (up to max_line_size)
        self._in_request_line = True
        self._line_too_long = False
        self._refused = False  # answered without the parser: read nothing more

    # ------------------------------------------------------------ deadline

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._start_head()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._head_deadline = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if data and self._head_deadline is None and self._between_requests():
            self._start_head()  # the first byte of the next request head
        if self._in_request_line and data and self._track_request_line(data) and self._refuse_http09():
            return
        parsed_before = parsed_request_count(self)
        super().data_received(data)
        if parsed_request_count(self) != parsed_before:
            payload = last_parsed_payload(self)
            if payload is not None:
                self._last_payload = payload
                self._head_deadline = None  # the head is in
                self._in_request_line = False

    def _between_requests(self) -> bool:
        payload = self._last_payload
        return payload is None or payload.is_eof()

    def _start_head(self) -> None:
        self._line_bytes = 0
        self._line_start = b""
        self._in_request_line = True
        self._line_too_long = False
        loop = self._event_loop
        deadline = self._head_deadline = loop.time() + self._header_timeout()
        timer = self._head_timer
        if timer is None or self._timer_at > deadline:
            # No timer, or one for later than this head may take (the timeout
            # was shortened by a reload): one for this deadline.
            if timer is not None:
                timer.cancel()
            self._timer_at = deadline
            self._head_timer = loop.call_at(deadline, self._head_timer_fired)

    def _head_timer_fired(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None:
            return  # no head in progress: the next one sets a timer
        loop = self._event_loop
        if loop.time() < deadline:
            # Set for an earlier head: this one has until its own deadline.
            self._timer_at = deadline
            self._head_timer = loop.call_at(deadline, self._head_timer_fired)
            return
        self._head_timed_out()

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.transport is None:
            return
        self._on_client_error("header_timeout")
        log.info("client_header_timeout", peer=_peer(self.transport), timeout_s=self._header_timeout())
        # No response: a caller this slow is not reading one, and a pipelined
        # response may be on the wire already.  Closing frees everything.
        self.force_close()

    def _track_request_line(self, data: bytes) -> bool:
        """Note whether the request line alone is over max_line_size (414, not 431);
        True when it is complete and an HTTP/0.9 one."""
        newline = data.find(b"\n")
        length = self._line_bytes + (len(data) if newline == -1 else newline)
        self._line_bytes = length
        if length > self.max_line_size:
            self._line_too_long = True
        elif not self._line_too_long:
            self._line_start += data if newline == -1 else data[:newline]
        if newline == -1:
            return False
        self._in_request_line = False
        line, self._line_start = self._line_start, b""
        # Method, one space, target: a line with any other number of spaces is not one.
        return not self._line_too_long and line.count(b" ") == 1 and _HTTP09_REQUEST_LINE.fullmatch(line) is not None

    def _refuse_http09(self) -> bool:
        """Answer an HTTP/0.9 request line at once, as a parse error; True if done.

        Its client sends that one line and waits; neither parser answers before
        a blank line that never comes, so the caller would only see the header
        timeout close the connection. Nothing more is read from it.  (False:
        this aiohttp cannot be handed the error, and the deadline closes it.)
        """
        error = BadHttpMessage("request line without an HTTP version (HTTP/0.9 is not supported)")
        if not queue_parse_error(self, 400, error):
            return False
        self._refused = True
        self._head_deadline = None
        return True

    # -------------------------------------------------------- bad requests

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request the parser rejected (or, status 500, a bug): answer it ourselves, then close."""
        if isinstance(exc, ConnectionError) and (self.transport is None or self.transport.is_closing()):
            # The caller left between the transport closing and aiohttp
            # cancelling the handler (writing the headers failed): a
            # disconnect, already accounted as one, not an error of ours.
            # aiohttp's request loop drops the connection on ConnectionError.
            raise ConnectionError("client disconnected") from exc
        if status == 500 and exc is not None:
            # Not client garbage: an error of ours. Keep the traceback.
            self.log_exception("unhandled_error", exc_info=exc)
            error: SidecarError = InternalError("internal error in the sidecar")
        elif isinstance(exc, HttpProcessingError):
            error = from_parser_error(
                exc,
                line_too_long=self._line_too_long,
                max_line_size=self.max_line_size,
                max_field_size=self.max_field_size,
                max_headers=self.max_headers,
            )
            self._on_client_error(error.code)
            log.warning(
                "bad_request_from_client",
                peer=_peer(self.transport),
                status=error.status,
                error=error.code,
                reason=error.message,
            )
        else:
            error = SidecarError(message or "request failed")
            error.status = status
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error response")
        # The request's version is unknown here (aiohttp stands in an HTTP/1.0 one).
        response = error_response(error, new_request_id(), close=True, as_http11=True)
        response.force_close()
        return response


def _peer(transport: asyncio.BaseTransport | None) -> str | None:
    peer = transport.get_extra_info("peername") if transport is not None else None
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else None


class GuardedServer(web.Server):
    """aiohttp's low-level server, making :class:`GuardedRequestHandler` connections."""

    def __init__(
        self,
        handler: Any,
        *,
        header_timeout: Callable[[], float],
        on_client_error: ClientErrorHook,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._header_timeout = header_timeout
        self._on_client_error = on_client_error

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(
            self,
            header_timeout=self._header_timeout,
            on_client_error=self._on_client_error,
            **handler_arguments(self),
        )
