"""The upstream never sees more than max_connections, even while connections churn."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.support.sidecar import proxy_url, running_sidecar
from tests.support.upstreams import Upstream


async def closing_handler(request: web.Request) -> web.StreamResponse:
    # Every answer closes its connection: the pool must replace it, and the
    # replacement must not open before the old socket is really closed.
    await asyncio.sleep(0.005)
    return web.Response(text="ok", headers={"Connection": "close"})


async def test_connection_cap_holds_while_connections_are_replaced(tmp_path: Path) -> None:
    async with Upstream(closing_handler) as upstream, running_sidecar(
        tmp_path,
        f"""
        upstreams:
          churn:
            url: {upstream.url}
            limits: {{ max_connections: 2, max_pending: 1000 }}
            timeouts: {{ pool: 10s }}
        """,
    ) as sidecar, aiohttp.ClientSession() as client:
        url = proxy_url(sidecar) + "/churn/x"

        async def one() -> int:
            async with client.get(url) as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(one() for _ in range(300)))
        pool = sidecar.generation().pools["churn"]
        assert statuses == [200] * 300
        assert len(upstream.peers) >= 150, "connections were not replaced: the test proves nothing"
        assert upstream.max_open <= 2, f"upstream saw {upstream.max_open} connections open at once"
        assert pool.stats().connections <= 2
