"""The plain-asyncio network backend under the real sidecar (sidecar/upstream/netio.py).

Each test drives a path of the backend through the whole proxy: TLS, read
timeouts, refused connects, upstream-closed keep-alive connections, large
bodies past the read high-water mark, and callers that disconnect mid-body.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.support import LOOPBACK
from tests.support.rest import assert_at_rest, eventually
from tests.support.sidecar import proxy_url, running_sidecar
from tests.support.tls import tls_server_context
from tests.support.upstreams import TLSUpstream, Upstream


async def test_https_upstream_through_the_asyncio_backend(tmp_path: Path) -> None:
    server_context, ca_file = tls_server_context(tmp_path, "localhost", LOOPBACK)

    async def hello(request: web.Request) -> web.Response:
        assert request.secure
        return web.Response(text=f"tls {request.path_qs}")

    async with TLSUpstream(server_context, hello) as upstream:
        async with (
            running_sidecar(
                tmp_path,
                f"""
            upstreams:
              api:
                url: https://{LOOPBACK}:{upstream.port}
                tls: {{ ca_file: {ca_file} }}
            """,
            ) as sidecar,
            aiohttp.ClientSession() as client,
        ):
            for _ in range(3):  # the second and third reuse the TLS connection
                async with client.get(proxy_url(sidecar) + "/api/x?y=1") as response:
                    assert response.status == 200
                    assert await response.text() == "tls /x?y=1"
            assert sidecar.generation().pools["api"].stats().opened_total == 1


async def test_untrusted_certificate_is_a_502_connect_error(tmp_path: Path) -> None:
    # Signed by a CA the sidecar was never told about.
    server_context, _ = tls_server_context(tmp_path, LOOPBACK)
    async with TLSUpstream(server_context) as upstream:
        async with (
            running_sidecar(tmp_path, f"upstreams:\n  api:\n    url: https://{LOOPBACK}:{upstream.port}\n") as sidecar,
            aiohttp.ClientSession() as client,
        ):
            async with client.get(proxy_url(sidecar) + "/api/x") as response:
                assert response.status == 502
                assert response.headers["X-Sidecar-Error"] == "upstream_connect_error"
            await assert_at_rest(sidecar, "api")


async def test_read_timeout_is_a_504_and_refused_connect_a_502(tmp_path: Path) -> None:
    async def stall(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="late")

    with_closed_port = Upstream()
    await with_closed_port.start()
    closed_url = with_closed_port.url
    await with_closed_port.stop()
    async with (
        Upstream(stall) as upstream,
        running_sidecar(
            tmp_path,
            f"""
        upstreams:
          api:
            url: {upstream.url}
            timeouts: {{ read: 200ms }}
          gone:
            url: {closed_url}
        """,
        ) as sidecar,
        aiohttp.ClientSession() as client,
    ):
        async with client.get(proxy_url(sidecar) + "/api/x") as response:
            assert response.status == 504
            assert response.headers["X-Sidecar-Error"] == "upstream_timeout"
        async with client.get(proxy_url(sidecar) + "/gone/x") as response:
            assert response.status == 502
            assert response.headers["X-Sidecar-Error"] == "upstream_connect_error"
        await assert_at_rest(sidecar, "api")
        await assert_at_rest(sidecar, "gone")


async def test_connection_closed_by_the_upstream_while_idle_is_not_reused(tmp_path: Path) -> None:
    """An idle connection the upstream closed shows as readable (EOF): a POST,
    which is never retried, must still get a fresh connection."""

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    upstream = Upstream(echo, read_body=False)
    await upstream.start()
    try:
        async with (
            running_sidecar(tmp_path, f"upstreams:\n  api:\n    url: {upstream.url}\n") as sidecar,
            aiohttp.ClientSession() as client,
        ):
            async with client.post(proxy_url(sidecar) + "/api/x", data=b"one") as response:
                assert await response.read() == b"one"
            # Close every upstream-side connection while the sidecar holds it idle.
            assert upstream._runner is not None and upstream._runner.server is not None
            for protocol in list(upstream._runner.server.connections):
                assert protocol.transport is not None
                protocol.transport.close()
            await asyncio.sleep(0.2)
            async with client.post(proxy_url(sidecar) + "/api/x", data=b"two") as response:
                assert response.status == 200
                assert await response.read() == b"two"
            assert sidecar.generation().pools["api"].stats().opened_total == 2
    finally:
        await upstream.stop()


async def test_large_body_passes_byte_for_byte_past_the_high_water_mark(tmp_path: Path) -> None:
    blob = bytes(range(256)) * (8 * 4096)  # 8 MiB

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = len(blob)
        await response.prepare(request)
        for start in range(0, len(blob), 1 << 20):
            await response.write(blob[start : start + (1 << 20)])
        return response

    async with (
        Upstream(big) as upstream,
        running_sidecar(tmp_path, f"upstreams:\n  api:\n    url: {upstream.url}\n") as sidecar,
        aiohttp.ClientSession() as client,
    ):
        async with client.get(proxy_url(sidecar) + "/api/big") as response:
            digest = hashlib.sha256()
            async for chunk in response.content.iter_chunked(1 << 16):
                digest.update(chunk)
                await asyncio.sleep(0)  # a caller slower than the upstream
        assert digest.hexdigest() == hashlib.sha256(blob).hexdigest()
        await assert_at_rest(sidecar, "api")


async def test_callers_disconnecting_mid_body_give_everything_back(tmp_path: Path) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        with __import__("contextlib").suppress(ConnectionError):
            while True:
                await response.write(b"x" * 65536)
                await asyncio.sleep(0.001)
        return response

    async with (
        Upstream(endless) as upstream,
        running_sidecar(
            tmp_path, f"upstreams:\n  api:\n    url: {upstream.url}\n    limits: {{ max_connections: 20 }}\n"
        ) as sidecar,
    ):

        async def read_a_little_then_leave() -> None:
            async with aiohttp.ClientSession() as client, client.get(proxy_url(sidecar) + "/api/x") as response:
                await response.content.readexactly(100_000)

        for _ in range(5):
            await asyncio.gather(*(read_a_little_then_leave() for _ in range(20)))
        await assert_at_rest(sidecar, "api")
        await eventually(lambda: sidecar.generation().pools["api"].stats().connections == 0)
        await eventually(lambda: upstream.open_connections == 0)
