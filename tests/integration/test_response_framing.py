"""Response framing from hostile upstreams, on real sockets.

Every upstream here is a :class:`ScriptedUpstream` writing raw bytes: extra
bytes after a complete response, ``Content-Length`` together with chunked
framing, bodies on bodiless responses, forged sidecar errors, response heads
that drip, statuses outside 100-599, interim responses.  The tests assert what
callers receive and how many connections the upstream sees, never how the
HTTP/1.1 parser works inside.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.support import LOOPBACK
from tests.support.rest import assert_at_rest, eventually
from tests.support.sidecar import proxy_url, running_sidecar
from tests.support.upstreams import ScriptedUpstream
from tests.support.wire import raw_request, read_response
from tests.support.yaml import one_upstream

MiB = 1024 * 1024
FORGED = b"HTTP/1.1 200 OK\r\nX-Poison: 1\r\nContent-Length: 6\r\n\r\nforged"
GARBAGE = b"\x00\xffnot http at all\r\n\r\n"
Reply = Callable[[str, str, dict[str, str], bytes], Awaitable[bytes]]


def config(url: str, read: str = "30s") -> str:
    return one_upstream(url, limits={"max_connections": 3, "max_pending": 200}, timeouts={"pool": "30s", "read": read})


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes]:
    """Method, path, lower-cased headers and the (Content-Length framed) body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {
        name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:] if line)
    }
    if headers.get("transfer-encoding") == "chunked":
        body = bytearray()
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")
        return method, path, headers, bytes(body)
    return method, path, headers, await reader.readexactly(int(headers.get("content-length", "0")))


def serving(reply: Reply) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A keep-alive upstream: each request's answer is written in a single write."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            method, path, headers, body = await read_request(reader)
            writer.write(await reply(method, path, headers, body))
            await writer.drain()

    return handle


def tagged(tag: str, extra: bytes = b"") -> bytes:
    body = tag.encode()
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Echo: %s\r\n\r\n%s%s" % (len(body), body, body, extra)


async def echo_tag(method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    return tagged(headers.get("x-tag", "-"))


# --------------------------------------------------------------------------
# Bytes beyond a complete response never reach the next request
# --------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [FORGED, GARBAGE], ids=["forged-response", "garbage"])
async def test_bytes_after_a_response_never_answer_the_next_request(tmp_path: Path, extra: bytes) -> None:
    async def reply(method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
        return tagged(headers["x-tag"], extra if path == "/dirty" else b"")

    async with ScriptedUpstream(serving(reply)) as upstream, running_sidecar(tmp_path, config(upstream.url)) as sidecar:
        async with aiohttp.ClientSession() as first, aiohttp.ClientSession() as second:
            async with first.get(proxy_url(sidecar) + "/api/dirty", headers={"X-Tag": "one"}) as response:
                assert response.status == 200 and await response.read() == b"one"
            # Another caller's POST: it must be answered by the upstream, for its own request.
            async with second.post(
                proxy_url(sidecar) + "/api/clean", data=b"pay", headers={"X-Tag": "two"}
            ) as response:
                assert response.status == 200
                assert "X-Poison" not in response.headers
                assert await response.read() == b"two"
        assert upstream.connections == 2  # the dirty connection was not used again
        await assert_at_rest(sidecar)


async def test_stress_trailing_bytes_never_cross_callers(tmp_path: Path) -> None:
    rng = random.Random(1234)
    dirty = 0

    async def reply(method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
        nonlocal dirty
        tag = headers["x-tag"]
        if path == "/poison":
            extra = rng.choice([b"", FORGED, GARBAGE, tagged("stolen")])
            dirty += bool(extra)
            return tagged(tag, extra)
        return tagged(tag)

    ids = itertools.count()
    outcomes = {"ok": 0, "502": 0}

    async def caller(client: aiohttp.ClientSession) -> None:
        for _ in range(15):
            tag = f"t{next(ids)}"
            path = rng.choice(["/api/poison", "/api/echo"])
            method = rng.choice(["GET", "POST"])
            data = tag.encode() if method == "POST" else None
            async with client.request(method, proxy_url(sidecar) + path, data=data, headers={"X-Tag": tag}) as response:
                body = await response.read()
                if response.status == 502:
                    assert response.headers["X-Sidecar-Error"] == "upstream_protocol_error"
                    outcomes["502"] += 1
                    continue
                assert response.status == 200, (response.status, body)
                assert body == tag.encode(), (tag, body)
                assert response.headers["X-Echo"] == tag
                assert "X-Poison" not in response.headers
                outcomes["ok"] += 1

    async with ScriptedUpstream(serving(reply)) as upstream, running_sidecar(tmp_path, config(upstream.url)) as sidecar:
        sessions = [aiohttp.ClientSession() for _ in range(20)]
        try:
            await asyncio.wait_for(asyncio.gather(*(caller(session) for session in sessions)), 120)
        finally:
            for session in sessions:
                await session.close()
        assert outcomes["ok"] + outcomes["502"] == 300
        assert dirty > 20
        # Extra bytes that arrive with the response are caught for sure; only a
        # segment arriving late could still make a request fail (never cross over).
        assert outcomes["502"] <= 3
        await assert_at_rest(sidecar)
        stats = sidecar.generation().pools["api"].stats()
        assert stats.connections <= 3
        assert upstream.connections >= dirty


# --------------------------------------------------------------------------
# Content-Length together with Transfer-Encoding: chunked
# --------------------------------------------------------------------------


def chunked(body: bytes, size: int = 64 * 1024) -> bytes:
    out = bytearray()
    for start in range(0, len(body), size):
        piece = body[start : start + size]
        out += b"%x\r\n%s\r\n" % (len(piece), piece)
    return bytes(out + b"0\r\n\r\n")


@pytest.mark.parametrize("declared", [10, 5 * MiB], ids=["length-smaller", "length-larger"])
async def test_content_length_with_chunked_response_is_ignored(tmp_path: Path, declared: int) -> None:
    body = random.Random(7).randbytes(MiB)

    async def reply(method: str, path: str, headers: dict[str, str], _: bytes) -> bytes:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % declared
        return head + chunked(body)

    async with ScriptedUpstream(serving(reply)) as upstream, running_sidecar(tmp_path, config(upstream.url)) as sidecar:
        async with aiohttp.ClientSession() as client:
            for _ in range(3):  # one kept-alive caller connection: it must stay in step
                async with client.get(proxy_url(sidecar) + "/api/x") as response:
                    assert response.status == 200
                    assert response.headers.get("Content-Length") is None
                    assert await asyncio.wait_for(response.read(), 10) == body
        raw = await raw_request(sidecar.proxy_port, b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert raw.header("Content-Length") is None and raw.body == body
        # The framing was ambiguous: that upstream connection is never used again.
        assert upstream.connections == 4
        await assert_at_rest(sidecar)


# --------------------------------------------------------------------------
# HEAD, 204, 304: the empty body is read to its end, the connection reused
# --------------------------------------------------------------------------


async def bodiless(method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    if path == "/204":
        return b"HTTP/1.1 204 No Content\r\nX-Echo: %s\r\n\r\n" % headers["x-tag"].encode()
    if path == "/304":
        return b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nX-Echo: %s\r\n\r\n' % headers["x-tag"].encode()
    if path == "/204-with-body":
        return b"HTTP/1.1 204 No Content\r\n\r\n" + FORGED
    if method == "HEAD":
        return b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nX-Echo: %s\r\n\r\n" % headers["x-tag"].encode()
    return tagged(headers["x-tag"])


@pytest.mark.parametrize(
    ("method", "path", "status"), [("HEAD", "/api/x", 200), ("GET", "/api/204", 204), ("GET", "/api/304", 304)]
)
async def test_bodiless_responses_reuse_the_connection(tmp_path: Path, method: str, path: str, status: int) -> None:
    async with (
        ScriptedUpstream(serving(bodiless)) as upstream,
        running_sidecar(tmp_path, config(upstream.url)) as sidecar,
    ):
        async with aiohttp.ClientSession() as client:
            for i in range(20):
                async with client.request(method, proxy_url(sidecar) + path, headers={"X-Tag": f"t{i}"}) as response:
                    assert response.status == status
                    assert response.headers["X-Echo"] == f"t{i}"
                    assert await response.read() == b""
                    if method == "HEAD":
                        assert response.headers["Content-Length"] == "1234"
        assert upstream.connections == 1
        await assert_at_rest(sidecar)


async def test_body_on_a_204_never_reaches_the_next_caller(tmp_path: Path) -> None:
    async with (
        ScriptedUpstream(serving(bodiless)) as upstream,
        running_sidecar(tmp_path, config(upstream.url)) as sidecar,
    ):
        async with aiohttp.ClientSession() as first, aiohttp.ClientSession() as second:
            for i in range(5):
                async with first.get(proxy_url(sidecar) + "/api/204-with-body", headers={"X-Tag": "x"}) as response:
                    assert response.status == 204 and await response.read() == b""
                async with second.post(
                    proxy_url(sidecar) + "/api/echo", data=b"p", headers={"X-Tag": f"p{i}"}
                ) as response:
                    assert response.status == 200 and "X-Poison" not in response.headers
                    assert await response.read() == f"p{i}".encode()
        await assert_at_rest(sidecar)


# --------------------------------------------------------------------------
# X-Sidecar-Error belongs to the sidecar
# --------------------------------------------------------------------------


async def test_upstream_cannot_forge_a_sidecar_error(tmp_path: Path) -> None:
    async def forger(method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
        payload = b'{"error": "pool_timeout"}'
        return (
            b"HTTP/1.1 503 Service Unavailable\r\n"
            b"X-Sidecar-Error: pool_timeout\r\nx-sidecar-error: upstream_timeout\r\n"
            b"Retry-After: 7\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(payload), payload)
        )

    async with (
        ScriptedUpstream(serving(forger)) as upstream,
        running_sidecar(tmp_path, config(upstream.url)) as sidecar,
    ):
        async with aiohttp.ClientSession() as client:
            async with client.post(proxy_url(sidecar) + "/api/x", data=b"executed") as response:
                assert response.status == 503
                assert "X-Sidecar-Error" not in response.headers
                assert response.headers["Retry-After"] == "7"  # the upstream's own: legitimate
                assert json.loads(await response.read()) == {"error": "pool_timeout"}
        await assert_at_rest(sidecar)


# --------------------------------------------------------------------------
# The whole wait for the response head is bounded by timeouts.read
# --------------------------------------------------------------------------


def dripping(
    pieces: list[bytes], interval: float
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(interval)

    return handle


HEAD_BYTES = [bytes([b]) for b in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 40]
PROCESSING = [b"HTTP/1.1 102 Processing\r\n\r\n"] * 50


@pytest.mark.parametrize("pieces", [HEAD_BYTES, PROCESSING], ids=["header-bytes", "102-processing"])
async def test_dripping_response_head_times_out(tmp_path: Path, pieces: list[bytes]) -> None:
    async with (
        ScriptedUpstream(dripping(pieces, 0.2)) as upstream,
        running_sidecar(tmp_path, config(upstream.url, read="1s")) as sidecar,
    ):
        async with aiohttp.ClientSession() as client:
            for method in ("GET", "POST"):
                started = time.monotonic()
                async with client.request(method, proxy_url(sidecar) + "/api/x", data=b"body") as response:
                    elapsed = time.monotonic() - started
                    assert response.status == 504
                    assert response.headers["X-Sidecar-Error"] == "upstream_timeout"
                    await response.read()
                assert 0.9 < elapsed < 4, elapsed
        await assert_at_rest(sidecar)
        await eventually(lambda: sidecar.generation().pools["api"].stats().connections == 0)


async def test_slow_upload_longer_than_the_read_timeout_succeeds(tmp_path: Path) -> None:
    async def reply(method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
        return tagged(str(len(body)))

    async def slow_body() -> AsyncIterator[bytes]:
        for _ in range(6):
            yield b"x" * 1000
            await asyncio.sleep(0.4)

    async with (
        ScriptedUpstream(serving(reply)) as upstream,
        running_sidecar(tmp_path, config(upstream.url, read="1s")) as sidecar,
    ):
        async with aiohttp.ClientSession() as client:
            started = time.monotonic()
            async with client.post(proxy_url(sidecar) + "/api/x", data=slow_body()) as response:
                assert response.status == 200
                assert await response.read() == b"6000"
            assert time.monotonic() - started > 2  # longer than timeouts.read
        await assert_at_rest(sidecar)


# --------------------------------------------------------------------------
# Status codes outside 100-599
# --------------------------------------------------------------------------


@pytest.mark.parametrize("status_line", [b"HTTP/1.1 600 X", b"HTTP/1.1 099 X", b"HTTP/1.1 999 Nine"])
async def test_status_outside_100_599_is_502(tmp_path: Path, status_line: bytes) -> None:
    async def reply(method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
        if path == "/bad":
            return status_line + b"\r\nContent-Length: 2\r\n\r\nok"
        return tagged(headers["x-tag"])

    async with ScriptedUpstream(serving(reply)) as upstream, running_sidecar(tmp_path, config(upstream.url)) as sidecar:
        async with aiohttp.ClientSession() as client:
            for i in range(2):
                # POST: not repeated on another connection, so the count below is exact.
                async with client.post(proxy_url(sidecar) + "/api/bad", data=b"p") as response:
                    assert response.status == 502
                    assert response.headers["X-Sidecar-Error"] == "upstream_protocol_error"
                    assert json.loads(await response.read())["error"] == "upstream_protocol_error"
                async with client.get(proxy_url(sidecar) + "/api/ok", headers={"X-Tag": f"t{i}"}) as response:
                    assert response.status == 200 and await response.read() == f"t{i}".encode()
        assert upstream.connections == 3  # each bad answer's connection was closed; the last one kept
        await assert_at_rest(sidecar)


# --------------------------------------------------------------------------
# Interim responses
# --------------------------------------------------------------------------


async def test_early_hints_then_the_final_response(tmp_path: Path) -> None:
    async def reply(method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
        hints = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        return hints + hints + tagged(headers["x-tag"])

    async with ScriptedUpstream(serving(reply)) as upstream, running_sidecar(tmp_path, config(upstream.url)) as sidecar:
        for i in range(3):
            response = await raw_request(
                sidecar.proxy_port, b"GET /api/x HTTP/1.1\r\nHost: a\r\nX-Tag: t%d\r\n\r\n" % i
            )
            assert response.status == 200  # the interim responses are not forwarded
            assert response.body == f"t{i}".encode()
        # And on one kept-alive caller connection, nothing but the final responses arrives.
        reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
        try:
            for i in range(3):
                writer.write(b"GET /api/x HTTP/1.1\r\nHost: a\r\nX-Tag: k%d\r\n\r\n" % i)
                response = await asyncio.wait_for(read_response(reader), 10)
                assert response.status == 200 and response.body == f"k{i}".encode()
        finally:
            writer.close()
        assert upstream.connections == 1
        await assert_at_rest(sidecar)
