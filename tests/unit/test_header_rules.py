"""The header rules on the way up and on the way back, without sockets (docs/routing-and-forwarding.md)."""

from __future__ import annotations

import re

import pytest

from sidecar import headers
from sidecar.config import parse_config
from sidecar.errors import UpstreamProtocolError
from sidecar.headers import caller_request_id, downstream_headers, new_request_id, upstream_headers
from sidecar.pools import UpstreamPool


def make_pool() -> UpstreamPool:
    config = parse_config(
        """
upstreams:
  api:
    url: http://api.internal:8080
    headers:
      set: {Authorization: Bearer xyz}
      remove: [X-Debug]
"""
    )
    return UpstreamPool(config.upstreams[0])


def test_upstream_headers_drop_hop_by_hop_and_ours_and_keep_the_callers_bytes() -> None:
    raw = [
        (b"Host", b"sidecar:8088"),
        (b"Accept", b"*/*"),
        (b"Connection", b"keep-alive, X-Named"),
        (b"Keep-Alive", b"timeout=5"),
        (b"X-Named", b"hop"),
        (b"x-NAMED", b"hop too"),
        (b"TE", b"trailers"),
        (b"Proxy-Authorization", b"secret"),
        (b"Expect", b"100-continue"),
        (b"X-Request-Id", b"caller-sent"),
        (b"X-Sidecar-Timeout", b"2s"),
        (b"X-Sidecar-Caller", b"checkout"),
        (b"authorization", b"the caller's"),
        (b"X-Debug", b"1"),
        (b"X-Utf8", "caf\u00e9".encode()),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    ]
    sent = upstream_headers(raw, ["keep-alive, X-Named", "x-second"], make_pool(), "rid")
    assert sent == [
        (b"Host", b"api.internal:8080"),
        (b"Accept", b"*/*"),
        (b"X-Utf8", "caf\u00e9".encode()),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"Authorization", b"Bearer xyz"),
        (b"X-Request-Id", b"rid"),
    ]


def test_a_header_a_second_connection_line_names_is_not_forwarded() -> None:
    raw = [(b"X-Second", b"1"), (b"X-Kept", b"2")]
    sent = upstream_headers(raw, ["close", "X-Second"], make_pool(), "rid")
    assert (b"X-Second", b"1") not in sent and (b"X-Kept", b"2") in sent


def test_downstream_headers_drop_hop_by_hop_ours_and_what_connection_names() -> None:
    raw = [
        (b"Content-Type", b"text/plain"),
        (b"Connection", b"keep-alive, X-Hop"),
        (b"X-Hop", b"1"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Keep-Alive", b"timeout=5"),
        (b"X-Request-Id", b"upstream-made-up"),
        (b"x-sidecar-error", b"queue_full"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"X-Tab", b"a\tb"),
    ]
    relayed, invented = downstream_headers(raw, "keep-alive, X-Hop", framed_by_coding=False, upstream="api")
    assert relayed == [("Content-Type", "text/plain"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Tab", "a\tb")]
    assert invented == ("Server",)


def test_content_length_beside_transfer_encoding_describes_nothing_relayed() -> None:
    raw = [(b"Content-Length", b"10"), (b"Server", b"up"), (b"Transfer-Encoding", b"chunked")]
    relayed, invented = downstream_headers(raw, None, framed_by_coding=True, upstream="api")
    assert relayed == [("Server", "up")] and invented == ("Content-Type",)
    relayed, _ = downstream_headers(raw[:2], None, framed_by_coding=False, upstream="api")
    assert relayed == [("Content-Length", "10"), ("Server", "up")]


def test_values_are_utf8_when_they_are_and_iso_8859_1_otherwise() -> None:
    raw = [(b"X-Utf8", "caf\u00e9 \u2603".encode()), (b"X-Latin", b"caf\xe9"), (b"X-\xe9", b"v")]
    relayed, _ = downstream_headers(raw, None, framed_by_coding=False, upstream="api")
    assert relayed == [("X-Utf8", "caf\u00e9 \u2603"), ("X-Latin", "caf\u00e9"), ("X-\u00e9", "v")]


@pytest.mark.parametrize("control", [b"\x00", b"\x01", b"\n", b"\r", b"\x1f", b"\x7f"])
def test_a_relayed_value_with_a_control_character_is_refused_naming_the_first(control: bytes) -> None:
    raw = [(b"X-Fine", b"ok"), (b"X-Bad", b"a" + control + b"b"), (b"X-Worse", control)]
    with pytest.raises(UpstreamProtocolError, match="'X-Bad'") as info:
        downstream_headers(raw, None, framed_by_coding=False, upstream="api")
    assert info.value.upstream == "api"
    # A header that is not relayed anyway may hold one.
    dropped = [(b"Keep-Alive", control), (b"X-Named", control), (b"X-Fine", b"\x80\xff ok")]
    relayed, _ = downstream_headers(dropped, "X-Named", framed_by_coding=False, upstream="api")
    assert relayed == [("X-Fine", "\x80\xff ok")]


def test_the_cache_of_header_names_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(headers, "_NAMES", {})
    monkeypatch.setattr(headers, "_NAMES_KEPT", 3)
    raw = [(f"X-Random-{index}".encode(), b"v") for index in range(10)]
    relayed, _ = downstream_headers(raw, None, framed_by_coding=False, upstream="api")
    assert [name for name, _ in relayed] == [f"X-Random-{index}" for index in range(10)]
    assert len(headers._NAMES) == 3


def test_request_ids_generated_are_32_hex_digits_and_a_callers_is_kept_only_when_safe() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(re.fullmatch(r"[0-9a-f]{32}", value) for value in ids)
    assert caller_request_id("caller-1") == "caller-1"
    for unsafe in (None, "", "a b", "caf\u00e9", "x" * 201, "tab\there"):
        assert caller_request_id(unsafe) is None
