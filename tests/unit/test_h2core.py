"""The HTTP/2 client core, without sockets: against the `h2` package's server state
machine pumped in memory (interop, flow control, backpressure), against hand-built
hostile frames (each with its exact outcome), and our own bytes checked by `h2`."""

from __future__ import annotations

import struct
from typing import Any

import h2.events as ev
import hpack
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.settings import SettingCodes, Settings
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from sidecar.upstream import h2core
from sidecar.upstream.h2core import (
    DATA,
    END,
    GOAWAY,
    HEAD,
    RESET,
    STREAM_WINDOW,
    TERMINATED,
    WINDOW,
    ClientCore,
    Event,
)

GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"example"), (b":path", b"/")]
POST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"example"), (b":path", b"/up")]


# ------------------------------------------------------------------ helpers


def parse_frames(data: bytes) -> list[Frame]:
    """The frames in `data` (which must hold whole frames), the preface skipped."""
    if data.startswith(h2core.PREFACE):
        data = data[len(h2core.PREFACE) :]
    frames = []
    view = memoryview(data)
    while view:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        frames.append(frame)
        view = view[9 + length :]
    return frames


class Pair:
    """Our client core and an `h2` server, bytes pumped between them in memory."""

    def __init__(self, server_settings: dict[SettingCodes, int] | None = None) -> None:
        self.client = ClientCore()
        self.server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        if server_settings:
            self.server.local_settings = Settings(client=False, initial_values=server_settings)
        self.server.initiate_connection()
        self.events: list[Event] = []  # the client's, all of them
        self.server_events: list[Any] = []
        self.sent: list[Frame] = []  # every frame the client wrote
        self.pump()

    def pump(self, limit: int = 1000) -> list[Event]:
        """Until neither side has anything to send; the client events it made."""
        new: list[Event] = []
        for _ in range(limit):
            out = self.client.data_to_send()
            if out:
                self.sent += parse_frames(out)
                self.server_events += self.server.receive_data(out)
            back = self.server.data_to_send()
            if back:
                new += self.client.receive(back)
            if not out and not back:
                break
        else:
            raise AssertionError("the two sides never went quiet")
        self.events += new
        return new

    def server_event(self, kind: type, stream_id: int) -> Any:
        found = [e for e in self.server_events if isinstance(e, kind) and getattr(e, "stream_id", None) == stream_id]
        assert found, f"no {kind.__name__} for stream {stream_id} on the server"
        return found[-1]

    def request_data(self, stream_id: int) -> bytes:
        """The request body the server received on `stream_id` (acknowledged as it goes)."""
        return b"".join(
            e.data for e in self.server_events if isinstance(e, ev.DataReceived) and e.stream_id == stream_id
        )

    def respond(
        self, stream_id: int, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None, **kw: Any
    ) -> None:
        self.server.send_headers(stream_id, [(b":status", str(status).encode()), *(headers or [])], **kw)

    def body_of(self, stream_id: int, events: list[Event] | None = None) -> bytes:
        return b"".join(e[2] for e in (self.events if events is None else events) if e[0] == DATA and e[1] == stream_id)  # type: ignore[misc]

    def download(self, stream_id: int, body: bytes, trailers: list[tuple[bytes, bytes]] | None = None) -> bytes:
        """The server sends `body` as the windows allow; the client consumes all it gets."""
        sent = 0
        got = b""
        while True:
            window = self.server.local_flow_control_window(stream_id)
            step = min(window, self.server.max_outbound_frame_size, len(body) - sent)
            if step:
                last = sent + step == len(body) and trailers is None
                self.server.send_data(stream_id, body[sent : sent + step], end_stream=last)
                sent += step
            elif sent == len(body):
                if trailers is not None:
                    self.server.send_headers(stream_id, trailers, end_stream=True)
                    trailers = None
                else:
                    break
            new = self.pump()
            chunk = self.body_of(stream_id, new)
            got += chunk
            if chunk:
                self.client.consumed(stream_id, len(chunk))
            if not step and not chunk and any(e[0] == END and e[1] == stream_id for e in new):
                break
            if not step and not chunk and window == 0:
                self.pump()
                if self.server.local_flow_control_window(stream_id) == 0:
                    raise AssertionError("the download stalled: no window")
        self.pump()
        return got


def ended(events: list[Event], stream_id: int) -> bool:
    return any(e[0] == END and e[1] == stream_id for e in events)


def kinds(events: list[Event]) -> list[int]:
    return [e[0] for e in events]


# ------------------------------------------------------------------ interop with h2 as the server


def test_handshake_and_a_get_without_a_body() -> None:
    pair = Pair()
    assert pair.client.settings_received
    assert any(isinstance(e, ev.SettingsAcknowledged) for e in pair.server_events)  # our SETTINGS
    assert isinstance(pair.sent[0], SettingsFrame) and pair.sent[0].settings[SettingCodes.ENABLE_PUSH] == 0
    assert pair.server.remote_settings.initial_window_size == STREAM_WINDOW
    assert pair.server.outbound_flow_control_window == h2core.CONNECTION_WINDOW
    sid = pair.client.start_request(GET, end_stream=True)
    pair.pump()
    request = pair.server_event(ev.RequestReceived, sid)
    assert request.headers[:4] == GET and request.stream_ended is not None
    pair.respond(sid, 200, [(b"content-type", b"text/plain"), (b"content-length", b"5")])
    pair.server.send_data(sid, b"hello", end_stream=True)
    events = pair.pump()
    assert events == [
        (HEAD, sid, 200, [(b"content-type", b"text/plain"), (b"content-length", b"5")]),
        (DATA, sid, b"hello", None),
        (END, sid, None, None),
    ]
    assert pair.client.open_streams == 0


def test_many_exchanges_over_one_connection() -> None:
    pair = Pair()
    for round_ in range(50):
        sid = pair.client.start_request([*GET[:3], (b":path", f"/{round_}".encode())], end_stream=True)
        pair.pump()
        assert pair.server_event(ev.RequestReceived, sid).headers[3] == (b":path", f"/{round_}".encode())
        pair.respond(sid, 200)
        pair.server.send_data(sid, b"x" * round_, end_stream=True)
        events = pair.pump()
        assert kinds(events) == ([HEAD, DATA, END] if round_ else [HEAD, END])
        assert pair.body_of(sid, events) == b"x" * round_
    assert pair.client.open_streams == 0
    assert pair.server.open_inbound_streams == 0


def test_post_larger_than_the_windows_resumes_on_window_updates() -> None:
    pair = Pair({SettingCodes.INITIAL_WINDOW_SIZE: 1000, SettingCodes.MAX_FRAME_SIZE: 16384})
    body = bytes(range(256)) * 1200  # 300 KiB: over the stream window and the connection's 65535
    sid = pair.client.start_request(POST, end_stream=False)
    pair.pump()
    sent = 0
    windows = 0
    acked: set[int] = set()
    while sent < len(body):
        room = pair.client.sendable(sid)
        if room == 0:
            # The server acknowledges what it received: WINDOW_UPDATEs, a WINDOW event here.
            received = [e for e in pair.server_events if isinstance(e, ev.DataReceived) and id(e) not in acked]
            assert received, "blocked with nothing to acknowledge"
            for e in received:
                pair.server.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                acked.add(id(e))
            events = pair.pump()
            assert WINDOW in kinds(events)
            windows += 1
            continue
        assert room <= 1000
        chunk = body[sent : sent + room]
        pair.client.send_data(sid, chunk, end_stream=sent + len(chunk) == len(body))
        sent += len(chunk)
        pair.pump()
    assert windows > 100
    assert pair.request_data(sid) == body
    assert pair.server_event(ev.StreamEnded, sid)
    pair.respond(sid, 201, end_stream=True)
    assert pair.pump() == [(HEAD, sid, 201, []), (END, sid, None, None)]


def test_request_data_is_split_at_the_peers_max_frame_size() -> None:
    pair = Pair()
    sid = pair.client.start_request(POST, end_stream=False)
    assert pair.client.sendable(sid) == 65_535  # the server's default window
    pair.client.send_data(sid, b"a" * 40_000, end_stream=True)
    pair.pump()
    data = [f for f in pair.sent if isinstance(f, DataFrame)]
    assert [len(f.data) for f in data] == [16_384, 16_384, 7_232]
    assert [("END_STREAM" in f.flags) for f in data] == [False, False, True]
    assert pair.request_data(sid) == b"a" * 40_000
    assert pair.client.sendable(sid) == 0  # the local side is closed
    # A larger MAX_FRAME_SIZE from the server: bigger frames.
    pair.server.update_settings({SettingCodes.MAX_FRAME_SIZE: 32_768})
    pair.pump()
    sid = pair.client.start_request(POST, end_stream=False)
    pair.client.send_data(sid, b"b" * 20_000, end_stream=False)
    pair.client.send_data(sid, b"", end_stream=True)
    pair.pump()
    data = [f for f in pair.sent if isinstance(f, DataFrame) and f.stream_id == sid]
    assert [len(f.data) for f in data] == [20_000, 0]
    assert pair.request_data(sid) == b"b" * 20_000 and pair.server_event(ev.StreamEnded, sid)


def test_a_response_larger_than_the_stream_window_waits_for_the_caller() -> None:
    pair = Pair()
    sid = pair.client.start_request(GET, end_stream=True)
    pair.pump()
    pair.respond(sid, 200)
    body = bytes(range(251)) * 4000  # ~1 MiB
    sent = 0
    while pair.server.local_flow_control_window(sid) and sent < len(body):
        step = min(pair.server.local_flow_control_window(sid), 16_384)
        pair.server.send_data(sid, body[sent : sent + step])
        sent += step
    assert sent == STREAM_WINDOW  # all the server may send before the caller reads
    events = pair.pump()
    assert len(pair.body_of(sid, events)) == STREAM_WINDOW
    # Nothing consumed: the server stays blocked however long we pump.
    pair.pump()
    assert pair.server.local_flow_control_window(sid) == 0
    # Consuming less than half the window gives nothing back yet ...
    pair.client.consumed(sid, STREAM_WINDOW // 2 - 1)
    pair.pump()
    assert pair.server.local_flow_control_window(sid) == 0
    # ... half of it does, and the server continues.
    pair.client.consumed(sid, 1)
    pair.pump()
    assert pair.server.local_flow_control_window(sid) == STREAM_WINDOW // 2
    pair.client.consumed(sid, STREAM_WINDOW // 2)
    pair.pump()
    assert pair.server.local_flow_control_window(sid) == STREAM_WINDOW
    rest = pair.download(sid, body[sent:])
    assert pair.body_of(sid) == body and len(rest) == len(body) - sent
    assert ended(pair.events, sid) and pair.client.open_streams == 0


def test_concurrent_streams_interleaved() -> None:
    pair = Pair()
    sids = [pair.client.start_request([*GET[:3], (b":path", f"/{i}".encode())], end_stream=True) for i in range(10)]
    assert sids == list(range(1, 21, 2))
    pair.pump()
    for sid in reversed(sids):
        pair.respond(sid, 200 + sid)
    for part in range(5):
        for sid in sids[part % 2 :: 2] + sids[1 - part % 2 :: 2]:
            pair.server.send_data(sid, f"{sid}:{part};".encode(), end_stream=part == 4)
    pair.pump()
    for sid in sids:
        assert [e for e in pair.events if e[1] == sid and e[0] == HEAD] == [(HEAD, sid, 200 + sid, [])]
        assert pair.body_of(sid) == b"".join(f"{sid}:{part};".encode() for part in range(5))
        assert ended(pair.events, sid)
    assert pair.client.open_streams == 0 and pair.server.open_inbound_streams == 0


def test_trailers_end_the_stream() -> None:
    pair = Pair()
    sid = pair.client.start_request(GET, end_stream=True)
    pair.pump()
    pair.respond(sid, 200, [(b"trailer", b"x-checksum")])
    pair.server.send_data(sid, b"body")
    pair.server.send_headers(sid, [(b"x-checksum", b"abc")], end_stream=True)
    assert kinds(pair.pump()) == [HEAD, DATA, END]


def test_padding_is_stripped_and_its_window_given_back() -> None:
    pair = Pair()
    sid = pair.client.start_request(GET, end_stream=True)
    pair.pump()
    pair.respond(sid, 200)
    pair.server.send_data(sid, b"padded", pad_length=200)
    pair.server.send_data(sid, b"", pad_length=10)
    events = pair.pump()
    assert events[1:] == [(DATA, sid, b"padded", None)]
    # A body mostly padding, far over the stream window: padding is nobody's to
    # consume, so its window must come back without the caller.
    body = b"z" * 300_000
    got = b""
    sent = 0
    for _ in range(100_000):
        window = pair.server.local_flow_control_window(sid)
        if sent < len(body) and window >= 356:
            pair.server.send_data(sid, body[sent : sent + 100], pad_length=255, end_stream=sent + 100 >= len(body))
            sent += 100
        new = pair.pump()
        chunk = pair.body_of(sid, new)
        got += chunk
        if chunk:
            pair.client.consumed(sid, len(chunk))
        elif sent >= len(body):
            break
        elif window < 356:
            pair.pump()
            assert pair.server.local_flow_control_window(sid) >= 356, "stalled on padding"
    assert got == body and ended(pair.events, sid)


def test_headers_over_16k_arrive_in_continuation_frames() -> None:
    pair = Pair()
    sid = pair.client.start_request(GET, end_stream=True)
    pair.pump()
    big = [(f"x-big-{i}".encode(), bytes([97 + i]) * 9000) for i in range(4)]
    pair.respond(sid, 200, big, end_stream=True)
    data = pair.server.data_to_send()
    types = [type(f) for f in parse_frames(data)]
    assert types[0] is HeadersFrame and types[1:] == [ContinuationFrame] * (len(types) - 1) and len(types) >= 2
    events = pair.client.receive(data)
    assert events == [(HEAD, sid, 200, big), (END, sid, None, None)]


def test_interim_responses_are_skipped() -> None:
    pair = Pair()
    sid = pair.client.start_request(GET, end_stream=True)
    pair.pump()
    pair.respond(sid, 100)
    pair.respond(sid, 103, [(b"link", b"</style.css>; rel=preload")])
    assert pair.pump() == []
    pair.respond(sid, 204, end_stream=True)
    assert pair.pump() == [(HEAD, sid, 204, []), (END, sid, None, None)]


def test_server_settings_change_the_initial_window_of_open_streams() -> None:
    pair = Pair()
    sid = pair.client.start_request(POST, end_stream=False)
    pair.pump()
    pair.client.send_data(sid, b"a" * 1000, end_stream=False)
    pair.pump()
    assert pair.client.sendable(sid) == 65_535 - 1000
    pair.server.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 500})
    pair.pump()
    assert pair.client.sendable(sid) == 0  # 500 - 1000: negative, so nothing
    other = pair.client.start_request(POST, end_stream=False)
    assert pair.client.sendable(other) == 500
    pair.server.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 100_000})
    events = pair.pump()
    assert WINDOW in kinds(events)
    # The connection's window is still the default 65535 less what was sent.
    assert pair.client.sendable(sid) == 65_535 - 1000
    pair.server.increment_flow_control_window(200_000)
    pair.pump()
    assert pair.client.sendable(sid) == 100_000 - 1000
    assert pair.client.sendable(other) == 100_000
    pair.client.send_data(sid, b"b" * (100_000 - 1000), end_stream=True)
    pair.client.send_data(other, b"c" * 100_000, end_stream=True)
    pair.pump()
    assert pair.request_data(sid) == b"a" * 1000 + b"b" * 99_000
    assert pair.request_data(other) == b"c" * 100_000


def test_ping_is_answered() -> None:
    pair = Pair()
    pair.server.ping(b"12345678")
    assert pair.pump() == []
    acks = [e for e in pair.server_events if isinstance(e, ev.PingAckReceived)]
    assert [a.ping_data for a in acks] == [b"12345678"]


def test_server_goaway_names_the_last_stream() -> None:
    pair = Pair()
    sids = [pair.client.start_request(GET, end_stream=True) for _ in range(3)]
    pair.pump()
    pair.respond(sids[0], 200)
    pair.server.close_connection(error_code=0, last_stream_id=sids[1])
    events = pair.pump()
    assert events == [(HEAD, sids[0], 200, []), (GOAWAY, sids[1], 0, None)]
    assert pair.client.goaway_last == sids[1] and not pair.client.can_open_stream()
    # A later GOAWAY may only lower it.
    pair.client.receive(GoAwayFrame(0, last_stream_id=sids[2], error_code=0).serialize())
    assert pair.client.goaway_last == sids[1]
    # Streams at or below it still finish.
    assert pair.client.receive(DataFrame(sids[0], b"ok", flags=["END_STREAM"]).serialize()) == [
        (DATA, sids[0], b"ok", None),
        (END, sids[0], None, None),
    ]


def test_server_rst_stream_is_a_reset_event() -> None:
    pair = Pair()
    a = pair.client.start_request(GET, end_stream=True)
    b = pair.client.start_request(GET, end_stream=True)
    pair.pump()
    pair.server.reset_stream(a, error_code=7)
    assert pair.pump() == [(RESET, a, 7, "the upstream reset the stream (error code 7)")]
    pair.respond(b, 200, end_stream=True)
    assert kinds(pair.pump()) == [HEAD, END]
    assert pair.client.open_streams == 0


def test_our_reset_is_seen_by_the_server() -> None:
    pair = Pair()
    sid = pair.client.start_request(GET, end_stream=True)
    pair.pump()
    pair.client.reset(sid)
    pair.pump()
    assert pair.server_event(ev.StreamReset, sid).error_code == h2core.CANCEL
    assert pair.client.open_streams == 0
    pair.client.reset(sid)  # twice: no second RST_STREAM
    pair.pump()
    assert sum(isinstance(f, RstStreamFrame) for f in pair.sent) == 1


def test_abandoned_downloads_do_not_leak_the_connection_window() -> None:
    pair = Pair()
    chunk = b"d" * 16_384
    for _ in range(100):  # 100 x 240 KiB: far more than the 16 MiB connection window
        sid = pair.client.start_request(GET, end_stream=True)
        pair.pump()
        pair.respond(sid, 200)
        for _ in range(15):
            pair.server.send_data(sid, chunk)
        wire = pair.server.data_to_send()
        half = len(wire) // 2
        events = pair.client.receive(wire[:half])
        unread = len(pair.body_of(sid, events))
        pair.client.reset(sid, unread=unread)  # the caller read nothing of it
        assert pair.client.receive(wire[half:]) == []  # DATA for the reset stream: dropped
        pair.pump()
        assert pair.server_event(ev.StreamReset, sid)
    assert pair.server.outbound_flow_control_window > h2core.CONNECTION_WINDOW - h2core.CONNECTION_WINDOW // 4 - 1
    sid = pair.client.start_request(GET, end_stream=True)
    pair.pump()
    pair.respond(sid, 200)
    body = bytes(range(256)) * 80_000  # 20 MiB, through the connection window more than once
    assert pair.download(sid, body) == body
    assert ended(pair.events, sid)


def test_early_response_while_uploading_closes_the_stream_on_the_server() -> None:
    pair = Pair()
    sid = pair.client.start_request(POST, end_stream=False)
    pair.client.send_data(sid, b"part", end_stream=False)
    pair.pump()
    pair.respond(sid, 413, end_stream=True)  # answered before the request ended
    assert kinds(pair.pump()) == [HEAD, END]
    assert pair.client.open_streams == 0
    # The server's stream must not stay half-open, counting against its concurrency limit.
    assert pair.server.open_inbound_streams == 0
    assert pair.server_event(ev.StreamReset, sid).error_code == h2core.NO_ERROR
    # A request that ended first gets no RST_STREAM after its response.
    sid = pair.client.start_request(GET, end_stream=True)
    pair.pump()
    pair.respond(sid, 200, end_stream=True)
    pair.pump()
    assert [f.stream_id for f in pair.sent if isinstance(f, RstStreamFrame)] == [1]


# ------------------------------------------------------------------ malformed and hostile input

END_STREAM_F, END_HEADERS_F, PADDED_F, PRIORITY_F = 0x1, 0x4, 0x8, 0x20
OK_HEAD = [(b":status", b"200")]


def raw(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """A frame as bytes, built here (not by the code under test), any payload allowed."""
    return struct.pack(">L", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">L", stream_id) + payload


class Scripted:
    """Our client core against a server scripted frame by frame."""

    def __init__(self, settings: bytes = b"") -> None:
        self.core = ClientCore()
        self.core.data_to_send()
        self.encoder = hpack.Encoder()
        assert self.core.receive(raw(4, 0, 0, settings)) == [(WINDOW, 0, None, None)]
        assert [type(f) for f in self.written()] == [SettingsFrame]  # the ACK

    def open(self, headers: list[tuple[bytes, bytes]] = GET, end_stream: bool = True) -> int:
        sid = self.core.start_request(headers, end_stream)
        self.core.data_to_send()
        return sid

    def block(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        return self.encoder.encode(headers, huffman=False)

    def headers(self, sid: int, headers: list[tuple[bytes, bytes]], flags: int = END_HEADERS_F) -> bytes:
        return raw(1, flags, sid, self.block(headers))

    def feed(self, data: bytes) -> list[Event]:
        return self.core.receive(data)

    def written(self) -> list[Frame]:
        return parse_frames(self.core.data_to_send())


def assert_stream_reset(
    s: Scripted, events: list[Event], sid: int, code: int = h2core.PROTOCOL_ERROR, still_open: int = 0
) -> None:
    """A RESET event for `sid` alone, RST_STREAM written, and the connection still usable."""
    assert events and events[-1][:3] == (RESET, sid, code), events
    assert all(e[0] in (HEAD, DATA) and e[1] == sid for e in events[:-1]), events
    assert [(f.stream_id, f.error_code) for f in s.written() if isinstance(f, RstStreamFrame)] == [(sid, code)]
    assert not s.core.terminated and s.core.open_streams == still_open
    other = s.open()
    assert s.feed(s.headers(other, OK_HEAD, END_HEADERS_F | END_STREAM_F)) == [
        (HEAD, other, 200, []),
        (END, other, None, None),
    ]


def assert_terminated(s: Scripted, events: list[Event], code: int) -> None:
    """TERMINATED with `code`, GOAWAY with it written, and nothing more taken in."""
    assert events and events[-1][:3] == (TERMINATED, 0, code), events
    assert TERMINATED not in kinds(events[:-1])
    goaways = [f for f in s.written() if isinstance(f, GoAwayFrame)]
    assert [(g.error_code, g.last_stream_id) for g in goaways] == [(code, 0)]
    assert s.core.terminated and not s.core.can_open_stream()
    assert s.feed(raw(6, 0, 0, b"12345678")) == [] and s.written() == []


STREAM_ERRORS = {
    "upper-case name": [(b":status", b"200"), (b"X-Up", b"a")],
    "empty name": [(b":status", b"200"), (b"", b"a")],
    "colon in a name": [(b":status", b"200"), (b"a:b", b"c")],
    "connection": [(b":status", b"200"), (b"connection", b"close")],
    "keep-alive": [(b":status", b"200"), (b"keep-alive", b"5")],
    "proxy-connection": [(b":status", b"200"), (b"proxy-connection", b"close")],
    "transfer-encoding": [(b":status", b"200"), (b"transfer-encoding", b"chunked")],
    "upgrade": [(b":status", b"200"), (b"upgrade", b"h2c")],
    "CR in a value": [(b":status", b"200"), (b"x", b"a\rb")],
    "LF in a value": [(b":status", b"200"), (b"x", b"a\nb")],
    "NUL in a value": [(b":status", b"200"), (b"x", b"a\0b")],
    "a value starting with a space": [(b":status", b"200"), (b"x", b" a")],
    "a value ending with a tab": [(b":status", b"200"), (b"x", b"a\t")],
    "no :status": [(b"content-type", b"text/plain")],
    "empty": [],
    ":status of two digits": [(b":status", b"20")],
    ":status of four digits": [(b":status", b"2000")],
    ":status over 599": [(b":status", b"600")],
    ":status not digits": [(b":status", b"abc")],
    ":status signed": [(b":status", b"+20")],
    ":status after a field": [(b"x", b"y"), (b":status", b"200")],
    "pseudo-header after a field": [(b":status", b"200"), (b"x", b"y"), (b":path", b"/")],
    "two :status": [(b":status", b"200"), (b":status", b"200")],
    "conflicting content-length": [(b":status", b"200"), (b"content-length", b"5"), (b"content-length", b"6")],
    "content-length not digits": [(b":status", b"200"), (b"content-length", b"5a")],
    "negative content-length": [(b":status", b"200"), (b"content-length", b"-1")],
    "101": [(b":status", b"101")],
}


@pytest.mark.parametrize("headers", STREAM_ERRORS.values(), ids=STREAM_ERRORS.keys())
def test_a_malformed_response_head_resets_its_stream_alone(headers: list[tuple[bytes, bytes]]) -> None:
    s = Scripted()
    bystander = s.open()
    sid = s.open()
    events = s.feed(s.headers(sid, headers))
    assert_stream_reset(s, events, sid, still_open=1)
    # The other stream is untouched.
    assert s.feed(s.headers(bystander, OK_HEAD, END_HEADERS_F | END_STREAM_F)) == [
        (HEAD, bystander, 200, []),
        (END, bystander, None, None),
    ]


def test_duplicate_equal_content_lengths_are_one() -> None:
    s = Scripted()
    sid = s.open()
    head = [(b":status", b"200"), (b"content-length", b"2"), (b"content-length", b"2")]
    events = s.feed(s.headers(sid, head) + raw(0, END_STREAM_F, sid, b"ok"))
    assert kinds(events) == [HEAD, DATA, END]


def test_an_interim_response_ending_the_stream_resets_it() -> None:
    s = Scripted()
    sid = s.open()
    assert_stream_reset(s, s.feed(s.headers(sid, [(b":status", b"103")], END_HEADERS_F | END_STREAM_F)), sid)


def test_trailers_must_end_the_stream_and_hold_no_pseudo_headers() -> None:
    s = Scripted()
    sid = s.open()
    assert s.feed(s.headers(sid, OK_HEAD)) == [(HEAD, sid, 200, [])]
    assert_stream_reset(s, s.feed(s.headers(sid, [(b"x-trailer", b"1")])), sid)
    sid = s.open()
    assert s.feed(s.headers(sid, OK_HEAD)) == [(HEAD, sid, 200, [])]
    events = s.feed(s.headers(sid, [(b":status", b"200")], END_HEADERS_F | END_STREAM_F))
    assert_stream_reset(s, events, sid)


def test_data_longer_or_shorter_than_the_content_length() -> None:
    s = Scripted()
    sid = s.open()
    head = [(b":status", b"200"), (b"content-length", b"3")]
    assert kinds(s.feed(s.headers(sid, head))) == [HEAD]
    assert_stream_reset(s, s.feed(raw(0, 0, sid, b"abcd")), sid)
    sid = s.open()
    events = s.feed(s.headers(sid, head) + raw(0, 0, sid, b"ab") + raw(0, 0, sid, b"cd"))
    assert_stream_reset(s, events, sid)
    sid = s.open()
    events = s.feed(s.headers(sid, head) + raw(0, END_STREAM_F, sid, b"ab"))
    assert kinds(events)[:2] == [HEAD, DATA]
    assert_stream_reset(s, events, sid)
    sid = s.open()
    events = s.feed(s.headers(sid, head, END_HEADERS_F | END_STREAM_F))
    assert_stream_reset(s, events, sid)
    # Trailers end the body too: short is short.
    sid = s.open()
    events = s.feed(s.headers(sid, head) + raw(0, 0, sid, b"ab") + s.headers(sid, [(b"x", b"1")], 5))
    assert_stream_reset(s, events, sid)


def test_data_before_the_response_head_resets_the_stream() -> None:
    s = Scripted()
    sid = s.open()
    assert_stream_reset(s, s.feed(raw(0, 0, sid, b"early")), sid)


def test_a_response_head_over_the_header_list_limit_resets_the_stream() -> None:
    s = Scripted()
    sid = s.open()
    block = s.block([(b":status", b"200"), (b"x-big", b"v" * 70_000)])
    data = raw(1, 0, sid, block[:16_000]) + raw(9, 0, sid, block[16_000:32_000])
    data += raw(9, 0, sid, block[32_000:48_000]) + raw(9, 0, sid, block[48_000:64_000])
    data += raw(9, END_HEADERS_F, sid, block[64_000:])
    assert_stream_reset(s, s.feed(data), sid)


CONNECTION_ERRORS: dict[str, tuple[bytes, int]] = {
    "frame over 16384": (raw(0, 0, 1, b"x" * 16_385), h2core.FRAME_SIZE_ERROR),
    "frame over 16384, header only": (raw(0, 0, 1, b"x" * 16_385)[:9], h2core.FRAME_SIZE_ERROR),
    "PUSH_PROMISE": (raw(5, END_HEADERS_F, 1, b"\0\0\0\2\x82"), h2core.PROTOCOL_ERROR),
    "HEADERS on an even stream": (raw(1, 5, 2, b"\x88"), h2core.PROTOCOL_ERROR),
    "HEADERS on stream 0": (raw(1, 5, 0, b"\x88"), h2core.PROTOCOL_ERROR),
    "HEADERS on a never-opened stream": (raw(1, 5, 5, b"\x88"), h2core.PROTOCOL_ERROR),
    "DATA on an even stream": (raw(0, 0, 2, b"x"), h2core.PROTOCOL_ERROR),
    "DATA on stream 0": (raw(0, 0, 0, b"x"), h2core.PROTOCOL_ERROR),
    "DATA on a never-opened stream": (raw(0, 0, 7, b"x"), h2core.PROTOCOL_ERROR),
    "RST_STREAM on a never-opened stream": (raw(3, 0, 9, b"\0\0\0\0"), h2core.PROTOCOL_ERROR),
    "RST_STREAM on stream 0": (raw(3, 0, 0, b"\0\0\0\0"), h2core.PROTOCOL_ERROR),
    "RST_STREAM of 3 bytes": (raw(3, 0, 1, b"\0\0\0"), h2core.FRAME_SIZE_ERROR),
    "WINDOW_UPDATE on a never-opened stream": (raw(8, 0, 11, b"\0\0\0\1"), h2core.PROTOCOL_ERROR),
    "WINDOW_UPDATE of 3 bytes": (raw(8, 0, 0, b"\0\0\1"), h2core.FRAME_SIZE_ERROR),
    "CONTINUATION without HEADERS": (raw(9, END_HEADERS_F, 1, b"\x88"), h2core.PROTOCOL_ERROR),
    "CONTINUATION for another stream": (raw(1, 0, 1, b"\x88") + raw(9, 4, 3, b""), h2core.PROTOCOL_ERROR),
    "PING inside a header block": (raw(1, 0, 1, b"\x88") + raw(6, 0, 0, b"12345678"), h2core.PROTOCOL_ERROR),
    "DATA inside a header block": (raw(1, 0, 1, b"\x88") + raw(0, 0, 1, b"x"), h2core.PROTOCOL_ERROR),
    "unknown frame inside a header block": (raw(1, 0, 1, b"\x88") + raw(0x20, 0, 1, b"x"), h2core.PROTOCOL_ERROR),
    "SETTINGS of 7 bytes": (raw(4, 0, 0, b"\0\4\0\0\0\1\0"), h2core.FRAME_SIZE_ERROR),
    "SETTINGS on a stream": (raw(4, 0, 1, b""), h2core.PROTOCOL_ERROR),
    "SETTINGS ACK with a payload": (raw(4, 1, 0, b"\0\4\0\0\0\1"), h2core.FRAME_SIZE_ERROR),
    "ENABLE_PUSH 1": (raw(4, 0, 0, struct.pack(">HL", 2, 1)), h2core.PROTOCOL_ERROR),
    "INITIAL_WINDOW_SIZE 2^31": (raw(4, 0, 0, struct.pack(">HL", 4, 2**31)), h2core.FLOW_CONTROL_ERROR),
    "MAX_FRAME_SIZE 16383": (raw(4, 0, 0, struct.pack(">HL", 5, 16_383)), h2core.PROTOCOL_ERROR),
    "MAX_FRAME_SIZE 2^24": (raw(4, 0, 0, struct.pack(">HL", 5, 2**24)), h2core.PROTOCOL_ERROR),
    "connection WINDOW_UPDATE of 0": (raw(8, 0, 0, b"\0\0\0\0"), h2core.PROTOCOL_ERROR),
    "connection window over 2^31-1": (raw(8, 0, 0, struct.pack(">L", 2**31 - 65_535)), h2core.FLOW_CONTROL_ERROR),
    "PING of 7 bytes": (raw(6, 0, 0, b"1234567"), h2core.FRAME_SIZE_ERROR),
    "PING of 9 bytes": (raw(6, 0, 0, b"123456789"), h2core.FRAME_SIZE_ERROR),
    "PING on a stream": (raw(6, 0, 1, b"12345678"), h2core.PROTOCOL_ERROR),
    "GOAWAY of 7 bytes": (raw(7, 0, 0, b"\0" * 7), h2core.FRAME_SIZE_ERROR),
    "GOAWAY on a stream": (raw(7, 0, 1, b"\0" * 8), h2core.PROTOCOL_ERROR),
    "PRIORITY on stream 0": (raw(2, 0, 0, b"\0\0\0\1\x10"), h2core.PROTOCOL_ERROR),
    "bad HPACK index 0": (raw(1, 5, 1, b"\x80"), h2core.COMPRESSION_ERROR),
    "bad HPACK index beyond the table": (raw(1, 5, 1, b"\xff\x50"), h2core.COMPRESSION_ERROR),
    "bad HPACK truncated literal": (raw(1, 5, 1, b"\x40\x05ab"), h2core.COMPRESSION_ERROR),
    "padding longer than the DATA": (raw(0, PADDED_F, 1, b"\x05abc"), h2core.PROTOCOL_ERROR),
    "padding longer than the HEADERS": (raw(1, 5 | PADDED_F, 1, b"\x02\x88"), h2core.PROTOCOL_ERROR),
    "HEADERS too short for its priority": (raw(1, 5 | PRIORITY_F, 1, b"\0\0\0"), h2core.FRAME_SIZE_ERROR),
}


@pytest.mark.parametrize(("data", "code"), CONNECTION_ERRORS.values(), ids=CONNECTION_ERRORS.keys())
def test_a_connection_error_terminates_with_goaway(data: bytes, code: int) -> None:
    s = Scripted()
    s.open()  # stream 1
    s.open()  # stream 3
    assert_terminated(s, s.feed(data), code)


@pytest.mark.parametrize(("data", "code"), CONNECTION_ERRORS.values(), ids=CONNECTION_ERRORS.keys())
def test_a_connection_error_one_byte_at_a_time(data: bytes, code: int) -> None:
    s = Scripted()
    s.open()
    s.open()
    events: list[Event] = []
    for i in range(len(data)):
        events += s.feed(data[i : i + 1])
        if events:
            break
    assert_terminated(s, events, code)


def test_the_first_frame_must_be_settings() -> None:
    for first in (raw(6, 0, 0, b"12345678"), raw(8, 0, 0, b"\0\0\0\1"), raw(4, 1, 0, b"")):
        core = ClientCore()
        core.data_to_send()
        events = core.receive(first + raw(4, 0, 0))
        assert events[-1][:3] == (TERMINATED, 0, h2core.PROTOCOL_ERROR)
        assert [f.error_code for f in parse_frames(core.data_to_send()) if isinstance(f, GoAwayFrame)] == [1]


def test_stream_window_update_of_zero_and_overflow_reset_the_stream() -> None:
    s = Scripted()
    sid = s.open(POST, end_stream=False)
    assert_stream_reset(s, s.feed(raw(8, 0, sid, b"\0\0\0\0")), sid)
    sid = s.open(POST, end_stream=False)
    assert_stream_reset(s, s.feed(raw(8, 0, sid, struct.pack(">L", 2**31 - 65_535))), sid, h2core.FLOW_CONTROL_ERROR)
    # Up to 2^31-1 exactly is fine.
    sid = s.open(POST, end_stream=False)
    assert s.feed(raw(8, 0, sid, struct.pack(">L", 2**31 - 1 - 65_535))) == [(WINDOW, sid, None, None)]
    # ... and a SETTINGS growing it past that is a connection error.
    assert_terminated(s, s.feed(raw(4, 0, 0, struct.pack(">HL", 4, 65_536))), h2core.FLOW_CONTROL_ERROR)


def test_window_updates_for_closed_streams_are_ignored() -> None:
    s = Scripted()
    sid = s.open()
    s.feed(s.headers(sid, OK_HEAD, 5))
    assert s.feed(raw(8, 0, sid, b"\0\0\0\1") + raw(8, 0, sid, b"\0\0\0\0")) == []
    assert s.written() == []


def test_data_beyond_the_stream_window_resets_the_stream() -> None:
    s = Scripted()
    sid = s.open()
    events = s.feed(s.headers(sid, OK_HEAD))
    for _ in range(STREAM_WINDOW // 16_384):
        events += s.feed(raw(0, 0, sid, b"x" * 16_384))
    assert kinds(events) == [HEAD] + [DATA] * (STREAM_WINDOW // 16_384)
    assert_stream_reset(s, s.feed(raw(0, 0, sid, b"x")), sid, h2core.FLOW_CONTROL_ERROR)


def test_data_beyond_the_connection_window_terminates() -> None:
    s = Scripted()
    per_stream = STREAM_WINDOW // 16_384
    for _ in range(h2core.CONNECTION_WINDOW // STREAM_WINDOW):
        sid = s.open()
        s.feed(s.headers(sid, OK_HEAD))
        for _ in range(per_stream):
            assert s.feed(raw(0, 0, sid, b"x" * 16_384))[0][0] == DATA
    sid = s.open()
    assert s.feed(s.headers(sid, OK_HEAD)) == [(HEAD, sid, 200, [])]
    assert_terminated(s, s.feed(raw(0, 0, sid, b"x")), h2core.FLOW_CONTROL_ERROR)


def test_unknown_frame_types_and_priority_are_ignored() -> None:
    s = Scripted()
    sid = s.open()
    data = raw(0x20, 0xFF, 0, b"whatever") + raw(0xFA, 0, sid, b"") + raw(0x0B, 0, 99, b"x" * 100)
    data += raw(2, 0, sid, b"\0\0\0\0\x10") + raw(2, 0, 41, b"\0\0\0\0\x10")  # PRIORITY: deprecated, ignored
    assert s.feed(data) == [] and s.written() == []
    assert s.feed(s.headers(sid, OK_HEAD, 5)) == [(HEAD, sid, 200, []), (END, sid, None, None)]


def test_priority_of_a_wrong_length_resets_its_stream() -> None:
    s = Scripted()
    sid = s.open()
    events = s.feed(raw(2, 0, sid, b"\0\0\0\0"))
    assert_stream_reset(s, events, sid, h2core.FRAME_SIZE_ERROR)


def test_padded_headers_with_priority() -> None:
    s = Scripted()
    sid = s.open()
    block = s.block([(b":status", b"200"), (b"x", b"y")])
    payload = b"\x03" + b"\0\0\0\0\x10" + block + b"\0\0\0"
    events = s.feed(raw(1, END_HEADERS_F | END_STREAM_F | PADDED_F | PRIORITY_F, sid, payload))
    assert events == [(HEAD, sid, 200, [(b"x", b"y")]), (END, sid, None, None)]


def test_headers_for_a_reset_stream_still_update_the_hpack_table() -> None:
    s = Scripted()
    gone = s.open()
    kept = s.open()
    s.core.reset(gone)
    s.written()
    # Incremental indexing: the second block refers to the entry the first one added.
    first = s.encoder.encode([(b":status", b"200"), (b"x-shared", b"value")])
    second = s.encoder.encode([(b":status", b"200"), (b"x-shared", b"value")])
    assert len(second) < len(first)
    assert s.feed(raw(1, 5, gone, first)) == []
    assert s.feed(raw(1, 5, kept, second)) == [(HEAD, kept, 200, [(b"x-shared", b"value")]), (END, kept, None, None)]


def scenario() -> tuple[Scripted, bytes]:
    s = Scripted()
    a = s.open()
    b = s.open()
    block = s.block([(b":status", b"200"), *[(f"x-{i}".encode(), b"v" * 3000) for i in range(8)]])
    data = raw(1, 0, a, block[:10_000]) + raw(9, 0, a, block[10_000:20_000]) + raw(9, 4, a, block[20_000:])
    data += raw(6, 0, 0, b"pingpong") + raw(0x20, 0, 0, b"unknown")
    data += s.headers(b, [(b":status", b"404"), (b"content-length", b"4")])
    data += raw(0, PADDED_F, a, b"\x04body\0\0\0\0") + raw(0, END_STREAM_F, b, b"gone")
    data += raw(8, 0, 0, b"\0\0\1\0") + raw(0, 0, a, b"more") + s.headers(a, [(b"x-t", b"1")], 5)
    data += raw(7, 0, 0, b"\0\0\0\3\0\0\0\0")
    return s, data


def test_bytes_split_anywhere_give_the_same_events() -> None:
    s, data = scenario()
    whole = s.feed(data)
    assert kinds(whole) == [HEAD, HEAD, DATA, DATA, END, WINDOW, DATA, END, GOAWAY]
    whole_written = s.core.data_to_send()
    s, data = scenario()
    one_by_one = [e for i in range(len(data)) for e in s.feed(data[i : i + 1])]
    assert one_by_one == whole
    assert s.core.data_to_send() == whole_written
    for step in (2, 7, 9, 10, 4097, 16_393):
        s, data = scenario()
        assert [e for i in range(0, len(data), step) for e in s.feed(data[i : i + step])] == whole


# ------------------------------------------------------------------ our bytes, as h2 reads them


def test_request_headers_over_the_peers_max_frame_size_go_in_continuation_frames() -> None:
    pair = Pair()
    big = [(f"x-big-{i}".encode(), bytes([97 + i]) * 10_000) for i in range(5)]
    sid = pair.client.start_request([*GET, *big], end_stream=True)
    pair.pump()
    frames = [f for f in pair.sent if f.stream_id == sid]
    assert [type(f) for f in frames] == [HeadersFrame, ContinuationFrame, ContinuationFrame, ContinuationFrame]
    assert [sorted(f.flags) for f in frames] == [["END_STREAM"], [], [], ["END_HEADERS"]]
    assert all(len(f.serialize_body()) <= 16_384 for f in frames)
    request = pair.server_event(ev.RequestReceived, sid)
    assert request.headers == [*GET, *big] and pair.server_event(ev.StreamEnded, sid)
    # With a larger MAX_FRAME_SIZE from the server, one frame holds it all.
    pair.server.update_settings({SettingCodes.MAX_FRAME_SIZE: 65_536})
    pair.pump()
    sid = pair.client.start_request([*POST, *big], end_stream=False)
    pair.client.send_data(sid, b"x", end_stream=True)
    pair.pump()
    assert [type(f).__name__ for f in pair.sent if f.stream_id == sid] == ["HeadersFrame", "DataFrame"]
    assert pair.server_event(ev.RequestReceived, sid).headers == [*POST, *big]


def test_close_sends_goaway() -> None:
    pair = Pair()
    sid = pair.client.start_request(GET, end_stream=True)
    pair.pump()
    pair.client.close()
    pair.pump()
    terminated = [e for e in pair.server_events if isinstance(e, ev.ConnectionTerminated)]
    assert [(t.error_code, t.last_stream_id) for t in terminated] == [(0, 0)]
    assert pair.client.terminated and not pair.client.can_open_stream()
    pair.client.close()  # once only
    pair.client.reset(sid)  # nothing more after GOAWAY
    assert pair.client.data_to_send() == b""


def test_everything_we_send_is_valid_to_h2() -> None:
    """A busy mix, every byte through h2's own checks (it raises on anything invalid)."""
    pair = Pair({SettingCodes.INITIAL_WINDOW_SIZE: 5_000})
    sids = []
    for i in range(20):
        sid = pair.client.start_request([*POST[:3], (b":path", f"/{i}".encode()), (b"x-n", b"v" * i * 100)], False)
        sids.append(sid)
        pair.client.send_data(sid, b"p" * min(pair.client.sendable(sid), 3_000), end_stream=i % 2 == 0)
        if i % 5 == 4:
            pair.client.reset(sid)
        pair.pump()
    pair.client.close(h2core.NO_ERROR)
    pair.pump()
    assert isinstance(pair.server_events[-1], ev.ConnectionTerminated)
    assert {type(f) for f in pair.sent} == {
        SettingsFrame,
        WindowUpdateFrame,
        HeadersFrame,
        DataFrame,
        RstStreamFrame,
        GoAwayFrame,
    }


def test_no_body_responses_may_carry_a_content_length() -> None:
    s = Scripted()
    head = [(b":method", b"HEAD"), *GET[1:]]
    sid = s.open(head)
    events = s.feed(s.headers(sid, [(b":status", b"200"), (b"content-length", b"1234")], 5))
    assert events == [(HEAD, sid, 200, [(b"content-length", b"1234")]), (END, sid, None, None)]
    sid = s.open()
    events = s.feed(s.headers(sid, [(b":status", b"304"), (b"content-length", b"1234")], 5))
    assert events == [(HEAD, sid, 304, [(b"content-length", b"1234")]), (END, sid, None, None)]
    # An ordinary GET still holds the body to its length.
    sid = s.open()
    assert_stream_reset(s, s.feed(s.headers(sid, [(b":status", b"200"), (b"content-length", b"3")], 5)), sid)
    # No content means none: DATA on a HEAD response is malformed.
    sid = s.open(head)
    events = s.feed(s.headers(sid, [(b":status", b"200"), (b"content-length", b"3")]) + raw(0, 1, sid, b"abc"))
    assert_stream_reset(s, events, sid)
