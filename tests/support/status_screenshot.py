"""Render the status page under made-up but real traffic and save a screenshot.

``scripts/status-screenshot [OUT.png]`` (default ``docs/images/status-page.png``):
a real sidecar in this process, real upstreams (fast, slow, failing, HTTP/2,
one that refuses connections and one too small for its load), real requests
through the proxy, and headless Chromium on the admin listener's ``/``.
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, suppress
from pathlib import Path

import aiohttp
from aiohttp import web

from sidecar import compat
from tests.support.browser import call, start_chromium
from tests.support.sidecar import admin_url, proxy_url, running_sidecar
from tests.support.upstreams import HypercornUpstream, Upstream, unused_port
from tests.support.yaml import upstreams_yaml

WIDTH = 2400  # wide enough for the state column the policies add
SETTLE_S = 12.0  # past the page's 10 s window, so every rate is a full one


def answering(
    low: float, high: float, fail: float = 0.0, missing: float = 0.0
) -> Callable[..., Awaitable[web.Response]]:
    """A handler taking low..high seconds, failing (500) or not found (404) at the given rates."""

    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(random.uniform(low, high))
        roll = random.random()
        status = 500 if roll < fail else 404 if roll < fail + missing else 200
        return web.Response(status=status, text="ok")

    return handler


async def main(out: Path) -> None:
    compat.start_up()
    random.seed(7)
    async with AsyncExitStack() as stack:
        payments = await stack.enter_async_context(Upstream(answering(0.002, 0.012, missing=0.02)))
        search = await stack.enter_async_context(Upstream(answering(0.02, 0.16)))
        inventory = await stack.enter_async_context(Upstream(answering(0.004, 0.03, fail=0.04)))
        ledger = await stack.enter_async_context(Upstream(answering(0.25, 0.35)))
        reports = await stack.enter_async_context(HypercornUpstream())
        yaml_text = upstreams_yaml(
            {
                "payments": {"url": payments.url + "/v2", "limits": {"max_connections": 32}},
                "search": {"url": search.url, "limits": {"max_connections": 16}},
                "inventory": {"url": inventory.url + "/api", "limits": {"max_connections": 24}},
                "reports": {"url": reports.url, "http2": "prior-knowledge", "limits": {"max_connections": 2}},
                "ledger": {
                    "url": ledger.url,
                    "limits": {"max_connections": 4, "max_pending": 4},
                    "timeouts": {"pool": "150ms"},
                },
                "legacy-crm": {"url": f"http://127.0.0.1:{unused_port()}", "timeouts": {"connect": "200ms"}},
            }
        )
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        sidecar = await stack.enter_async_context(running_sidecar(directory, yaml_text))
        session = await stack.enter_async_context(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))
        proxy = proxy_url(sidecar)

        async def client(path: str, pause: float) -> None:
            while True:
                with suppress(aiohttp.ClientError):
                    async with session.get(proxy + path) as response:
                        await response.read()
                await asyncio.sleep(random.uniform(0, 2 * pause))

        plan = [("/payments/charge", 6, 0.02), ("/search/q", 11, 0.01), ("/inventory/items", 4, 0.03),
                ("/reports/daily", 3, 0.05), ("/ledger/entries", 10, 0.02), ("/legacy-crm/contacts", 1, 0.3),
                ("/unknown/path", 1, 0.5)]  # fmt: skip
        tasks = [asyncio.create_task(client(path, pause)) for path, count, pause in plan for _ in range(count)]
        driver = await call(start_chromium, WIDTH, 1000)
        try:
            await call(driver.get, admin_url(sidecar) + "/")
            await asyncio.sleep(SETTLE_S)
            # The viewport exactly as tall as the page: no scrollbar, no blank band.
            height = await call(driver.execute_script, "return Math.ceil(document.body.getBoundingClientRect().bottom)")
            metrics = {"width": WIDTH, "height": int(height), "deviceScaleFactor": 1, "mobile": False}
            await call(driver.execute_cdp_cmd, "Emulation.setDeviceMetricsOverride", metrics)
            await asyncio.sleep(1.5)
            await call(driver.save_screenshot, str(out))
        finally:
            await call(driver.quit)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images/status-page.png")))
