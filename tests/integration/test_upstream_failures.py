"""Upstreams that refuse, time out, hang up or answer garbage: the 502/504 the caller gets.

See docs/backpressure.md, "Errors".

Real upstreams on port 0 (:mod:`tests.support.upstreams`), the real sidecar,
callers that are aiohttp clients or raw sockets (:mod:`tests.support.wire`).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support import LOOPBACK
from tests.support.rest import assert_at_rest, eventually
from tests.support.sidecar import assert_sidecar_error, proxy_url, running_sidecar
from tests.support.tls import tls_server_context
from tests.support.upstreams import BlackholeUpstream, ScriptedUpstream, TLSUpstream, Upstream, unused_port
from tests.support.wire import raw_request, read_request_head, request_bytes
from tests.support.yaml import API_INTERNAL, one_upstream

MiB = 1024 * 1024


async def test_upstream_refused_is_502_connect_error(tmp_path: Path) -> None:
    port = unused_port()
    async with running_sidecar(tmp_path, one_upstream(f"http://{LOOPBACK}:{port}/base", route=API_INTERNAL)) as sidecar:
        async with aiohttp.ClientSession() as client:
            async with client.get(proxy_url(sidecar) + "/api/x") as response:
                payload = assert_sidecar_error(
                    response.status, response.headers, await response.read(), 502, "upstream_connect_error"
                )
                assert payload["upstream"] == "api"
        await assert_at_rest(sidecar)
        assert sidecar.generation().pools["api"].stats().connections == 0


async def test_upstream_closing_before_headers_is_502_protocol_error(tmp_path: Path) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.close()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"this is not HTTP\r\n\r\n")
        await writer.drain()

    for behaviour in (hang_up, garbage):
        async with (
            ScriptedUpstream(behaviour) as upstream,
            running_sidecar(tmp_path, one_upstream(f"{upstream.url}/base", route=API_INTERNAL)) as sidecar,
        ):
            async with aiohttp.ClientSession() as client:
                for method in ("GET", "POST"):
                    async with client.request(method, proxy_url(sidecar) + "/api/x", data=b"x") as response:
                        payload = assert_sidecar_error(
                            response.status, response.headers, await response.read(), 502, "upstream_protocol_error"
                        )
                        assert payload["upstream"] == "api"
            await assert_at_rest(sidecar)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\nContent-Length: 2\r\n\r\nok",  # aiohttp would refuse to write it
        b"HTTP/1.1 200 OK\r\nX-Bad: a\x7fb\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX Bad: v\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    ],
    ids=["control-char", "del-char", "space-in-name", "bad-status-line", "conflicting-length"],
)
async def test_malformed_upstream_response_is_502(tmp_path: Path, head: bytes) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(head)
        await writer.drain()
        await asyncio.sleep(1)

    async with (
        ScriptedUpstream(answer) as upstream,
        running_sidecar(tmp_path, one_upstream(f"{upstream.url}/base", route=API_INTERNAL)) as sidecar,
    ):
        response = await raw_request(sidecar.proxy_port, request_bytes("/api/x"))
        assert_sidecar_error(response.status, response.headers, response.body, 502, "upstream_protocol_error")
        await eventually(lambda: sidecar.generation().pools["api"].stats().connections == 0)
        await assert_at_rest(sidecar)


async def test_upstream_read_timeout_is_504(tmp_path: Path) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.Response(text="too late")

    extra: dict[str, Any] = {"timeouts": {"read": "300ms"}}
    async with (
        Upstream(slow) as upstream,
        running_sidecar(tmp_path, one_upstream(f"{upstream.url}/base", route=API_INTERNAL, **extra)) as sidecar,
    ):
        started = time.monotonic()
        async with aiohttp.ClientSession() as client:
            async with client.get(proxy_url(sidecar) + "/api/x") as response:
                payload = assert_sidecar_error(
                    response.status, response.headers, await response.read(), 504, "upstream_timeout"
                )
        assert payload["upstream"] == "api"
        assert time.monotonic() - started < 3  # the read timeout, not the upstream's 5 s
        await assert_at_rest(sidecar)


async def test_upstream_connect_timeout_is_504(tmp_path: Path) -> None:
    async with BlackholeUpstream() as blackhole:
        extra: dict[str, Any] = {"timeouts": {"connect": "300ms"}}
        async with running_sidecar(
            tmp_path, one_upstream(f"{blackhole.url}/base", route=API_INTERNAL, **extra)
        ) as sidecar:
            started = time.monotonic()
            async with aiohttp.ClientSession() as client:
                async with client.get(proxy_url(sidecar) + "/api/x") as response:
                    payload = assert_sidecar_error(
                        response.status, response.headers, await response.read(), 504, "upstream_timeout"
                    )
            assert "connecting" in payload["message"]
            assert time.monotonic() - started < 3
            await assert_at_rest(sidecar)


async def _echo_target(request: web.Request) -> web.StreamResponse:
    return web.Response(text=request.raw_path)


async def test_tls_upstream_verified_and_handshake_failure_is_502(tmp_path: Path) -> None:
    server_context, ca_file = tls_server_context(tmp_path, "localhost")
    async with TLSUpstream(server_context, _echo_target) as upstream:
        config = f"""
            upstreams:
              trusted:
                url: https://localhost:{upstream.port}/base
                tls: {{ ca_file: "{ca_file}" }}
              untrusted:
                url: https://localhost:{upstream.port}/base
        """
        async with running_sidecar(tmp_path, config) as sidecar, aiohttp.ClientSession() as client:
            async with client.get(proxy_url(sidecar) + "/trusted/x?q=1") as response:
                assert response.status == 200
                assert await response.text() == "/base/x?q=1"
            async with client.get(proxy_url(sidecar) + "/untrusted/x") as response:
                payload = assert_sidecar_error(
                    response.status, response.headers, await response.read(), 502, "upstream_connect_error"
                )
                assert payload["upstream"] == "untrusted"
                assert "certificate" in payload["message"]
