"""The HTTP/2 client core, without sockets: against the `h2` package's server state
machine pumped in memory (interop, flow control, backpressure), against hand-built
hostile frames (each with its exact outcome), and our own bytes checked by `h2`."""

from __future__ import annotations

from typing import Any

import h2.events as ev
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
)

from sidecar.upstream import h2core
from sidecar.upstream.h2core import (
    DATA,
    END,
    GOAWAY,
    HEAD,
    RESET,
    STREAM_WINDOW,
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
