"""One HTTP/2 client connection as plain code (RFC 9113): bytes in, events out.

No I/O and no event loop: the shell (h2conn.py) feeds it what the socket
received, writes out what :meth:`ClientCore.data_to_send` returns, and wakes
the requests the events name.  It speaks only what a proxy's client side
needs and refuses the rest (see docs/http2.md):

* requests: HEADERS (+ CONTINUATION) and DATA within both send windows;
* responses: interim 1xx skipped, the final head checked (one ``:status``,
  lower-case names, no connection-specific fields, no CR/LF/NUL in a value,
  ``content-length`` kept by the DATA that follows), trailers ending the
  stream; a malformed response resets its stream alone;
* flow control: the receive window is given back only as the caller consumes
  the body (:meth:`consumed`), so a slow caller slows its upstream stream;
* SETTINGS, PING and GOAWAY answered here; server push refused (we disable it);
* any connection error ends the connection with GOAWAY and a
  :data:`TERMINATED` event.

Events are tuples, ``(kind, stream_id, a, b)``, for speed on the hot path.

Why one module over 400 lines: the handlers of the ten frame types read and
write one state (the stream table, both directions' windows, the header
block in progress); the message rules are already out, in h2fields.py.
"""

from __future__ import annotations

import struct

from .h2fields import MalformedResponse, response_head
from .h2hpack import Decoder, Encoder, HeaderListTooLarge, HPACKError

Header = tuple[bytes, bytes]
Event = tuple[int, int, object, object]

# Event kinds: (kind, stream_id, a, b)
HEAD = 1  # a: status (int), b: headers (list); the final response head
DATA = 2  # a: bytes, b: unused
END = 3  # the response ended (END_STREAM)
RESET = 4  # a: error code, b: message (str) — by the peer, or by us for a malformed response
GOAWAY = 5  # stream_id: the last stream the peer may process; a: error code
WINDOW = 6  # a send window grew: senders may go on
TERMINATED = 7  # the connection is dead; a: error code, b: message

# Frame types and flags (RFC 9113 §6)
_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS, _PUSH_PROMISE = 0, 1, 2, 3, 4, 5
_PING, _GOAWAY, _WINDOW_UPDATE, _CONTINUATION = 6, 7, 8, 9
_END_STREAM = _ACK = 0x1
_END_HEADERS, _PADDED, _PRIORITY_FLAG = 0x4, 0x8, 0x20

# Error codes (RFC 9113 §7)
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 5, 6, 7, 8, 9

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_FRAME = struct.Struct(">BHBBL")  # length as 8 + 16 bits, type, flags, stream id
_MAX_WINDOW = 2**31 - 1
_DEFAULT_WINDOW = 65_535
_MAX_FRAME = 16_384  # what we accept (the default: we do not raise it)
_HEADER_BLOCK_LIMIT = 256 * 1024  # HEADERS + CONTINUATION fragments of one block
# Receive windows: a stream may run this far ahead of its caller; the
# connection as a whole this far (given back as callers consume).
STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
_MAX_STREAM_ID = 2**31 - 1


class StreamError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class ConnectionError_(Exception):  # (the builtin ConnectionError is an OSError)
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Stream:
    __slots__ = (
        "send_window",
        "recv_window",
        "unacked",
        "local_closed",
        "head_done",
        "length",
        "received",
        "head_request",
    )

    def __init__(self, send_window: int) -> None:
        self.send_window = send_window
        self.recv_window = STREAM_WINDOW
        self.unacked = 0  # consumed by the caller, not yet given back
        self.local_closed = False
        self.head_done = False
        self.length: int | None = None  # the response's content-length
        self.received = 0
        self.head_request = False  # its response has no content whatever its content-length says


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    length = len(payload)
    return _FRAME.pack(length >> 16, length & 0xFFFF, kind, flags, stream_id) + payload


class ClientCore:
    """The client side of one HTTP/2 connection."""

    def __init__(self, max_header_list_size: int = 65_536) -> None:
        self._out: list[bytes] = [
            PREFACE,
            # ENABLE_PUSH 0, INITIAL_WINDOW_SIZE, MAX_HEADER_LIST_SIZE
            frame(_SETTINGS, 0, 0, struct.pack(">HLHLHL", 2, 0, 4, STREAM_WINDOW, 6, max_header_list_size)),
            frame(_WINDOW_UPDATE, 0, 0, struct.pack(">L", CONNECTION_WINDOW - _DEFAULT_WINDOW)),
        ]
        self._decoder = Decoder(max_header_list_size=max_header_list_size)
        self._encoder = Encoder()
        self._buffer = b""
        self._streams: dict[int, _Stream] = {}
        self._next_stream_id = 1
        self._send_window = _DEFAULT_WINDOW
        self._recv_window = CONNECTION_WINDOW
        self._unacked = 0
        self._peer_initial_window = _DEFAULT_WINDOW
        self._peer_max_frame = 16_384
        self._block: tuple[int, int, list[bytes]] | None = None  # a header block awaiting CONTINUATION
        self.settings_received = False
        self.max_concurrent_streams: int | None = None  # None: the peer set no limit (yet)
        self.goaway_last: int | None = None  # set once the peer sent GOAWAY
        self.terminated = False

    # ------------------------------------------------------------ reads

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def can_open_stream(self) -> bool:
        return not self.terminated and self.goaway_last is None and self._next_stream_id <= _MAX_STREAM_ID

    def sendable(self, stream_id: int) -> int:
        """How many body bytes ``stream_id`` may send now (0: wait for a WINDOW event)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed:
            return 0
        return max(0, min(stream.send_window, self._send_window))

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    # ------------------------------------------------------------ requests

    def start_request(self, headers: list[Header], end_stream: bool) -> int:
        """Open a stream with a request head; its id.  ``headers`` lower-case, pseudo-headers first."""
        stream_id = self._next_stream_id
        self._next_stream_id += 2
        block = self._encoder.encode(headers)
        stream = self._streams[stream_id] = _Stream(self._peer_initial_window)
        stream.local_closed = end_stream
        stream.head_request = (b":method", b"HEAD") in headers
        size = self._peer_max_frame
        flags = _END_STREAM if end_stream else 0
        if len(block) <= size:
            self._out.append(frame(_HEADERS, flags | _END_HEADERS, stream_id, block))
            return stream_id
        self._out.append(frame(_HEADERS, flags, stream_id, block[:size]))
        for start in range(size, len(block), size):
            last = start + size >= len(block)
            self._out.append(frame(_CONTINUATION, _END_HEADERS if last else 0, stream_id, block[start : start + size]))
        return stream_id

    def send_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        """Queue body bytes; ``len(data)`` must not exceed :meth:`sendable`."""
        stream = self._streams[stream_id]
        size = len(data)
        stream.send_window -= size
        self._send_window -= size
        step = self._peer_max_frame
        for start in range(0, size, step):
            chunk = data[start : start + step]
            last = end_stream and start + step >= size
            self._out.append(frame(_DATA, _END_STREAM if last else 0, stream_id, chunk))
        if end_stream:
            if not size:
                self._out.append(frame(_DATA, _END_STREAM, stream_id))
            stream.local_closed = True

    def reset(self, stream_id: int, code: int = CANCEL, unread: int = 0) -> None:
        """Abandon a stream; ``unread``: body bytes received for it that no caller will consume."""
        self._give_back(unread)
        if self._streams.pop(stream_id, None) is not None and not self.terminated:
            self._out.append(frame(_RST_STREAM, 0, stream_id, struct.pack(">L", code)))

    def consumed(self, stream_id: int, size: int) -> None:
        """A caller took ``size`` body bytes: give the window back once half of it is used."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.unacked += size
            if stream.unacked >= STREAM_WINDOW // 2:
                stream.recv_window += stream.unacked
                self._out.append(frame(_WINDOW_UPDATE, 0, stream_id, struct.pack(">L", stream.unacked)))
                stream.unacked = 0
        self._give_back(size)

    def give_back(self, size: int) -> None:
        """Body bytes received that no caller will consume (a stream reset since)."""
        self._give_back(size)

    def _give_back(self, size: int) -> None:
        if size <= 0:
            return
        self._unacked += size
        if self._unacked >= CONNECTION_WINDOW // 4 and not self.terminated:
            self._recv_window += self._unacked
            self._out.append(frame(_WINDOW_UPDATE, 0, 0, struct.pack(">L", self._unacked)))
            self._unacked = 0

    def close(self, code: int = NO_ERROR) -> None:
        """Say goodbye: GOAWAY (we accept no streams of the peer's)."""
        if not self.terminated:
            self.terminated = True
            self._out.append(frame(_GOAWAY, 0, 0, struct.pack(">LL", 0, code)))

    # ------------------------------------------------------------ receiving

    def receive(self, data: bytes) -> list[Event]:
        """Take in bytes from the peer; the events they make."""
        events: list[Event] = []
        if self.terminated:
            return events
        buffer = self._buffer + data if self._buffer else data
        view = memoryview(buffer)
        end = len(buffer)
        position = 0
        try:
            while end - position >= 9:
                high, low, kind, flags, stream_id = _FRAME.unpack_from(buffer, position)
                length = high << 16 | low
                if length > _MAX_FRAME:
                    raise ConnectionError_(FRAME_SIZE_ERROR, f"a frame of {length} bytes, over {_MAX_FRAME}")
                stop = position + 9 + length
                if stop > end:
                    break
                payload = bytes(view[position + 9 : stop]) if length else b""
                position = stop
                stream_id &= _MAX_STREAM_ID
                try:
                    self._frame(kind, flags, stream_id, payload, events)
                except StreamError as error:
                    self._streams.pop(stream_id, None)
                    self._out.append(frame(_RST_STREAM, 0, stream_id, struct.pack(">L", error.code)))
                    events.append((RESET, stream_id, error.code, f"malformed response: {error}"))
        except ConnectionError_ as error:
            self.close(error.code)
            self._buffer = b""
            events.append((TERMINATED, 0, error.code, str(error)))
            return events
        finally:
            view.release()
        self._buffer = buffer[position:] if position < end else b""
        return events

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if self._block is not None and kind != _CONTINUATION:
            raise ConnectionError_(PROTOCOL_ERROR, "a frame inside a header block")
        if not self.settings_received and kind != _SETTINGS:
            raise ConnectionError_(PROTOCOL_ERROR, "the server's first frame is not SETTINGS")
        if kind == _DATA:
            self._on_data(flags, stream_id, payload, events)
        elif kind == _HEADERS:
            self._on_headers(flags, stream_id, payload, events)
        elif kind == _CONTINUATION:
            self._on_continuation(flags, stream_id, payload, events)
        elif kind == _SETTINGS:
            self._on_settings(flags, stream_id, payload, events)
        elif kind == _WINDOW_UPDATE:
            self._on_window_update(stream_id, payload, events)
        elif kind == _RST_STREAM:
            if len(payload) != 4:
                raise ConnectionError_(FRAME_SIZE_ERROR, "RST_STREAM is not 4 bytes")
            self._known(stream_id, "RST_STREAM")
            if self._streams.pop(stream_id, None) is not None:
                code = int.from_bytes(payload, "big")
                events.append((RESET, stream_id, code, f"the upstream reset the stream (error code {code})"))
        elif kind == _PING:
            if len(payload) != 8 or stream_id:
                raise ConnectionError_(FRAME_SIZE_ERROR if stream_id == 0 else PROTOCOL_ERROR, "a malformed PING")
            if not flags & _ACK:
                self._out.append(frame(_PING, _ACK, 0, payload))
        elif kind == _GOAWAY:
            if stream_id or len(payload) < 8:
                raise ConnectionError_(PROTOCOL_ERROR if stream_id else FRAME_SIZE_ERROR, "a malformed GOAWAY")
            last = int.from_bytes(payload[:4], "big") & _MAX_STREAM_ID
            self.goaway_last = last if self.goaway_last is None else min(last, self.goaway_last)
            events.append((GOAWAY, self.goaway_last, int.from_bytes(payload[4:8], "big"), None))
        elif kind == _PUSH_PROMISE:
            raise ConnectionError_(PROTOCOL_ERROR, "PUSH_PROMISE although push is disabled")
        elif kind == _PRIORITY:  # deprecated (RFC 9113 §5.3.2): checked, then ignored
            if not stream_id:
                raise ConnectionError_(PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                raise StreamError(FRAME_SIZE_ERROR, "PRIORITY is not 5 bytes")
        # Unknown frame types are ignored (RFC 9113 §4.1).

    def _known(self, stream_id: int, what: str) -> None:
        """A frame for a stream must name one we opened (open, or closed since)."""
        if stream_id == 0 or stream_id % 2 == 0 or stream_id >= self._next_stream_id:
            raise ConnectionError_(PROTOCOL_ERROR, f"{what} on stream {stream_id}, which we never opened")

    @staticmethod
    def _unpad(flags: int, payload: bytes, what: str) -> bytes:
        if not flags & _PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise ConnectionError_(PROTOCOL_ERROR, f"{what} padding longer than the frame")
        return payload[1 : len(payload) - payload[0]]

    def _on_data(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        self._known(stream_id, "DATA")
        size = len(payload)
        self._recv_window -= size
        if self._recv_window < 0:
            raise ConnectionError_(FLOW_CONTROL_ERROR, "DATA beyond the connection's receive window")
        data = self._unpad(flags, payload, "DATA")
        stream = self._streams.get(stream_id)
        if stream is None:  # a stream we reset: its DATA still counts against the connection window
            self._give_back(size)
            return
        stream.recv_window -= size
        problem = None
        if stream.recv_window < 0:
            problem = StreamError(FLOW_CONTROL_ERROR, "DATA beyond the stream's receive window")
        elif not stream.head_done:
            problem = StreamError(PROTOCOL_ERROR, "DATA before the response head")
        stream.received += len(data)
        if stream.length is not None and stream.received > stream.length:
            problem = StreamError(PROTOCOL_ERROR, "more DATA than the content-length")
        if problem is not None:
            self._give_back(size)  # nobody will consume it
            raise problem
        if size > len(data):  # padding: nobody will consume it either, so it counts as consumed now
            self.consumed(stream_id, size - len(data))
        if data:
            events.append((DATA, stream_id, data, None))
        if flags & _END_STREAM:
            self._end(stream_id, stream, events)

    def _end(self, stream_id: int, stream: _Stream, events: list[Event]) -> None:
        if stream.length is not None and stream.received != stream.length:
            raise StreamError(PROTOCOL_ERROR, "the body is shorter than its content-length")
        del self._streams[stream_id]
        if not stream.local_closed:
            # Answered before the request ended: the rest of it will not be sent, and the
            # peer's stream must not stay half-open, counting against its stream limit.
            self._out.append(frame(_RST_STREAM, 0, stream_id, struct.pack(">L", NO_ERROR)))
        events.append((END, stream_id, None, None))

    def _on_headers(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id == 0 or stream_id % 2 == 0:
            raise ConnectionError_(PROTOCOL_ERROR, f"HEADERS on stream {stream_id}")
        block = self._unpad(flags, payload, "HEADERS")
        if flags & _PRIORITY_FLAG:
            if len(block) < 5:
                raise ConnectionError_(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            block = block[5:]
        if flags & _END_HEADERS:
            self._on_block(flags, stream_id, block, events)
        else:
            self._block = (stream_id, flags, [block])

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        pending = self._block
        if pending is None or pending[0] != stream_id:
            raise ConnectionError_(PROTOCOL_ERROR, "CONTINUATION outside a header block")
        pending[2].append(payload)
        if sum(map(len, pending[2])) > _HEADER_BLOCK_LIMIT:
            raise ConnectionError_(PROTOCOL_ERROR, "a header block over 256 KiB")
        if flags & _END_HEADERS:
            self._block = None
            self._on_block(pending[1], stream_id, b"".join(pending[2]), events)

    def _on_block(self, flags: int, stream_id: int, block: bytes, events: list[Event]) -> None:
        self._known(stream_id, "HEADERS")
        # Decoded whatever becomes of the stream: the decoder's table must follow the peer's.
        try:
            headers = self._decoder.decode(block)
        except HPACKError as error:
            raise ConnectionError_(COMPRESSION_ERROR, f"undecodable header block: {error}") from None
        except HeaderListTooLarge:
            raise StreamError(PROTOCOL_ERROR, "a response header list over the limit") from None
        stream = self._streams.get(stream_id)
        if stream is None:
            return  # a stream we reset
        end_stream = bool(flags & _END_STREAM)
        if stream.head_done:
            if not end_stream:
                raise StreamError(PROTOCOL_ERROR, "trailers without END_STREAM")
            if any(name[:1] == b":" for name, _ in headers):
                raise StreamError(PROTOCOL_ERROR, "a pseudo-header in trailers")
            self._end(stream_id, stream, events)
            return
        try:
            status, fields, length = response_head(headers)
        except MalformedResponse as error:
            raise StreamError(PROTOCOL_ERROR, str(error)) from None
        if status < 200:
            if status == 101 or end_stream:
                raise StreamError(PROTOCOL_ERROR, f"an interim {status} response that is not one")
            return  # 100, 103, ...: the final head is still to come
        stream.head_done = True
        # HEAD, 204 and 304 have no content, whatever a content-length there says (it
        # describes the response a GET would get): any DATA at all is malformed.
        stream.length = 0 if stream.head_request or status in (204, 304) else length
        events.append((HEAD, stream_id, status, fields))
        if end_stream:
            self._end(stream_id, stream, events)

    def _on_settings(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id:
            raise ConnectionError_(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & _ACK:
            if not self.settings_received:  # the server's preface is its own SETTINGS, not an ACK
                raise ConnectionError_(PROTOCOL_ERROR, "the server's first frame is a SETTINGS ACK")
            if payload:
                raise ConnectionError_(FRAME_SIZE_ERROR, "a SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS not a multiple of 6 bytes")
        self.settings_received = True
        for offset in range(0, len(payload), 6):
            code, value = struct.unpack_from(">HL", payload, offset)
            if code == 2 and value != 0:  # ENABLE_PUSH: a server may only say 0
                raise ConnectionError_(PROTOCOL_ERROR, f"ENABLE_PUSH {value} from a server")
            if code == 3:
                self.max_concurrent_streams = value
            elif code == 4:
                if value > _MAX_WINDOW:
                    raise ConnectionError_(FLOW_CONTROL_ERROR, f"INITIAL_WINDOW_SIZE {value}")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for stream in self._streams.values():
                    stream.send_window += delta
                    if stream.send_window > _MAX_WINDOW:
                        raise ConnectionError_(FLOW_CONTROL_ERROR, "a stream's send window over 2^31-1")
            elif code == 5:
                if not 16_384 <= value <= 16_777_215:
                    raise ConnectionError_(PROTOCOL_ERROR, f"MAX_FRAME_SIZE {value}")
                self._peer_max_frame = value
        self._out.append(frame(_SETTINGS, _ACK, 0))
        events.append((WINDOW, 0, None, None))

    def _on_window_update(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, "WINDOW_UPDATE is not 4 bytes")
        increment = int.from_bytes(payload, "big") & _MAX_WINDOW
        if stream_id == 0:
            if not increment:
                raise ConnectionError_(PROTOCOL_ERROR, "a WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > _MAX_WINDOW:
                raise ConnectionError_(FLOW_CONTROL_ERROR, "the connection's send window over 2^31-1")
        else:
            self._known(stream_id, "WINDOW_UPDATE")
            stream = self._streams.get(stream_id)
            if stream is None:
                return
            if not increment:
                raise StreamError(PROTOCOL_ERROR, "a WINDOW_UPDATE of 0")
            stream.send_window += increment
            if stream.send_window > _MAX_WINDOW:
                raise StreamError(FLOW_CONTROL_ERROR, "the stream's send window over 2^31-1")
        events.append((WINDOW, stream_id, None, None))
