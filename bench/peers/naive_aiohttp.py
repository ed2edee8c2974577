"""A naive proxy on aiohttp both sides: aiohttp server + one shared ClientSession.

Usage: python naive_aiohttp.py LISTEN_PORT UPSTREAM_URL
"""

import asyncio
import sys

import aiohttp
import uvloop
from aiohttp import web


async def main(port: int, upstream: str) -> None:
    session = aiohttp.ClientSession(
        base_url=upstream, connector=aiohttp.TCPConnector(limit=1000), auto_decompress=False
    )

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        async with session.get(request.raw_path) as upstream_response:
            body = await upstream_response.read()
            return web.Response(
                status=upstream_response.status,
                body=body,
                content_type=upstream_response.headers.get("content-type", "application/octet-stream"),
            )

    server = web.Server(handle, access_log=None)
    runner = web.ServerRunner(server)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), sys.argv[2]))
