"""The framer's own rules: what a response is made of, and when the connection may carry another."""

from __future__ import annotations

import gc
import random

import pytest

from sidecar.upstream.h1frame import MAX_HEAD_BYTES, FramingError, ResponseFramer


def framed(data: bytes, method: bytes = b"GET", *, eof: bool = False) -> ResponseFramer:
    framer = ResponseFramer(method)
    framer.feed(data)
    if eof:
        framer.feed_eof()
    return framer


def refused(data: bytes, method: bytes = b"GET", *, eof: bool = False) -> str:
    with pytest.raises(FramingError) as error:
        framed(data, method, eof=eof)
    return str(error.value)


# ------------------------------------------------------------------ the head


def test_a_content_length_response() -> None:
    framer = framed(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello")
    assert framer.head_done and framer.complete
    assert framer.status == 200
    assert framer.http_version == "HTTP/1.1"
    assert framer.headers == [(b"Content-Type", b"text/plain"), (b"Content-Length", b"5")]
    assert framer.take_body() == b"hello"
    assert framer.reusable and not framer.trailing and not framer.close_after


def test_the_head_is_known_before_the_body_ends() -> None:
    framer = framed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel")
    assert framer.head_done and not framer.complete
    assert framer.take_body() == b"hel"
    framer.feed(b"lo worl")
    assert framer.take_body() == b"lo worl" and framer.complete
    assert framer.take_body() == b""


def test_take_body_joins_and_empties() -> None:
    framer = ResponseFramer(b"GET")
    framer.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
    for piece in (b"ab", b"cd", b"ef"):
        framer.feed(piece)
    assert framer.body == [b"ab", b"cd", b"ef"]
    assert framer.take_body() == b"abcdef"
    assert framer.body == []


def test_header_names_keep_their_case_and_repeats_their_order() -> None:
    framer = framed(
        b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nX-Mixed-Case: v\r\nset-cookie: b=2\r\nContent-Length: 0\r\n\r\n"
    )
    assert framer.headers == [
        (b"Set-Cookie", b"a=1"),
        (b"X-Mixed-Case", b"v"),
        (b"set-cookie", b"b=2"),
        (b"Content-Length", b"0"),
    ]


def test_values_lose_the_whitespace_around_them() -> None:
    # llhttp drops it in front of a value and keeps it behind; it is not part
    # of the value (RFC 9110 §5.5), and h11 dropped both.
    framer = framed(b"HTTP/1.1 200 OK\r\nX-Pad: \t a b \t \r\nX-Empty:  \r\nContent-Length: 2  \r\n\r\nhi")
    assert framer.headers == [(b"X-Pad", b"a b"), (b"X-Empty", b""), (b"Content-Length", b"2")]
    assert framer.take_body() == b"hi"


def test_http_1_0() -> None:
    framer = framed(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert framer.http_version == "HTTP/1.0" and framer.complete
    assert not framer.reusable  # HTTP/1.0 closes unless it says keep-alive


@pytest.mark.parametrize("status", [b"HTTP/1.1 600 Odd", b"HTTP/1.1 099 Odd", b"HTTP/2.0 200 OK", b"HTTP/0.9 200 OK"])
def test_a_status_line_this_proxy_cannot_relay(status: bytes) -> None:
    message = refused(status + b"\r\nContent-Length: 0\r\n\r\n")
    assert "HTTP/" in message or "outside 100-599" in message


@pytest.mark.parametrize("char", [b"\x00", b"\x01", b"\x0b", b"\x0c", b"\x1f", b"\x7f"])
@pytest.mark.parametrize("status", [b"200", b"103"])
def test_a_control_character_in_the_reason_phrase(char: bytes, status: bytes) -> None:
    data = b"HTTP/1.1 " + status + b" O" + char + b"K\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert "reason phrase" in refused(data)


def test_a_reason_phrase_with_tabs_and_obs_text() -> None:
    framer = framed(b"HTTP/1.1 200 \tOK \xe9t\xe9\r\nContent-Length: 0\r\n\r\n")
    assert framer.complete and framer.status == 200


def test_the_framers_own_message_reaches_the_caller() -> None:
    assert refused(b"HTTP/1.1 600 Odd\r\n\r\n") == "status 600 is outside 100-599"


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n",  # obs-fold
        b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",  # bare LF
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",  # duplicate length
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",  # conflicting length
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello",  # a list
        b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n",  # space before the colon
        b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 0\r\n\r\n",  # NUL
        b"garbage\r\n\r\n",
    ],
)
def test_malformed_heads(data: bytes) -> None:
    refused(data)


@pytest.mark.parametrize("coding", [b"", b"Transfer-Encoding: chunked\r\n"], ids=["alone", "beside chunked"])
def test_a_content_length_of_more_than_20_digits(coding: bytes) -> None:
    # Zeros in front keep the value small for llhttp; h11 refused a length
    # longer than any 64-bit number is written.
    length = b"Content-Length: " + b"0" * 20 + b"5\r\n"
    assert "Content-Length" in refused(b"HTTP/1.1 200 OK\r\n" + length + coding + b"\r\n0\r\n\r\n")
    twenty = framed(b"HTTP/1.1 200 OK\r\nContent-Length: " + b"0" * 19 + b"5\r\n\r\nhello")
    assert twenty.complete and twenty.take_body() == b"hello"


def test_a_head_just_under_the_limit() -> None:
    value = b"v" * (MAX_HEAD_BYTES - 2000)
    framer = framed(b"HTTP/1.1 200 OK\r\nX-Big: " + value + b"\r\nContent-Length: 0\r\n\r\n")
    assert framer.complete and framer.headers[0] == (b"X-Big", value)


def test_a_head_over_the_limit() -> None:
    fields = b"".join(b"X-F%d: %s\r\n" % (i, b"f" * 1000) for i in range(MAX_HEAD_BYTES // 1000 + 5))
    assert f"over {MAX_HEAD_BYTES} bytes" in refused(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n")


def test_interim_heads_count_towards_the_limit() -> None:
    half = b"X-Half: " + b"h" * (MAX_HEAD_BYTES // 2 + 100) + b"\r\n"
    data = b"HTTP/1.1 103 Early Hints\r\n" + half + b"\r\nHTTP/1.1 200 OK\r\n" + half + b"Content-Length: 0\r\n\r\n"
    assert f"over {MAX_HEAD_BYTES} bytes" in refused(data)


@pytest.mark.parametrize("piece", [4096, 65536, MAX_HEAD_BYTES + 1])
def test_a_head_that_never_ends_is_refused_past_the_limit(piece: int) -> None:
    framer = ResponseFramer(b"GET")
    framer.feed(b"HTTP/1.1 200 OK\r\nX-Endless: ")
    fed = 0
    with pytest.raises(FramingError, match=f"over {MAX_HEAD_BYTES} bytes"):
        while fed <= 2 * MAX_HEAD_BYTES:
            framer.feed(b"v" * piece)
            fed += piece
    assert fed <= MAX_HEAD_BYTES + piece


def test_the_limit_is_on_the_bytes_of_the_head() -> None:
    # Field lines without a value: few bytes of names, many of the head.
    fields = b"a:\r\n" * (MAX_HEAD_BYTES // 4 + 10)
    assert f"over {MAX_HEAD_BYTES} bytes" in refused(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n")


def test_many_interim_responses_count_towards_the_limit() -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    framer = ResponseFramer(b"GET")
    with pytest.raises(FramingError, match=f"over {MAX_HEAD_BYTES} bytes"):
        for _ in range(MAX_HEAD_BYTES // len(interim) + 10):
            framer.feed(interim)


def test_a_head_exactly_at_the_limit() -> None:
    start = b"HTTP/1.1 200 OK\r\nX-Pad: "
    end = b"\r\nContent-Length: 0\r\n\r\n"
    exact = start + b"p" * (MAX_HEAD_BYTES - len(start) - len(end)) + end
    assert len(exact) == MAX_HEAD_BYTES
    for pieces in ([exact], [exact[:-1], exact[-1:]]):
        framer = ResponseFramer(b"GET")
        for piece in pieces:
            framer.feed(piece)
        assert framer.complete
    refused(start + b"p" * (MAX_HEAD_BYTES - len(start) - len(end) + 1) + end)


# ----------------------------------------------------------------- framing


def test_chunked() -> None:
    framer = framed(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
    )
    assert framer.complete and framer.reusable
    assert framer.take_body() == b"hello world"
    assert framer.headers == [(b"Transfer-Encoding", b"chunked")]


def test_trailers_are_not_headers() -> None:
    framer = framed(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Head: 1\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\nX-Other: 2\r\n\r\n"
    )
    assert framer.complete and framer.reusable
    assert framer.headers == [(b"Transfer-Encoding", b"chunked"), (b"X-Head", b"1")]
    assert framer.take_body() == b"hello"


@pytest.mark.parametrize(
    "trailers",
    [
        b"Transfer-Encoding: gzip\r\n",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        b"Content-Length: 000000000000000000005\r\n",
    ],
    ids=["gzip", "chunked twice", "21 digits"],
)
def test_framing_fields_in_the_trailers_follow_the_head_rules(trailers: bytes) -> None:
    # Not relayed, and meaningless there, but h11 refused them: so do we.
    refused(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n" + trailers + b"\r\n")


def test_a_trailer_section_over_the_limit() -> None:
    trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"t" * 1000) for i in range(MAX_HEAD_BYTES // 1000 + 5))
    message = refused(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n" + trailers + b"\r\n")
    assert f"trailer section over {MAX_HEAD_BYTES} bytes" in message


@pytest.mark.parametrize("piece", [4096, 65536])
def test_a_trailer_field_that_never_ends_is_refused_past_the_limit(piece: int) -> None:
    # httptools holds a field until it ends: the bytes between two pieces of
    # body are bounded like a head.
    framer = ResponseFramer(b"GET")
    framer.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Endless: ")
    fed = 0
    with pytest.raises(FramingError, match=f"over {MAX_HEAD_BYTES} bytes"):
        while fed <= 2 * MAX_HEAD_BYTES:
            framer.feed(b"v" * piece)
            fed += piece
    assert fed <= MAX_HEAD_BYTES + piece


def test_chunk_framing_between_body_bytes_is_not_limited_across_a_body() -> None:
    # Tiny chunks: far more framing than body, in reads that each carry body.
    chunks = b"1\r\nx\r\n" * 60000
    framer = ResponseFramer(b"GET")
    framer.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    for i in range(0, len(chunks), 256 * 1024):
        framer.feed(chunks[i : i + 256 * 1024])
    framer.feed(b"0\r\n\r\n")
    assert framer.complete and framer.take_body() == b"x" * 60000


@pytest.mark.parametrize("coding", [b"gzip", b"gzip, chunked", b"chunked, gzip", b"identity", b"chunked, chunked"])
def test_only_chunked_is_a_transfer_coding(coding: bytes) -> None:
    message = refused(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\n0\r\n\r\n", eof=True)
    assert "unsupported Transfer-Encoding" in message


def test_chunked_twice_in_two_fields() -> None:
    refused(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")


@pytest.mark.parametrize("order", ["length first", "coding first"])
def test_content_length_beside_chunked(order: str) -> None:
    fields = [b"Content-Length: 3", b"Transfer-Encoding: chunked", b"X-Other: 1"]
    if order == "coding first":
        fields[0], fields[1] = fields[1], fields[0]
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(field + b"\r\n" for field in fields) + b"\r\n"
    framer = framed(head + b"5\r\nhello\r\n0\r\n\r\n")
    # The coding frames the body, the length is never relayed, and the
    # connection is closed afterwards.
    assert framer.complete and framer.take_body() == b"hello"
    assert framer.close_after and not framer.reusable
    assert all(name.lower() != b"content-length" for name, _ in framer.headers)
    assert (b"X-Other", b"1") in framer.headers


def test_an_invalid_chunk() -> None:
    refused(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloX0\r\n\r\n")


# ------------------------------------------------------- bodyless responses


def test_head_ends_with_its_head() -> None:
    framer = framed(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", b"HEAD")
    assert framer.complete and framer.reusable
    assert framer.take_body() == b""
    assert framer.headers == [(b"Content-Length", b"1000")]


def test_head_with_a_body_anyway() -> None:
    framer = framed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"HEAD")
    assert framer.complete and framer.take_body() == b""
    assert framer.trailing and not framer.reusable


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
def test_204_and_304_end_with_their_head(status: bytes) -> None:
    framer = framed(b"HTTP/1.1 " + status + b"\r\nContent-Length: 100\r\n\r\n")
    assert framer.complete and framer.reusable and framer.take_body() == b""
    framer.feed(b"hello")
    assert framer.trailing and not framer.reusable and framer.take_body() == b""


# ------------------------------------------------------- interim responses


@pytest.mark.parametrize("interim", [b"100 Continue", b"102 Processing", b"103 Early Hints"])
def test_interim_responses_are_skipped(interim: bytes) -> None:
    framer = ResponseFramer(b"GET")
    framer.feed(b"HTTP/1.1 " + interim + b"\r\nLink: </a.css>; rel=preload\r\n\r\n")
    assert not framer.head_done
    framer.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert framer.head_done and framer.complete and framer.reusable
    assert framer.status == 200
    assert framer.headers == [(b"Content-Length", b"2")]
    assert framer.take_body() == b"hi"


@pytest.mark.parametrize(
    "pieces",
    [
        [b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
        [b"\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
        [b"\n", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
        [b"HTTP/1.1 100 Continue\r\n\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
        [b"HTTP/1.1 100 Continue\r\n\r\n", b"\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
        [b"HTTP/1.1 100 Continue\r\n\r", b"\n\n", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
    ],
    ids=["at the start", "at the start, alone", "a bare LF", "after a 100", "after a 100, alone", "after a 100, split"],
)
def test_an_empty_line_before_a_status_line(pieces: list[bytes]) -> None:
    # llhttp skips empty lines before a message; a response has none (h11 refuses them too).
    framer = ResponseFramer(b"GET")
    with pytest.raises(FramingError, match="empty line before the status line"):
        for piece in pieces:
            framer.feed(piece)


@pytest.mark.parametrize("coding", [b"gzip", b"chunked\r\nTransfer-Encoding: chunked"])
def test_an_interim_response_with_a_coding_the_final_one_could_not_have(coding: bytes) -> None:
    data = (
        b"HTTP/1.1 100 Continue\r\nTransfer-Encoding: "
        + coding
        + b"\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    )
    assert "unsupported Transfer-Encoding" in refused(data)


@pytest.mark.parametrize(
    "interim",
    [b"HTTP/1.1 100 Continue\r\nConnection: close\r\n\r\n", b"HTTP/1.0 100 Continue\r\n\r\n"],
    ids=["Connection: close", "HTTP/1.0"],
)
def test_an_interim_response_that_says_close(interim: bytes) -> None:
    # llhttp would take it for the last message on the connection and refuse
    # the final response after it; the final response decides.
    framer = framed(interim + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert framer.complete and framer.status == 200 and framer.take_body() == b"hi"
    assert framer.reusable


def test_101_is_refused() -> None:
    message = refused(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n")
    assert "switched protocols" in message
    assert "switched protocols" in refused(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")


# -------------------------------------------------------------- keep-alive


@pytest.mark.parametrize(
    ("connection", "reusable"),
    [
        (b"", True),
        (b"Connection: keep-alive\r\n", True),
        (b"Connection: close\r\n", False),
        (b"Connection: Close\r\n", False),
        (b"Connection: keep-alive, close\r\n", False),
    ],
)
def test_keep_alive_in_http_1_1(connection: bytes, reusable: bool) -> None:
    framer = framed(b"HTTP/1.1 200 OK\r\n" + connection + b"Content-Length: 2\r\n\r\nhi")
    assert framer.complete and framer.reusable is reusable


@pytest.mark.parametrize("connection", [b"", b"Connection: close\r\n", b"Connection: keep-alive\r\n"])
def test_http_1_0_is_never_reused(connection: bytes) -> None:
    # The request went out as HTTP/1.1 without "keep-alive": an HTTP/1.0
    # server that answers "keep-alive" anyway is not trusted with another
    # (h11, and so httpcore, closed it too).
    framer = framed(b"HTTP/1.0 200 OK\r\n" + connection + b"Content-Length: 2\r\n\r\nhi")
    assert framer.complete and not framer.reusable


@pytest.mark.parametrize(
    ("connection", "reusable"),
    [(b"", True), (b"Connection: close\r\n", False), (b"Connection: keep-alive\r\nConnection: close\r\n", False)],
)
def test_a_head_response_without_a_length(connection: bytes, reusable: bool) -> None:
    # llhttp would read its body to EOF and calls it not keep-alive; it has
    # no body, and the connection stays usable.
    framer = framed(b"HTTP/1.1 200 OK\r\n" + connection + b"\r\n", b"HEAD")
    assert framer.complete and framer.reusable is reusable


def test_connection_tokens_are_whole_words() -> None:
    assert framed(b"HTTP/1.1 200 OK\r\nConnection: closer\r\nContent-Length: 0\r\n\r\n").reusable
    assert not framed(b"HTTP/1.1 200 OK\r\nConnection: upgrade , CLOSE \r\nContent-Length: 0\r\n\r\n").reusable


# --------------------------------------------------------- reuse, trailing


def test_bytes_after_a_complete_response_make_it_trailing() -> None:
    framer = framed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert framer.reusable
    framer.feed(b"")
    assert framer.reusable  # nothing arrived
    framer.feed(b"X")
    assert framer.complete and framer.trailing and not framer.reusable
    assert framer.take_body() == b"hi"


@pytest.mark.parametrize(
    "extra",
    [
        b"garbage",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nho",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x00",
        b"\x00\x01",
    ],
    ids=["garbage", "a second response", "a 101 response", "binary"],
)
def test_bytes_after_the_response_in_the_same_read(extra: bytes) -> None:
    framer = framed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi" + extra)
    assert framer.complete and framer.trailing and not framer.reusable
    assert framer.status == 200 and framer.take_body() == b"hi"
    assert framer.headers == [(b"Content-Length", b"2")]


@pytest.mark.parametrize(
    ("method", "response"),
    [
        (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"),
        (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"),
        (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"),
    ],
    ids=["content-length", "chunked", "204", "HEAD"],
)
@pytest.mark.parametrize("extra", [b"\r\n", b"\n", b"\r", b"\r\n\r\n"], ids=["CRLF", "LF", "CR", "two CRLF"])
@pytest.mark.parametrize("delivery", ["same read", "next read"])
def test_line_ends_after_the_response_make_it_trailing(
    method: bytes, response: bytes, extra: bytes, delivery: str
) -> None:
    # llhttp skips them silently, as it skips empty lines before a message.
    framer = ResponseFramer(method)
    if delivery == "same read":
        framer.feed(response + extra)
    else:
        framer.feed(response)
        assert framer.complete and framer.reusable
        framer.feed(extra)
    assert framer.complete and framer.trailing and not framer.reusable


@pytest.mark.parametrize("body", [b"\r\n", b"\n", b"\r", b"hi\r\n"])
def test_a_body_ending_with_line_ends_is_not_trailing(body: bytes) -> None:
    framer = framed(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert framer.complete and framer.reusable and not framer.trailing
    assert framer.take_body() == body


def test_head_with_chunk_framing_after_it() -> None:
    # Parsed as a chunked body by llhttp, this would call no callback at all.
    framer = framed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"HEAD")
    assert framer.complete and framer.trailing and not framer.reusable
    assert framer.take_body() == b""


def test_trailing_after_connection_close() -> None:
    framer = framed(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhiX")
    assert framer.complete and framer.trailing and not framer.reusable


def test_close_after_and_trailing_together() -> None:
    framer = framed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\nX")
    assert framer.complete and framer.close_after and framer.trailing and not framer.reusable


def test_reusable_only_once_complete() -> None:
    framer = framed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nh")
    assert framer.head_done and not framer.complete and not framer.reusable


# ----------------------------------------------------------------------- EOF


def test_a_body_framed_by_eof() -> None:
    framer = framed(b"HTTP/1.1 200 OK\r\n\r\nhello")
    assert framer.head_done and not framer.complete
    framer.feed(b" world")
    framer.feed_eof()
    assert framer.complete and not framer.reusable
    assert framer.take_body() == b"hello world"


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ],
    ids=["content-length", "chunked"],
)
def test_a_body_cut_short_by_eof(data: bytes) -> None:
    assert "before the end of the response body" in refused(data, eof=True)


@pytest.mark.parametrize("data", [b"", b"HTTP/1.1 200 OK\r\nContent-Le", b"HTTP/1.1 100 Continue\r\n\r\n"])
def test_eof_before_a_final_head(data: bytes) -> None:
    assert "without sending a response" in refused(data, eof=True)


@pytest.mark.parametrize(
    ("method", "data"),
    [
        (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"),
        (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"),
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"),
    ],
    ids=["content-length", "chunked", "HEAD"],
)
def test_eof_after_a_complete_response_ends_reuse(method: bytes, data: bytes) -> None:
    framer = framed(data, method)
    assert framer.reusable
    framer.feed_eof()
    assert framer.complete and not framer.reusable and not framer.trailing


def test_head_framed_response_at_eof() -> None:
    # A HEAD response without a length is complete with its head, not at EOF.
    framer = framed(b"HTTP/1.1 200 OK\r\n\r\n", b"HEAD")
    assert framer.complete
    framer.feed_eof()
    assert framer.complete


# ----------------------------------------------------------------- garbage


@pytest.mark.parametrize(
    ("data", "method", "eof"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"GET", False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", b"GET", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"HEAD", False),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b"GET", False),
        (b"HTTP/1.1 200 OK\r\n\r\nto the end", b"GET", True),
    ],
)
def test_a_complete_response_leaves_no_reference_cycle(data: bytes, method: bytes, eof: bool) -> None:
    # The parser calls back into the framer that holds it: were that cycle
    # left behind, every response would be garbage only the cycle collector
    # frees, and its passes grow with the requests in flight.
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        framer = framed(data, method, eof=eof)
        assert framer.complete
        framer.take_body()
        del framer
        assert gc.collect() == 0
    finally:
        if was_enabled:
            gc.enable()


# ------------------------------------------------------------------ property


def random_response(rng: random.Random) -> tuple[bytes, bytes]:
    """A valid response with a random body, framed by length or by chunks; (bytes, body)."""
    body = rng.randbytes(rng.choice([0, 1, 2, 17, 300, 5000]))
    if rng.random() < 0.5:
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body, body
    chunks, rest = [], body
    while rest:
        size = rng.randint(1, 700)
        piece, rest = rest[:size], rest[size:]
        extension = rng.choice([b"", b";a=b", b';q="x y"'])
        size_text = (b"%x" % len(piece)).upper() if rng.random() < 0.5 else b"%x" % len(piece)
        chunks.append(size_text + extension + b"\r\n" + piece + b"\r\n")
    trailers = rng.choice([b"", b"X-Sum: 1\r\n"])
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + b"".join(chunks) + b"0\r\n" + trailers + b"\r\n", body


def test_random_splits_give_the_same_body() -> None:
    # hypothesis is not a dependency of the project: a seeded generator instead.
    rng = random.Random(1729)
    for _ in range(300):
        data, body = random_response(rng)
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 12))))
        pieces = [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        framer = ResponseFramer(b"GET")
        received = []
        for piece in pieces:
            framer.feed(piece)
            received.append(framer.take_body())
        assert framer.complete and framer.reusable, data[:200]
        assert b"".join(received) == body
