"""The hand-rolled proxy the sidecar replaces: aiohttp in, one shared httpx client out.

This is the common fix from the httpx docs ("share one AsyncClient"), done
carefully: one ``AsyncClient`` with ``max_connections=10`` and a 1 s pool
timeout, streaming both ways, ``httpx.PoolTimeout`` answered with 503. What it
lacks is what the sidecar adds: its own bounded FIFO with its own deadline.
Requests queue inside httpcore, whose pool timeout restarts whenever a waiter
loses a race for a freed connection (encode/httpcore#822).

    python -m bench.naive_httpx_proxy --upstream http://127.0.0.1:9000 [--listen 127.0.0.1:0]

Prints ``listening <port>`` on stdout once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import httpx
from aiohttp import web

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host"}
)
T = TypeVar("T")
CLIENT: web.AppKey[httpx.AsyncClient] = web.AppKey("client")
UPSTREAM: web.AppKey[str] = web.AppKey("upstream")


async def forward(request: web.Request) -> web.StreamResponse:
    client = request.app[CLIENT]
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
    body = request.content.iter_chunked(65536) if request.body_exists else None
    upstream_request = client.build_request(
        request.method, request.app[UPSTREAM] + request.path_qs, headers=headers, content=body
    )
    try:
        response = await client.send(upstream_request, stream=True)
    except httpx.PoolTimeout:
        return web.Response(status=503, text="pool timeout", headers={"Retry-After": "1"})
    except httpx.HTTPError as exc:
        return web.Response(status=502, text=f"upstream error: {exc}")
    try:
        downstream = web.StreamResponse(status=response.status_code)
        for name, value in response.headers.multi_items():
            if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                downstream.headers.add(name, value)
        await downstream.prepare(request)
        async for chunk in response.aiter_raw():
            await downstream.write(chunk)
        await downstream.write_eof()
        return downstream
    finally:
        await response.aclose()


async def run(upstream: str, host: str, port: int) -> None:
    client = httpx.AsyncClient(
        limits=httpx.Limits(max_connections=10, max_keepalive_connections=10),
        timeout=httpx.Timeout(30.0, pool=1.0),
    )
    app = web.Application()
    app[CLIENT] = client
    app[UPSTREAM] = upstream.rstrip("/")
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    assert server is not None
    bound = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    print(f"listening {bound}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await client.aclose()


def run_loop() -> Callable[[Coroutine[Any, Any, T]], T]:
    """uvloop's runner when installed (as the sidecar uses), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--listen", default="127.0.0.1:0")
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    with contextlib.suppress(KeyboardInterrupt):
        run_loop()(run(args.upstream, host, int(port)))
    sys.exit(0)


if __name__ == "__main__":
    main()
