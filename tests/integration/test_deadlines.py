"""Caller deadlines (X-Sidecar-Timeout) through the real sidecar on real sockets."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.support.rest import eventually
from tests.support.sidecar import SidecarProcess, proxy_url, running_sidecar
from tests.support.upstreams import Upstream
from tests.support.wire import raw_exchange
from tests.support.yaml import write_config


def _config(url: str, *, pool: str = "5s", read: str = "30s") -> str:
    return f"""
        upstreams:
          app:
            url: {url}
            limits: {{ max_connections: 1, max_concurrent_requests: 1, max_pending: 8 }}
            timeouts: {{ pool: {pool}, read: {read} }}
        """


def _rejected(sidecar: object, reason: str) -> float:
    text = sidecar.metrics.render().decode()  # type: ignore[attr-defined]
    for line in text.splitlines():
        if line.startswith("sidecar_rejected_requests_total{") and f'reason="{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_queued_request_leaves_when_its_budget_ends_not_at_timeouts_pool(tmp_path: Path) -> None:
    """The only slot is held and timeouts.pool is 5 s: a 300 ms budget is a 504
    deadline_exceeded after about 300 ms, and the queue is empty again."""
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/hold":
            await release.wait()
        return web.Response(text="ok")

    async with Upstream(handler) as upstream, running_sidecar(tmp_path, _config(upstream.url)) as sidecar:
        pool = sidecar.generation().pools["app"]
        async with aiohttp.ClientSession() as session:
            base = proxy_url(sidecar)
            holder = asyncio.ensure_future(session.get(f"{base}/app/hold"))
            await eventually(lambda: pool.admission.in_flight == 1)
            started = time.monotonic()
            async with session.get(f"{base}/app/x", headers={"X-Sidecar-Timeout": "300ms"}) as response:
                elapsed = time.monotonic() - started
                body = await response.json()
                assert response.status == 504
                assert response.headers["X-Sidecar-Error"] == "deadline_exceeded"
                assert body["error"] == "deadline_exceeded"
            assert 0.25 <= elapsed <= 1.5, elapsed
            assert pool.admission.pending == 0
            release.set()
            async with await holder as held:
                assert held.status == 200
        await eventually(lambda: pool.admission.in_flight == 0 and pool.stats().active == 0)
        assert _rejected(sidecar, "deadline_exceeded") == 1
        assert [r.path for r in upstream.requests] == ["/hold"]


async def test_the_budget_left_is_forwarded_and_the_callers_header_is_replaced(tmp_path: Path) -> None:
    """Queued ~200 ms out of a 2 s budget: the upstream receives one
    X-Sidecar-Timeout, in whole ms, at most the budget minus the time queued."""
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/hold":
            await release.wait()
        return web.Response(text="ok")

    async with Upstream(handler) as upstream, running_sidecar(tmp_path, _config(upstream.url)) as sidecar:
        pool = sidecar.generation().pools["app"]
        async with aiohttp.ClientSession() as session:
            base = proxy_url(sidecar)
            holder = asyncio.ensure_future(session.get(f"{base}/app/hold"))
            await eventually(lambda: pool.admission.in_flight == 1)
            started = time.monotonic()
            waiter = asyncio.ensure_future(session.get(f"{base}/app/x", headers={"X-Sidecar-Timeout": "2s"}))
            await eventually(lambda: pool.admission.pending == 1)
            await asyncio.sleep(0.2)
            release.set()
            async with await waiter as response:
                assert response.status == 200
            queued = time.monotonic() - started
            async with await holder as held:
                assert held.status == 200
            # Without the caller header nothing is added.
            async with session.get(f"{base}/app/plain") as plain:
                assert plain.status == 200
        seen = {r.path: [v for k, v in r.headers if k.lower() == "x-sidecar-timeout"] for r in upstream.requests}
        assert seen["/hold"] == [] and seen["/plain"] == []
        (value,) = seen["/x"]
        assert value.endswith("ms") and value[:-2].isdigit(), value
        assert 1 <= int(value[:-2]) <= 2000 - 200, value
        assert int(value[:-2]) >= 2000 - queued * 1000 - 1000, (value, queued)  # not wildly low either
        await eventually(lambda: pool.admission.in_flight == 0 and pool.stats().active == 0)


async def test_a_slow_upstream_past_the_budget_is_deadline_exceeded_and_everything_is_released(
    tmp_path: Path,
) -> None:
    """A 2 s upstream and a 400 ms budget: 504 deadline_exceeded after about
    400 ms (not upstream_timeout), the slot is free and the connection is not
    left active; the next request gets through."""
    calls = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        if request.path == "/slow":
            await asyncio.sleep(2)
        return web.Response(text="ok")

    async with Upstream(handler) as upstream, running_sidecar(tmp_path, _config(upstream.url)) as sidecar:
        pool = sidecar.generation().pools["app"]
        async with aiohttp.ClientSession() as session:
            base = proxy_url(sidecar)
            started = time.monotonic()
            async with session.get(f"{base}/app/slow", headers={"X-Sidecar-Timeout": "400ms"}) as response:
                elapsed = time.monotonic() - started
                assert response.status == 504
                assert response.headers["X-Sidecar-Error"] == "deadline_exceeded"
            assert 0.3 <= elapsed <= 1.5, elapsed
            await eventually(lambda: pool.admission.in_flight == 0 and pool.stats().active == 0)
            async with session.get(f"{base}/app/fast", headers={"X-Sidecar-Timeout": "5s"}) as response:
                assert response.status == 200
        await eventually(lambda: pool.admission.in_flight == 0 and pool.stats().active == 0)
        assert pool.admission.pending == 0
        assert _rejected(sidecar, "deadline_exceeded") == 1
        assert "upstream_timeout" not in sidecar.metrics.render().decode()


async def test_a_configured_read_timeout_shorter_than_the_budget_stays_upstream_timeout(tmp_path: Path) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(2)
        return web.Response(text="ok")

    async with (
        Upstream(handler) as upstream,
        running_sidecar(tmp_path, _config(upstream.url, read="200ms")) as sidecar,
        aiohttp.ClientSession() as session,
        session.get(f"{proxy_url(sidecar)}/app/slow", headers={"X-Sidecar-Timeout": "5s"}) as response,
    ):
        assert response.status == 504
        assert response.headers["X-Sidecar-Error"] == "upstream_timeout"


@pytest.mark.parametrize("value", ["abc", "0", "-1s", "0ms", "1.5.5s", ""])
async def test_a_bad_budget_is_400_naming_the_header(tmp_path: Path, value: str) -> None:
    async with (
        Upstream() as upstream,
        running_sidecar(tmp_path, _config(upstream.url)) as sidecar,
        aiohttp.ClientSession() as session,
        session.get(f"{proxy_url(sidecar)}/app/x", headers={"X-Sidecar-Timeout": value}) as response,
    ):
        body = await response.json()
        assert response.status == 400
        assert response.headers["X-Sidecar-Error"] == "bad_request"
        assert "X-Sidecar-Timeout" in body["message"]
        assert upstream.requests == []


@pytest.mark.parametrize("value", ["1.5", "250ms", "2s"])
async def test_good_budgets_in_every_form_pass(tmp_path: Path, value: str) -> None:
    async with (
        Upstream() as upstream,
        running_sidecar(tmp_path, _config(upstream.url)) as sidecar,
        aiohttp.ClientSession() as session,
        session.get(f"{proxy_url(sidecar)}/app/x", headers={"X-Sidecar-Timeout": value}) as response,
    ):
        assert response.status == 200


async def test_cancelled_and_expiring_waiters_leave_nothing_behind(tmp_path: Path) -> None:
    """A storm of short budgets and callers that give up, behind one held slot:
    afterwards no slot, waiter or connection is left."""
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/hold":
            await release.wait()
        return web.Response(text="ok")

    config = _config("URL").replace("max_pending: 8", "max_pending: 200")
    async with Upstream(handler) as upstream, running_sidecar(tmp_path, config.replace("URL", upstream.url)) as sc:
        pool = sc.generation().pools["app"]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            base = proxy_url(sc)
            holder = asyncio.ensure_future(session.get(f"{base}/app/hold"))
            await eventually(lambda: pool.admission.in_flight == 1)

            async def one(i: int) -> int:
                async with session.get(f"{base}/app/{i}", headers={"X-Sidecar-Timeout": f"{50 + i % 7 * 30}ms"}) as r:
                    return r.status

            tasks = [asyncio.ensure_future(one(i)) for i in range(150)]
            await asyncio.sleep(0.1)
            for task in tasks[::3]:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            statuses = {r for r in results if isinstance(r, int)}
            assert statuses <= {504}, statuses
            await eventually(lambda: pool.admission.pending == 0)
            release.set()
            async with await holder as held:
                assert held.status == 200
        await eventually(lambda: pool.admission.in_flight == 0 and pool.stats().active == 0 and pool.active == 0)


async def test_the_access_log_gives_the_budget_in_ms_or_null(tmp_path: Path) -> None:
    async with Upstream() as upstream:
        process = SidecarProcess(write_config(tmp_path, _config(upstream.url)))
        await process.start()
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{process.url}/app/a", headers={"X-Sidecar-Timeout": "1.5"}) as response:
                    assert response.status == 200
                async with session.get(f"{process.url}/app/b") as response:
                    assert response.status == 200
                async with session.get(f"{process.url}/app/c", headers={"X-Sidecar-Timeout": "nope"}) as response:
                    assert response.status == 400
            await process.wait_for_event("access", count=3)
            by_path = {event["path"]: event for event in process.events("access")}
            assert by_path["/app/a"]["deadline_ms"] == 1500.0
            assert by_path["/app/b"]["deadline_ms"] is None
            assert by_path["/app/c"]["deadline_ms"] is None and by_path["/app/c"]["error"] == "bad_request"
        finally:
            await process.stop()


async def test_a_bad_budget_on_a_request_with_bad_framing_still_closes_the_connection(tmp_path: Path) -> None:
    """The framing check comes first: a request whose body framing cannot be
    trusted is refused and its connection closed, whatever its X-Sidecar-Timeout
    says, so no bytes after its head can pass as a next request."""
    smuggling = (
        b"POST /app/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\nX-Sidecar-Timeout: abc\r\n\r\n"
        b"0\r\n\r\nGET /app/smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    async with Upstream() as upstream, running_sidecar(tmp_path, _config(upstream.url)) as sidecar:
        raw = await raw_exchange(sidecar.proxy_port, smuggling)
        assert raw.startswith(b"HTTP/1.1 400 ")
        assert raw.count(b"HTTP/1.1 ") == 1
        assert b"connection: close" in raw.lower()
        assert upstream.requests == []
