"""The aiohttp self-checks: each reports its internal when that internal is gone."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import http_parser, web, web_protocol
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.web_protocol import RequestHandler

from sidecar.compat import aiohttp as compat
from sidecar.compat import registered
from sidecar.compat.aiohttp import Failure, self_check


def only_failure(naming: str) -> Failure:
    failures = self_check()
    assert len(failures) == 1, failures
    (failure,) = failures
    assert isinstance(failure, Failure)
    assert failure.startswith(f"aiohttp {aiohttp.__version__}: ")
    assert naming in failure
    return failure


def test_the_installed_aiohttp_passes_every_check() -> None:
    assert self_check() == []


def test_prepare_headers_missing_is_reported_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(web.StreamResponse, "_prepare_headers")
    failure = only_failure("StreamResponse._prepare_headers")
    assert not failure.fatal
    assert "Content-Type" in failure


def test_prepare_headers_no_longer_called_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    async def start_without_hooks(self: web.StreamResponse, request: web.BaseRequest) -> None:
        raise NotImplementedError

    monkeypatch.setattr(web.StreamResponse, "_start", start_without_hooks)
    failures = self_check()
    assert any("no longer calls _prepare_headers" in failure for failure in failures), failures
    assert any("no longer calls _write_headers" in failure for failure in failures), failures


def test_write_headers_missing_is_reported_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(web.StreamResponse, "_write_headers")
    assert not only_failure("StreamResponse._write_headers").fatal


def test_payload_writer_missing_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(web.StreamResponse, "_payload_writer")
    assert not only_failure("StreamResponse._payload_writer").fatal


def without_handler_attribute(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """As if aiohttp had renamed the attribute: new handlers do not have it."""
    real_init = RequestHandler.__init__

    def init_then_rename(self: RequestHandler, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]
        delattr(self, name)

    monkeypatch.setattr(RequestHandler, "__init__", init_then_rename)


def test_request_count_missing_is_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    without_handler_attribute(monkeypatch, "_request_count")
    assert only_failure("RequestHandler._request_count").fatal


def test_messages_missing_is_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    without_handler_attribute(monkeypatch, "_messages")
    assert only_failure("RequestHandler._messages").fatal


def test_a_handler_that_cannot_be_built_is_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(RequestHandler, "_messages")  # __init__ cannot set it
    failures = self_check()
    assert any(getattr(failure, "fatal", False) and "_messages" in failure for failure in failures), failures


def test_err_info_missing_is_reported_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(web_protocol, "_ErrInfo")
    failure = only_failure("_ErrInfo")
    assert not failure.fatal
    assert "HTTP/0.9" in failure


def test_waiter_missing_is_reported_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    without_handler_attribute(monkeypatch, "_waiter")
    assert not only_failure("RequestHandler._waiter").fatal


def test_server_kwargs_missing_is_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    real_init = web.Server.__init__

    def init_then_rename(self: web.Server, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]
        self._handler_kwargs = self._kwargs  # type: ignore[attr-defined]
        del self._kwargs

    monkeypatch.setattr(web.Server, "__init__", init_then_rename)
    assert only_failure("web.Server._kwargs").fatal


def test_server_loop_missing_is_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    real_init = web.Server.__init__

    def init_then_rename(self: web.Server, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]
        del self._loop

    monkeypatch.setattr(web.Server, "__init__", init_then_rename)
    assert only_failure("web.Server._loop").fatal


def test_python_parser_missing_is_reported_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(http_parser, "HttpRequestParserPy")
    assert not only_failure("HttpRequestParserPy").fatal
    assert compat.parser_in_use() == "unknown"


# ----------------------------------------------------------- the fallbacks


@pytest.fixture
def handler() -> Iterator[RequestHandler]:
    loop = asyncio.new_event_loop()
    try:

        async def unused(request: web.BaseRequest) -> web.StreamResponse:
            raise AssertionError

        yield RequestHandler(web.Server(unused, loop=loop), loop=loop)
    finally:
        loop.close()


def test_a_parse_error_is_queued_as_aiohttps_parser_would(handler: RequestHandler) -> None:
    assert compat.queue_parse_error(handler, 400, BadHttpMessage("no version"))
    assert compat.parsed_request_count(handler) == 1
    info = handler._messages[-1][0]
    assert isinstance(info, web_protocol._ErrInfo)
    assert (info.status, info.message) == (400, "no version")


def test_without_err_info_nothing_is_queued(handler: RequestHandler, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(web_protocol, "_ErrInfo")
    assert not compat.queue_parse_error(handler, 400, BadHttpMessage("no version"))
    assert compat.parsed_request_count(handler) == 0
    assert compat.last_parsed_payload(handler) is None


def test_handler_arguments_are_the_servers(handler: RequestHandler) -> None:
    loop = asyncio.new_event_loop()
    try:

        async def unused(request: web.BaseRequest) -> web.StreamResponse:
            raise AssertionError

        server = web.Server(unused, loop=loop, max_line_size=123, handler_cancellation=True)
        assert compat.handler_arguments(server) == {"loop": loop, "max_line_size": 123}
    finally:
        loop.close()


# ------------------------------------------------------- the request queue


def test_a_deque_only_operation_on_the_queue_is_reported_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    def requeue(self: RequestHandler, message: object) -> None:
        self._messages.appendleft(message)  # type: ignore[arg-type]

    monkeypatch.setattr(RequestHandler, "_requeue", requeue, raising=False)
    failure = only_failure("RequestHandler._requeue uses appendleft")
    assert not failure.fatal
    assert "deque" in failure


def test_the_queue_check_looks_into_properties_and_nested_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    def oldest(self: RequestHandler) -> object:
        def turn() -> None:
            self._messages.rotate(1)

        turn()
        return self._messages[0]

    monkeypatch.setattr(RequestHandler, "_oldest", property(oldest), raising=False)
    assert not only_failure("RequestHandler._oldest uses rotate").fatal


def test_a_handler_gets_the_light_queue_a_fifo(handler: RequestHandler) -> None:
    compat.lighten_message_queue(handler)
    queue: object = handler._messages
    assert type(queue) is compat.MessageQueue
    assert not queue
    queue.append("first")
    queue.append("second")
    assert len(queue) == 2
    assert queue[-1] == "second"
    assert queue.popleft() == "first"
    assert queue.popleft() == "second"
    assert not queue


def test_the_queue_fallback_keeps_aiohttps_deque(handler: RequestHandler, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compat, "_light_queue", True)  # restored after the test
    (check,) = [check for check in registered() if check.guards == "message queue"]
    assert check.fallback is not None and check.use_fallback is not None
    check.use_fallback()
    compat.lighten_message_queue(handler)
    assert type(handler._messages) is deque


def test_head_buffering_missing_is_reported_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(web.StreamResponse, "_send_headers_immediately")
    failure = only_failure("StreamResponse._send_headers_immediately")
    assert not failure.fatal
    assert "first chunk" in failure


class _Wire(asyncio.Transport):
    """A transport that keeps what is written to it, one entry per write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def writelines(self, chunks: object) -> None:
        self.writes.append(b"".join(chunks))  # type: ignore[arg-type]

    def is_closing(self) -> bool:
        return self.closing


def _relay_request(wire: _Wire) -> web.BaseRequest:
    from unittest import mock

    from aiohttp.http_writer import StreamWriter
    from aiohttp.test_utils import make_mocked_request

    protocol = mock.Mock(transport=wire)
    writer = StreamWriter(protocol, asyncio.get_running_loop())
    return make_mocked_request("GET", "/", writer=writer, transport=wire, protocol=protocol)


async def test_a_relayed_head_goes_out_with_the_first_chunk_in_one_write() -> None:
    wire = _Wire()
    response = compat.RelayedResponse(200, ("Server",))
    response.headers["Content-Length"] = "5"
    await response.prepare(_relay_request(wire))
    assert wire.writes == []
    await response.write(b"hello")
    assert len(wire.writes) == 1 and wire.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert wire.writes[0].endswith(b"\r\n\r\nhello") and b"Server:" not in wire.writes[0]
    await asyncio.sleep(0)  # the head's own send finds nothing left to send
    await response.write_eof()
    assert len(wire.writes) == 1


async def test_a_relayed_head_without_a_chunk_at_hand_goes_out_on_the_next_pass_of_the_loop() -> None:
    wire = _Wire()
    response = compat.RelayedResponse(200, ())
    response.headers["Content-Length"] = "5"
    await response.prepare(_relay_request(wire))
    await asyncio.sleep(0)
    assert len(wire.writes) == 1 and wire.writes[0].endswith(b"\r\n\r\n")
    await response.write(b"hello")
    assert wire.writes[1:] == [b"hello"]


async def test_a_relayed_head_for_a_caller_gone_raises_as_writing_it_would() -> None:
    wire = _Wire()
    wire.closing = True
    with pytest.raises(ConnectionResetError):
        await compat.RelayedResponse(200, ()).prepare(_relay_request(wire))
    assert wire.writes == []
