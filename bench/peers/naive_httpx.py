"""The naive proxy a team writes first: aiohttp server + one shared httpx.AsyncClient.

Usage: python naive_httpx.py LISTEN_PORT UPSTREAM_URL
"""

import sys

import httpx
import uvloop
from aiohttp import web


async def main(port: int, upstream: str) -> None:
    client = httpx.AsyncClient(base_url=upstream, limits=httpx.Limits(max_connections=1000))

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        upstream_response = await client.get(request.raw_path)
        return web.Response(
            status=upstream_response.status_code,
            body=upstream_response.content,
            content_type=upstream_response.headers.get("content-type", "application/octet-stream"),
        )

    server = web.Server(handle, access_log=None)
    runner = web.ServerRunner(server)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    print("ready", flush=True)
    await __import__("asyncio").Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), sys.argv[2]))
