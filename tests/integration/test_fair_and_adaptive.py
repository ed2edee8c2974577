"""Fair shares per caller and the adaptive concurrency limit, end to end on real sockets.

The upstream here serves ``capacity`` requests at once and queues the rest
internally (as a real one does), and records, on its side, how many requests
it holds and how long each spent there.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sidecar.pools import UpstreamPool
from sidecar.server import Sidecar
from tests.support.metrics import scrape
from tests.support.rest import assert_at_rest, eventually
from tests.support.sidecar import SidecarProcess, admin_url, proxy_url, running_sidecar
from tests.support.upstreams import Upstream
from tests.support.yaml import write_config

SERVICE = 0.05


class Capacity:
    """An upstream handler that works on ``capacity`` requests at once, ``SERVICE`` each."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.serving = 0
        self.holding = 0  # requests inside the upstream: served or queued in it
        self.most_held = 0
        self.times: list[tuple[float, float]] = []  # (finished at, seconds inside the upstream)
        self.caller_headers = 0
        self._turn = asyncio.Condition()

    def raise_to(self, capacity: int) -> None:
        self.capacity = capacity

    def reset(self) -> None:
        self.most_held = self.holding
        self.times.clear()

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        if "X-Sidecar-Caller" in request.headers:
            self.caller_headers += 1
        arrived = time.monotonic()
        self.holding += 1
        self.most_held = max(self.most_held, self.holding)
        try:
            async with self._turn:
                await self._turn.wait_for(lambda: self.serving < self.capacity)
                self.serving += 1
            try:
                await asyncio.sleep(SERVICE)
            finally:
                async with self._turn:
                    self.serving -= 1
                    self._turn.notify_all()
        finally:
            self.holding -= 1
        now = time.monotonic()
        self.times.append((now, now - arrived))
        return web.Response(text="ok")


def config(url: str, *, weights: str = "", limits: str = "", pool: str = "30s") -> str:
    return f"""
    callers:
      weights: {{ {weights} }}
    upstreams:
      api:
        url: {url}
        limits: {{ {limits} }}
        timeouts: {{ pool: {pool}, read: 60s }}
    """


def only_pool(sidecar: Sidecar) -> UpstreamPool:
    (pool,) = sidecar.generation().pools.values()
    return pool


async def closed_loop(
    session: aiohttp.ClientSession,
    url: str,
    caller: str | None,
    until: float,
    done: Counter[str],
    statuses: Counter[int] | None = None,
) -> None:
    """One caller that sends its next request as soon as the last one is answered."""
    headers = {} if caller is None else {"X-Sidecar-Caller": caller}
    while time.monotonic() < until:
        async with session.get(url, headers=headers) as response:
            await response.read()
            if statuses is not None:
                statuses[response.status] += 1
            if response.status == 200:
                done[caller or "other"] += 1
            else:
                await asyncio.sleep(0.01)  # refused: do not spin


async def run_callers(base: str, callers: dict[str | None, int], seconds: float) -> Counter[str]:
    done: Counter[str] = Counter()
    until = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(
            *(
                closed_loop(session, base + "/api/x", caller, until, done)
                for caller, count in callers.items()
                for _ in range(count)
            )
        )
    return done


@pytest.mark.parametrize(
    ("weights", "live_share"),
    [("live: 9, batch: 1", (0.80, 1.0)), ("live: 1, batch: 1", (0.35, 0.65))],
    ids=["9-to-1", "equal"],
)
async def test_completions_follow_the_weights(tmp_path: Path, weights: str, live_share: tuple[float, float]) -> None:
    async with Upstream(Capacity(100)) as upstream:
        text = config(upstream.url, weights=weights, limits="max_concurrent_requests: 4")
        async with running_sidecar(tmp_path, text) as sidecar:
            done = await run_callers(proxy_url(sidecar), {"live": 20, "batch": 20}, 6.0)
            total = done["live"] + done["batch"]
            assert total >= 200  # 4 slots of 50 ms: about 80 per second
            share = done["live"] / total
            assert live_share[0] <= share <= live_share[1], (done, share)
            await assert_at_rest(sidecar)


async def test_a_caller_alone_gets_the_whole_throughput(tmp_path: Path) -> None:
    """Work-conserving: the same throughput as with no callers configured at all."""
    rates = []
    for weights in ("live: 9, batch: 1", ""):
        async with Upstream(Capacity(100)) as upstream:
            text = config(upstream.url, weights=weights, limits="max_concurrent_requests: 4")
            async with running_sidecar(tmp_path, text) as sidecar:
                done = await run_callers(proxy_url(sidecar), {"batch": 20}, 3.0)
                rates.append(done["batch"])
                await assert_at_rest(sidecar)
    fair, fifo = rates
    assert fifo >= 120
    assert fair >= 0.85 * fifo, rates


async def test_the_greedy_callers_queue_never_refuses_the_others(tmp_path: Path) -> None:
    async with Upstream(Capacity(100)) as upstream:
        text = config(upstream.url, weights="live: 1, batch: 1", limits="max_concurrent_requests: 4, max_pending: 20")
        async with running_sidecar(tmp_path, text) as sidecar:
            base = proxy_url(sidecar)
            batch_done: Counter[str] = Counter()
            batch_statuses: Counter[int] = Counter()
            until = time.monotonic() + 3.0
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                batch = [
                    asyncio.create_task(
                        closed_loop(session, base + "/api/x", "batch", until, batch_done, batch_statuses)
                    )
                    for _ in range(200)
                ]
                pool = only_pool(sidecar)
                await eventually(lambda: pool.admission.pending == 20, message="batch never filled the queue")

                async def live() -> int:
                    async with session.get(base + "/api/x", headers={"X-Sidecar-Caller": "live"}) as response:
                        await response.read()
                        return response.status

                statuses = await asyncio.gather(*(live() for _ in range(10)))
                await asyncio.gather(*batch)
            assert statuses == [200] * 10
            assert batch_statuses[503] > 0  # batch was over its share, and was refused
            await assert_at_rest(sidecar)


async def test_unconfigured_callers_share_one_label_and_the_header_stays_here(tmp_path: Path) -> None:
    async with Upstream(Capacity(100)) as upstream:
        handler = upstream.handler
        assert isinstance(handler, Capacity)
        text = config(upstream.url, weights="live: 2")
        async with running_sidecar(tmp_path, text) as sidecar:
            base = proxy_url(sidecar)
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as session:

                async def call(caller: str) -> int:
                    async with session.get(base + "/api/x", headers={"X-Sidecar-Caller": caller}) as response:
                        await response.read()
                        return response.status

                statuses = await asyncio.gather(*(call(f"caller-{i}") for i in range(500)), call("live"))
                assert set(statuses) == {200}
                samples = await scrape(session, admin_url(sidecar))
                async with session.get(admin_url(sidecar) + "/pools") as response:
                    pools = await response.json()
            callers = {dict(labels).get("caller") for (name, labels) in samples if name == "sidecar_requests_total"}
            assert callers == {"live", "other"}
            waits = {
                dict(labels).get("caller") for (name, labels) in samples if name == "sidecar_pool_wait_seconds_count"
            }
            assert waits <= {"live", "other"}
            assert handler.caller_headers == 0
            assert len(upstream.requests) == 501
            assert all(name.lower() != "x-sidecar-caller" for r in upstream.requests for name, _ in r.headers)
            entry = pools["upstreams"]["api"]
            assert entry["callers"] == {}  # at rest: nobody in flight or waiting
            assert entry["concurrency_limit"] == entry["limits"]["max_concurrent_requests"]
            await assert_at_rest(sidecar)


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "static"])
async def test_adaptive_limit_keeps_the_upstream_uncongested(tmp_path: Path, adaptive: bool) -> None:
    handler = Capacity(8)
    async with Upstream(handler) as upstream:
        limits = f"max_concurrent_requests: 100, adaptive: {str(adaptive).lower()}"
        async with running_sidecar(tmp_path, config(upstream.url, limits=limits)) as sidecar:
            base = proxy_url(sidecar)
            pool = only_pool(sidecar)
            done: Counter[str] = Counter()
            statuses: Counter[int] = Counter()
            start = time.monotonic()
            until = start + (12.0 if adaptive else 4.0)
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
                callers = [
                    asyncio.create_task(closed_loop(session, base + "/api/x", None, until, done, statuses))
                    for _ in range(60)
                ]
                await asyncio.sleep(2.0)  # warm-up
                handler.reset()
                await asyncio.sleep(2.0)
                held, inside = handler.most_held, [seconds for _, seconds in handler.times]
                median = statistics.median(inside)
                if adaptive:
                    assert held <= 30, held
                    assert median <= 3 * SERVICE, median
                    assert 8 <= pool.admission.capacity <= 30
                    samples = await scrape(session, admin_url(sidecar))
                    assert 1 <= sum(v for (n, _), v in samples.items() if n == "sidecar_concurrency_limit") <= 30
                    async with session.get(admin_url(sidecar) + "/pools") as response:
                        assert "concurrency_limit" in (await response.text())
                    # The upstream can take four times as much now: the limit follows.
                    raised = time.monotonic()
                    handler.raise_to(32)
                    await eventually(
                        lambda: pool.admission.capacity >= 28, timeout=10.0, message="the limit did not follow"
                    )
                    assert time.monotonic() - raised <= 10.0
                else:
                    assert held >= 45, held  # ~60: every caller's request is inside the upstream
                    assert median >= 5 * SERVICE, median
                await asyncio.gather(*callers)
            assert set(statuses) == {200}  # no refusals while it measures or adapts
            await assert_at_rest(sidecar)


async def test_the_access_log_names_the_caller(tmp_path: Path) -> None:
    async with Upstream() as upstream:
        process = SidecarProcess(write_config(tmp_path, config(upstream.url, weights="live: 9")))
        await process.start()
        try:
            async with aiohttp.ClientSession() as session:
                for path, caller in (("/api/a", "live"), ("/api/b", "someone-else"), ("/api/c", "bad name")):
                    async with session.get(process.url + path, headers={"X-Sidecar-Caller": caller}) as response:
                        assert response.status == 200
                async with session.get(process.url + "/api/d") as response:
                    assert response.status == 200
            await process.wait_for_event("access", count=4)
            by_path = {event["path"]: event["caller"] for event in process.events("access")}
            assert by_path == {"/api/a": "live", "/api/b": "someone-else", "/api/c": "other", "/api/d": "other"}
        finally:
            await process.stop()
