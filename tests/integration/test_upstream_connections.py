"""Pool slots and upstream connections: released on every abort, kept alive, never reused stale (docs/backpressure.md).

Real upstreams on port 0 (:mod:`tests.support.upstreams`), the real sidecar,
callers that are aiohttp clients or raw sockets (:mod:`tests.support.wire`).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from sidecar.server import Sidecar
from tests.support import LOOPBACK
from tests.support.rest import assert_at_rest, eventually
from tests.support.sidecar import proxy_url, running_sidecar
from tests.support.upstreams import BlackholeUpstream, ScriptedUpstream, Upstream
from tests.support.wire import read_request_head, request_bytes
from tests.support.yaml import API_INTERNAL, one_upstream

MiB = 1024 * 1024


async def test_aborted_downloads_release_their_pool_slots(tmp_path: Path) -> None:
    chunk = b"z" * 65536

    async def endless(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/small"):
            return web.Response(text="small")
        response = web.StreamResponse()
        await response.prepare(request)
        while True:  # until the sidecar goes away
            await response.write(chunk)
            await asyncio.sleep(0.001)

    async def slow_headers(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.Response(text="late")

    async def sink(request: web.Request) -> web.StreamResponse:
        size = 0
        async for piece in request.content.iter_any():
            size += len(piece)
        return web.Response(text=str(size))

    async def route(request: web.Request) -> web.StreamResponse:
        handler = {"/base/slow": slow_headers, "/base/upload": sink}.get(request.path, endless)
        return await handler(request)

    # A generous pool timeout: "promptly" is asserted below, not by the admission clock on a busy machine.
    extra: dict[str, Any] = {"limits": {"max_connections": 5, "max_pending": 1000}, "timeouts": {"pool": "10s"}}
    async with (
        Upstream(route, read_body=False) as upstream,
        running_sidecar(tmp_path, one_upstream(f"{upstream.url}/base", route=API_INTERNAL, **extra)) as sidecar,
    ):
        pool = sidecar.generation().pools["api"]
        assert pool.admission.capacity == 5 and pool.admission.pool_timeout == 10

        async def abort_mid_download() -> None:
            reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
            writer.write(request_bytes("/api/big"))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200")
            await asyncio.wait_for(reader.readexactly(1000), 10)  # some body, then vanish
            writer.transport.abort()

        async def abort_waiting_for_headers() -> None:
            _, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
            writer.write(request_bytes("/api/slow"))
            await writer.drain()
            await eventually(lambda: pool.admission.in_flight > 0)  # it holds a slot upstream
            writer.transport.abort()

        async def abort_mid_upload() -> None:
            _, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
            writer.write(request_bytes("/api/upload", "Content-Length: 10000000", method="POST") + b"u" * 100_000)
            await writer.drain()
            await eventually(lambda: pool.admission.in_flight > 0)
            writer.transport.abort()

        async def batch(make: object, total: int, concurrency: int) -> None:
            for start in range(0, total, concurrency):
                await asyncio.gather(*(make() for _ in range(min(concurrency, total - start))))  # type: ignore[operator]

        await batch(abort_mid_download, 500, 5)
        await batch(abort_waiting_for_headers, 50, 1)
        await batch(abort_mid_upload, 50, 1)

        # Every slot is back: the next 50 go through promptly, 5 at a time at most upstream.
        started = time.monotonic()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:

            async def small() -> int:
                async with client.get(proxy_url(sidecar) + "/api/small") as response:
                    await response.read()
                    return response.status

            statuses = await asyncio.gather(*(small() for _ in range(50)))
        assert statuses == [200] * 50
        assert time.monotonic() - started < 10
        await assert_at_rest(pool)
        assert pool.stats().connections <= 5
        assert upstream.max_open <= 5


async def test_upstream_connections_are_kept_alive_and_reused(upstream: Upstream, api_sidecar: Sidecar) -> None:
    async with aiohttp.ClientSession() as client:
        for _ in range(20):
            async with client.post(proxy_url(api_sidecar) + "/api/x", data=b"body") as response:
                assert response.status == 200
            async with client.get(proxy_url(api_sidecar) + "/api/x") as response:
                assert response.status == 200
    assert len(upstream.peers) == 1
    stats = api_sidecar.generation().pools["api"].stats()
    assert (stats.connections, stats.idle, stats.opened_total) == (1, 1, 1)


async def test_stale_kept_alive_connection_is_retried_for_idempotent_requests(tmp_path: Path) -> None:
    async def one_request_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Answer the first request as keep-alive, then drop the connection when the
        # next one arrives: the race of an upstream closing an idle connection.
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request_head(reader)
        writer.transport.abort()

    async with (
        ScriptedUpstream(one_request_per_connection) as upstream,
        running_sidecar(tmp_path, one_upstream(f"{upstream.url}/base", route=API_INTERNAL)) as sidecar,
    ):
        async with aiohttp.ClientSession() as client:
            for _ in range(3):
                async with client.get(proxy_url(sidecar) + "/api/x") as response:
                    assert response.status == 200 and await response.read() == b"ok"
            # Only GET/HEAD/OPTIONS/TRACE without a body are repeated: a POST may have had effects.
            async with client.post(proxy_url(sidecar) + "/api/x", data=b"pay") as response:
                assert response.status == 502
                assert response.headers["X-Sidecar-Error"] == "upstream_protocol_error"
        # GET 1 opens #1; GETs 2 and 3 find their kept-alive connection dropped and are
        # retried on #2 and #3; the POST meets the same fate on #3 and is not retried.
        assert upstream.connections == 3
        await assert_at_rest(sidecar)


async def test_upstream_closed_idle_connection_is_not_reused(tmp_path: Path) -> None:
    async def close_after_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # without saying Connection: close

    async with (
        ScriptedUpstream(close_after_one) as upstream,
        running_sidecar(tmp_path, one_upstream(f"{upstream.url}/base", route=API_INTERNAL)) as sidecar,
    ):
        async with aiohttp.ClientSession() as client:
            for _ in range(5):
                await asyncio.sleep(0.1)  # the FIN has arrived by now
                async with client.post(proxy_url(sidecar) + "/api/x", data=b"not retryable") as response:
                    assert response.status == 200
        assert upstream.connections == 5


async def test_caller_leaving_while_the_upstream_connection_opens_leaks_nothing(tmp_path: Path) -> None:
    # httpcore can leak a slot when a request is cancelled while its connection is
    # being opened (a phantom CONNECTING connection): a request cancelled then must not
    # leave a phantom connection (or slot) behind.
    async with BlackholeUpstream() as blackhole:
        extra: dict[str, Any] = {"limits": {"max_connections": 2}, "timeouts": {"connect": "30s"}}
        async with running_sidecar(
            tmp_path, one_upstream(f"{blackhole.url}/base", route=API_INTERNAL, **extra)
        ) as sidecar:
            pool = sidecar.generation().pools["api"]
            for _ in range(50):
                _, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
                writer.write(request_bytes("/api/x"))
                await writer.drain()
                await eventually(lambda: pool.stats().connecting == 1)
                writer.transport.abort()
                # At once, not by the idle sweeper (1 s) finding a dead connection later.
                await eventually(lambda: pool.stats().connections == 0 and pool.admission.in_flight == 0, 0.9)
            await assert_at_rest(sidecar)
            assert pool.stats().opened_total == pool.stats().closed_total == 50
