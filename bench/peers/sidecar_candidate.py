"""The real sidecar with another client stack under each upstream's httpx.AsyncClient (benchmark only).

Usage: python sidecar_candidate.py CANDIDATE sidecar-args...

Candidates:
  pool           the shipped stack: our O(1) PoolTransport over the sidecar's own connections
                 (the "pool-anyio" candidate of bench/results/transports.md, httpcore's
                 connections on anyio, is gone with httpcore's connections)
  pool-httpcore2 the same pool over httpcore2 connections, httpx2 models (import swap)
  httpx-stock    httpx 0.28's own AsyncHTTPTransport/httpcore pool
  httpx2-stock   httpx2's own AsyncHTTPTransport/httpcore2 pool
  aiohttp        httpx-aiohttp's AiohttpTransport over an aiohttp ClientSession (HTTP/1.1 only)
Everything else (routing, admission, headers, streaming, metrics, access log) is the real sidecar.
"""

from __future__ import annotations

import sys
from typing import Any

candidate, argv = sys.argv[1], sys.argv[2:]
if candidate in ("pool-httpcore2", "httpx2-stock"):
    import httpcore2
    import httpx2

    sys.modules["httpx"] = httpx2
    sys.modules["httpcore"] = httpcore2

import httpx  # noqa: E402

from sidecar import cli, pools  # noqa: E402

_original_init = pools.UpstreamPool.__init__


def _client(transport: httpx.AsyncBaseTransport) -> httpx.AsyncClient:
    return pools._SharedClient(transport=transport, trust_env=False, follow_redirects=False)


def _patched_init(self: Any, upstream: Any) -> None:
    _original_init(self, upstream)
    limits = upstream.limits
    if candidate in ("httpx-stock", "httpx2-stock"):
        transport: httpx.AsyncBaseTransport = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(
                max_connections=limits.max_connections,
                max_keepalive_connections=limits.max_connections,
                keepalive_expiry=limits.keepalive_expiry,
            ),
            http1=self.transport._http1,
            http2=self.transport._http2,
        )
        self.client = _client(transport)
    elif candidate == "aiohttp":
        import aiohttp
        from httpx_aiohttp import AiohttpTransport

        def session() -> aiohttp.ClientSession:
            connector = aiohttp.TCPConnector(limit=limits.max_connections, keepalive_timeout=limits.keepalive_expiry)
            return aiohttp.ClientSession(connector=connector, auto_decompress=False)

        class Targeted(AiohttpTransport):
            """httpx-aiohttp ignores the ``target`` extension: put the path back in the URL
            (yarl may still re-quote it, and aiohttp adds Accept-Encoding: behaviour gaps)."""

            async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                target = request.extensions.get("target")
                if target:
                    request.url = request.url.copy_with(raw_path=target)
                return await super().handle_async_request(request)

        self.client = _client(Targeted(client=session))


if candidate != "pool":
    pools.UpstreamPool.__init__ = _patched_init  # type: ignore[method-assign]

sys.exit(cli.main(argv))
