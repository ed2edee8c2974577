"""A small upstream that answers after a delay: GET /delay/<ms> -> 1 KiB after <ms> milliseconds.

Usage: python delay_server.py LISTEN_PORT
"""

import asyncio
import sys

import uvloop
from aiohttp import web

BODY = b"x" * 1024


async def main(port: int) -> None:
    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        parts = request.path.rstrip("/").rsplit("/", 1)
        try:
            delay_ms = float(parts[-1])
        except ValueError:
            delay_ms = 0.0
        await asyncio.sleep(delay_ms / 1000)
        return web.Response(body=BODY, content_type="application/octet-stream")

    server = web.Server(handle, access_log=None)
    runner = web.ServerRunner(server)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
