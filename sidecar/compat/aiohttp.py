"""Every use of aiohttp's private internals, behind names of ours, and a check of each.

aiohttp has no public way to do a few things the proxy must do.  Each one is
here and nowhere else, and :func:`self_check` verifies on the installed
aiohttp that the internal is still what this code expects.  What each
internal is for, and what happens without it:

``StreamResponse._prepare_headers`` (:class:`RelayedResponse`)
    Dropping the ``Content-Type: application/octet-stream`` and ``Server``
    headers aiohttp adds to a response that has none: a proxy must not invent
    headers the upstream did not send.  Without it: responses still relay
    correctly, with those two headers added.  Falls back.
``StreamResponse._send_headers_immediately`` (:class:`RelayedResponse`)
    Holding a relayed response's head until its first body chunk, so that
    both go out in one write (a system call less per response; what no chunk
    came for in the same pass of the loop is sent on the next).  Without it:
    the head goes out on its own, as a write of its own.  Falls back.
``StreamResponse._write_headers`` and ``_payload_writer`` (:class:`Http11Response`)
    Writing an error response's status line as HTTP/1.1 whatever the
    request's version: aiohttp echoes it, and makes up HTTP/1.0 for a
    request it could not parse.  Without it: the status line echoes the
    request's version.  Falls back.
``RequestHandler._request_count`` and ``_messages``
    Telling when the parser has a complete request head, which stops the
    request-head deadline, and which body stream belongs to that request.
    Without them the deadline cannot work: no connection could be served
    safely.  Fatal: the sidecar must not start.
``aiohttp.web_protocol._ErrInfo`` and ``RequestHandler._waiter``
    Answering an HTTP/0.9 request line (no version) with 400 at once, by
    queueing a parse error as aiohttp's own parser would.  Without them:
    such a connection is closed by the request-head deadline instead.  Falls
    back.
``web.Server._kwargs`` and ``_loop``
    Building our request handler with the very arguments aiohttp's server
    would give its own.  Without them no connection can be accepted.  Fatal.
``http_parser.HttpRequestParserPy``
    Saying in the ``started`` event which HTTP parser runs (C or Python).
    Without it the event says ``unknown``.  Falls back.
``RequestHandler._messages`` as a FIFO and nothing else (:class:`MessageQueue`)
    Replacing each connection's deque of parsed requests with a list, 700
    bytes lighter per open connection.  Without it: aiohttp's deque stays.
    Falls back.

Why one module over 400 lines: it is the one place aiohttp's internals are
touched, each with its self-check beside it; splitting it would scatter them.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import http_parser, web, web_protocol
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler

from .checks import SelfCheck, register

__all__ = [
    "Failure",
    "Http11Response",
    "MessageQueue",
    "RelayedResponse",
    "handler_arguments",
    "last_parsed_payload",
    "lighten_message_queue",
    "parsed_request_count",
    "parser_in_use",
    "queue_parse_error",
    "self_check",
]

_MISSING = object()


# ------------------------------------------------------------------ responses


class RelayedResponse(web.StreamResponse):
    """A StreamResponse that adds nothing the upstream did not send, its head
    written with its first body chunk.

    aiohttp adds ``Content-Type: application/octet-stream`` and its own
    ``Server`` header when missing; a proxy must not invent either.
    ``invented`` names the ones the upstream did not send, to drop again.

    The head waits for the first chunk only as long as the chunk is at hand:
    if none is written in the same pass of the event loop (the upstream's
    body is not there yet), the head goes out on the next, so a caller never
    waits for a body to see the status.  A caller gone by the time the head
    is written is told as aiohttp would tell it (ConnectionResetError).
    """

    __slots__ = ("_invented",)

    # aiohttp's own buffering of a head until the first chunk (web.Response uses it).
    _send_headers_immediately = False

    def __init__(self, status: int, invented: tuple[str, ...]) -> None:
        super().__init__(status=status)
        self._invented = invented

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        headers = self.headers
        for name in self._invented:
            headers.popall(name, None)

    async def _write_headers(self) -> None:
        request = self._req
        transport = None if request is None else request.transport
        if transport is None or transport.is_closing():
            # What writing the head would have raised.
            raise ConnectionResetError("Cannot write to closing transport")
        await super()._write_headers()
        writer = self._payload_writer
        if writer is not None and not self._send_headers_immediately:
            # aiohttp's StreamWriter knows its loop (asking asyncio is a getpid() on Python 3.11).
            loop = getattr(writer, "loop", None) or asyncio.get_running_loop()
            loop.call_soon(_send_head, writer)


def _send_head(writer: AbstractStreamWriter) -> None:
    """The head of a relayed response no chunk was written with in time."""
    # Nothing to send when it went out with a chunk (or the end); a caller that
    # left is the handler's to learn, from its next write or the end.
    with contextlib.suppress(ConnectionError):
        writer.send_headers()


class Http11Response(web.Response):
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
        writer = getattr(self, "_payload_writer", None) if self._as_http11 else None
        if writer is None:
            await super()._write_headers()
            return
        await writer.write_headers(f"HTTP/1.1 {self.status} {self.reason}", self.headers)
        if getattr(self, "_send_headers_immediately", True):
            writer.send_headers()

    async def write_eof(self, data: bytes = b"") -> None:
        await super().write_eof(data)
        # Sent (aiohttp writes it after the handler returned).  aiohttp keeps a
        # connection's last response until the next request arrives: an idle
        # caller that was refused keeps the object, not its headers and body.
        self.headers.clear()
        self.body = None


# ------------------------------------------------------- connection handler


def parsed_request_count(handler: RequestHandler) -> int:
    """How many request heads (or parse errors) the connection's parser has produced."""
    return handler._request_count


def last_parsed_payload(handler: RequestHandler) -> StreamReader | None:
    """The body stream of the request head parsed last, while it waits to be handled."""
    messages = handler._messages
    return messages[-1][1] if messages else None


def queue_parse_error(handler: RequestHandler, status: int, error: HttpProcessingError) -> bool:
    """Hand ``error`` to the connection's request loop as if the parser had raised it.

    The loop then answers it through ``handle_error``, as any parse error.
    False, changing nothing, if this aiohttp lacks what it takes.
    """
    err_info = getattr(web_protocol, "_ErrInfo", None)
    waiter = getattr(handler, "_waiter", _MISSING)
    if err_info is None or waiter is _MISSING:
        return False
    handler._messages.append((err_info(status=status, exc=error, message=error.message), EMPTY_PAYLOAD))
    handler._request_count += 1
    if isinstance(waiter, asyncio.Future) and not waiter.done():
        waiter.set_result(None)  # the request loop waits for a message
    return True


def handler_arguments(server: web.Server) -> dict[str, Any]:
    """The keyword arguments ``server`` gives each RequestHandler it makes, its loop included."""
    return {"loop": server._loop, **server._kwargs}


def parser_in_use() -> str:
    """``c`` when aiohttp parses requests with llhttp, ``python`` with its pure-Python parser."""
    python = getattr(http_parser, "HttpRequestParserPy", None)
    if python is None:
        return "unknown"
    return "c" if http_parser.HttpRequestParser is not python else "python"


# --------------------------------------------------------------- self-check


class Failure(str):
    """A self-check failure: the text to print, and whether the sidecar must not start."""

    fatal: bool

    def __new__(cls, text: str, *, fatal: bool) -> Failure:
        failure = super().__new__(cls, text)
        failure.fatal = fatal
        return failure


class _Probe:
    """A real aiohttp server and connection handler to look at, built once per check run."""

    def __init__(self) -> None:
        self.server_kwargs: dict[str, Any] = {"max_line_size": 4321}
        self.server: web.Server | None = None
        self.handler: RequestHandler | None = None
        self.error: str | None = None
        loop = asyncio.new_event_loop()
        self.loop = loop
        try:
            self.server = web.Server(_unused_handler, loop=loop, **self.server_kwargs)
            self.handler = RequestHandler(self.server, loop=loop)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            loop.close()  # nothing runs on it: the objects are only looked at


async def _unused_handler(request: web.BaseRequest) -> web.StreamResponse:
    raise AssertionError("never called")  # pragma: no cover


def _hook(owner: type, name: str, caller: str) -> str | None:
    """An overridable coroutine method that aiohttp itself calls from ``caller``."""
    method = getattr(owner, name, None)
    if method is None:
        return f"{owner.__name__}.{name} is missing"
    if not inspect.iscoroutinefunction(method):
        return f"{owner.__name__}.{name} is no longer a coroutine method"
    if name not in _names(getattr(owner, caller, None)):
        return f"{owner.__name__}.{caller} no longer calls {name}"
    return None


def _names(function: Any) -> tuple[str, ...]:
    code = getattr(function, "__code__", None)
    return tuple(code.co_names) if code is not None else ()


def _handler_attribute(probe: _Probe, name: str, kind: type, used_in: str) -> str | None:
    if probe.handler is None:
        return f"a RequestHandler cannot be built to check RequestHandler.{name} ({probe.error})"
    if not isinstance(getattr(probe.handler, name, _MISSING), kind):
        return f"RequestHandler.{name} is missing or not a {kind.__name__}"
    if name not in _names(getattr(RequestHandler, used_in, None)):
        return f"RequestHandler.{used_in} no longer uses {name}"
    return None


def _check_relayed_headers(probe: _Probe) -> str | None:
    return _hook(web.StreamResponse, "_prepare_headers", "_start")


def _check_head_with_body(probe: _Probe) -> str | None:
    if not isinstance(getattr(web.StreamResponse, "_send_headers_immediately", None), bool):
        return "StreamResponse._send_headers_immediately is missing"
    write_headers = getattr(web.StreamResponse, "_write_headers", None)
    if write_headers is None:
        return None  # the status line's check reports it; neither override is called then
    if "_send_headers_immediately" not in _names(write_headers):
        return "StreamResponse._write_headers no longer reads _send_headers_immediately"
    return None


def _check_status_line(probe: _Probe) -> str | None:
    problem = _hook(web.StreamResponse, "_write_headers", "_start")
    if problem is None and (
        not hasattr(web.StreamResponse, "_payload_writer") or "_payload_writer" not in _names(web.StreamResponse._start)
    ):
        problem = "StreamResponse._payload_writer is missing"
    return problem


def _check_parsed_heads(probe: _Probe) -> str | None:
    return _handler_attribute(probe, "_request_count", int, "data_received") or _handler_attribute(
        probe, "_messages", deque, "data_received"
    )


def _check_parse_error_queue(probe: _Probe) -> str | None:
    err_info = getattr(web_protocol, "_ErrInfo", None)
    if err_info is None:
        return "aiohttp.web_protocol._ErrInfo is missing"
    try:
        err_info(status=400, exc=ValueError("probe"), message="probe")
    except Exception as exc:
        return f"aiohttp.web_protocol._ErrInfo(status, exc, message) fails: {type(exc).__name__}: {exc}"
    if probe.handler is None:
        return f"a RequestHandler cannot be built to check RequestHandler._waiter ({probe.error})"
    if getattr(probe.handler, "_waiter", _MISSING) is not None:
        return "RequestHandler._waiter is missing or not None on a new connection"
    if "_waiter" not in _names(RequestHandler.start) or "_messages" not in _names(RequestHandler.start):
        return "RequestHandler.start no longer waits on _waiter for _messages"
    return None


def _check_handler_arguments(probe: _Probe) -> str | None:
    if probe.server is None:
        return f"a web.Server cannot be built to check web.Server._kwargs ({probe.error})"
    if getattr(probe.server, "_kwargs", None) != probe.server_kwargs:
        return "web.Server._kwargs is missing or no longer holds the handler's keyword arguments"
    if getattr(probe.server, "_loop", None) is not probe.loop:
        return "web.Server._loop is missing or is not the server's loop"
    return None


def _check_parser_kind(probe: _Probe) -> str | None:
    if not isinstance(getattr(http_parser, "HttpRequestParserPy", None), type):
        return "aiohttp.http_parser.HttpRequestParserPy is missing"
    return None


@dataclass(frozen=True, slots=True)
class _Internal:
    check: Callable[[_Probe], str | None]
    without_it: str
    fatal: bool


_INTERNALS: tuple[_Internal, ...] = (
    _Internal(
        _check_relayed_headers,
        "relayed responses will carry Content-Type and Server headers the upstream did not send",
        fatal=False,
    ),
    _Internal(
        _check_head_with_body,
        "a relayed response's head will be written on its own, not with its first chunk",
        fatal=False,
    ),
    _Internal(
        _check_status_line,
        "error responses will echo the request's HTTP version in their status line",
        fatal=False,
    ),
    _Internal(
        _check_parsed_heads,
        "the request-head deadline cannot tell when a request head is complete",
        fatal=True,
    ),
    _Internal(
        _check_parse_error_queue,
        "an HTTP/0.9 request line will be closed by the request-head deadline, not answered 400",
        fatal=False,
    ),
    _Internal(
        _check_handler_arguments,
        "the proxy port cannot build its connection handlers",
        fatal=True,
    ),
    _Internal(
        _check_parser_kind,
        "the started event will say http_parser=unknown",
        fatal=False,
    ),
)


def self_check() -> list[str]:
    """What is wrong with the installed aiohttp's internals; empty when all is as expected.

    Each item is a :class:`Failure` (a str) naming aiohttp's version, the
    internal and its consequence; ``failure.fatal`` says the sidecar cannot
    run safely with it (exit 1 at start-up), otherwise it falls back.
    """
    probe = _Probe()
    failures: list[str] = []
    for internal in _INTERNALS:
        try:
            problem = internal.check(probe)
        except Exception as exc:  # a check must report, never crash start-up
            problem = f"checking failed: {type(exc).__name__}: {exc}"
        if problem is None:
            continue
        outcome = "the sidecar cannot run safely" if internal.fatal else "falling back"
        failures.append(
            Failure(
                f"aiohttp {aiohttp.__version__}: {problem}: {internal.without_it} ({outcome})", fatal=internal.fatal
            )
        )
    return failures


def _registered(internal: _Internal) -> SelfCheck:
    return SelfCheck(
        libraries=("aiohttp",),
        guards=internal.check.__name__.removeprefix("_check_").replace("_", " "),
        check=lambda: internal.check(_Probe()),
        fallback=None if internal.fatal else internal.without_it,
    )


# Run at start-up with the other libraries' checks (sidecar/compat/__init__.py).
for _internal in _INTERNALS:
    register(_registered(_internal))


# ----------------------------------------------------- the request queue

# What a deque can do that a list cannot (popleft is MessageQueue's own).
_DEQUE_ONLY = frozenset({"appendleft", "extendleft", "rotate", "maxlen"})
_light_queue = True  # False once its check failed: connections keep aiohttp's deque


class MessageQueue(list[Any]):
    """A connection's parsed requests waiting for its request loop: aiohttp's deque, lighter.

    A deque allocates a 64-slot block when it is made (760 bytes with the
    object) and keeps it while empty, so every kept-alive caller connection
    held one for as long as it stayed open, idle or not.  An empty list holds
    no slots; the queue rarely holds more than a few pipelined requests, so
    taking the first with ``pop(0)`` costs what ``popleft`` does.
    """

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


def lighten_message_queue(handler: RequestHandler) -> None:
    """Give a new connection handler a :class:`MessageQueue` in place of aiohttp's deque."""
    if _light_queue:
        handler._messages = MessageQueue()  # type: ignore[assignment]


def _code_names(code: Any) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= _code_names(const)
    return names


def _functions_of(owner: type) -> list[tuple[str, Any]]:
    """(name, code) of every method, property and reify defined in ``owner``."""
    found = []
    for name, value in vars(owner).items():
        for part in (value, getattr(value, "__func__", None), getattr(value, "fget", None)):
            part = getattr(part, "wrapped", part)  # aiohttp's reify
            code = getattr(part, "__code__", None)
            if code is not None:
                found.append((name, code))
    return found


def _check_message_queue(probe: _Probe | None = None) -> str | None:
    """Does aiohttp use ``_messages`` as nothing but a FIFO a list can be? (By the names its code uses.)"""
    for owner in RequestHandler.__mro__:
        if not owner.__module__.startswith("aiohttp."):
            continue
        for name, code in _functions_of(owner):
            names = _code_names(code)
            if "_messages" not in names:
                continue
            used = names & _DEQUE_ONLY or ({"deque"} & names if name != "__init__" else set())
            if used:
                return f"{owner.__name__}.{name} uses {', '.join(sorted(used))} with _messages"
    return None


def _keep_the_deque() -> None:
    global _light_queue
    _light_queue = False


_MESSAGE_QUEUE = _Internal(
    _check_message_queue,
    "each connection keeps aiohttp's own request deque (about 700 bytes more per open connection)",
    fatal=False,
)
_INTERNALS = (*_INTERNALS, _MESSAGE_QUEUE)
register(
    SelfCheck(
        libraries=("aiohttp",),
        guards="message queue",
        check=_check_message_queue,
        fallback=_MESSAGE_QUEUE.without_it,
        use_fallback=_keep_the_deque,
    )
)
