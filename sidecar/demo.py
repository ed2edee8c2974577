"""A tiny upstream for trying the sidecar out: ``python -m sidecar.demo [HOST:PORT]``.

It echoes what it received as JSON, so one ``curl`` through the sidecar shows
the rewritten path, the headers that arrived and the request id.
``?delay=SECONDS`` (at most 30) holds the answer back, to watch a request in
flight: a slow pool, or the graceful drain on ``docker compose stop``.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

MAX_DELAY = 30.0


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    await asyncio.sleep(_delay(request.query.get("delay")))
    answer = {
        "upstream": "demo",
        "method": request.method,
        "path": request.raw_path,
        "headers": dict(request.headers),
        "body_bytes": len(body),
    }
    return web.Response(text=json.dumps(answer, indent=2) + "\n", content_type="application/json")


def _delay(value: str | None) -> float:
    try:
        seconds = float(value or 0)
    except ValueError:
        return 0.0
    return min(seconds, MAX_DELAY) if seconds > 0 else 0.0  # NaN and negatives: no delay


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    host, _, port = (args[0] if args else "127.0.0.1:8090").rpartition(":")
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    web.run_app(app, host=host or "127.0.0.1", port=int(port), access_log=None, print=None)


if __name__ == "__main__":
    main()
