"""A tiny upstream for trying the sidecar out: ``python -m sidecar.demo [HOST:PORT]``.

It echoes what it received as JSON, so one ``curl`` through the sidecar shows
the rewritten path, the headers that arrived and the request id.
"""

from __future__ import annotations

import json
import sys

from aiohttp import web


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    answer = {
        "upstream": "demo",
        "method": request.method,
        "path": request.raw_path,
        "headers": dict(request.headers),
        "body_bytes": len(body),
    }
    return web.Response(text=json.dumps(answer, indent=2) + "\n", content_type="application/json")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    host, _, port = (args[0] if args else "127.0.0.1:8090").rpartition(":")
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    web.run_app(app, host=host or "127.0.0.1", port=int(port), access_log=None, print=None)


if __name__ == "__main__":
    main()
