"""The status page on the admin listener's ``/`` (docs/status-page.md), in a real headless Chromium.

A real sidecar forwards real traffic to real upstreams while Chromium renders
the page; the numbers are read back from the DOM (``data-field`` cells and
their raw ``data-value``) and compared with ``/pools`` fetched around them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from selenium import webdriver
from selenium.webdriver.common.by import By

from sidecar import admin
from tests.support.browser import call, chromium_paths, start_chromium
from tests.support.metrics import parse_metrics, value
from tests.support.rest import assert_at_rest, eventually, pool_of
from tests.support.sidecar import admin_url, proxy_url, running_sidecar
from tests.support.upstreams import Upstream
from tests.support.yaml import upstreams_yaml

TOKEN = "page-admin-token-7f3a"
# The per-upstream /pools keys the page has columns for; any other lands in its "state" cell.
KNOWN_POOL_KEYS = {
    "url",
    "http2",
    "limits",
    "in_flight",
    "pending",
    "oldest_wait_s",
    "connections",
    "http_versions",
    "totals",
}

needs_chromium = pytest.mark.skipif(
    chromium_paths() is None,
    reason="chromium and chromedriver are not installed (apt-get install chromium chromium-driver; .ci/run does)",
)

# Every data-field cell of one upstream's row: {"field": {"value": data-value, "text": textContent}},
# plus the /pools "time" of the snapshot the page is showing.
READ_ROW_FUNCTION = """
function readRow(name) {
  const tr = document.querySelector(`tr[data-upstream="${name}"]`);
  if (!tr) return null;
  const row = {time: Number(document.getElementById("rows").dataset.time)};
  tr.querySelectorAll("[data-field]").forEach((el) => {
    row[el.dataset.field] = {value: el.dataset.value ?? null, text: el.textContent.trim()};
  });
  return row;
}
"""
READ_ROW = READ_ROW_FUNCTION + "return readRow(arguments[0]);"
# The row once the page shows a /pools snapshot newer than arguments[1].
READ_ROW_AFTER = (
    READ_ROW_FUNCTION + "const row = readRow(arguments[0]); return row && row.time > arguments[1] ? row : null;"
)
# The row once its total has a number.
READ_ROW_WITH_TOTAL = (
    READ_ROW_FUNCTION + "const row = readRow(arguments[0]); return row && row.total.value ? row : null;"
)


async def get_json(session: aiohttp.ClientSession, url: str, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.get(url, headers=headers) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def until(driver: webdriver.Chrome, script: str, *args: Any, timeout: float = 20.0) -> Any:
    """Run ``script`` in the page until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        result = await call(driver.execute_script, script, *args)
        if result:
            return result
        assert time.monotonic() < deadline, f"page never satisfied: {script.strip()[:200]}"
        await asyncio.sleep(0.1)


@asynccontextmanager
async def chromium() -> AsyncIterator[webdriver.Chrome]:
    driver = await call(start_chromium)
    try:
        yield driver
    finally:
        await call(driver.quit)


@asynccontextmanager
async def background(make: Callable[[], Awaitable[None]]) -> AsyncIterator[None]:
    """Run ``make()`` in a loop in the background until the block ends."""

    async def loop() -> None:
        while True:
            await make()

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


def number(cell: dict[str, Any]) -> float:
    assert cell["value"] not in (None, ""), cell
    return float(cell["value"])


def console_problems(driver: webdriver.Chrome) -> list[str]:
    """Console errors, CSP violations among them ("Refused to ...")."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] in ("SEVERE", "WARNING") or "Content Security Policy" in entry["message"]
    ]


def network_requests(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    """Every request Chromium sent since the last call (from its performance log)."""
    sent = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            sent.append(message["params"]["request"])
    return sent


# ---------------------------------------------------------------- without a browser


async def test_page_is_open_with_a_strict_csp_and_its_data_needs_the_token(
    tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STATUS_PAGE_TOKEN", TOKEN)
    yaml_text = upstreams_yaml({"api": upstream.url}, admin={"listen": "127.0.0.1:0", "token": "${STATUS_PAGE_TOKEN}"})
    async with running_sidecar(tmp_path, yaml_text) as sidecar, aiohttp.ClientSession() as session:
        base = admin_url(sidecar)
        async with session.get(base + "/") as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/html; charset=utf-8"
            assert response.headers["Cache-Control"] == "no-store"
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            csp = response.headers["Content-Security-Policy"]
            html = await response.text()
        assert TOKEN not in html  # the page holds no secret and no data
        directives = dict(part.strip().split(" ", 1) for part in csp.split(";"))
        script = re.search(r"<script>(.*?)</script>", html, re.DOTALL)
        style = re.search(r"<style>(.*?)</style>", html, re.DOTALL)
        assert script and style

        def sha256(text: str) -> str:
            return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

        assert directives == {
            "default-src": "'none'",
            "script-src": sha256(script.group(1)),
            "style-src": sha256(style.group(1)),
            "connect-src": "'self'",
            "img-src": "'none'",
            "base-uri": "'none'",
            "form-action": "'none'",
            "frame-ancestors": "'none'",
        }
        # Nothing external: no URL to another origin anywhere in the document.
        assert not re.search(r"""(src|href)\s*=|https?://|//[a-z0-9.-]+\.[a-z]{2,}/""", html, re.IGNORECASE)
        for path in ("/pools", "/stats"):
            async with session.get(base + path) as response:
                assert response.status == 401
            await get_json(session, base + path, TOKEN)


async def test_stats_counts_what_metrics_counts(tmp_path: Path) -> None:
    async def by_path(request: web.Request) -> web.StreamResponse:
        status = 500 if request.path.endswith("/fail") else 404 if request.path.endswith("/missing") else 200
        return web.Response(status=status, text="body")

    async with (
        Upstream(by_path) as upstream,
        running_sidecar(tmp_path, upstreams_yaml({"alpha": upstream.url, "beta": upstream.url})) as sidecar,
        aiohttp.ClientSession() as session,
    ):
        proxy, base = proxy_url(sidecar), admin_url(sidecar)
        for path, times in (("/alpha/ok", 5), ("/alpha/missing", 2), ("/beta/fail", 3), ("/nowhere", 4)):
            for _ in range(times):
                async with session.get(proxy + path) as response:
                    await response.read()
        stats = await get_json(session, base + "/stats")
        async with session.get(base + "/metrics") as response:
            samples = parse_metrics(await response.text())
    rows = stats["upstreams"]
    assert isinstance(stats["monotonic"], float)
    assert rows["alpha"]["requests"] == 7
    assert rows["alpha"]["responses"] == {"2xx": 5, "3xx": 0, "4xx": 2, "5xx": 0}
    assert rows["beta"]["responses"]["5xx"] == 3
    assert rows["none"]["refused"] == {"no_route": 4}
    assert rows["alpha"]["refused"] == {} and rows["alpha"]["upstream_errors"] == {}
    for name in ("alpha", "beta", "none"):
        duration = rows[name]["duration"]
        assert len(duration["cumulative"]) == len(duration["bounds"]) + 1
        for bound, count in zip(duration["bounds"], duration["cumulative"], strict=False):
            assert count == value(samples, "sidecar_request_duration_seconds_bucket", upstream=name, le=str(bound))
        assert duration["cumulative"][-1] == rows[name]["requests"]
        assert duration["sum"] == pytest.approx(value(samples, "sidecar_request_duration_seconds_sum", upstream=name))


# ---------------------------------------------------------------- in Chromium


@pytest.mark.slow
@needs_chromium
async def test_page_renders_live_numbers_that_match_pools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = asyncio.Event()

    async def hold(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(text="held")

    # State the page has no column for (as newer versions add to /pools) lands in its "state" cell.
    original = admin.pool_snapshot

    def with_future_state(pool: Any, secrets: frozenset[str] = frozenset()) -> dict[str, Any]:
        return {**original(pool, secrets), "future_stage": {"state": "closed", "failures": 0}}

    monkeypatch.setattr(admin, "pool_snapshot", with_future_state)
    yaml_text = upstreams_yaml(
        {
            "api": {"url": "UPSTREAM"},
            "held": {
                "url": "HELD",
                "limits": {"max_connections": 4, "max_concurrent_requests": 2, "max_pending": 1},
                "timeouts": {"pool": "60s", "read": "60s"},
            },
        }
    )
    async with (
        Upstream() as upstream,
        Upstream(hold) as slow,
        running_sidecar(tmp_path, yaml_text.replace("UPSTREAM", upstream.url).replace("HELD", slow.url)) as sidecar,
        aiohttp.ClientSession() as session,
        chromium() as driver,
    ):
        proxy, base = proxy_url(sidecar), admin_url(sidecar)

        async def fetch(path: str) -> int:
            async with session.get(proxy + path) as response:
                await response.read()
                return response.status

        # Two held in flight (the limit), one waiting (the queue's limit): every
        # further request to `held` is refused at once with queue_full.
        holders = [asyncio.create_task(fetch("/held/x")) for _ in range(3)]
        held_pool = pool_of(sidecar, "held")
        await eventually(lambda: held_pool.admission.in_flight == 2 and held_pool.admission.pending == 1)

        async def traffic() -> None:
            assert await fetch("/api/x") == 200
            assert await fetch("/held/x") == 503
            await asyncio.sleep(0.01)

        async with background(traffic):
            await call(driver.get, base + "/")
            # Rates need two /stats snapshots; then every cell has a number.
            await until(driver, "return document.getElementById('window').dataset.value")

            # Exactly what /pools says, for the numbers that stand still.
            held = await until(driver, READ_ROW, "held")
            pools = (await get_json(session, base + "/pools"))["upstreams"]["held"]
            assert number(held["in_flight"]) == pools["in_flight"] == 2
            assert number(held["limit"]) == pools["limits"]["max_concurrent_requests"] == 2
            assert number(held["pending"]) == pools["pending"] == 1
            assert number(held["max_pending"]) == pools["limits"]["max_pending"] == 1
            assert number(held["conn_active"]) == pools["connections"]["active"] == 2
            assert number(held["max_connections"]) == 4
            assert held["in_flight"]["text"] == "2" and held["load"]["text"] == "100%"
            assert number(held["oldest_wait"]) > 0
            refused = json.loads(held["refused"]["value"])
            assert refused["queue_full"] > 0, held["refused"]
            assert "queue_full" in held["refused"]["text"]
            assert number(held["rate_5xx"]) > 0  # queue_full is a 503

            # The total moves: the page's is between two /pools snapshots taken around it.
            totals = []
            for _ in range(2):
                before = await get_json(session, base + "/pools")
                row = await until(driver, READ_ROW_AFTER, "api", before["time"])
                after = await get_json(session, base + "/pools")
                total = number(row["total"])
                assert before["upstreams"]["api"]["totals"]["requests"] <= total
                assert total <= after["upstreams"]["api"]["totals"]["requests"]
                assert number(row["limit"]) == after["upstreams"]["api"]["limits"]["max_concurrent_requests"]
                assert 0 <= number(row["in_flight"]) <= number(row["limit"])
                totals.append(total)
            assert totals[1] > totals[0], totals
            assert row["total"]["text"] == f"{int(totals[1]):,}"  # the text is the number, formatted
            assert number(row["rate"]) > 0 and number(row["rate_2xx"]) > 0
            assert number(row["rate_5xx"]) == 0
            p50, p99 = number(row["p50"]), number(row["p99"])
            assert 0 < p50 <= p99 < 5, (p50, p99)
            assert json.loads(row["http"]["value"]) == after["upstreams"]["api"]["http_versions"]
            shown = json.loads(row["state"]["value"])
            # A key no version of the page knows, and the policies' own entries, as /pools has them.
            assert shown["future_stage"] == {"state": "closed", "failures": 0}
            assert "future_stage" in row["state"]["text"] and "closed" in row["state"]["text"]
            for key in ("circuit", "pacing", "retries"):
                assert key in shown and shown[key].keys() == after["upstreams"]["api"][key].keys(), key
            state_shown = "return getComputedStyle(document.querySelector('[data-field=state]')).display !== 'none'"
            assert await call(driver.execute_script, state_shown)
            tiles = await call(
                driver.execute_script,
                "return ['sum-rate', 'sum-in-flight', 'sum-pending']"
                ".map((id) => document.getElementById(id).dataset.value)",
            )
            assert float(tiles[0]) > 0 and float(tiles[1]) >= 2 and float(tiles[2]) >= 1

            # Nothing but the page itself, /pools and /stats, all from the admin listener.
            resources = await call(
                driver.execute_script, "return performance.getEntriesByType('resource').map((e) => e.name)"
            )
            assert resources and {url.split("?")[0] for url in resources} <= {base + "/pools", base + "/stats"}
            sent = await call(network_requests, driver)
            assert sent and all(request["url"].startswith(base + "/") for request in sent), sent
            assert await call(console_problems, driver) == []

        release.set()
        assert [await holder for holder in holders] == [200, 200, 200]
    for name in ("api", "held"):
        await assert_at_rest(sidecar, name)


@pytest.mark.slow
@needs_chromium
async def test_page_asks_for_the_token_once_and_sends_it_as_a_bearer_header(
    tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STATUS_PAGE_TOKEN", TOKEN)
    yaml_text = upstreams_yaml({"api": upstream.url}, admin={"listen": "127.0.0.1:0", "token": "${STATUS_PAGE_TOKEN}"})
    async with (
        running_sidecar(tmp_path, yaml_text) as sidecar,
        aiohttp.ClientSession() as session,
        chromium() as driver,
    ):
        proxy, base = proxy_url(sidecar), admin_url(sidecar)

        async def traffic() -> None:
            async with session.get(proxy + "/api/x") as response:
                assert response.status == 200
            await asyncio.sleep(0.02)

        async with background(traffic):
            await call(driver.get, base + "/")
            login = await call(driver.find_element, By.ID, "login")
            await until(driver, "return !document.getElementById('login').hidden")
            assert await call(driver.execute_script, READ_ROW, "api") is None  # no data without the token

            async def submit(token: str) -> None:
                field = await call(driver.find_element, By.ID, "token")
                await call(field.clear)
                await call(field.send_keys, token)
                await call((await call(driver.find_element, By.ID, "login-submit")).click)

            await submit("not-the-token")
            await until(driver, "return !document.getElementById('login-error').hidden")
            assert await call(login.is_displayed)
            await submit(TOKEN)
            row = await until(driver, READ_ROW, "api")
            assert not await call(login.is_displayed)
            stored = await call(driver.execute_script, "return sessionStorage.getItem('sidecar.admin-token')")
            assert stored == TOKEN

            # Asked once: a reload of the tab goes straight to the data.
            await call(driver.refresh)
            row = await until(driver, READ_ROW_WITH_TOTAL, "api")
            assert await call(driver.execute_script, "return document.getElementById('login').hidden")
            pools = await get_json(session, base + "/pools", TOKEN)
            # The state column is there only for keys the other columns do not show.
            extra = set(pools["upstreams"]["api"]) - KNOWN_POOL_KEYS
            state_shown = "return getComputedStyle(document.querySelector('[data-field=state]')).display !== 'none'"
            assert await call(driver.execute_script, state_shown) == bool(extra)
            assert number(row["total"]) <= pools["upstreams"]["api"]["totals"]["requests"]

            # The token travelled only as the header, never in a URL.
            sent = await call(network_requests, driver)
            data = [request for request in sent if request["url"] in (base + "/pools", base + "/stats")]
            assert data, sent
            assert all(TOKEN not in request["url"] for request in sent)
            with_token = [request for request in data if request["headers"].get("Authorization") == f"Bearer {TOKEN}"]
            assert with_token, data
            assert TOKEN not in await call(lambda: driver.current_url)
            problems = [line for line in await call(console_problems, driver) if "401" not in line]
            assert problems == []  # the 401s that asked for the token are the only errors
    await assert_at_rest(sidecar, "api")
