"""The framing of HTTP/1.1 responses, against h11 as the reference.

Each case of the corpus is fed to ``ResponseFramer`` and to an h11 client
connection (the parser the sidecar's HTTP/1.1 upstream connections used
before, through httpcore), in every delivery: whole, split in two at every
byte boundary, and one byte at a time; then EOF where the case says.

For each delivery the two must agree on:

* the verdict: ``accept`` (the final response ended), ``reject`` (an error)
  or ``incomplete`` (waiting for more bytes);
* once both accept: the final status, the header fields (h11's
  ``raw_items()``; h11 lower-cases the value of ``Transfer-Encoding``, so
  that one is compared lower-cased), the body bytes, and whether the
  connection may carry another request.

Reuse, h11's side: the final ``EndOfMessage`` arrived, both ``our_state``
and ``their_state`` are ``DONE`` (h11 moves both to ``MUST_CLOSE`` when
either side's keep-alive is off: ``Connection: close``, HTTP/1.0, a body
read to EOF) and ``trailing_data`` is empty and not closed (bytes beyond the
response, or EOF, leave nothing to reuse). Our side: ``ResponseFramer.reusable``.

Where we are deliberately stricter, the case is in ``STRICTER`` with the RFC
section that allows it; the test asserts we are never more lenient in any
delivery and that the case still differs in at least one (so the list cannot
go stale). ``WIDER`` holds the one case we accept and h11 refuses, with why.
Every other case must agree exactly, and our own outcome (everything the
framer exposes) must be the same in every delivery, except for the cases in
``DELIVERY_DEPENDENT``: a limit on bytes still unfinished when a read ends,
where h11's outcome depends on the delivery too, and ours must match it.

h11 is built with httpcore's ``max_incomplete_event_size`` (100 KiB, our
``MAX_HEAD_BYTES``): h11's own default of 16 KiB is not what the sidecar ran with.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import h11
import pytest

from sidecar.upstream.h1frame import MAX_HEAD_BYTES, FramingError, ResponseFramer

# --------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    method: bytes = b"GET"
    eof: bool = False
    # Split boundaries tried: every `stride`-th one (large heads only).
    stride: int = 1


def response(*fields: bytes, body: bytes = b"", status: bytes = b"HTTP/1.1 200 OK") -> bytes:
    return status + b"\r\n" + b"".join(field + b"\r\n" for field in fields) + b"\r\n" + body


CL0 = b"Content-Length: 0"
TE = b"Transfer-Encoding: chunked"
OK = response(CL0)


def chunked(body: bytes, *fields: bytes, status: bytes = b"HTTP/1.1 200 OK") -> bytes:
    return response(TE, *fields, body=body, status=status)


BIG_VALUE = b"v" * (MAX_HEAD_BYTES + 50 * 1024)
BIG_FIELDS = [b"X-Filler-%05d: %s" % (i, b"f" * 1000) for i in range(150)]
LARGE_FIELDS = [b"X-Filler-%05d: %s" % (i, b"f" * 1000) for i in range(60)]

CASES = [
    # ---- Content-Length
    Case("content-length", response(b"Content-Length: 5", body=b"hello")),
    Case("content-length zero", OK),
    Case("content-length with leading spaces", response(b"Content-Length:   5", body=b"hello")),
    Case("content-length with spaces", response(b"Content-Length:   5  ", body=b"hello")),
    Case("content-length with a leading tab", response(b"Content-Length:\t5", body=b"hello")),
    Case("content-length with a trailing tab", response(b"Content-Length: 5\t", body=b"hello")),
    Case("content-length leading zeros", response(b"Content-Length: 005", body=b"hello")),
    Case("content-length 20 digits", response(b"Content-Length: 00000000000000000005", body=b"hello")),
    Case("content-length 21 digits", response(b"Content-Length: 000000000000000000005", body=b"hello")),
    Case(
        "content-length 21 digits and chunked",
        response(b"Content-Length: 000000000000000000005", TE, body=b"0\r\n\r\n"),
    ),
    Case("content-length duplicate identical", response(b"Content-Length: 5", b"Content-Length: 5", body=b"hello")),
    Case("content-length list identical", response(b"Content-Length: 5, 5", body=b"hello")),
    Case("content-length conflicting", response(b"Content-Length: 5", b"Content-Length: 6", body=b"hello!")),
    Case("content-length list conflicting", response(b"Content-Length: 5, 6", body=b"hello!")),
    Case("content-length one of them zero", response(b"Content-Length: 0", b"Content-Length: 5", body=b"hello")),
    Case("content-length with a comma", response(b"Content-Length: 5,", body=b"hello")),
    Case("content-length non-numeric", response(b"Content-Length: five", body=b"hello")),
    Case("content-length hex", response(b"Content-Length: 0x5", body=b"hello")),
    Case("content-length plus sign", response(b"Content-Length: +5", body=b"hello")),
    Case("content-length minus sign", response(b"Content-Length: -5", body=b"hello")),
    Case("content-length empty", response(b"Content-Length: ", body=b"hello")),
    Case("content-length inner space", response(b"Content-Length: 5 5", body=b"hello")),
    Case("content-length decimal", response(b"Content-Length: 5.0", body=b"hello")),
    Case("content-length overflow", response(b"Content-Length: 18446744073709551616", body=b"hello")),
    Case(
        "content-length overflow then EOF", response(b"Content-Length: 18446744073709551616", body=b"hello"), eof=True
    ),
    Case("content-length huge", response(b"Content-Length: 99999999999999999999999", body=b"hello")),
    Case("content-length body short", response(b"Content-Length: 10", body=b"hello")),
    Case("content-length body short then EOF", response(b"Content-Length: 10", body=b"hello"), eof=True),
    Case("content-length then EOF", response(b"Content-Length: 5", body=b"hello"), eof=True),
    Case("chunked then EOF", chunked(b"5\r\nhello\r\n0\r\n\r\n"), eof=True),
    # ---- bytes beyond the declared length
    Case("garbage after the body", response(b"Content-Length: 5", body=b"helloXYZ")),
    Case(
        "garbage after the body, Connection: close",
        response(b"Content-Length: 5", b"Connection: close", body=b"helloX"),
    ),
    Case(
        "second response after the body",
        response(b"Content-Length: 2", body=b"hi") + response(b"Content-Length: 2", body=b"ho"),
    ),
    Case(
        "101 response after the body",
        OK + response(b"Upgrade: x", b"Connection: upgrade", status=b"HTTP/1.1 101 Switching") + b"\x81\x00",
    ),
    Case("empty line after the body", response(b"Content-Length: 5", body=b"hello\r\n")),
    Case("bare LF after the body", response(b"Content-Length: 5", body=b"hello\n")),
    Case("empty line after a chunked body", chunked(b"1\r\na\r\n0\r\n\r\n\r\n")),
    Case("empty line after a 204", response(status=b"HTTP/1.1 204 No Content") + b"\r\n"),
    # ---- Transfer-Encoding
    Case("chunked", chunked(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")),
    Case("chunked empty", chunked(b"0\r\n\r\n")),
    Case("chunked hex lower case", chunked(b"a\r\n0123456789\r\n0\r\n\r\n")),
    Case("chunked hex upper case", chunked(b"A\r\n0123456789\r\n0\r\n\r\n")),
    Case("chunked leading zeros", chunked(b"0005\r\nhello\r\n000\r\n\r\n")),
    Case("chunk size 20 hex digits", chunked(b"00000000000000000005\r\nhello\r\n0\r\n\r\n")),
    Case("chunk size 21 hex digits", chunked(b"000000000000000000005\r\nhello\r\n0\r\n\r\n")),
    Case("chunk extension", chunked(b"5;name\r\nhello\r\n0;last\r\n\r\n")),
    Case("chunk extension with value", chunked(b"5;name=value;other=1\r\nhello\r\n0\r\n\r\n")),
    Case("chunk extension quoted", chunked(b'5;name="a;b c\\"d"\r\nhello\r\n0\r\n\r\n')),
    Case("chunk extension empty", chunked(b"5;\r\nhello\r\n0\r\n\r\n")),
    Case("chunk extension without name", chunked(b"5;=v\r\nhello\r\n0\r\n\r\n")),
    Case("chunk extension unterminated quote", chunked(b'5;a="b\r\nhello\r\n0\r\n\r\n')),
    Case("chunk extension with bare CR", chunked(b"5;a\rb\r\nhello\r\n0\r\n\r\n")),
    Case("chunk extension quoted with obs-text", chunked(b'5;a="\xe9"\r\nhello\r\n0\r\n\r\n')),
    Case("chunk extension on the last chunk", chunked(b"5\r\nhello\r\n0;a=b\r\n\r\n")),
    Case("chunk extension value with a space", chunked(b"5;a=b c\r\nhello\r\n0\r\n\r\n")),
    Case("chunk extension with BWS", chunked(b"5; a = b\r\nhello\r\n0\r\n\r\n")),
    Case("chunk extension with a tab", chunked(b"5;\ta=b\r\nhello\r\n0\r\n\r\n")),
    Case("chunk extension with NUL", chunked(b"5;a=\x00\r\nhello\r\n0\r\n\r\n")),
    Case("chunk extension with obs-text", chunked(b"5;a=\xe9\r\nhello\r\n0\r\n\r\n")),
    Case("chunk size invalid", chunked(b"g\r\nhello\r\n0\r\n\r\n")),
    Case("chunk size negative", chunked(b"-5\r\nhello\r\n0\r\n\r\n")),
    Case("chunk size 0x", chunked(b"0x5\r\nhello\r\n0\r\n\r\n")),
    Case("chunk size empty", chunked(b"\r\nhello\r\n0\r\n\r\n")),
    Case("chunk size leading space", chunked(b" 5\r\nhello\r\n0\r\n\r\n")),
    Case("chunk size trailing space", chunked(b"5 \r\nhello\r\n0\r\n\r\n")),
    Case("chunk size space before extension", chunked(b"5 ;a=b\r\nhello\r\n0\r\n\r\n")),
    Case("chunk size with a plus", chunked(b"+5\r\nhello\r\n0\r\n\r\n")),
    Case("chunk size overflow then EOF", chunked(b"fffffffffffffffff\r\nhello"), eof=True),
    Case("chunk data without CRLF", chunked(b"5\r\nhelloX0\r\n\r\n")),
    Case("chunk data with bare LF", chunked(b"5\r\nhello\n0\r\n\r\n")),
    Case("chunk size line with bare LF", chunked(b"5\nhello\r\n0\r\n\r\n")),
    Case("chunk data ending with CR only", chunked(b"5\r\nhello\r0\r\n\r\n")),
    Case("chunk data longer than its size", chunked(b"3\r\nhello\r\n0\r\n\r\n")),
    Case("last chunk with bare LF end", chunked(b"5\r\nhello\r\n0\r\n\n")),
    Case("chunked trailers", chunked(b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n")),
    Case("chunked trailer obs-fold", chunked(b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\n def\r\n\r\n")),
    Case("chunked trailer bare LF", chunked(b"5\r\nhello\r\n0\r\nX-Checksum: abc\n\r\n")),
    Case("chunked trailer without colon", chunked(b"5\r\nhello\r\n0\r\nX-Checksum\r\n\r\n")),
    Case("content-length in the trailers", chunked(b"5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n")),
    Case("invalid content-length in the trailers", chunked(b"5\r\nhello\r\n0\r\nContent-Length: x\r\n\r\n")),
    Case(
        "content-length 21 digits in the trailers",
        chunked(b"5\r\nhello\r\n0\r\nContent-Length: 000000000000000000005\r\n\r\n"),
    ),
    Case("chunked in the trailers", chunked(b"5\r\nhello\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n")),
    Case(
        "chunked twice in the trailers",
        chunked(b"5\r\nhello\r\n0\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ),
    Case("gzip in the trailers", chunked(b"5\r\nhello\r\n0\r\nTransfer-Encoding: gzip\r\n\r\n")),
    Case("NUL in a trailer", chunked(b"5\r\nhello\r\n0\r\nX: a\x00b\r\n\r\n")),
    Case("trailer with an empty name", chunked(b"5\r\nhello\r\n0\r\n: b\r\n\r\n")),
    Case("EOF in the trailers", chunked(b"5\r\nhello\r\n0\r\nX: 1\r\n"), eof=True),
    Case("chunked without the last chunk then EOF", chunked(b"5\r\nhello\r\n"), eof=True),
    Case("chunked without the final CRLF then EOF", chunked(b"5\r\nhello\r\n0\r\n"), eof=True),
    Case("chunked upper case coding", response(b"Transfer-Encoding: Chunked", body=b"0\r\n\r\n")),
    Case("chunked twice, two fields", response(TE, TE, body=b"0\r\n\r\n")),
    Case("chunked twice, one field", response(b"Transfer-Encoding: chunked, chunked", body=b"0\r\n\r\n")),
    Case("empty coding", response(b"Transfer-Encoding: ", body=b"hello"), eof=True),
    Case("coding with spaces", response(b"Transfer-Encoding:  chunked  ", body=b"0\r\n\r\n")),
    Case("coding without a space", response(b"Transfer-Encoding:chunked", body=b"0\r\n\r\n")),
    Case("gzip, chunked", response(b"Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n")),
    Case("chunked, gzip", response(b"Transfer-Encoding: chunked, gzip", body=b"0\r\n\r\n"), eof=True),
    Case("identity", response(b"Transfer-Encoding: identity", body=b"hello"), eof=True),
    Case("unknown coding", response(b"Transfer-Encoding: foo", body=b"hello"), eof=True),
    Case("coding with a form feed", response(b"Transfer-Encoding: chunked\x0c", body=b"0\r\n\r\n")),
    Case("chunked in HTTP/1.0", chunked(b"5\r\nhello\r\n0\r\n\r\n", status=b"HTTP/1.0 200 OK")),
    # ---- Content-Length and Transfer-Encoding together
    Case("content-length and chunked", response(b"Content-Length: 3", TE, body=b"5\r\nhello\r\n0\r\n\r\n")),
    Case("chunked and content-length", response(TE, b"Content-Length: 100", body=b"5\r\nhello\r\n0\r\n\r\n")),
    Case("content-length invalid and chunked", response(b"Content-Length: x", TE, body=b"5\r\nhello\r\n0\r\n\r\n")),
    Case("content-length and gzip", response(b"Content-Length: 5", b"Transfer-Encoding: gzip", body=b"hello")),
    # ---- bodyless responses
    Case("HEAD with content-length", response(b"Content-Length: 10"), method=b"HEAD"),
    Case("HEAD with chunked", response(TE), method=b"HEAD"),
    Case("HEAD without framing", response(), method=b"HEAD"),
    Case("HEAD without framing, Connection: close", response(b"Connection: close"), method=b"HEAD"),
    Case("HEAD with a body anyway", response(b"Content-Length: 5", body=b"hello"), method=b"HEAD"),
    Case("HEAD with a chunked body anyway", response(TE, body=b"0\r\n\r\n"), method=b"HEAD"),
    Case("HEAD with an empty line after", response(b"Content-Length: 5") + b"\r\n", method=b"HEAD"),
    Case("HEAD then EOF", response(b"Content-Length: 10"), method=b"HEAD", eof=True),
    Case("204", response(status=b"HTTP/1.1 204 No Content")),
    Case("204 to a HEAD", response(status=b"HTTP/1.1 204 No Content"), method=b"HEAD"),
    Case("204 with a body anyway", response(b"Content-Length: 5", body=b"hello", status=b"HTTP/1.1 204 No Content")),
    Case("204 with chunked", response(TE, status=b"HTTP/1.1 204 No Content")),
    Case("304 with content-length", response(b"Content-Length: 100", status=b"HTTP/1.1 304 Not Modified")),
    Case("304 with a body anyway", response(body=b"hello", status=b"HTTP/1.1 304 Not Modified")),
    # ---- interim responses
    Case("100 then 200", response(status=b"HTTP/1.1 100 Continue") + response(b"Content-Length: 2", body=b"hi")),
    Case("102 then 200", response(status=b"HTTP/1.1 102 Processing") + OK),
    Case("103 then 200", response(b"Link: </a.css>; rel=preload", status=b"HTTP/1.1 103 Early Hints") + OK),
    Case(
        "three interim responses",
        response(status=b"HTTP/1.1 100 Continue") * 2 + response(b"X: 1", status=b"HTTP/1.1 103 Early Hints") + OK,
    ),
    Case("100 to a HEAD", response(status=b"HTTP/1.1 100 Continue") + response(b"Content-Length: 9"), method=b"HEAD"),
    Case("100 then EOF", response(status=b"HTTP/1.1 100 Continue"), eof=True),
    Case("100 with gzip coding", response(b"Transfer-Encoding: gzip", status=b"HTTP/1.1 100 Continue") + OK),
    Case("100 with chunked coding", response(TE, status=b"HTTP/1.1 100 Continue") + OK),
    Case("100 with chunked twice", response(TE, TE, status=b"HTTP/1.1 100 Continue") + OK),
    Case("100 with Connection: close", response(b"Connection: close", status=b"HTTP/1.1 100 Continue") + OK),
    Case("100 in HTTP/1.0, then 200", response(status=b"HTTP/1.0 100 Continue") + OK),
    Case(
        "100, then 200 in HTTP/1.0",
        response(status=b"HTTP/1.1 100 Continue") + response(CL0, status=b"HTTP/1.0 200 OK"),
    ),
    Case("100, then 204", response(status=b"HTTP/1.1 100 Continue") + response(status=b"HTTP/1.1 204 No Content")),
    Case("100, empty line, 200", response(status=b"HTTP/1.1 100 Continue") + b"\r\n" + OK),
    Case("100, bare LF, 200", response(status=b"HTTP/1.1 100 Continue") + b"\n" + OK),
    Case("100 with content-length", response(b"Content-Length: 5", status=b"HTTP/1.1 100 Continue") + OK),
    Case(
        "101 unasked",
        response(b"Upgrade: websocket", b"Connection: upgrade", status=b"HTTP/1.1 101 Switching Protocols"),
    ),
    Case("101 unasked, no Upgrade field", response(status=b"HTTP/1.1 101 Switching Protocols")),
    # ---- the status line
    Case("empty line before the status line", b"\r\n" + OK),
    Case("bare LF before the status line", b"\n" + OK),
    Case("no reason phrase", b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n"),
    Case("empty reason phrase", b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n"),
    Case("reason phrase with obs-text", b"HTTP/1.1 200 \xe9t\xe9\r\nContent-Length: 0\r\n\r\n"),
    Case("reason phrase with NUL", b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n"),
    Case("reason phrase with a control", b"HTTP/1.1 200 O\x01K\r\nContent-Length: 0\r\n\r\n"),
    Case("reason phrase with a form feed", b"HTTP/1.1 200 O\x0cK\r\nContent-Length: 0\r\n\r\n"),
    Case("reason phrase with DEL", b"HTTP/1.1 200 O\x7fK\r\nContent-Length: 0\r\n\r\n"),
    Case("reason phrase with a tab", b"HTTP/1.1 200 O\tK\r\nContent-Length: 0\r\n\r\n"),
    Case("interim reason phrase with NUL", b"HTTP/1.1 100 C\x00\r\n\r\n" + OK),
    Case("status line with bare LF", b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n"),
    Case("status without a space", b"HTTP/1.1 200OK\r\nContent-Length: 0\r\n\r\n"),
    Case("two spaces after the version", b"HTTP/1.1  200 OK\r\nContent-Length: 0\r\n\r\n"),
    Case("status with a letter", b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n"),
    Case("status line then EOF", b"HTTP/1.1 200 OK\r", eof=True),
    Case("status 99", response(CL0, status=b"HTTP/1.1 99 Low")),
    Case("status 099", response(CL0, status=b"HTTP/1.1 099 Low")),
    Case("status 600", response(CL0, status=b"HTTP/1.1 600 High")),
    Case("status 999", response(CL0, status=b"HTTP/1.1 999 High")),
    Case("status 1000", response(CL0, status=b"HTTP/1.1 1000 High")),
    Case("HTTP/2.0", response(CL0, status=b"HTTP/2.0 200 OK")),
    Case("HTTP/0.9", response(CL0, status=b"HTTP/0.9 200 OK")),
    Case("HTTP/1.2", response(CL0, status=b"HTTP/1.2 200 OK")),
    Case("lower-case http", response(CL0, status=b"http/1.1 200 OK")),
    Case("garbage status line", b"<html>hello</html>\r\n\r\n"),
    Case("garbage then EOF", b"<html>hello</html>", eof=True),
    Case("binary garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
    # ---- header fields
    Case("obs-fold", response(b"X-Folded: a", b" b", CL0)),
    Case("obs-fold with a tab", response(b"X-Folded: a", b"\tb", CL0)),
    Case("header with bare LF", b"HTTP/1.1 200 OK\r\nX: 1\nContent-Length: 0\r\n\r\n"),
    Case("head ending with bare LF", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\n"),
    Case("head all bare LF", b"HTTP/1.1 200 OK\nContent-Length: 0\n\n"),
    Case("whitespace before the first field", b"HTTP/1.1 200 OK\r\n X: 1\r\nContent-Length: 0\r\n\r\n"),
    Case("header without colon", response(b"X-No-Colon", CL0)),
    Case("space before colon", response(b"Content-Length : 0")),
    Case("tab before colon", response(b"Content-Length\t: 0")),
    Case("empty header name", response(b": value", CL0)),
    Case("invalid header name", response(b"X(y): 1", CL0)),
    Case("header name with DEL", response(b"X\x7fY: 1", CL0)),
    Case("non-ASCII header name", response(b"\xc3\x9c: 1", CL0)),
    Case("NUL in a value", response(b"X: a\x00b", CL0)),
    Case("CR in a value", response(b"X: a\rb", CL0)),
    Case("control in a value", response(b"X: a\x01b", CL0)),
    Case("DEL in a value", response(b"X: a\x7fb", CL0)),
    Case("obs-text in a value", response(b"X: caf\xe9", CL0)),
    Case("tab inside a value", response(b"X: a\tb", CL0)),
    Case("empty value", response(b"X:", CL0)),
    Case("trailing whitespace in a value", response(b"X-Pad: a b \t ", CL0)),
    Case("only whitespace in a value", response(b"X-Pad: \t ", CL0)),
    Case("head cut short then EOF", b"HTTP/1.1 200 OK\r\nContent-Le", eof=True),
    Case("head without its blank line then EOF", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n", eof=True),
    Case("EOF before any byte", b"", eof=True),
    Case("a large head", response(*LARGE_FIELDS, CL0), stride=997),
    Case("an oversized head: many fields", response(*BIG_FIELDS, CL0), stride=1999),
    Case("an oversized head: one field", response(b"X-Big: " + BIG_VALUE, CL0), stride=1999),
    Case("an oversized head: many empty fields", response(*[b"a:"] * 30000, CL0), stride=9973),
    Case("an oversized head, never ending", b"HTTP/1.1 200 OK\r\nX-Big: " + BIG_VALUE, stride=1999),
    Case("an oversized head of interim responses", response(status=b"HTTP/1.1 100 Continue") * 5000 + OK, stride=9973),
    Case(
        "a large trailer section",
        chunked(b"5\r\nhello\r\n0\r\n" + b"".join(f + b"\r\n" for f in LARGE_FIELDS) + b"\r\n"),
        stride=997,
    ),
    Case(
        "an oversized trailer section",
        chunked(b"5\r\nhello\r\n0\r\n" + b"".join(f + b"\r\n" for f in BIG_FIELDS) + b"\r\n"),
        stride=1999,
    ),
    Case("an oversized trailer field", chunked(b"5\r\nhello\r\n0\r\nX-Big: " + BIG_VALUE + b"\r\n\r\n"), stride=1999),
    Case("an oversized chunk extension", chunked(b"5;" + BIG_VALUE + b"\r\nhello\r\n0\r\n\r\n"), stride=1999),
    # ---- keep-alive
    Case("HTTP/1.1 keep-alive by default", response(b"Content-Length: 2", body=b"hi")),
    Case("HTTP/1.1 Connection: close", response(b"Connection: close", b"Content-Length: 2", body=b"hi")),
    Case("HTTP/1.1 Connection: CLOSE", response(b"Connection: CLOSE", CL0)),
    Case("HTTP/1.1 Connection: keep-alive, close", response(b"Connection: keep-alive, close", CL0)),
    Case("HTTP/1.1 Connection: closer", response(b"Connection: closer", CL0)),
    Case("HTTP/1.1 two Connection fields", response(b"Connection: keep-alive", b"Connection: close", CL0)),
    Case("HTTP/1.1 Connection with empty tokens", response(b"Connection: ,close,", CL0)),
    Case("HTTP/1.0 with content-length", response(b"Content-Length: 2", body=b"hi", status=b"HTTP/1.0 200 OK")),
    Case(
        "HTTP/1.0 keep-alive",
        response(b"Connection: keep-alive", b"Content-Length: 2", body=b"hi", status=b"HTTP/1.0 200 OK"),
    ),
    Case(
        "HTTP/1.0 keep-alive, chunked",
        chunked(b"2\r\nhi\r\n0\r\n\r\n", b"Connection: keep-alive", status=b"HTTP/1.0 200 OK"),
    ),
    Case(
        "HTTP/1.0 keep-alive, HEAD",
        response(b"Connection: keep-alive", b"Content-Length: 2", status=b"HTTP/1.0 200 OK"),
        method=b"HEAD",
    ),
    Case("HTTP/1.0 chunked, Connection: close", chunked(b"0\r\n\r\n", b"Connection: close", status=b"HTTP/1.0 200 OK")),
    Case("HTTP/1.0 close", response(b"Connection: close", b"Content-Length: 2", body=b"hi", status=b"HTTP/1.0 200 OK")),
    # ---- bodies framed by the end of the connection
    Case("read until close", response(body=b"hello world"), eof=True),
    Case("read until close, no EOF yet", response(body=b"hello world")),
    Case("read until close, empty", response(), eof=True),
    Case("read until close, HTTP/1.0", response(body=b"hello", status=b"HTTP/1.0 200 OK"), eof=True),
    Case("read until close, Connection: close", response(b"Connection: close", body=b"hello\r\n"), eof=True),
]

# Cases where we refuse (or close the connection) and h11 accepts (or would
# reuse it), and the RFC text that allows it.
STRICTER = {
    "content-length duplicate identical": (
        "RFC 9110 §8.6: a recipient of repeated identical Content-Length values MAY reject the message as invalid"
    ),
    "content-length list identical": "RFC 9110 §8.6: the same, for a list of identical values in one field",
    "content-length with a trailing tab": (
        "none: OWS may hold a tab (RFC 9110 §5.6.3); llhttp refuses a tab after the digits (a space passes). "
        "A 502 is the safe side of a framing field, and no server is known to send one"
    ),
    "content-length overflow": (
        "RFC 9110 §8.6: a recipient MUST prevent parsing errors from integer overflow; "
        "a length over 2^64-1 is refused at once (h11 waits for the bytes, and fails at EOF)"
    ),
    "chunk extension empty": "RFC 9112 §7.1.1: chunk-ext-name is a token; an empty one is not a chunk-ext",
    "chunk extension unterminated quote": "RFC 9112 §7.1.1: chunk-ext-val is a token or a complete quoted-string",
    "chunk extension with bare CR": "RFC 9112 §2.2: a bare CR MUST be treated as invalid",
    "chunk extension value with a space": "RFC 9112 §7.1.1: chunk-ext-val is a token or a quoted-string",
    "chunk extension with NUL": "RFC 9112 §7.1.1: the same",
    "chunk extension with obs-text": "RFC 9112 §7.1.1: the same (obs-text is allowed only in a quoted-string)",
    "chunk extension with BWS": (
        "none: RFC 9112 §7.1.1 allows BWS around ';' and '=' (RFC 9110 §5.6.3: recipients MUST parse it); "
        "llhttp refuses whitespace in chunk extensions. A 502 is the safe side of chunk framing; chunk "
        "extensions are almost never sent"
    ),
    "chunk extension with a tab": "none: the same",
    "chunk size trailing space": (
        "RFC 9112 §7.1: chunk = chunk-size [ chunk-ext ] CRLF; whitespace after the size is outside the grammar"
    ),
    "chunked trailer obs-fold": (
        "RFC 9112 §5.2: a proxy receiving obs-fold in a response MUST either reply 502 or replace it"
    ),
    "chunked trailer bare LF": "RFC 9112 §2.2: a recipient MAY recognize a bare LF as a line end (and so MAY not)",
    "last chunk with bare LF end": "RFC 9112 §2.2: the same",
    "content-length and chunked": (
        "RFC 9112 §6.3 (3): a message with both ought to be handled as an error; the Content-Length is "
        "dropped and the connection is not reused"
    ),
    "chunked and content-length": "RFC 9112 §6.3 (3): the same",
    "reason phrase with a control": "RFC 9112 §4: reason-phrase = 1*( HTAB / SP / VCHAR / obs-text ); a CTL is invalid",
    "reason phrase with DEL": "RFC 9112 §4: the same (DEL is a CTL)",
    "status line with bare LF": "RFC 9112 §2.2: a recipient MAY recognize a bare LF as a line end (and so MAY not)",
    "header with bare LF": "RFC 9112 §2.2: the same",
    "head ending with bare LF": "RFC 9112 §2.2: the same",
    "head all bare LF": "RFC 9112 §2.2: the same",
    "status 600": "RFC 9110 §15: valid status codes are 100-599; 600-999 is a response this proxy cannot relay",
    "status 999": "RFC 9110 §15: the same",
    "HTTP/2.0": "RFC 9110 §2.5: another major version means an incompatible message syntax",
    "HTTP/0.9": "RFC 9110 §2.5: the same (and HTTP/0.9 has no status line at all)",
    "HTTP/1.2": (
        "RFC 9112 §2.3 says a higher minor version SHOULD be read as 1.1; llhttp accepts only versions that "
        "exist (the leniency that lifts this is documented as a smuggling risk), and no HTTP/1.2 exists"
    ),
    "obs-fold": "RFC 9112 §5.2: a proxy receiving obs-fold in a response MUST either reply 502 or replace it",
    "obs-fold with a tab": "RFC 9112 §5.2: the same",
    "control in a value": "RFC 9110 §5.5: field values with CTLs other than HTAB are invalid (MAY be retained)",
    "DEL in a value": "RFC 9110 §5.5: the same (DEL is a CTL)",
    "an oversized head: many fields": (
        "RFC 9110 §21.5: no header size is mandated; h11 applies its limit only to a head still incomplete, "
        "so a head over MAX_HEAD_BYTES passes there when it arrives in one piece"
    ),
    "an oversized head: one field": "RFC 9110 §21.5: the same",
    "an oversized head: many empty fields": "RFC 9110 §21.5: the same",
    "an oversized trailer section": "RFC 9110 §21.5: the same, for the trailer section",
    "an oversized trailer field": "RFC 9110 §21.5: the same",
    "an oversized head of interim responses": (
        "RFC 9110 §21.5: the same; h11 limits each interim head alone, we count them into the final one's"
    ),
}

# Cases where we accept and h11 refuses.
WIDER = {
    "chunk size 21 hex digits": (
        "RFC 9112 §7.1: chunk-size = 1*HEXDIG, no limit on the digits; llhttp reads the value exactly "
        "(and refuses one over 2^64-1); h11 caps the digits at 20. No framing ambiguity: both end the "
        "response at the same byte when h11 reads it at all"
    ),
}

# Cases whose outcome depends on how the bytes arrive, for h11 as for us:
# a limit on bytes still unfinished when a read ends. These must agree with
# h11 in every delivery instead of agreeing with their own whole delivery.
DELIVERY_DEPENDENT = {
    "an oversized chunk extension": (
        "a chunk line over MAX_HEAD_BYTES is refused when a read ends inside it, passes when it arrives whole"
    ),
}

CASES_BY_NAME = {case.name: case for case in CASES}


def test_the_corpus() -> None:
    assert len(CASES) >= 60
    assert len(CASES_BY_NAME) == len(CASES), "two cases share a name"
    listed = set(STRICTER) | set(WIDER) | set(DELIVERY_DEPENDENT)
    assert listed <= set(CASES_BY_NAME), f"listed but not in the corpus: {listed - set(CASES_BY_NAME)}"
    assert not set(STRICTER) & set(WIDER)
    assert not (set(STRICTER) | set(WIDER)) & set(DELIVERY_DEPENDENT)


# ----------------------------------------------------------------- deliveries


def deliveries(case: Case) -> Iterator[tuple[str, list[bytes]]]:
    """Whole, in two pieces at every (stride-th) boundary, one byte at a time."""
    data = case.data
    yield "whole", [data]
    for i in range(1, len(data), case.stride):
        yield f"split at {i}", [data[:i], data[i:]]
    if case.stride == 1:
        yield "byte by byte", [data[i : i + 1] for i in range(len(data))]
    else:
        # A large head one byte at a time is slow in h11: 64-byte pieces instead.
        yield "64-byte pieces", [data[i : i + 64] for i in range(0, len(data), 64)]


# -------------------------------------------------------------------- outcomes

ACCEPT, REJECT, INCOMPLETE = "accept", "reject", "incomplete"


@dataclass(frozen=True)
class Outcome:
    """What both parsers are compared on."""

    verdict: str
    status: int = 0
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    reusable: bool = False

    def rank(self) -> int:
        """Leniency: a higher rank accepts more."""
        if self.verdict == REJECT:
            return 0
        if self.verdict == INCOMPLETE:
            return 1
        return 3 if self.reusable else 2


@dataclass(frozen=True)
class Ours:
    """Everything the framer exposes, for our own split-invariance."""

    verdict: str
    head_done: bool
    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    http_version: str
    body: bytes
    reusable: bool
    trailing: bool
    close_after: bool

    def common(self) -> Outcome:
        if self.verdict != ACCEPT:
            return Outcome(self.verdict)
        return Outcome(ACCEPT, self.status, comparable(self.headers), self.body, self.reusable)


def comparable(headers: tuple[tuple[bytes, bytes], ...]) -> tuple[tuple[bytes, bytes], ...]:
    # h11 lower-cases the value of Transfer-Encoding (it accepts only "chunked").
    return tuple((name, value.lower() if name.lower() == b"transfer-encoding" else value) for name, value in headers)


def ours(case: Case, pieces: list[bytes]) -> Ours:
    framer = ResponseFramer(case.method)
    body = []
    verdict = ACCEPT
    try:
        for piece in pieces:
            if piece:
                framer.feed(piece)
                body.append(framer.take_body())
        if case.eof:
            framer.feed_eof()
            body.append(framer.take_body())
    except FramingError:
        verdict = REJECT
    else:
        if not framer.complete:
            verdict = INCOMPLETE
    if verdict == REJECT:
        return Ours(REJECT, False, 0, (), "", b"", False, False, False)
    return Ours(
        verdict,
        framer.head_done,
        framer.status,
        tuple(framer.headers),
        framer.http_version,
        b"".join(body),
        framer.reusable if verdict == ACCEPT else False,
        framer.trailing,
        framer.close_after,
    )


def theirs(case: Case, pieces: list[bytes]) -> Outcome:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
    conn.send(h11.Request(method=case.method, target="/", headers=[("Host", "upstream.test")]))
    conn.send(h11.EndOfMessage())
    response: h11.Response | None = None
    body = []
    done = False
    inputs = [piece for piece in pieces if piece]  # b"" is EOF to h11
    if case.eof:
        inputs.append(b"")
    try:
        for piece in inputs:
            conn.receive_data(piece)
            while not done:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    break
                if isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    body.append(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    done = True
                else:
                    assert isinstance(event, h11.InformationalResponse), event
    except h11.RemoteProtocolError:
        return Outcome(REJECT)
    if not done:
        return Outcome(INCOMPLETE)
    assert response is not None
    reusable = conn.our_state is h11.DONE and conn.their_state is h11.DONE and conn.trailing_data == (b"", False)
    return Outcome(
        ACCEPT,
        response.status_code,
        comparable(tuple(response.headers.raw_items())),
        b"".join(body),
        reusable,
    )


# ----------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_against_h11(case: Case) -> None:
    whole = ours(case, [case.data])
    differs, varies = [], []
    for how, pieces in deliveries(case):
        mine = ours(case, pieces)
        if case.name in DELIVERY_DEPENDENT:
            if mine != whole:
                varies.append(how)
        else:
            assert mine == whole, f"{how}: our outcome depends on how the bytes arrive"
        reference = theirs(case, pieces)
        common = mine.common()
        if case.name in WIDER:
            continue
        if case.name in STRICTER:
            assert common.rank() <= reference.rank(), f"{how}: more lenient than h11: {common} vs {reference}"
            if common.verdict == ACCEPT and reference.verdict == ACCEPT:
                assert (common.status, common.body) == (reference.status, reference.body), how
            if common != reference:
                differs.append(how)
            continue
        assert common == reference, f"{how}: ours {common} vs h11 {reference}"
    if case.name in STRICTER:
        assert differs, f"listed as stricter than h11 ({STRICTER[case.name]}) but agrees with it in every delivery"
    if case.name in DELIVERY_DEPENDENT:
        assert varies, f"listed as depending on the delivery ({DELIVERY_DEPENDENT[case.name]}) but does not"
    if case.name in WIDER:
        assert whole.verdict == ACCEPT
        assert theirs(case, [case.data]).verdict == REJECT


def test_a_wider_case_decodes_exactly() -> None:
    outcome = ours(CASES_BY_NAME["chunk size 21 hex digits"], [CASES_BY_NAME["chunk size 21 hex digits"].data])
    assert (outcome.verdict, outcome.body, outcome.reusable) == (ACCEPT, b"hello", True)
