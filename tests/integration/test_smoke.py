"""The shortest path through the real sidecar: one request, one answer."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.support.sidecar import proxy_url, running_sidecar
from tests.support.upstreams import Upstream


async def test_request_is_proxied_with_prefix_stripped(tmp_path: Path) -> None:
    async with Upstream() as upstream, running_sidecar(
        tmp_path,
        f"""
        upstreams:
          api:
            url: {upstream.url}/base
        """,
    ) as sidecar, aiohttp.ClientSession() as client:
        async with client.get(proxy_url(sidecar) + "/api/v1/items?a=1&b=%20") as response:
            assert response.status == 200
            assert await response.text() == "ok"
            assert response.headers["X-Request-Id"]
    assert [r.path for r in upstream.requests] == ["/base/v1/items?a=1&b=%20"]
