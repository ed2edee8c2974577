"""Header rules on the way up and on the way back (see docs/routing-and-forwarding.md).

Pure functions over raw header bytes: what is dropped (hop-by-hop, the
headers a ``Connection`` line names, what only the sidecar may set), what is
added (``Host``, ``headers.set``, ``X-Request-Id``) and what an upstream may
not send to a caller.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .errors import UpstreamProtocolError

if TYPE_CHECKING:
    from .pools import UpstreamPool

# RFC 9110 §7.6.1 hop-by-hop headers, plus Proxy-Authorization/Authenticate,
# which belong to the hop between the caller and us.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        # RFC 9113 §3.2.1: HTTP2-Settings only means something on the hop of an h2c upgrade.
        "http2-settings",
    }
)
# Not forwarded upstream either: Host is rewritten, Expect is answered here,
# X-Request-Id is set by us (kept if the caller sent one), and so is
# X-Sidecar-Timeout: what is left of the caller's budget, never what it sent.
_NOT_FORWARDED = HOP_BY_HOP | {"host", "expect", "x-request-id", "x-sidecar-timeout"}
# Response headers only the sidecar sets: X-Request-Id is ours, and
# X-Sidecar-Error tells callers the upstream was never reached, so an upstream
# must not be able to claim it (a caller would retry a POST it executed).
_OURS = frozenset({"x-request-id", "x-sidecar-error"})
# What aiohttp refuses to write in a header (and what no header value may
# hold): letting it through would fail in prepare() with a 500 and a
# traceback.  The control characters but tab, looked for in the raw bytes:
# all are ASCII, and neither UTF-8 nor ISO-8859-1 (how values are decoded)
# makes one from other bytes or one into another.  A tab is not among them,
# so it can join the values for a single look.
_CONTROL_BYTES = bytes([*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F])
_DROPPED_DOWNSTREAM = HOP_BY_HOP | _OURS
_MAX_REQUEST_ID = 200
# Header names as received → (as text, lower-cased): the same few names
# arrive on every response, so each is decoded once (a bounded number kept).
_NAMES: dict[bytes, tuple[str, str]] = {}
_NAMES_KEPT = 2048


def _has_control_byte(raw: bytes) -> bool:
    return len(raw.translate(None, _CONTROL_BYTES)) != len(raw)


def _name(raw: bytes) -> tuple[str, str]:
    known = _NAMES.get(raw)
    if known is None:
        name = raw.decode("latin-1")
        known = (name, name.lower())
        if len(_NAMES) < _NAMES_KEPT:
            _NAMES[raw] = known
    return known


def connection_tokens(value: str | None) -> frozenset[str]:
    """The lower-cased header names a ``Connection`` value lists."""
    if not value:
        return frozenset()
    return frozenset(token.strip().lower() for token in value.split(",") if token.strip())


def new_request_id() -> str:
    # 32 hex digits from the kernel's random source, as uuid4().hex but without
    # building a UUID (a quarter of the cost).
    return os.urandom(16).hex()


def caller_request_id(value: str | None) -> str | None:
    """The caller's X-Request-Id if it is safe to echo, log and forward: visible ASCII."""
    if value and len(value) <= _MAX_REQUEST_ID and value.isascii() and value.isprintable() and " " not in value:
        return value
    return None


def upstream_headers(
    raw_headers: Iterable[tuple[bytes, bytes]], connection: Iterable[str], pool: UpstreamPool, request_id: str
) -> list[tuple[bytes, bytes]]:
    """The request headers sent upstream, as bytes.

    The caller's header bytes pass as received (aiohttp's str view would have to
    be re-encoded, and httpx encodes str values as ASCII: non-ASCII bytes broke
    it).  Every ``Connection`` line counts: a second one may name more
    hop-by-hop headers.
    """
    named = connection_tokens(",".join(connection))
    skipped = pool.headers_not_forwarded
    headers: list[tuple[bytes, bytes]] = [pool.host_header]
    names = _NAMES
    for raw_name, raw_value in raw_headers:
        known = names.get(raw_name)
        lower = (_name(raw_name) if known is None else known)[1]
        if lower in _NOT_FORWARDED or lower in skipped or (named and lower in named):
            continue
        headers.append((raw_name, raw_value))
    headers.extend(pool.headers_set)
    headers.append((b"X-Request-Id", request_id.encode("ascii")))
    return headers


def downstream_headers(
    raw_headers: Iterable[tuple[bytes, bytes]], connection: str | None, *, framed_by_coding: bool, upstream: str | None
) -> tuple[list[tuple[str, str]], tuple[str, ...]]:
    """The response headers relayed to the caller, and the ones aiohttp would
    invent that the upstream did not send (``Content-Type``, ``Server``).

    ``framed_by_coding``: the response carried ``Transfer-Encoding``.  Its body
    is relayed as that coding framed it, so a ``Content-Length`` beside it
    describes nothing we send (RFC 9112 §6.3): forwarding it would cut or hang
    the caller's body.
    """
    named = connection_tokens(connection)
    seen_content_type = seen_server = False
    relayed: list[tuple[str, str]] = []
    values: list[bytes] = []
    names = _NAMES
    for raw_name, raw_value in raw_headers:
        known = names.get(raw_name)
        name, lower = _name(raw_name) if known is None else known
        if lower in _DROPPED_DOWNSTREAM or (named and lower in named):
            continue
        if lower == "content-type":
            seen_content_type = True
        elif lower == "server":
            seen_server = True
        elif framed_by_coding and lower == "content-length":
            continue
        # The value as aiohttp will write it back: UTF-8 round-trips byte for
        # byte; other bytes (obs-text) are read as ISO-8859-1, HTTP's historical charset.
        try:
            value = raw_value.decode("utf-8")
        except UnicodeDecodeError:
            value = raw_value.decode("latin-1")
        relayed.append((name, value))
        values.append(raw_value)
    if _has_control_byte(b"\t".join(values)):
        for (name, _), raw_value in zip(relayed, values, strict=True):
            if _has_control_byte(raw_value):
                raise UpstreamProtocolError(f"upstream sent an invalid value for header {name!r}", upstream=upstream)
    invented = tuple(name for name, seen in (("Content-Type", seen_content_type), ("Server", seen_server)) if not seen)
    return relayed, invented
