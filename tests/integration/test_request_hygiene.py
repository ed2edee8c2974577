"""Request-side hygiene: what a caller sends that must never reach an upstream.

Each case sends raw client bytes to the real sidecar (a child process, run with
aiohttp's C parser and with the pure-Python one, whose quirks differ); the
upstream is a raw TCP server recording every byte it receives, so "nothing
reached the upstream" is checked on the wire.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from tests.support.sidecar import SidecarProcess
from tests.support.upstreams import ScriptedUpstream
from tests.support.wire import raw_exchange, status_of
from tests.support.yaml import API_INTERNAL, upstreams_yaml, write_config

PARSERS = ["c", "python"]


def _config(url: str) -> str:
    return upstreams_yaml(
        {
            "api": {"url": f"{url}/base", "route": API_INTERNAL},
            "keep": {"url": f"{url}/kbase", "route": {"path_prefix": "/keep", "strip_prefix": False}},
        }
    )


@asynccontextmanager
async def _sidecar(tmp_path: Path, upstream: ScriptedUpstream, parser: str) -> AsyncIterator[SidecarProcess]:
    env = {"AIOHTTP_NO_EXTENSIONS": "1" if parser == "python" else ""}
    process = SidecarProcess(write_config(tmp_path, _config(upstream.url)), env=env)
    await process.start()
    try:
        assert process.events("started")[0]["http_parser"] == parser
        yield process
        assert b"Traceback" not in "\n".join(process.raw).encode()
    finally:
        await process.stop()


async def _until_closed(port: int, data: bytes, *, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send ``data`` in one write; everything received, and whether the sidecar closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()
    closed = False
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                received += chunk
            closed = True
    except (TimeoutError, ConnectionError):
        closed = closed or writer.transport.is_closing()
    finally:
        writer.transport.abort()
    return bytes(received), closed


def _error_of(raw: bytes) -> tuple[int, str | None, str | None]:
    """Status, X-Sidecar-Error and the JSON body's error of the first response in ``raw``."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    code = None
    length = len(rest)
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"x-sidecar-error":
            code = value.strip().decode()
        elif name.strip().lower() == b"content-length":
            length = int(value)
    body = rest[:length]
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = {}
    return status_of(raw), code, parsed.get("error") if isinstance(parsed, dict) else None


def _responses(raw: bytes) -> int:
    return len(re.findall(rb"HTTP/\d\.\d \d{3} ", raw))


async def _assert_at_rest(process: SidecarProcess) -> None:
    async with aiohttp.ClientSession() as client, client.get(process.admin_url + "/pools") as response:
        pools = (await response.json())["upstreams"]
    for name, pool in pools.items():
        assert (pool["in_flight"], pool["pending"], pool["connections"]["active"]) == (0, 0, 0), name


async def _assert_refused(
    process: SidecarProcess, upstream: ScriptedUpstream, request: bytes, status: int, code: str, *, closes: bool = True
) -> None:
    """``request`` gets one error response, the upstream nothing; ``closes``: and the connection is closed."""
    if closes:
        raw, closed = await _until_closed(process.proxy_port, request)
        assert closed, f"the connection was left open after {request[:40]!r}"
    else:
        raw = await raw_exchange(process.proxy_port, request)
    assert _error_of(raw) == (status, code, code), (request[:80], raw[:200])
    assert _responses(raw) == 1, raw[:400]
    assert re.match(rb"HTTP/1\.[01] \d{3} ", raw), raw[:40]
    await asyncio.sleep(0.1)
    assert upstream.received == [], f"bytes reached the upstream: {upstream.all_bytes[:300]!r}"
    await _assert_at_rest(process)


# --------------------------------------------------------------------------
# CONNECT: refused, and the connection closed with it
# --------------------------------------------------------------------------

_SMUGGLED = b"GET /api/smuggled HTTP/1.1\r\nHost: api.internal\r\n\r\n"
CONNECT_CASES = {
    "tunnel_bytes": b"CONNECT api.internal:443 HTTP/1.1\r\nHost: api.internal:443\r\n\r\n" + _SMUGGLED,
    "content_length_body": b"CONNECT api.internal:443 HTTP/1.1\r\nHost: api.internal:443\r\n"
    b"Content-Length: %d\r\n\r\n" % len(_SMUGGLED) + _SMUGGLED,
    "chunked_body": b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(_SMUGGLED) + _SMUGGLED + b"\r\n0\r\n\r\n",
    "nothing_after": b"CONNECT api.internal:443 HTTP/1.1\r\nHost: api.internal:443\r\n\r\n",
}


@pytest.mark.parametrize("parser", PARSERS)
async def test_refused_connect_closes_the_connection(tmp_path: Path, parser: str) -> None:
    """Whatever follows a CONNECT (tunnel bytes, a declared body) is never read as a request."""
    async with ScriptedUpstream() as upstream, _sidecar(tmp_path, upstream, parser) as process:
        for request in CONNECT_CASES.values():
            await _assert_refused(process, upstream, request, 405, "connect_not_supported")


# --------------------------------------------------------------------------
# Dot-segments climbing out of the upstream's base path (or kept prefix)
# --------------------------------------------------------------------------

CLIMBING_TARGETS = [
    b"/api/../admin",
    b"/api/x/../../admin",
    b"/api/%2e%2e/admin",
    b"/api/.%2E/admin",
    b"/api/..%2fadmin",
    b"/api/..%5Cadmin",
    b"/api/..;/admin",
    b"/keep/../admin",
    b"/keep/%2e%2e/admin?a=1",
]


@pytest.mark.parametrize("parser", PARSERS)
async def test_dot_segments_never_climb_out_of_the_base_path(tmp_path: Path, parser: str) -> None:
    async with ScriptedUpstream() as upstream, _sidecar(tmp_path, upstream, parser) as process:
        for target in CLIMBING_TARGETS:
            request = b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n"
            await _assert_refused(process, upstream, request, 400, "bad_request", closes=False)
        for target in (b"/../admin", b"/x/%2e%2e/%2e%2e/admin"):  # Host-header route
            request = b"GET " + target + b" HTTP/1.1\r\nHost: api.internal\r\n\r\n"
            await _assert_refused(process, upstream, request, 400, "bad_request", closes=False)
        # Moving around inside, and dots in the query: forwarded byte for byte.
        inside = b"GET /api/a/../b?x=../.. HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        assert status_of(await raw_exchange(process.proxy_port, inside)) == 200
        assert upstream.all_bytes.startswith(b"GET /base/a/../b?x=../.. HTTP/1.1\r\n")
        await _assert_at_rest(process)


# --------------------------------------------------------------------------
# Transfer-Encoding other than one "chunked"
# --------------------------------------------------------------------------

_POST = b"POST /api/x HTTP/1.1\r\nHost: a\r\n"
_CHUNKED_BODY = b"5\r\nhello\r\n0\r\n\r\n"
TE_CASES = {
    "gzip_then_chunked": _POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n" + _CHUNKED_BODY,
    "deflate_then_chunked": _POST + b"Transfer-Encoding: deflate,chunked\r\n\r\n" + _CHUNKED_BODY,
    "chunked_twice": _POST + b"Transfer-Encoding: chunked, chunked\r\n\r\n" + _CHUNKED_BODY,
    "chunked_then_identity": _POST + b"Transfer-Encoding: chunked, identity\r\n\r\n" + _CHUNKED_BODY,
    "identity": _POST + b"Transfer-Encoding: identity\r\n\r\nhello",
    "gzip_alone": _POST + b"Transfer-Encoding: gzip\r\n\r\nhello",
    "split_gzip_chunked": _POST + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n" + _CHUNKED_BODY,
    "split_chunked_chunked": _POST
    + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
    + _CHUNKED_BODY,
    "split_with_a_header_between": _POST
    + b"Transfer-Encoding: gzip\r\nX-A: b\r\nTransfer-Encoding: chunked\r\n\r\n"
    + _CHUNKED_BODY,
    "trailing_empty_element": _POST + b"Transfer-Encoding: chunked,\r\n\r\n" + _CHUNKED_BODY,
    # RFC 9112 §6.1: in an HTTP/1.0 message the framing is faulty whatever it says.
    "http10_chunked": b"POST /api/x HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + _CHUNKED_BODY,
    # A body whose end never comes: the refusal must not wait for it.
    "gzip_then_chunked_unfinished": _POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n",
}


@pytest.mark.parametrize("parser", PARSERS)
async def test_transfer_coding_other_than_chunked_is_400_and_closes(tmp_path: Path, parser: str) -> None:
    async with ScriptedUpstream() as upstream, _sidecar(tmp_path, upstream, parser) as process:
        for request in TE_CASES.values():
            await _assert_refused(process, upstream, request, 400, "bad_request")
        # One chunked, in any case: decoded and forwarded.
        ok = _POST + b"Transfer-Encoding: CHUNKED\r\nConnection: close\r\n\r\n" + _CHUNKED_BODY
        assert status_of(await raw_exchange(process.proxy_port, ok)) == 200
        assert upstream.all_bytes.startswith(b"POST /base/x HTTP/1.1\r\n")
        assert b"hello" in upstream.all_bytes
        await _assert_at_rest(process)


# --------------------------------------------------------------------------
# Request line and Host (RFC 9112 §3)
# --------------------------------------------------------------------------

FRAGMENT_TARGETS = [b"/api/x#frag", b"/api/x?a=1#frag", b"/api#", b"/keep/x#/../../admin"]


@pytest.mark.parametrize("parser", PARSERS)
async def test_fragment_in_origin_form_is_400(tmp_path: Path, parser: str) -> None:
    async with ScriptedUpstream() as upstream, _sidecar(tmp_path, upstream, parser) as process:
        for target in FRAGMENT_TARGETS:
            request = b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n"
            await _assert_refused(process, upstream, request, 400, "bad_request", closes=False)


INVALID_HOSTS = [
    b"a.test/evil",
    b"a .test",
    b"a@b",
    b"api.internal@evil.example",
    b"[::1",
    b"a:80x",
    b"caf\xc3\xa9.test",
]


@pytest.mark.parametrize("parser", PARSERS)
async def test_invalid_host_header_is_400(tmp_path: Path, parser: str) -> None:
    async with ScriptedUpstream() as upstream, _sidecar(tmp_path, upstream, parser) as process:
        for host in INVALID_HOSTS:
            for target in (b"/api/x", b"http://api.internal/x"):
                request = b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
                await _assert_refused(process, upstream, request, 400, "bad_request", closes=False)
        # Two Host lines (RFC 9112 §3.2 too): both parsers refuse them already.
        request = b"GET /api/x HTTP/1.1\r\nHost: a\r\nHost: api.internal\r\n\r\n"
        await _assert_refused(process, upstream, request, 400, "bad_request", closes=False)
        # Valid ones still route (an empty Host included).
        for host in (b"", b"api.internal:8088", b"127.0.0.1", b"[::1]:1"):
            request = b"GET /api/x HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
            assert status_of(await raw_exchange(process.proxy_port, request)) == 200, host
        assert upstream.all_bytes.count(b"GET /base/") == 4
        await _assert_at_rest(process)


VERSION_CASES = {
    "http2": b"GET /api/x HTTP/2.0\r\nHost: a\r\n\r\n",
    "http3": b"GET /api/x HTTP/3.0\r\nHost: a\r\n\r\n",
    "http12": b"GET /api/x HTTP/1.2\r\nHost: a\r\n\r\n",
    "http09_spelled_out": b"GET /api/x HTTP/0.9\r\nHost: a\r\n\r\n",
    "http2_with_body": b"POST /api/x HTTP/2.0\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
}
# 505, or 400 where the parser cannot tell: no version at all (HTTP/0.9), or
# llhttp refusing bytes after a request it has to close (any version but 1.x).
VERSION_OR_PARSER_CASES = {
    "http09": b"GET /api/x\r\n\r\n",
    "http2_preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "http2_then_pipelined": b"GET /api/x HTTP/2.0\r\nHost: a\r\n\r\nGET /api/y HTTP/1.1\r\nHost: a\r\n\r\n",
}


@pytest.mark.parametrize("parser", PARSERS)
async def test_http_versions_other_than_1_0_and_1_1_are_refused(tmp_path: Path, parser: str) -> None:
    """505 (or 400 when there is no version to speak of), always as a well-formed
    HTTP/1.1 response, and the connection closed."""
    async with ScriptedUpstream() as upstream, _sidecar(tmp_path, upstream, parser) as process:
        for request in VERSION_CASES.values():
            await _assert_refused(process, upstream, request, 505, "http_version_not_supported")
        refused_505 = len(VERSION_CASES)
        for request in [*VERSION_CASES.values(), *VERSION_OR_PARSER_CASES.values()]:
            raw, closed = await _until_closed(process.proxy_port, request)
            refused_505 += status_of(raw) == 505
            assert raw.startswith((b"HTTP/1.1 505 ", b"HTTP/1.1 400 ")), raw[:60]
            assert _error_of(raw)[1] in ("http_version_not_supported", "bad_request")
            assert b"\r\nConnection: close\r\n" in raw.partition(b"\r\n\r\n")[0]
            assert closed and _responses(raw) == 1, raw[:300]
        await asyncio.sleep(0.1)
        assert upstream.received == []
        # Counted alike whichever parser (or the handler) refused the version.
        async with aiohttp.ClientSession() as client, client.get(process.admin_url + "/metrics") as response:
            metrics = await response.text()
        assert f'sidecar_client_errors_total{{kind="http_version_not_supported"}} {refused_505}.0' in metrics
        # HTTP/1.0 and HTTP/1.1 still pass, answered in their own version.
        for version in (b"1.0", b"1.1"):
            request = b"GET /api/x HTTP/" + version + b"\r\nHost: a\r\nConnection: close\r\n\r\n"
            assert (await raw_exchange(process.proxy_port, request)).startswith(b"HTTP/" + version + b" 200 ")
        await _assert_at_rest(process)


@pytest.mark.parametrize("parser", PARSERS)
async def test_http09_request_line_is_answered_at_once(tmp_path: Path, parser: str) -> None:
    """An HTTP/0.9 client sends one line and waits: neither parser answers before a
    blank line, so without an answer of our own it would only see the header
    timeout close the connection."""
    async with ScriptedUpstream() as upstream, _sidecar(tmp_path, upstream, parser) as process:
        loop = asyncio.get_running_loop()
        for request in (b"GET /api/x\r\n", b"GET /\r\n", b"GET /api/x\n"):
            started = loop.time()
            raw, closed = await _until_closed(process.proxy_port, request, timeout=8)
            assert loop.time() - started < 5, "answered by the header timeout, not at once"
            assert raw.startswith(b"HTTP/1.1 400 "), raw[:60]
            assert _error_of(raw)[1:] == ("bad_request", "bad_request")
            assert closed and _responses(raw) == 1
        # Trickled: the line is only complete with its last byte.
        reader, writer = await asyncio.open_connection("127.0.0.1", process.proxy_port)
        for byte in b"GET /api/x\r\n":
            writer.write(bytes([byte]))
            await writer.drain()
        async with asyncio.timeout(5):
            raw = await reader.read()
        writer.close()
        assert raw.startswith(b"HTTP/1.1 400 ")
        await asyncio.sleep(0.1)
        assert upstream.received == []
        # A versioned request line is still read to its end as usual.
        request = b"GET /api/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        assert status_of(await raw_exchange(process.proxy_port, request)) == 200
        await _assert_at_rest(process)
