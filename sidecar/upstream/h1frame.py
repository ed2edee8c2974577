"""Where one HTTP/1.1 response ends, from the bytes an upstream sends: the pure core.

llhttp (the C parser of Node.js, through httptools) reads the bytes; this
module adds the rules a proxy needs on top of it and decides, for each
exchange, what the caller gets and whether the connection may carry another
request (see docs/http1-upstream.md):

* interim responses (``1xx``) are skipped; ``101`` is refused, as the sidecar
  never asks for an upgrade;
* ``Transfer-Encoding`` must be exactly ``chunked``; with a ``Content-Length``
  beside it the coding frames the body, the length is dropped, and the
  connection is closed afterwards (RFC 9112 §6.3);
* a duplicate or conflicting ``Content-Length`` (or one of more than 20
  digits), an invalid chunk, obs-fold, a bare LF, an empty line before a
  status line, a control character in the reason phrase, a version other
  than 1.x, a status outside 100-599, or a head or trailer section over
  ``MAX_HEAD_BYTES`` is a :class:`FramingError` (the caller gets 502); the
  framing fields of interim heads and trailers are held to the same rules;
* a HEAD response, a ``204`` and a ``304`` end with their head; any byte
  after the end of a response (a body sent anyway, a second response, an
  empty line) marks the connection ``trailing``: it is closed, never reused;
* a response framed by the end of the connection is complete at EOF, any
  other one cut short there is a :class:`FramingError`;
* the connection may carry another request only after an HTTP/1.1 response
  without ``Connection: close`` whose body is not framed by EOF (HTTP/1.0
  "keep-alive" is not honoured: the request never offered it), and not
  once the upstream has closed its side.

Header values come without the whitespace around them; trailers are read
and dropped.

No I/O here: the connection (``h1conn.py``) feeds bytes in and reads the
outcome, and the differential tests feed the same bytes to h11.
"""

from __future__ import annotations

import re

from httptools.parser.errors import HttpParserCallbackError, HttpParserError, HttpParserUpgrade
from httptools.parser.parser import HttpResponseParser

# The response head may be at most this many bytes, from its first byte to
# the empty line that ends it, interim responses included (httpcore gave h11
# the same limit); past it the upstream is answered with 502.
MAX_HEAD_BYTES = 100 * 1024
_HEAD_TOO_LARGE = f"response head over {MAX_HEAD_BYTES} bytes"
# The same bound holds for the trailer section of a chunked body (its field
# names and values), and for the bytes in a row that carry no body after the
# head (chunk framing, trailers): httptools holds an unfinished field whole.
_TRAILERS_TOO_LARGE = f"trailer section over {MAX_HEAD_BYTES} bytes"
_FRAMING_TOO_LARGE = f"chunk framing or trailer section over {MAX_HEAD_BYTES} bytes"

_CHUNKED = b"chunked"
_CONTENT_LENGTH = b"content-length"
_TRANSFER_ENCODING = b"transfer-encoding"
_CONNECTION = b"connection"
_CLOSE = b"close"
_END_OF_HEAD = b"\r\n\r\n"
# A reason phrase is tabs, spaces, visible characters and obs-text; llhttp
# lets the other controls (NUL among them) through.
_REASON_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class FramingError(Exception):
    """The upstream's bytes are not a response this proxy can relay safely."""


class ResponseFramer:
    """The response to one request, from the bytes fed in.

    After :meth:`feed` (or :meth:`feed_eof`) returns, ``head_done`` says the
    final head is in (``status``, ``headers``, ``http_version``), ``body``
    holds the body bytes not yet taken, and ``complete`` says the response has
    ended.  ``reusable`` is only meaningful once ``complete``.
    """

    __slots__ = (
        "_parser",
        "_head_request",
        "_head",
        "_message_start",
        "_fields",
        "_eof_framed",
        "_chunked",
        "_since_body",
        "_trailer_size",
        "_trailer_framing",
        "status",
        "headers",
        "http_version",
        "head_done",
        "complete",
        "keep_alive",
        "trailing",
        "close_after",
        "body",
    )

    def __init__(self, method: bytes) -> None:
        # The parser holds this framer (its callbacks): a cycle, which
        # release() ends once the response is over, so that a finished
        # exchange is freed by reference counting, not left to the cycle
        # collector (whose passes grow with the requests in flight).
        parser = HttpResponseParser(self)
        # A Content-Length beside Transfer-Encoding: llhttp refuses it
        # outright; RFC 9112 lets the coding frame the body, and the
        # connection is closed afterwards (see close_after).
        #
        # After a message that says close (Connection: close, HTTP/1.0)
        # llhttp refuses any further message: right for the final response,
        # wrong after an interim one. Lenient, it parses on; nothing after
        # the final response is ever read as one here (it is only trailing),
        # and the connection's reuse is decided by this module, not llhttp.
        parser.set_dangerous_leniencies(  # type: ignore[attr-defined]  # missing from its stubs
            lenient_chunked_length=True, lenient_keep_alive=True
        )
        self._parser: HttpResponseParser | None = parser
        self._head_request = method == b"HEAD"
        # The bytes fed until the final head is in, and where the status
        # line of the message being read starts in them (past any interim
        # response): llhttp reports no offsets, and some rules need them.
        self._head: bytes | bytearray = b""
        self._message_start = 0
        self._fields: list[tuple[bytes, bytes]] = []
        self._eof_framed = False
        self._chunked = False
        self._since_body = 0
        self._trailer_size = 0
        self._trailer_framing: list[tuple[bytes, bytes]] = []
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.http_version = "HTTP/1.1"
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.trailing = False
        self.close_after = False
        self.body: list[bytes] = []

    @property
    def reusable(self) -> bool:
        """The connection may carry another request: the response ended
        cleanly where its framing said, and nothing came after it."""
        return self.complete and self.keep_alive and not self.trailing and not self.close_after

    # ------------------------------------------------------------ input

    def feed(self, data: bytes) -> None:
        if self.complete:
            if data:
                self.trailing = True  # bytes beyond the response: never reuse
            return
        if not data:
            return
        head_done = self.head_done
        if not head_done:
            head = self._head
            if not head:
                self._head = data  # the usual case: the head arrives in one read
            elif isinstance(head, bytearray):
                head.extend(data)
            else:
                self._head = bytearray(head) + data
        parser = self._parser
        assert parser is not None, "fed after release()"
        taken = len(self.body)
        try:
            if data[-1] in (10, 13):  # LF, CR
                # After a complete response llhttp skips CR and LF without a
                # callback (any other byte starts a message, or is an error,
                # and either marks it trailing). Holding the last byte back
                # tells whether the response ended before it.
                view = memoryview(data)
                parser.feed_data(view[:-1])
                if self.complete:
                    self.trailing = True
                    return
                parser.feed_data(view[-1:])
            else:
                parser.feed_data(data)
        except HttpParserCallbackError as error:
            cause = error.__context__
            if isinstance(cause, FramingError):
                raise cause from None
            raise FramingError(str(error)) from cause
        except HttpParserUpgrade:
            if self.complete:
                self.trailing = True  # a 101 after the response is only bytes beyond it
                return
            raise FramingError("the upstream switched protocols without being asked to") from None
        except HttpParserError as error:
            if self.complete:
                self.trailing = True  # garbage after a complete response
                return
            raise FramingError(f"malformed response: {error}") from None
        if self.complete:
            return
        if not self.head_done:
            if len(self._head) > MAX_HEAD_BYTES:
                # Every byte so far belongs to the head, and it has not ended.
                raise FramingError(_HEAD_TOO_LARGE)
        elif self._chunked:
            # Only a chunked body has bytes that are not body after its head.
            if len(self.body) != taken:
                self._since_body = 0
            else:
                if head_done:  # else on_headers_complete counted the bytes after the head
                    self._since_body += len(data)
                if self._since_body > MAX_HEAD_BYTES:
                    raise FramingError(_FRAMING_TOO_LARGE)

    def feed_eof(self) -> None:
        """The upstream closed its side of the connection."""
        if self.complete:
            self.keep_alive = False  # a closed connection carries nothing more
            return
        if self.head_done and self._eof_framed:
            self.complete = True
            self.keep_alive = False
            self.release()
            return
        if not self.head_done:
            raise FramingError("the upstream closed the connection without sending a response")
        raise FramingError("the upstream closed the connection before the end of the response body")

    def release(self) -> None:
        """Drop the parser: nothing more will be fed (the response is over,
        or its connection is being closed)."""
        self._parser = None

    def take_body(self) -> bytes:
        body = self.body
        if len(body) == 1:
            data = body[0]
        else:
            data = b"".join(body)
        body.clear()
        return data

    # ---------------------------------------------- httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            self.trailing = True  # a second response where only one was asked for
            return
        # llhttp skips empty lines before a message (a server's leniency for
        # requests); a response has none, and h11 refuses them too.
        if self._head[self._message_start] in (10, 13):  # LF, CR
            raise FramingError("an empty line before the status line")
        self._fields = []

    def on_status(self, reason: bytes) -> None:
        if not self.complete and _REASON_CONTROL.search(reason) is not None:
            raise FramingError("a control character in the reason phrase")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:
            return
        if value and value[-1] in (32, 9):  # SP, HTAB
            # llhttp skips the whitespace before a value, not after it.
            value = value.rstrip(b" \t")
        if self.head_done:
            self._on_trailer(name, value)
            return
        self._fields.append((name, value))

    def _on_trailer(self, name: bytes, value: bytes) -> None:
        """A trailer field of a chunked body: not relayed, but bounded, and a
        framing field there is held to the head's rules (h11 refused a
        Transfer-Encoding other than one ``chunked`` in trailers too)."""
        self._trailer_size += len(name) + len(value)
        if self._trailer_size > MAX_HEAD_BYTES:
            raise FramingError(_TRAILERS_TOO_LARGE)
        lowered = name.lower()
        if lowered in (_TRANSFER_ENCODING, _CONTENT_LENGTH):
            self._trailer_framing.append((name, value))
            _framing_fields(self._trailer_framing)

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        version = parser.get_http_version()
        if not version.startswith("1."):
            raise FramingError(f"the upstream answered in HTTP/{version}")
        if status < 100 or status > 599:
            raise FramingError(f"status {status} is outside 100-599")
        if status == 101:
            raise FramingError("the upstream switched protocols without being asked to")
        # This head ends at its first empty line (llhttp accepts no bare CR
        # or LF in a head); the offset counts the interim heads before it.
        head = self._head
        end = head.index(_END_OF_HEAD, self._message_start) + 4
        if end > MAX_HEAD_BYTES:
            raise FramingError(_HEAD_TOO_LARGE)
        fields = self._fields
        # Checked on an interim head too: h11 refused such a field anywhere.
        chunked, length, close = _framing_fields(fields)
        if status < 200:
            self._message_start = end  # an interim response: the final one follows
            self._fields = []
            return
        if chunked and length:
            # The coding frames the body; a length beside it is never relayed,
            # and the connection is not trusted with another request.
            fields = [(name, value) for name, value in fields if name.lower() != _CONTENT_LENGTH]
            self.close_after = True
        self.status = status
        self.headers = fields
        self.http_version = "HTTP/1.0" if version == "1.0" else "HTTP/1.1"
        self.head_done = True
        self._head = b""
        self._chunked = chunked
        self._since_body = len(head) - end
        bodyless = self._head_request or status == 204 or status == 304
        self._eof_framed = not bodyless and not chunked and not length
        # Not llhttp's should_keep_alive(): it takes a HEAD response without
        # a length for one read to EOF, and honours HTTP/1.0 "keep-alive",
        # which the request (HTTP/1.1, no keep-alive) never offered. As h11:
        # HTTP/1.1 without "close", and a body not framed by EOF.
        self.keep_alive = version == "1.1" and not close and not self._eof_framed
        if self._head_request:
            # llhttp does not know the request was HEAD: the response ends
            # here, and whatever it parses as a body is beyond it (chunk
            # framing would not even reach a callback).
            self.complete = True
            self.release()  # the local in feed() keeps it for the rest of this call
            if len(head) > end:
                self.trailing = True

    def on_body(self, body: bytes) -> None:
        if self.complete:
            self.trailing = True
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.head_done and not self.complete:
            self.complete = True
            self.release()  # the local in feed() keeps it for the rest of this call


def _framing_fields(fields: list[tuple[bytes, bytes]]) -> tuple[bool, bool, bool]:
    """(framed by chunked coding, has a Content-Length, says Connection:
    close); a Transfer-Encoding other than a single ``chunked`` is refused:
    a response read to the end of the connection under an unknown coding
    could be cut anywhere."""
    chunked = length = close = False
    for name, value in fields:
        lowered = name.lower()
        if lowered == _TRANSFER_ENCODING:
            if chunked or value.strip().lower() != _CHUNKED:
                raise FramingError(f"unsupported Transfer-Encoding {value.decode('latin-1')!r}")
            chunked = True
        elif lowered == _CONTENT_LENGTH:
            # llhttp checks the digits and the value; zeros in front could
            # make the field any length (h11 refused more than 20 digits).
            if len(value) > 20:
                raise FramingError("a Content-Length of more than 20 digits")
            length = True
        elif lowered == _CONNECTION:
            tokens = value.lower()
            if _CLOSE in tokens:  # before splitting: the usual value is "keep-alive"
                close = close or any(token.strip() == _CLOSE for token in tokens.split(b","))
    return chunked, length, close
