"""Message bodies and their framing: byte-identical, chunked, close-delimited, bodyless, 100-continue.

See docs/routing-and-forwarding.md.

Real upstreams on port 0 (:mod:`tests.support.upstreams`), the real sidecar,
callers that are aiohttp clients or raw sockets (:mod:`tests.support.wire`).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sidecar.server import Sidecar
from tests.support import LOOPBACK
from tests.support.rest import eventually
from tests.support.sidecar import proxy_url, running_sidecar
from tests.support.upstreams import ScriptedUpstream, Upstream, unused_port
from tests.support.wire import raw_request, read_request_head, read_response, request_bytes
from tests.support.yaml import API_INTERNAL, one_upstream

MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("method", "status", "upstream_headers"),
    [
        ("HEAD", 200, {"Content-Length": "1234", "Content-Type": "text/plain"}),
        ("GET", 204, {}),
        ("GET", 304, {"ETag": '"v1"'}),
        ("POST", 204, {}),
    ],
)
async def test_bodyless_responses_have_no_body(
    upstream: Upstream, api_sidecar: Sidecar, method: str, status: int, upstream_headers: dict[str, str]
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers=upstream_headers)

    upstream.handler = handler
    reader, writer = await asyncio.open_connection(LOOPBACK, api_sidecar.proxy_port)
    try:
        # Twice on one connection: a stray body byte would corrupt the second response.
        for _ in range(2):
            writer.write(request_bytes("/api/x", "Content-Length: 0", method=method))
            response = await asyncio.wait_for(read_response(reader, method=method), 5)
            assert response.status == status
            assert response.body == b""
            for name, value in upstream_headers.items():
                assert response.header(name) == value
            assert response.header("Transfer-Encoding") is None
        writer.write(request_bytes("/api/x", "Content-Length: 0", "Connection: close", method=method))
        final = await asyncio.wait_for(read_response(reader, method=method), 5)
        assert final.status == status
        assert await asyncio.wait_for(reader.read(), 5) == b""  # and nothing after it
    finally:
        writer.close()


async def test_expect_100_continue(tmp_path: Path) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        return web.Response(body=await request.read())

    refused = f"http://{LOOPBACK}:{unused_port()}"
    config = f"""
        upstreams:
          api: {{ url: "{{up}}/base" }}
          down: {{ url: "{refused}" }}
        """
    async with (
        Upstream(echo, read_body=False) as upstream,
        running_sidecar(tmp_path, config.replace("{up}", upstream.url)) as sidecar,
    ):
        reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
        try:
            writer.write(request_bytes("/api/x", "Content-Length: 5", "Expect: 100-continue", method="POST"))
            interim = await asyncio.wait_for(read_response(reader), 5)
            assert interim.status == 100
            writer.write(b"hello")
            final = await asyncio.wait_for(read_response(reader), 5)
            assert final.status == 200 and final.body == b"hello"
        finally:
            writer.close()
        assert all(name.lower() != "expect" for name, _ in upstream.requests[0].headers)

        # Refused before the body is wanted: the final answer comes at once, no 100, no upload.
        for target, status in (("/down/x", 502), ("/nowhere", 404)):
            response = await raw_request(
                sidecar.proxy_port,
                request_bytes(target, "Content-Length: 5", "Expect: 100-continue", "Connection: close", method="POST"),
            )
            assert response.status == status


async def test_gzip_bodies_pass_byte_identical_both_ways(upstream: Upstream, api_sidecar: Sidecar) -> None:
    original = os.urandom(64 * 1024) + b"compressible " * 20_000
    compressed = gzip.compress(original, mtime=0)

    async def handler(request: web.Request) -> web.StreamResponse:
        received = await request.read()  # the upstream does not decompress either (auto_decompress=False)
        assert request.headers["Content-Encoding"] == "gzip"
        return web.Response(
            body=compressed,
            headers={
                "Content-Encoding": "gzip",
                "Content-Type": "application/json",
                "X-Received-Sha256": hashlib.sha256(received).hexdigest(),
            },
        )

    upstream.handler = handler
    upstream.read_body = False
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        async with client.post(
            proxy_url(api_sidecar) + "/api/x",
            data=compressed,
            headers={"Content-Encoding": "gzip", "Accept-Encoding": "gzip"},
        ) as response:
            body = await response.read()
            assert response.status == 200
            assert response.headers["Content-Encoding"] == "gzip"
            assert response.headers["Content-Length"] == str(len(compressed))
            assert response.headers["X-Received-Sha256"] == hashlib.sha256(compressed).hexdigest()
            assert body == compressed
    sent = dict((n.lower(), v) for n, v in upstream.requests[0].headers)
    assert sent["accept-encoding"] == "gzip"
    assert sent["content-length"] == str(len(compressed))


async def test_chunked_upload_without_content_length(upstream: Upstream, api_sidecar: Sidecar) -> None:
    async def digest(request: web.Request) -> web.StreamResponse:
        hasher, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(64 * 1024):
            hasher.update(chunk)
            size += len(chunk)
        return web.json_response({"sha256": hasher.hexdigest(), "size": size})

    pieces = [os.urandom(n) for n in (1, 1000, 70_000, 3, 200_000)]

    async def body() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece
            await asyncio.sleep(0.01)  # arrive in separate reads

    upstream.handler = digest
    upstream.read_body = False
    async with aiohttp.ClientSession() as client:
        async with client.post(proxy_url(api_sidecar) + "/api/upload", data=body()) as response:
            assert response.status == 200
            result = await response.json()
    expected = b"".join(pieces)
    assert result == {"sha256": hashlib.sha256(expected).hexdigest(), "size": len(expected)}
    sent = dict((n.lower(), v) for n, v in upstream.requests[0].headers)
    assert "content-length" not in sent
    assert sent["transfer-encoding"] == "chunked"


async def test_upstream_body_delimited_by_close(tmp_path: Path) -> None:
    payload = os.urandom(300_000)

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + payload)  # no length, no chunking: ends at close
        await writer.drain()
        writer.close()

    async with (
        ScriptedUpstream(until_close) as upstream,
        running_sidecar(tmp_path, one_upstream(f"{upstream.url}/base", route=API_INTERNAL)) as sidecar,
    ):
        for _ in range(2):
            response = await raw_request(sidecar.proxy_port, request_bytes("/api/x"))
            assert response.status == 200
            assert response.body == payload
        assert upstream.connections == 2  # such a connection is never reused
        await eventually(lambda: sidecar.generation().pools["api"].stats().connections == 0)


@pytest.mark.parametrize(
    ("method", "sent_headers", "body", "expected"),
    [
        ("POST", ["Content-Length: 0"], b"", {"content-length": "0"}),
        ("POST", ["Content-Length: 5"], b"hello", {"content-length": "5"}),
        ("PUT", ["Transfer-Encoding: chunked"], b"5\r\nhello\r\n0\r\n\r\n", {"transfer-encoding": "chunked"}),
        ("GET", [], b"", {}),
        ("DELETE", [], b"", {}),
    ],
)
async def test_request_body_framing_is_exactly_one_of_length_or_chunked(
    upstream: Upstream,
    api_sidecar: Sidecar,
    method: str,
    sent_headers: list[str],
    body: bytes,
    expected: dict[str, str],
) -> None:
    response = await raw_request(api_sidecar.proxy_port, request_bytes("/api/x", *sent_headers, method=method) + body)
    assert response.status == 200
    (recorded,) = upstream.requests
    framing = {n.lower(): v for n, v in recorded.headers if n.lower() in ("content-length", "transfer-encoding")}
    assert framing == expected
    assert recorded.method == method
    assert recorded.body == (b"hello" if b"hello" in body else b"")
