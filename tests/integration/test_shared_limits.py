"""Limits shared across replicas in a real redis-server, with two or three real sidecar processes."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support.redis import RedisCluster, RedisServer
from tests.support.sidecar import SidecarProcess
from tests.support.upstreams import Upstream
from tests.support.yaml import write_config

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def redis_server(tmp_path: Path) -> Any:
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


def _config(
    upstream_url: str, redis_url: str | None, *, on_error: str = "local", lease: str = "10s", **api: str
) -> str:
    shared = (
        ""
        if redis_url is None
        else f'shared: {{ redis: "{redis_url}", timeout: 50ms, on_error: {on_error}, lease: {lease} }}\n'
    )
    fields = "".join(f"    {key}: {value}\n" for key, value in api.items())
    return f"{shared}upstreams:\n  api:\n    url: {upstream_url}\n{fields}"


@asynccontextmanager
async def _sidecars(
    tmp_path: Path, yaml_text: str, count: int = 2, env: dict[str, str] | None = None
) -> AsyncIterator[list[SidecarProcess]]:
    path = write_config(tmp_path, yaml_text)
    processes = [SidecarProcess(path, env=dict(env or {})) for _ in range(count)]
    try:
        await asyncio.gather(*(process.start() for process in processes))
        yield processes
    finally:
        await asyncio.gather(*(process.stop() for process in processes))


async def _flood(
    session: aiohttp.ClientSession,
    urls: list[str],
    seconds: float,
    callers: int,
    on_response: Callable[[int, dict[str, str], bytes, float], None] | None = None,
) -> list[int]:
    """``callers`` concurrent loops per URL for ``seconds``; every status seen."""
    end = time.monotonic() + seconds
    statuses: list[int] = []

    async def caller(url: str) -> None:
        while time.monotonic() < end:
            started = time.monotonic()
            async with session.get(url) as response:
                body = await response.read()
                statuses.append(response.status)
                if on_response is not None:
                    on_response(response.status, dict(response.headers), body, time.monotonic() - started)
            if response.status != 200:
                await asyncio.sleep(0.01)  # a refused caller retries at once, but not in a hot loop

    await asyncio.gather(*(caller(url) for url in urls for _ in range(callers)))
    return statuses


def _counting_upstream(delay: float = 0.0) -> tuple[Upstream, list[float], list[int]]:
    """An upstream that records when each request arrived and the most in flight at once."""
    arrivals: list[float] = []
    in_flight = [0, 0]  # now, most

    async def handler(request: web.Request) -> web.StreamResponse:
        arrivals.append(time.monotonic())
        in_flight[0] += 1
        in_flight[1] = max(in_flight[1], in_flight[0])
        try:
            if delay:
                await asyncio.sleep(delay)
            return web.Response(text="ok")
        finally:
            in_flight[0] -= 1

    return Upstream(handler), arrivals, in_flight


def _most_in_window(arrivals: list[float], window: float) -> int:
    arrivals = sorted(arrivals)
    most, start = 0, 0
    for end, at in enumerate(arrivals):
        while at - arrivals[start] >= window:
            start += 1
        most = max(most, end - start + 1)
    return most


async def _eventually(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    """Every lease is released soon after its request ends (the release is a background call)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def _metric(session: aiohttp.ClientSession, process: SidecarProcess, name: str) -> float:
    async with session.get(f"{process.admin_url}/metrics") as response:
        text = await response.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.mark.parametrize("shared", [True, False])
async def test_a_shared_rate_holds_across_two_flooded_sidecars(
    tmp_path: Path, redis_server: RedisServer, shared: bool
) -> None:
    """10/s burst 2, two sidecars flooded for 3 s: about 32 reach the upstream
    in any 3 s when shared; about twice that when each counts alone."""
    upstream, arrivals, _ = _counting_upstream()
    async with upstream, AsyncExitStack() as stack:
        text = _config(
            upstream.url,
            redis_server.url,
            rate_limit=f"{{ rate: 10/s, burst: 2, shared: {str(shared).lower()} }}",
            timeouts="{ pool: 200ms }",
        )
        processes = await stack.enter_async_context(_sidecars(tmp_path, text))
        session = await stack.enter_async_context(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))
        statuses = await _flood(session, [f"{p.url}/api/x" for p in processes], 3.5, callers=10)
        assert set(statuses) <= {200, 429}
        most = _most_in_window(arrivals, 3.0)
        if shared:
            assert 20 <= most <= 10 * 3 + 2 + 3, most
        else:
            assert most >= 50, most


async def test_shared_leases_cap_the_upstream_across_sidecars(tmp_path: Path, redis_server: RedisServer) -> None:
    """shared_max_concurrent_requests 3, local 10, a 300 ms upstream, 20 callers
    per sidecar: never more than 3 at the upstream, and at least 90 % of what 3 allow."""
    upstream, arrivals, in_flight = _counting_upstream(0.3)
    async with upstream, AsyncExitStack() as stack:
        text = _config(
            upstream.url,
            redis_server.url,
            limits="{ max_concurrent_requests: 10, shared_max_concurrent_requests: 3 }",
            timeouts="{ pool: 30s }",
        )
        processes = await stack.enter_async_context(_sidecars(tmp_path, text))
        session = await stack.enter_async_context(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))
        seconds = 4.0
        started = time.monotonic()
        statuses = await _flood(session, [f"{p.url}/api/x" for p in processes], seconds, callers=20)
        assert in_flight[1] <= 3, in_flight
        assert set(statuses) == {200}
        # Throughput while the flood ran (the last requests finish after it).
        served = sum(1 for at in arrivals if at - started < seconds)
        assert served >= 0.9 * 3 * seconds / 0.3 - 3, served
        await _eventually(lambda: redis_server.command("ZCARD", "sidecar:{api}:leases").strip() == b":0")


async def test_a_killed_holders_leases_free_after_the_lease(tmp_path: Path, redis_server: RedisServer) -> None:
    """A sidecar SIGKILLed while holding every lease: the survivor gets all 3 again within lease + 2 s."""
    gate = asyncio.Event()
    in_flight = [0, 0]

    async def handler(request: web.Request) -> web.StreamResponse:
        in_flight[0] += 1
        in_flight[1] = max(in_flight[1], in_flight[0])
        try:
            if request.path == "/hold":
                await gate.wait()
            else:
                await asyncio.sleep(0.3)
            return web.Response(text="ok")
        finally:
            in_flight[0] -= 1

    async with Upstream(handler) as upstream, AsyncExitStack() as stack:
        text = _config(
            upstream.url,
            redis_server.url,
            lease="2s",
            limits="{ shared_max_concurrent_requests: 3 }",
            timeouts="{ pool: 30s, read: 60s }",
        )
        victim, survivor = await stack.enter_async_context(_sidecars(tmp_path, text))
        session = await stack.enter_async_context(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))
        holders = [asyncio.ensure_future(session.get(f"{victim.url}/api/hold")) for _ in range(3)]
        deadline = time.monotonic() + 10
        while in_flight[0] < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        victim.signal(signal.SIGKILL)
        killed = time.monotonic()
        gate.set()
        for holder in holders:
            with pytest.raises(aiohttp.ClientError):
                await holder
        in_flight[1] = 0
        statuses = await _flood(session, [f"{survivor.url}/api/x"], 2.0 + 2.0 + 1.0, callers=6)
        assert set(statuses) == {200}
        assert in_flight[1] == 3
        assert time.monotonic() - killed < 2.0 + 2.0 + 1.0 + 2.0


async def test_a_learned_pause_holds_on_every_replica(tmp_path: Path, redis_server: RedisServer) -> None:
    """429 Retry-After 5 through sidecar A: sidecar B answers 429 upstream_rate_limited
    within 1 s, without contacting the upstream."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/warm":
            return web.Response(text="ok")
        return web.Response(status=429, headers={"Retry-After": "5"}, text="slow down")

    async with Upstream(handler) as upstream, AsyncExitStack() as stack:
        text = _config(upstream.url, redis_server.url, pacing="{ shared: true }", timeouts="{ pool: 100ms }")
        a, b = await stack.enter_async_context(_sidecars(tmp_path, text))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        async with session.get(f"{b.url}/api/warm") as response:  # B has read Redis once already
            assert response.status == 200
        upstream.requests.clear()
        async with session.get(f"{a.url}/api/x") as response:
            assert response.status == 429 and response.headers["Retry-After"] == "5"
        learned = time.monotonic()
        await asyncio.sleep(0.6)  # B's last read of Redis is now older than its re-read interval
        async with session.get(f"{b.url}/api/y") as response:
            body = json.loads(await response.read())
            assert response.status == 429
            assert response.headers["X-Sidecar-Error"] == "upstream_rate_limited"
            assert body["error"] == "upstream_rate_limited"
            assert int(response.headers["Retry-After"]) >= 1
        assert time.monotonic() - learned < 1.5
        assert len(upstream.requests) == 1  # only A's


@pytest.mark.parametrize("on_error", ["local", "deny"])
async def test_redis_stopped_mid_load(tmp_path: Path, redis_server: RedisServer, on_error: str) -> None:
    """Redis stopped while two sidecars are under load: local falls back (fast,
    counted, warned once), deny refuses 503; Redis back: shared again within 5 s."""
    upstream, arrivals, _ = _counting_upstream()
    async with upstream, AsyncExitStack() as stack:
        text = _config(
            upstream.url,
            redis_server.url,
            on_error=on_error,
            rate_limit="{ rate: 10/s, burst: 2, shared: true }",
            timeouts="{ pool: 1ms }",
        )
        processes = await stack.enter_async_context(_sidecars(tmp_path, text))
        session = await stack.enter_async_context(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))
        urls = [f"{p.url}/api/x" for p in processes]
        await _flood(session, urls, 1.0, callers=5)
        redis_server.stop()
        slowest = [0.0]
        codes: list[str] = []

        def seen(status: int, headers: dict[str, str], body: bytes, took: float) -> None:
            slowest[0] = max(slowest[0], took)
            codes.append(headers.get("X-Sidecar-Error", str(status)))

        arrivals.clear()
        await _flood(session, urls, 3.0, callers=5, on_response=seen)
        assert slowest[0] < 0.05 + 0.2 + 0.3, slowest  # shared.timeout + 200 ms (+ a shared machine's slack)
        if on_error == "local":
            # Each sidecar falls back to its own 10/s: at most about twice the shared rate.
            assert _most_in_window(arrivals, 3.0) <= 2 * (10 * 3 + 2) + 6
            assert set(codes) <= {"200", "rate_limited"}
        else:
            assert "shared_limits_unavailable" in codes and "200" not in codes
        for process in processes:
            assert await _metric(session, process, "sidecar_shared_errors_total") >= 1
            warnings = [line for line in process.lines if "Redis" in str(line.get("event", ""))]
            assert 1 <= len(warnings) <= 1, warnings  # 3 s of outage: one warning (at most one per 10 s)
        redis_server.start()
        back = time.monotonic()
        arrivals.clear()
        await _flood(session, urls, 6.0, callers=5)
        # After at most 5 s the limit is shared again: the last 1 s-windows see the shared 10/s.
        late = [at for at in arrivals if at - back >= 5.0]
        assert len(late) <= 10 * 1 + 2 + 3, len(late)
        assert redis_server.command("EXISTS", "sidecar:{api}:rate").strip() == b":1"


async def test_the_redis_password_is_never_shown(tmp_path: Path) -> None:
    password = "pa55-w0rd-redis"
    server = RedisServer(tmp_path, password=password).start()
    try:
        upstream, _, _ = _counting_upstream()
        async with upstream, AsyncExitStack() as stack:
            text = _config(
                upstream.url,
                f"redis://:${{REDIS_PASSWORD}}@127.0.0.1:{server.port}/0",
                rate_limit="{ rate: 100/s, shared: true }",
                limits="{ shared_max_concurrent_requests: 5 }",
            )
            (process,) = await stack.enter_async_context(
                _sidecars(tmp_path, text, count=1, env={"REDIS_PASSWORD": password})
            )
            session = await stack.enter_async_context(aiohttp.ClientSession())
            async with session.get(f"{process.url}/api/x") as response:
                assert response.status == 200
            assert server.command("EXISTS", "sidecar:{api}:rate").strip() == b":1"  # it did use Redis
            server.stop()  # errors are logged now: they must not carry it either
            await asyncio.sleep(0.1)
            for _ in range(3):
                async with session.get(f"{process.url}/api/x") as response:
                    await response.read()
            shown = []
            for path in ("/config", "/pools", "/metrics"):
                async with session.get(f"{process.admin_url}{path}") as response:
                    shown.append(await response.text())
            entry = json.loads(shown[1])["upstreams"]["api"]["shared"]
            assert entry["state"] == "down" and entry["rate_limit"] is True and entry["leases"]["limit"] == 5
            assert entry["redis"] == f"redis://<redacted>@127.0.0.1:{server.port}/0"
            await process.stop()
            assert any("Redis" in line for line in process.raw)
            for text_shown in [*shown, *process.raw]:
                assert password not in text_shown
    finally:
        server.stop()


async def test_leases_and_tasks_are_back_to_zero_after_a_storm_with_cancellations(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """60 callers for 2 shared leases, a third of them giving up early: nothing
    stays held (leases here and in Redis, waiters, background tasks, slots)."""
    from sidecar.policy.shared import SharedLeaseStage, SharedRateLimitStage, shared_lease_stage
    from tests.support.rest import assert_at_rest, eventually, pool_of
    from tests.support.sidecar import proxy_url, running_sidecar

    upstream, _, in_flight = _counting_upstream(0.05)
    await upstream.start()
    text = _config(
        upstream.url,
        redis_server.url,
        limits="{ shared_max_concurrent_requests: 2, max_pending: 30 }",
        rate_limit="{ rate: 1000/s, shared: true }",
        timeouts="{ pool: 400ms }",
    )
    async with (
        upstream,
        running_sidecar(tmp_path, text) as sidecar,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
    ):
        pool = pool_of(sidecar)
        stage = shared_lease_stage(pool.stages)
        assert isinstance(stage, SharedLeaseStage)
        assert any(isinstance(s, SharedRateLimitStage) for s in pool.stages.stages)
        statuses: list[int] = []

        async def caller(index: int) -> None:
            timeout = aiohttp.ClientTimeout(total=0.08 if index % 3 == 0 else 5)
            try:
                async with session.get(f"{proxy_url(sidecar)}/api/x", timeout=timeout) as response:
                    await response.read()
                    statuses.append(response.status)
            except TimeoutError:
                statuses.append(0)

        await asyncio.gather(*(caller(i) for i in range(60)))
        assert in_flight[1] <= 2
        assert 0 in statuses and 200 in statuses
        assert set(statuses) <= {0, 200, 503}
        await assert_at_rest(sidecar)
        await eventually(lambda: not stage.held and stage.pending == 0 and stage.tasks() == 0, timeout=5)
        await _eventually(lambda: redis_server.command("ZCARD", "sidecar:{api}:leases").strip() == b":0")


async def test_a_long_request_keeps_its_lease_past_the_lease_time(tmp_path: Path, redis_server: RedisServer) -> None:
    """lease 1 s, limit 1: a 2.5 s request renews its lease, so the other sidecar waits for it."""
    in_flight = [0, 0]

    async def handler(request: web.Request) -> web.StreamResponse:
        in_flight[0] += 1
        in_flight[1] = max(in_flight[1], in_flight[0])
        try:
            await asyncio.sleep(2.5 if request.path == "/long" else 0.01)
            return web.Response(text="ok")
        finally:
            in_flight[0] -= 1

    async with Upstream(handler) as upstream, AsyncExitStack() as stack:
        text = _config(
            upstream.url,
            redis_server.url,
            lease="1s",
            limits="{ shared_max_concurrent_requests: 1 }",
            timeouts="{ pool: 10s }",
        )
        a, b = await stack.enter_async_context(_sidecars(tmp_path, text))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        long = asyncio.ensure_future(session.get(f"{a.url}/api/long"))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        async with session.get(f"{b.url}/api/short") as response:
            assert response.status == 200
        waited = time.monotonic() - started
        async with await long as response:
            assert response.status == 200
        assert in_flight[1] == 1
        assert 1.5 <= waited <= 4.0, waited  # it waited for the long request, well past the 1 s lease

def _tokens_free(server: RedisServer, burst: int, rate: float) -> float:
    """Tokens the shared bucket holds now, from its TAT and the server's clock."""
    seconds, micros = server.query("TIME")
    now = int(seconds) * 1_000_000 + int(micros)
    value = server.query("GET", "sidecar:{api}:rate")
    ahead = max(0, (0 if value is None else int(value)) - now)
    interval = 1_000_000 / rate
    return (burst * interval - ahead) / interval


@pytest.mark.parametrize("refused_by", ["queue_full", "pool_timeout"])
async def test_attempts_refused_after_the_shared_rate_limit_give_their_token_back(
    tmp_path: Path, redis_server: RedisServer, refused_by: str
) -> None:
    """rate 2/s burst 5, one request holding the only slot (or the only shared lease): 12 more, one
    after the other, each take a shared token and are then refused (503 queue_full, or 503
    pool_timeout after waiting for the lease).  Every token comes back: none of them is ever 429
    rate_limited, and the bucket still holds the 4 tokens the held request left."""
    gate = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        await gate.wait()
        return web.Response(text="ok")

    limits = (
        "{ max_concurrent_requests: 1, max_pending: 0 }"
        if refused_by == "queue_full"
        else "{ shared_max_concurrent_requests: 1 }"
    )
    async with Upstream(handler) as upstream, AsyncExitStack() as stack:
        text = _config(
            upstream.url,
            redis_server.url,
            rate_limit="{ rate: 2/s, burst: 5, shared: true }",
            limits=limits,
            timeouts="{ pool: 50ms, read: 30s }",
        )
        (process,) = await stack.enter_async_context(_sidecars(tmp_path, text, count=1))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        held = asyncio.ensure_future(session.get(f"{process.url}/api/held"))
        await _eventually(lambda: len(upstream.requests) == 1, timeout=10)
        codes = []
        for _ in range(12):
            async with session.get(f"{process.url}/api/x") as response:
                await response.read()
                codes.append(response.headers.get("X-Sidecar-Error", str(response.status)))
        assert codes == [refused_by] * 12, codes
        # 12 refusals took at most ~1.5 s: a refill of 3 tokens at most; without the refunds the
        # bucket would be empty by now (and most refusals 429).
        await _eventually(lambda: _tokens_free(redis_server, 5, 2.0) >= 3.5)
        assert _tokens_free(redis_server, 5, 2.0) <= 5.0
        gate.set()
        async with await held as response:
            assert response.status == 200
        assert len(upstream.requests) == 1  # the refused ones never reached it

def _connections(server: RedisServer) -> int:
    """Connections the Redis server holds, the one asking not counted."""
    return len(server.query("CLIENT", "LIST").decode().splitlines()) - 1


async def test_reloads_and_shutdown_close_the_redis_clients_of_retired_pools(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Six reloads, every other one changing the shared: section (a new client), the others only the
    upstream (a new pool, the same client): after each, with traffic and lease waiters in between,
    the connections at the Redis server come back to the steady number; none after the shutdown."""
    upstream, _, _ = _counting_upstream(0.05)

    def config(timeout: str, rate: int) -> str:
        return (
            f'shared: {{ redis: "{redis_server.url}", timeout: {timeout} }}\n'
            f"upstreams:\n  api:\n    url: {upstream.url}\n"
            f"    rate_limit: {{ rate: {rate}/s, shared: true }}\n"
            "    limits: { shared_max_concurrent_requests: 2 }\n"
            "    timeouts: { pool: 5s }\n"
            f"  other:\n    url: {upstream.url}\n    route: {{ path_prefix: /other }}\n"
        )

    async with upstream, AsyncExitStack() as stack:
        path = write_config(tmp_path, config("50ms", 1000))
        process = SidecarProcess(path)
        await process.start()
        stack.push_async_callback(process.stop)
        session = await stack.enter_async_context(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))

        async def traffic() -> None:
            # 6 at once for 2 leases: some wait, so a subscriber connection opens and closes again.
            statuses = await _flood(session, [f"{process.url}/api/x"], 0.5, callers=6)
            assert set(statuses) == {200}, statuses

        await traffic()
        await asyncio.sleep(1.0)  # the subscriber connection closes once nobody waits
        steady = _connections(redis_server)
        assert steady >= 1
        for reload in range(6):
            if reload % 2 == 0:
                text = config(f"{60 + reload}ms", 1000)  # shared: changed: a new client
            else:
                text = config(f"{60 + reload - 1}ms", 1000 + reload)  # only the upstream changed
            write_config(tmp_path, text)
            async with session.post(f"{process.admin_url}/reload") as response:
                assert response.status == 200, await response.text()
            await traffic()
            await _eventually(lambda: _connections(redis_server) <= steady, timeout=10)
        assert steady <= 2, steady  # one pipelined connection (and a subscriber maybe still closing)
        await process.stop()
        await _eventually(lambda: _connections(redis_server) == 0, timeout=10)


async def test_workers_share_the_limits_and_each_has_its_own_redis_client(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """``workers: 2``, a shared rate limit (10/s, burst 2) on one upstream and 3 shared leases on
    another (300 ms each), both flooded through both workers: the rate and the leases hold for the
    two workers together, and every connection at the Redis server belongs to one worker (named by
    its pid), each worker its own."""
    fast, arrivals, _ = _counting_upstream()
    slow, _, in_flight = _counting_upstream(0.3)
    async with fast, slow, AsyncExitStack() as stack:
        text = (
            "workers: 2\n"
            f'shared: {{ redis: "{redis_server.url}", timeout: 50ms }}\n'
            "upstreams:\n"
            f"  api:\n    url: {fast.url}\n"
            "    rate_limit: { rate: 10/s, burst: 2, shared: true }\n    timeouts: { pool: 200ms }\n"
            f"  slow:\n    url: {slow.url}\n"
            "    limits: { max_concurrent_requests: 10, shared_max_concurrent_requests: 3 }\n"
            "    timeouts: { pool: 5s }\n"
        )
        process = SidecarProcess(write_config(tmp_path, text))
        await process.start()
        stack.push_async_callback(process.stop)
        await process.wait_for_event("started", count=2)
        workers = {int(line["pid"]) for line in process.events("started")}
        assert len(workers) == 2 and process.proc is not None and process.proc.pid not in workers
        session = await stack.enter_async_context(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))
        # Many connections, so the kernel spreads them over both workers (SO_REUSEPORT).
        statuses = await _flood(session, [f"{process.url}/api/x", f"{process.url}/slow/x"], 4.0, callers=20)
        assert set(statuses) <= {200, 429}, statuses
        served = {line.get("worker") for line in process.events("access") if line.get("status") == 200}
        assert served == {0, 1}, "both workers must serve requests"
        assert in_flight[1] == 3, in_flight  # the leases, for both workers together
        most = _most_in_window(arrivals, 3.0)
        assert 20 <= most <= 10 * 3 + 2 + 3, most  # the rate, for both together (each alone: twice that)
        for line in process.lines:  # Redis answered all along: the limits were the shared ones
            assert "Redis" not in str(line.get("event", "")), line
        names = {entry["name"] for entry in redis_server.clients()}
        assert names == {f"sidecar-{pid}" for pid in workers}, names
        await _eventually(lambda: redis_server.command("ZCARD", "sidecar:{slow}:leases").strip() == b":0")
        await process.stop()
        await _eventually(lambda: not redis_server.clients())


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Any:
    cluster = RedisCluster(tmp_path).start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_a_redis_cluster_holds_the_shared_limits_while_a_slot_moves(
    tmp_path: Path, redis_cluster: RedisCluster
) -> None:
    """A 3-primary Redis Cluster, ``cluster: true`` given one node's address: a shared rate limit
    (10/s, burst 2) on an upstream whose keys live on another node, 3 shared leases on one whose
    keys live on the first, two sidecars flooded; halfway, the rate limit's slot moves to the third
    node (the sidecars follow MOVED). The rate and the leases hold throughout."""
    from redis.crc import key_slot

    fast, arrivals, _ = _counting_upstream()
    slow, _, in_flight = _counting_upstream(0.3)
    seed, second, third = redis_cluster.nodes
    rate_slot, lease_slot = key_slot(b"{api}"), key_slot(b"{batch}")
    assert redis_cluster.owner(rate_slot) is second and redis_cluster.owner(lease_slot) is seed
    async with fast, slow, AsyncExitStack() as stack:
        text = (
            f'shared: {{ redis: "{seed.url}", timeout: 50ms, cluster: true }}\n'
            "upstreams:\n"
            f"  api:\n    url: {fast.url}\n"
            "    rate_limit: { rate: 10/s, burst: 2, shared: true }\n    timeouts: { pool: 200ms }\n"
            f"  batch:\n    url: {slow.url}\n"
            "    limits: { shared_max_concurrent_requests: 3 }\n    timeouts: { pool: 5s }\n"
        )
        processes = await stack.enter_async_context(_sidecars(tmp_path, text))
        session = await stack.enter_async_context(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))
        urls = [f"{p.url}/{name}/x" for p in processes for name in ("api", "batch")]
        flood = asyncio.ensure_future(_flood(session, urls, 5.0, callers=8))
        await asyncio.sleep(2.5)
        redis_cluster.move_slot(rate_slot, third)
        statuses = await flood
        assert set(statuses) <= {200, 429}, statuses
        assert in_flight[1] == 3, in_flight
        most = _most_in_window(arrivals, 3.0)
        assert 20 <= most <= 10 * 3 + 2 + 3, most
        assert third.query("EXISTS", "sidecar:{api}:rate_takes") == 1  # counted on its new node
        assert second.query("CLUSTER", "COUNTKEYSINSLOT", rate_slot) == 0
        for process in processes:
            # A call caught between the moves of the slot's two keys may fail (TRYAGAIN); no more.
            assert await _metric(session, process, "sidecar_shared_errors_total") <= 4
        await _eventually(lambda: seed.query("ZCARD", "sidecar:{batch}:leases") == 0)


async def test_a_cluster_without_cluster_true_is_named_in_the_warning(
    tmp_path: Path, redis_cluster: RedisCluster
) -> None:
    upstream, _, _ = _counting_upstream()
    async with upstream, AsyncExitStack() as stack:
        # {api} is not served by the node given: it answers MOVED.
        text = _config(upstream.url, redis_cluster.url, rate_limit="{ rate: 100/s, shared: true }")
        (process,) = await stack.enter_async_context(_sidecars(tmp_path, text, count=1))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        async with session.get(f"{process.url}/api/x") as response:
            assert response.status == 200  # on_error: local
        await process.stop()
        warnings = [str(line.get("event")) for line in process.lines if "Redis" in str(line.get("event", ""))]
        assert len(warnings) == 1 and "set shared.cluster: true" in warnings[0], warnings
