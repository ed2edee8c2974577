"""Backpressure on real sockets (docs/backpressure.md): shed at once, never hang, never leak.

* overload: a saturated upstream gets exactly ``max_connections`` connections,
  the queue holds ``max_pending``, everyone else gets 503 ``queue_full`` at
  once and the queue's tail 503 ``pool_timeout`` after ``timeouts.pool``;
* FIFO: waiters reach the upstream in arrival order;
* storms of callers that disconnect (or whose handler is cancelled twice) at
  every stage leave no slot, waiter, connection or file descriptor behind;
* HTTP/2: the in-flight limit follows what the server's streams can carry,
  and what they cannot carry gets a 503 within ``timeouts.pool``, not a hang.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from sidecar.exchange import Exchange
from sidecar.server import Sidecar
from tests.support import LOOPBACK
from tests.support.rest import assert_at_rest, pool_of
from tests.support.sidecar import proxy_url, running_sidecar
from tests.support.tls import tls_server_context
from tests.support.upstreams import HypercornUpstream, TLSUpstream, Upstream
from tests.support.yaml import one_upstream

# ------------------------------------------------------------------ helpers


@dataclass
class Outcome:
    status: int
    elapsed: float
    headers: CIMultiDict[str]
    body: bytes


async def timed_get(session: aiohttp.ClientSession, url: str) -> Outcome:
    started = time.monotonic()
    async with session.get(url) as response:
        body = await response.read()
        return Outcome(response.status, time.monotonic() - started, CIMultiDict(response.headers), body)


def assert_spec_503(outcome: Outcome, code: str, upstream: str = "api") -> None:
    """The sidecar's own refusals: X-Sidecar-Error, the JSON body and a whole-seconds Retry-After >= 1."""
    assert outcome.status == 503
    assert outcome.headers["X-Sidecar-Error"] == code
    retry_after = outcome.headers["Retry-After"]
    assert retry_after.isdigit() and int(retry_after) >= 1, retry_after
    body = json.loads(outcome.body)
    assert body["error"] == code
    assert body["upstream"] == upstream
    assert body["message"]
    assert body["request_id"] == outcome.headers["X-Request-Id"]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def unlimited_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))


# ------------------------------------------------------------ overload


async def test_overload_sheds_at_once_and_times_out_the_queue_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(2.0)
        return web.Response(text="done")

    async with (
        Upstream(slow) as upstream,
        running_sidecar(
            tmp_path,
            f"""
        upstreams:
          api:
            url: {upstream.url}
            limits: {{ max_connections: 4, max_pending: 8 }}
            timeouts: {{ pool: 1s }}
        """,
        ) as sidecar,
        unlimited_session() as session,
    ):
        exchanges: list[Exchange] = []
        finished = sidecar.forwarder._finished

        def record(exchange: Exchange) -> None:
            exchanges.append(exchange)
            finished(exchange)

        monkeypatch.setattr(sidecar.forwarder, "_finished", record)
        url = proxy_url(sidecar) + "/api/work"
        outcomes = await asyncio.gather(*(timed_get(session, url) for _ in range(40)))
        pool = pool_of(sidecar)
        await assert_at_rest(pool, timeout=10, max_connections=4)

    by_kind: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        kind = outcome.headers.get("X-Sidecar-Error", str(outcome.status))
        by_kind.setdefault(kind, []).append(outcome)
    assert set(by_kind) <= {"200", "queue_full", "pool_timeout"}, {k: len(v) for k, v in by_kind.items()}

    full = by_kind.get("queue_full", [])
    assert len(full) >= 28
    for outcome in full:
        assert outcome.elapsed < 0.5, outcome.elapsed
        assert_spec_503(outcome, "queue_full")

    # The upstream takes 2 s: no slot frees within the 1 s pool timeout.
    timed_out = by_kind.get("pool_timeout", [])
    assert len(timed_out) == 40 - len(full) - 4
    for outcome in timed_out:
        assert 1.0 <= outcome.elapsed < 1.5, outcome.elapsed
        assert_spec_503(outcome, "pool_timeout")

    # The access log shows how long a timed-out waiter waited.
    waits = sorted(e.pool_wait for e in exchanges if e.error == "pool_timeout")
    assert len(waits) == len(timed_out) and waits[0] >= 1.0, waits

    admitted = by_kind.get("200", [])
    assert len(admitted) == 4
    assert all(outcome.body == b"done" for outcome in admitted)
    assert len(upstream.requests) == 4
    assert upstream.max_open <= 4
    assert len(upstream.peers) <= 4


async def test_waiters_reach_the_upstream_in_arrival_order(tmp_path: Path) -> None:
    first_may_finish = asyncio.Event()

    async def record(request: web.Request) -> web.StreamResponse:
        if request.path == "/0":
            await first_may_finish.wait()  # holds the only slot while the others queue
        return web.Response(text=request.path)

    async with (
        Upstream(record) as upstream,
        running_sidecar(
            tmp_path,
            f"""
        upstreams:
          api:
            url: {upstream.url}
            limits: {{ max_connections: 1, max_pending: 50 }}
            timeouts: {{ pool: 30s }}
        """,
        ) as sidecar,
        unlimited_session() as session,
    ):
        pool = pool_of(sidecar)
        base = proxy_url(sidecar) + "/api/"
        tasks = []
        for number in range(12):
            tasks.append(asyncio.ensure_future(timed_get(session, f"{base}{number}")))
            # Each request is queued before the next one is sent, so the
            # arrival order is known.
            deadline = time.monotonic() + 10
            while (pool.admission.in_flight, pool.admission.pending) != (1, number):
                assert time.monotonic() < deadline, (number, pool.admission.in_flight, pool.admission.pending)
                await asyncio.sleep(0.002)
        first_may_finish.set()
        outcomes = await asyncio.gather(*tasks)
        assert [o.status for o in outcomes] == [200] * 12
        await assert_at_rest(pool, timeout=10, max_connections=1)
    assert [r.path for r in upstream.requests] == [f"/{n}" for n in range(12)]


# ------------------------------------------------------------ cancellation storms

STORM_REQUESTS = 2000
STORM_CONCURRENCY = 200
STORM_CONNECTIONS = 10
_BODY_CHUNK = b"x" * 16384


async def streaming_upstream(request: web.Request) -> web.StreamResponse:
    """Headers after a short think, then 64 KiB in four paced chunks."""
    await asyncio.sleep(random.random() * 0.02)
    response = web.StreamResponse()
    response.content_length = 4 * len(_BODY_CHUNK)
    await response.prepare(request)
    for _ in range(4):
        await response.write(_BODY_CHUNK)
        await asyncio.sleep(0.003)
    await response.write_eof()
    return response


async def raw_client(port: int, rng: random.Random) -> str:
    """One caller on a raw socket that may walk away at any stage."""
    mode = rng.choice(("complete", "complete", "early", "early", "mid_body"))
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(b"GET /api/storm HTTP/1.1\r\nHost: storm\r\nConnection: close\r\n\r\n")
        if mode == "early":
            # Waiting in the queue, or admitted and waiting for upstream headers.
            await asyncio.sleep(rng.random() * 0.06)
            return mode
        head = await reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1].decode()
        if mode == "mid_body":
            if status == "200":
                await reader.readexactly(rng.randrange(1, 3 * len(_BODY_CHUNK)))
            return f"{mode}:{status}"
        await reader.read()
        return f"{mode}:{status}"
    except (ConnectionError, asyncio.IncompleteReadError):
        return f"{mode}:reset"
    finally:
        if rng.random() < 0.5:
            writer.transport.abort()  # RST-like: the sidecar sees an error, not EOF
        else:
            writer.close()


async def run_storm(port: int, seed: int) -> Counter[str]:
    rng = random.Random(seed)
    results: Counter[str] = Counter()
    remaining = iter(range(STORM_REQUESTS))

    async def worker() -> None:
        for _ in remaining:
            results[await raw_client(port, rng)] += 1

    await asyncio.gather(*(worker() for _ in range(STORM_CONCURRENCY)))
    return results


async def fresh_requests_succeed(sidecar: Sidecar, count: int = 50) -> None:
    async with unlimited_session() as session:
        started = time.monotonic()
        outcomes = await asyncio.gather(*(timed_get(session, proxy_url(sidecar) + "/api/after") for _ in range(count)))
    assert [o.status for o in outcomes] == [200] * count
    assert len(outcomes[0].body) == 4 * len(_BODY_CHUNK)
    assert time.monotonic() - started < 10  # promptly: ~50 x 30 ms over 10 connections


def storm_config(url: str) -> str:
    return one_upstream(url, limits={"max_connections": 10, "max_pending": 1000}, timeouts={"pool": "2s"})


@asynccontextmanager
async def storm_setup(tmp_path: Path) -> AsyncIterator[Sidecar]:
    async with Upstream(streaming_upstream, read_body=False) as upstream:
        fds_before = open_fds()
        async with running_sidecar(tmp_path, storm_config(upstream.url), admin=False) as sidecar:
            yield sidecar
            pool = pool_of(sidecar)
            await assert_at_rest(pool, timeout=10, max_connections=STORM_CONNECTIONS)
            assert upstream.open_connections <= STORM_CONNECTIONS
            await fresh_requests_succeed(sidecar)
            await assert_at_rest(pool, timeout=10, max_connections=STORM_CONNECTIONS)
            # Pooled keep-alive connections are two fds each (both ends live here).
            assert open_fds() <= fds_before + 2 * STORM_CONNECTIONS + 5


async def test_cancellation_storm_leaks_nothing(tmp_path: Path) -> None:
    async with storm_setup(tmp_path) as sidecar:
        results = await run_storm(sidecar.proxy_port, seed=3)
        assert sum(results.values()) == STORM_REQUESTS
        # Every stage was exercised.
        assert results["early"] > 300
        assert results["mid_body:200"] > 100
        assert results["complete:200"] > 100


async def test_double_cancellation_storm_leaks_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second cancel landing in the cleanup (finally/close) path (anyio's shield
    does not stop a native Task.cancel()).

    Besides callers walking away (aiohttp cancels the handler), a third of the
    handler tasks are cancelled by us twice: the second cancel arrives in the
    next loop iteration or a millisecond later, i.e. while the first one is
    still unwinding through ``response.aclose()`` and the admission release.
    """
    async with storm_setup(tmp_path) as sidecar:
        loop = asyncio.get_running_loop()
        rng = random.Random(11)
        original = sidecar.forwarder._handle
        double_cancelled = 0

        def cancel_twice(task: asyncio.Task[Any]) -> None:
            nonlocal double_cancelled
            if task.done():
                return
            double_cancelled += 1
            task.cancel()
            if rng.random() < 0.5:
                loop.call_soon(task.cancel)
            else:
                loop.call_later(rng.random() * 0.002, task.cancel)

        async def handle_and_maybe_cancel(request: web.BaseRequest, exchange: Any) -> web.StreamResponse:
            task = asyncio.current_task()
            assert task is not None
            if rng.random() < 0.35:
                loop.call_later(rng.random() * 0.08, cancel_twice, task)
            return await original(request, exchange)

        # Undone before storm_setup checks that fresh requests succeed.
        with monkeypatch.context() as patch:
            patch.setattr(sidecar.forwarder, "_handle", handle_and_maybe_cancel)
            results = await run_storm(sidecar.proxy_port, seed=5)
        assert sum(results.values()) == STORM_REQUESTS
        assert double_cancelled > 300


# ------------------------------------------------------------------ HTTP/2


class H2Upstream(HypercornUpstream):
    """An h2c (prior knowledge) upstream that answers after ``delay`` and
    counts concurrent streams (``max_in_handler``)."""

    def __init__(self, *, delay: float, max_streams: int = 100) -> None:
        super().__init__(max_concurrent_streams=max_streams)
        self.delay = delay

    async def _answer(self, scope: dict[str, Any], send: Any) -> None:
        await asyncio.sleep(self.delay)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": scope["http_version"].encode()})


def h2_config(url: str) -> str:
    return one_upstream(
        url, http2="prior-knowledge", limits={"max_connections": 2, "max_pending": 100}, timeouts={"pool": "1s"}
    )


async def test_http2_limit_defaults_to_100_streams_per_connection(tmp_path: Path) -> None:
    async with (
        H2Upstream(delay=0.0) as upstream,
        running_sidecar(tmp_path, h2_config(upstream.url), admin=False) as sidecar,
        unlimited_session() as session,
    ):
        pool = pool_of(sidecar)
        assert pool.admission.capacity == 2 * 100
        outcome = await timed_get(session, proxy_url(sidecar) + "/api/x")
        assert outcome.status == 200
        assert outcome.body == b"2"
        # hypercorn grants 100 streams: the limit stays what two connections carry.
        assert pool.admission.capacity == 2 * 100


@pytest.mark.slow
async def test_http2_streams_beyond_the_server_limit_get_503_not_a_hang(tmp_path: Path) -> None:
    """httpcore's wait for a free HTTP/2 stream has no timeout.

    The server allows 5 streams per connection, two connections: 10 streams.
    Thirty callers at once on a cold pool (nothing known about the server
    yet), then again once its limit is known: 10 are served, the rest get 503
    pool_timeout within timeouts.pool (+ slack), nobody hangs.
    """
    async with (
        H2Upstream(delay=2.0, max_streams=5) as upstream,
        running_sidecar(tmp_path, h2_config(upstream.url), admin=False) as sidecar,
        unlimited_session() as session,
    ):
        pool = pool_of(sidecar)
        url = proxy_url(sidecar) + "/api/x"
        for wave in ("cold", "warm"):
            outcomes = await asyncio.gather(*(timed_get(session, url) for _ in range(30)))
            served = [o for o in outcomes if o.status == 200]
            refused = [o for o in outcomes if o.status != 200]
            assert upstream.max_in_handler <= 10, wave
            assert len(served) == 10, (wave, Counter(o.status for o in outcomes))
            for outcome in refused:
                assert_spec_503(outcome, "pool_timeout")
                assert 0.9 <= outcome.elapsed < 1.8, (wave, outcome.elapsed)
            for outcome in served:
                assert outcome.elapsed < 2.0 + 1.0, (wave, outcome.elapsed)
            # What two connections of five streams carry, learned from SETTINGS.
            assert pool.admission.capacity == 10
            await assert_at_rest(pool, timeout=10, max_connections=2)


# ------------------------------------------------ double cancellation, aimed


def double_cancel_config(url: str, http2: str | bool) -> str:
    return one_upstream(url, http2=http2, limits={"max_connections": 1, "max_pending": 10}, timeouts={"pool": "2s"})


class SlowBodyH2(H2Upstream):
    """h2c upstream whose body never finishes while the test runs."""

    async def _answer(self, scope: dict[str, Any], send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x" * 1024, "more_body": True})
        await asyncio.sleep(30)


async def slow_body_h1(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(request)
    await response.write(b"x" * 1024)
    await asyncio.sleep(30)
    return response


@pytest.mark.parametrize("protocol", ["http1", "http2"])
@pytest.mark.parametrize("second", ["next_tick", "one_ms_later"])
async def test_second_cancel_during_the_upstream_close_leaks_nothing(
    tmp_path: Path, protocol: str, second: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second cancel, aimed: it lands while ``response.aclose()``
    is closing the upstream exchange (the caller stalled mid-response, the
    first cancel unwinds into the close, the second interrupts it)."""
    h1 = Upstream(slow_body_h1, read_body=False)
    h2 = SlowBodyH2(delay=0)
    upstream: Any = h1 if protocol == "http1" else h2
    http2: str | bool = False if protocol == "http1" else "prior-knowledge"
    loop = asyncio.get_running_loop()
    async with (
        upstream,
        running_sidecar(tmp_path, double_cancel_config(upstream.url, http2), admin=False) as sidecar,
    ):
        pool = pool_of(sidecar)
        forwarder = sidecar.forwarder
        original_handle = forwarder._handle
        handlers: list[asyncio.Task[Any]] = []

        async def stalled_relay(request: web.BaseRequest, response: Any, exchange: Any) -> web.StreamResponse:
            await asyncio.sleep(30)  # a caller that stopped reading
            raise AssertionError("not reached")

        async def recorded_handle(request: web.BaseRequest, exchange: Any) -> web.StreamResponse:
            task = asyncio.current_task()
            assert task is not None
            handlers.append(task)
            return await original_handle(request, exchange)

        with monkeypatch.context() as patch:
            patch.setattr(forwarder, "_relay", stalled_relay)
            patch.setattr(forwarder, "_handle", recorded_handle)
            for _ in range(3):
                # A raw socket: aiohttp's client would silently retry the GET.
                reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
                writer.write(b"GET /api/slow HTTP/1.1\r\nHost: x\r\n\r\n")
                deadline = time.monotonic() + 5
                while pool.stats().active == 0 or not handlers or handlers[-1].done():
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.05)  # well inside stalled_relay
                task = handlers[-1]
                task.cancel()
                if second == "next_tick":
                    loop.call_soon(task.cancel)
                else:
                    loop.call_later(0.001, task.cancel)
                assert await asyncio.wait_for(reader.read(), 5) == b""  # dropped, no response
                writer.close()
                await assert_at_rest(pool, timeout=10, max_connections=1)


async def test_http2_over_tls_that_falls_back_to_http1_admits_one_per_connection(tmp_path: Path) -> None:
    """``http2: true`` on https is a wish (ALPN): a server that picks HTTP/1.1
    carries one request per connection, so the limit drops from
    ``max_connections x 100`` to ``max_connections``."""
    server_context, ca_file = tls_server_context(tmp_path, LOOPBACK)
    async with TLSUpstream(server_context, _ok) as upstream:
        async with (
            running_sidecar(
                tmp_path,
                f"""
            upstreams:
              api:
                url: https://{LOOPBACK}:{upstream.port}
                http2: true
                limits: {{ max_connections: 2 }}
                tls: {{ ca_file: {ca_file} }}
            """,
                admin=False,
            ) as sidecar,
            unlimited_session() as session,
        ):
            pool = pool_of(sidecar)
            assert pool.admission.capacity == 200
            outcome = await timed_get(session, proxy_url(sidecar) + "/api/x")
            assert outcome.status == 200
            assert pool.admission.capacity == 2
            # The first connection (opened offering h2) is replaced, once free,
            # by one of the sidecar's own HTTP/1.1 connections.
            outcome = await timed_get(session, proxy_url(sidecar) + "/api/x")
            assert outcome.status == 200
            assert pool.stats().http_versions == {"HTTP/1.1": 1}
            assert pool.admission.capacity == 2


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def test_expect_100_continue_gets_the_503_not_an_invitation_to_send_the_body(tmp_path: Path) -> None:
    held = asyncio.Event()

    async def hold(request: web.Request) -> web.StreamResponse:
        held.set()
        await asyncio.sleep(5)
        return web.Response(text="late")

    async with (
        Upstream(hold) as upstream,
        running_sidecar(
            tmp_path,
            f"""
        upstreams:
          api:
            url: {upstream.url}
            limits: {{ max_connections: 1, max_pending: 0 }}
        """,
            admin=False,
        ) as sidecar,
    ):
        _, holder = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)  # takes the only slot
        holder.write(b"GET /api/hold HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(held.wait(), 5)

        reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
        writer.write(b"POST /api/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        status_line = await asyncio.wait_for(reader.readline(), 5)
        assert status_line.startswith(b"HTTP/1.1 503"), status_line
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b"X-Sidecar-Error: queue_full" in head
        writer.close()
        holder.close()
