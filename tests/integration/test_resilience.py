"""Retries with a budget and the circuit breaker, through the real sidecar on real sockets."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

from sidecar.exchange import Attempt, Exchange
from sidecar.policy import Stage, Stages
from sidecar.pools import UpstreamPool
from sidecar.server import Sidecar
from tests.support.rest import eventually
from tests.support.sidecar import SidecarProcess, admin_url, proxy_url, running_sidecar
from tests.support.upstreams import Handler, RawH2Server, ScriptedUpstream, Upstream
from tests.support.wire import read_request_head
from tests.support.yaml import write_config


def _config(url: str, extra: str = "", *, http2: str = "false") -> str:
    return f"""
        upstreams:
          app:
            url: {url}
            http2: {http2}
            limits: {{ max_connections: 10, max_pending: 100 }}
            timeouts: {{ pool: 5s, read: 5s }}
            {extra}
        """


async def _at_rest(pool: UpstreamPool) -> None:
    await eventually(
        lambda: (
            pool.admission.in_flight == 0
            and pool.admission.pending == 0
            and pool.stats().active == 0
            and pool.active == 0
        )
    )


class Answers:
    """A handler answering the given statuses in turn (then 200), recording each body's sha256."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.digests: list[str] = []

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        self.digests.append(hashlib.sha256(await request.read()).hexdigest())
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status, text=f"answer {status}")


async def _metric(sidecar: Sidecar, line_start: str) -> float:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{admin_url(sidecar)}/metrics") as response:
            text = await response.text()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric line {line_start!r}")


# ---------------------------------------------------------------- retries


async def test_a_503_then_200_is_retried_and_the_caller_sees_the_second_answer(tmp_path: Path) -> None:
    handler = Answers(503)
    async with Upstream(handler) as upstream:
        config = _config(upstream.url, "retries: { attempts: 1, retry_on: [503] }")
        async with running_sidecar(tmp_path, config) as sidecar, aiohttp.ClientSession() as session:
            async with session.get(f"{proxy_url(sidecar)}/app/x") as response:
                assert response.status == 200
                assert await response.text() == "answer 200"
                assert response.headers["X-Sidecar-Attempts"] == "2"
            async with session.get(f"{proxy_url(sidecar)}/app/x") as response:
                assert response.status == 200
                assert "X-Sidecar-Attempts" not in response.headers  # one attempt: no header
            assert len(upstream.requests) == 3
            assert await _metric(sidecar, 'sidecar_retries_total{result="sent",upstream="app"}') == 1
            await _at_rest(sidecar.generation().pools["app"])


async def test_the_default_config_does_not_retry_a_503(tmp_path: Path) -> None:
    handler = Answers(503)
    async with Upstream(handler) as upstream:
        async with running_sidecar(tmp_path, _config(upstream.url)) as sidecar, aiohttp.ClientSession() as session:
            async with session.get(f"{proxy_url(sidecar)}/app/x") as response:
                assert response.status == 503
                assert await response.text() == "answer 503"
            assert len(upstream.requests) == 1
            await _at_rest(sidecar.generation().pools["app"])


async def test_a_post_is_retried_only_with_an_idempotency_key_and_its_body_replayed_byte_for_byte(
    tmp_path: Path,
) -> None:
    handler = Answers()
    body = os.urandom(40_000)

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 7000):
            yield body[start : start + 7000]
            await asyncio.sleep(0)

    async with Upstream(handler, read_body=False) as upstream:
        config = _config(upstream.url, "retries: { attempts: 1, retry_on: [503] }")
        async with running_sidecar(tmp_path, config) as sidecar, aiohttp.ClientSession() as session:
            url = f"{proxy_url(sidecar)}/app/upload"
            handler.statuses[:] = [503]
            async with session.post(url, data=body) as response:
                assert response.status == 503  # POST without a key: relayed, not repeated
            assert len(upstream.requests) == 1
            for data in (body, chunked()):  # with Content-Length, then chunked
                handler.statuses[:] = [503]
                before = len(upstream.requests)
                async with session.post(url, data=data, headers={"Idempotency-Key": "k-1"}) as response:
                    assert response.status == 200
                    assert response.headers["X-Sidecar-Attempts"] == "2"
                assert len(upstream.requests) == before + 2
            await _at_rest(sidecar.generation().pools["app"])
    expected = hashlib.sha256(body).hexdigest()
    assert handler.digests[1:] == [expected] * 4


async def test_a_body_over_max_body_is_not_retried(tmp_path: Path) -> None:
    handler = Answers(503)
    async with Upstream(handler) as upstream:
        config = _config(upstream.url, "retries: { attempts: 1, retry_on: [503], max_body: 1KiB }")
        async with running_sidecar(tmp_path, config) as sidecar, aiohttp.ClientSession() as session:

            async def chunked() -> AsyncIterator[bytes]:
                for _ in range(4):
                    yield b"x" * 500

            for data in (b"x" * 2000, chunked()):  # declared over the limit, then found over it while streaming
                before = len(upstream.requests)
                headers = {"Idempotency-Key": "k"}
                async with session.put(f"{proxy_url(sidecar)}/app/x", data=data, headers=headers) as response:
                    assert response.status == 503
                assert len(upstream.requests) == before + 1
                upstream.requests.clear()
                handler.statuses[:] = [503]
            await _at_rest(sidecar.generation().pools["app"])


async def test_a_refused_http2_stream_is_a_connect_error_retried_even_for_a_post(tmp_path: Path) -> None:
    async with RawH2Server() as upstream:
        config = _config(upstream.url, http2="prior-knowledge")  # the default: retry_on [connect_error]
        async with running_sidecar(tmp_path, config) as sidecar, aiohttp.ClientSession() as session:
            async with session.post(f"{proxy_url(sidecar)}/app/refuse-first", data=b"payload") as response:
                assert response.status == 200, await response.text()
                assert await response.text() == "ok"
                assert response.headers["X-Sidecar-Attempts"] == "2"
            assert upstream.paths == ["/refuse-first", "/refuse-first"]
            await _at_rest(sidecar.generation().pools["app"])


async def test_a_connection_refused_is_retried_for_a_post(tmp_path: Path) -> None:
    """Nothing listens for the first attempt: the second one (on a new
    connection, after the upstream came up during the backoff) gets through."""
    handler = Answers()
    upstream = Upstream(handler)
    await upstream.start()
    url = upstream.url
    await upstream.stop()
    config = _config(url, "retries: { attempts: 3, backoff: { base: 300ms, max: 300ms } }")
    async with running_sidecar(tmp_path, config) as sidecar, aiohttp.ClientSession() as session:
        port = int(url.rsplit(":", 1)[1])

        async def come_up() -> web.AppRunner:
            await asyncio.sleep(0.05)
            app = web.Application()

            async def serve(request: web.Request) -> web.StreamResponse:
                return await handler(request)

            app.router.add_route("*", "/{tail:.*}", serve)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            return runner

        starting = asyncio.create_task(come_up())
        async with session.post(f"{proxy_url(sidecar)}/app/x", data=b"abc") as response:
            assert response.status == 200
            assert int(response.headers["X-Sidecar-Attempts"]) >= 2
        runner = await starting
        await runner.cleanup()
        assert handler.digests == [hashlib.sha256(b"abc").hexdigest()]
        await _at_rest(sidecar.generation().pools["app"])


async def test_an_upstream_breaking_mid_body_cuts_the_body_after_one_attempt(tmp_path: Path) -> None:
    async def half_a_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()

    async with ScriptedUpstream(half_a_body) as upstream:
        config = _config(upstream.url, "retries: { attempts: 2, retry_on: [connect_error, reset, timeout, 503] }")
        async with running_sidecar(tmp_path, config) as sidecar, aiohttp.ClientSession() as session:
            try:
                async with session.get(f"{proxy_url(sidecar)}/app/x") as response:
                    assert response.status == 200
                    await response.read()
                raise AssertionError("a cut body must not look complete")
            except aiohttp.ClientPayloadError:
                pass
            assert upstream.connections == 1
            await _at_rest(sidecar.generation().pools["app"])


async def test_a_reset_before_the_headers_is_retried_for_a_get(tmp_path: Path) -> None:
    async def reset_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        if upstream.connections == 1:
            writer.transport.abort()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()

    async with ScriptedUpstream(reset_first) as upstream:
        config = _config(upstream.url, "retries: { attempts: 1, retry_on: [reset] }")
        async with running_sidecar(tmp_path, config) as sidecar, aiohttp.ClientSession() as session:
            async with session.get(f"{proxy_url(sidecar)}/app/x") as response:
                assert response.status == 200 and await response.read() == b"ok"
                assert response.headers["X-Sidecar-Attempts"] == "2"
            async with session.post(f"{proxy_url(sidecar)}/app/x", data=b"1") as response:
                assert response.status == 200  # (the upstream answers every later connection)
            await _at_rest(sidecar.generation().pools["app"])


async def test_the_budget_bounds_the_load_on_an_always_failing_upstream(tmp_path: Path) -> None:
    async def always_503(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503, text="down")

    async with Upstream(always_503) as upstream:
        config = _config(
            upstream.url,
            "retries: { attempts: 3, retry_on: [503], backoff: { base: 1ms, max: 1ms },"
            " budget: { ratio: 0.2, min_per_second: 1 } }",
        )
        async with running_sidecar(tmp_path, config) as sidecar, aiohttp.ClientSession() as session:

            async def one() -> int:
                async with session.get(f"{proxy_url(sidecar)}/app/x") as response:
                    await response.read()
                    return response.status

            for _ in range(10):
                assert await asyncio.gather(*(one() for _ in range(10))) == [503] * 10
            # 100 requests, and at most 0.2 * 100 + 1/s * 10 s retries.
            assert 100 + 20 <= len(upstream.requests) <= 100 + 20 + 10
            sent = await _metric(sidecar, 'sidecar_retries_total{result="sent",upstream="app"}')
            exhausted = await _metric(sidecar, 'sidecar_retries_total{result="budget_exhausted",upstream="app"}')
            assert sent == len(upstream.requests) - 100
            assert exhausted >= 100 - sent / 3  # every request that wanted a retry it did not get
            async with session.get(f"{admin_url(sidecar)}/pools") as response:
                entry = (await response.json())["upstreams"]["app"]
                assert entry["retries"]["budget_remaining"] == 0
            await _at_rest(sidecar.generation().pools["app"])


def _retry_after(value: str) -> Handler:
    calls: list[float] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        calls.append(time.monotonic())
        if len(calls) == 1:
            return web.Response(status=503, headers={"Retry-After": value}, text="later")
        return web.Response(text="now")

    return handler


async def test_retry_after_longer_than_backoff_max_is_relayed_shorter_is_waited(tmp_path: Path) -> None:
    for backoff_max, status, attempts in (("250ms", 503, 1), ("2s", 200, 2)):
        handler = _retry_after("1")
        async with Upstream(handler) as upstream:
            config = _config(
                upstream.url, f"retries: {{ attempts: 1, retry_on: [503], backoff: {{ max: {backoff_max} }} }}"
            )
            async with running_sidecar(tmp_path, config) as sidecar, aiohttp.ClientSession() as session:
                started = time.monotonic()
                async with session.get(f"{proxy_url(sidecar)}/app/x") as response:
                    assert response.status == status
                    if status == 503:
                        assert response.headers["Retry-After"] == "1"
                elapsed = time.monotonic() - started
                assert len(upstream.requests) == attempts
                if attempts == 2:
                    assert 0.95 <= elapsed <= 3.0
                else:
                    assert elapsed < 0.9
                await _at_rest(sidecar.generation().pools["app"])


class _Deadline(Stage):
    """Sets a caller deadline, as the deadline stage does from X-Sidecar-Timeout."""

    __slots__ = ()
    name = "test_deadline"

    async def admit(self, exchange: Exchange) -> None:
        exchange.deadline = time.monotonic() + 0.5


async def test_no_retry_when_the_deadline_is_shorter_than_the_backoff(tmp_path: Path) -> None:
    handler = _retry_after("1")
    async with Upstream(handler) as upstream:
        config = _config(upstream.url, "retries: { attempts: 1, retry_on: [503], backoff: { max: 2s } }")
        async with running_sidecar(tmp_path, config) as sidecar, aiohttp.ClientSession() as session:
            pool = sidecar.generation().pools["app"]
            pool.stages = Stages([_Deadline(), *pool.stages.stages])
            started = time.monotonic()
            async with session.get(f"{proxy_url(sidecar)}/app/x") as response:
                assert response.status == 503
            assert time.monotonic() - started < 0.9
            assert len(upstream.requests) == 1
            assert await _metric(sidecar, 'sidecar_retries_total{result="no_time",upstream="app"}') == 1
            await _at_rest(pool)


# ---------------------------------------------------------------- circuit breaker


async def test_the_circuit_opens_fails_fast_probes_once_and_closes(tmp_path: Path) -> None:
    mode = {"status": 503, "delay": 0.0}

    async def handler(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(mode["delay"])
        return web.Response(status=int(mode["status"]), text="answer")

    async with Upstream(handler) as upstream:
        config = _config(
            upstream.url, "retries: { attempts: 0 }\n            circuit_breaker: { failures: 3, open_for: 1s }"
        )
        async with running_sidecar(tmp_path, config) as sidecar, aiohttp.ClientSession() as session:
            url = f"{proxy_url(sidecar)}/app/x"
            state = 'sidecar_circuit_state{upstream="app"}'

            async def get() -> tuple[int, dict[str, str]]:
                async with session.get(url) as response:
                    await response.read()
                    return response.status, dict(response.headers)

            assert await _metric(sidecar, state) == 0
            for _ in range(3):
                assert (await get())[0] == 503
            assert len(upstream.requests) == 3
            assert await _metric(sidecar, state) == 1
            started = time.monotonic()
            status, headers = await get()
            fast = time.monotonic() - started
            assert status == 503 and headers["X-Sidecar-Error"] == "circuit_open"
            assert headers["Retry-After"] == "1"
            assert fast < 0.05
            assert len(upstream.requests) == 3  # not contacted

            # Half-open: of 10 simultaneous requests exactly one is the probe (and it fails).
            await asyncio.sleep(1.05)
            mode["delay"] = 0.3
            probes = asyncio.gather(*(get() for _ in range(10)))
            await eventually(lambda: len(upstream.requests) == 4)
            assert await _metric(sidecar, state) == 2
            answers = await probes
            assert len(upstream.requests) == 4
            assert sorted(headers.get("X-Sidecar-Error", "") for _, headers in answers) == [""] + ["circuit_open"] * 9
            # Failed probe: open again for twice the period.
            assert await _metric(sidecar, state) == 1
            status, headers = await get()
            assert status == 503 and headers["Retry-After"] == "2"
            await asyncio.sleep(1.1)
            assert (await get())[1].get("X-Sidecar-Error") == "circuit_open"  # still open after 1 s
            await asyncio.sleep(1.0)
            # A good probe closes it.
            mode["status"], mode["delay"] = 200, 0.0
            assert (await get())[0] == 200
            assert await _metric(sidecar, state) == 0
            assert [status for status, _ in await asyncio.gather(*(get() for _ in range(5)))] == [200] * 5
            rejected = 'sidecar_rejected_requests_total{reason="circuit_open",upstream="app"}'
            assert await _metric(sidecar, rejected) == 12  # 1 + 9 + 2 while open
            async with session.get(f"{admin_url(sidecar)}/pools") as response:
                entry = (await response.json())["upstreams"]["app"]
                assert entry["circuit"]["state"] == "closed"
            await _at_rest(sidecar.generation().pools["app"])


async def test_429s_never_open_the_circuit(tmp_path: Path) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=429, text="slow down")

    async with Upstream(handler) as upstream:
        config = _config(upstream.url, "circuit_breaker: { failures: 2, open_for: 1s }")
        async with running_sidecar(tmp_path, config) as sidecar, aiohttp.ClientSession() as session:
            for _ in range(10):
                async with session.get(f"{proxy_url(sidecar)}/app/x") as response:
                    assert response.status == 429 and "X-Sidecar-Error" not in response.headers
            assert len(upstream.requests) == 10
            assert await _metric(sidecar, 'sidecar_circuit_state{upstream="app"}') == 0


async def test_connect_errors_open_the_circuit_and_the_retry_gets_the_last_answer(tmp_path: Path) -> None:
    """The failure that opens the circuit is what the caller gets, not the
    refusal of the retry it would have made."""
    upstream = Upstream()
    await upstream.start()
    url = upstream.url
    await upstream.stop()
    config = _config(url, "retries: { attempts: 2 }\n            circuit_breaker: { failures: 2, open_for: 5s }")
    async with running_sidecar(tmp_path, config) as sidecar, aiohttp.ClientSession() as session:
        async with session.get(f"{proxy_url(sidecar)}/app/x") as response:
            assert response.status == 502
            assert response.headers["X-Sidecar-Error"] == "upstream_connect_error"
            assert response.headers["X-Sidecar-Attempts"] == "2"
        async with session.get(f"{proxy_url(sidecar)}/app/x") as response:
            assert response.status == 503
            assert response.headers["X-Sidecar-Error"] == "circuit_open"
            assert response.headers["Retry-After"] == "5"
        await _at_rest(sidecar.generation().pools["app"])


# ---------------------------------------------------------------- leaks


async def test_no_leaks_across_a_storm_of_retries_cancellations_and_a_flapping_circuit(tmp_path: Path) -> None:
    rng = random.Random(7)
    healthy = False

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        roll = 1.0 if healthy else rng.random()
        if roll < 0.05:
            await asyncio.sleep(0.2)  # slow: some callers give up meanwhile
        if roll < 0.25:
            return web.Response(status=503, text="flaky")
        return web.Response(text="ok")

    async with Upstream(handler, read_body=False) as upstream:
        config = _config(
            upstream.url,
            "retries: { attempts: 2, retry_on: [connect_error, reset, 503], backoff: { base: 1ms, max: 5ms } }\n"
            "            circuit_breaker: { failures: 5, open_for: 20ms, max_open: 100ms }",
        )
        async with running_sidecar(tmp_path, config) as sidecar:
            pool = sidecar.generation().pools["app"]
            baseline = len(asyncio.all_tasks())
            callers = asyncio.Semaphore(50)
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

                async def one(index: int) -> str:
                    # Every fifth caller gives up after 50 ms: cancelled in a
                    # backoff, in a slot wait or mid-attempt.
                    timeout = aiohttp.ClientTimeout(total=0.05 if index % 5 == 0 else 10)
                    async with callers:
                        try:
                            if index % 3 == 0:
                                request = session.post(
                                    f"{proxy_url(sidecar)}/app/x",
                                    data=b"b" * 100,
                                    headers={"Idempotency-Key": str(index)},
                                    timeout=timeout,
                                )
                            else:
                                request = session.get(f"{proxy_url(sidecar)}/app/x", timeout=timeout)
                            async with request as response:
                                await response.read()
                                return response.headers.get("X-Sidecar-Error", str(response.status))
                        except (TimeoutError, aiohttp.ClientError):
                            return "cancelled"

                outcomes = await asyncio.gather(*(one(index) for index in range(2000)))
            seen = set(outcomes)
            assert {"200", "503", "circuit_open", "cancelled"} <= seen, seen
            await _at_rest(pool)
            # Tasks back to where they were, but for the test upstream's handler
            # task of each connection the sidecar keeps alive to it.
            await eventually(lambda: len(asyncio.all_tasks()) <= baseline + pool.stats().idle + 1)
            assert pool.retries.results["sent"] > 0
            # No probe was lost on the way: once the upstream is healthy the circuit closes.
            healthy = True
            async with aiohttp.ClientSession() as session:

                async def closes() -> bool:
                    async with session.get(f"{proxy_url(sidecar)}/app/x") as response:
                        return response.status == 200

                deadline = time.monotonic() + 3
                while not await closes():
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
            assert pool.circuit.state().name == "CLOSED"
            await _at_rest(pool)


class _Allowance(Stage):
    """Records what a per-attempt gate may still wait before each retry."""

    __slots__ = ("seen",)
    name = "test_allowance"

    def __init__(self) -> None:
        self.seen: list[float | None] = []

    async def before_retry(self, exchange: Exchange, attempt: Attempt) -> None:
        self.seen.append(exchange.wait_allowance(time.monotonic()))


async def test_a_waited_out_retry_after_does_not_count_against_timeouts_pool(tmp_path: Path) -> None:
    """timeouts.pool (300 ms) bounds the waits in the stages, not the backoff:
    after a 1 s Retry-After the gates of the retry may still wait (almost) all of it."""
    handler = _retry_after("1")
    async with Upstream(handler) as upstream:
        config = f"""
            upstreams:
              app:
                url: {upstream.url}
                timeouts: {{ pool: 300ms }}
                retries: {{ attempts: 1, retry_on: [503], backoff: {{ max: 2s }} }}
            """
        async with running_sidecar(tmp_path, config) as sidecar, aiohttp.ClientSession() as session:
            pool = sidecar.generation().pools["app"]
            allowance = _Allowance()
            pool.stages = Stages([allowance, *pool.stages.stages])
            async with session.get(f"{proxy_url(sidecar)}/app/x") as response:
                assert response.status == 200, await response.text()
                assert response.headers["X-Sidecar-Attempts"] == "2"
            assert len(allowance.seen) == 1
            left = allowance.seen[0]
            assert left is not None and 0.2 <= left <= 0.3
            await _at_rest(pool)


async def test_the_access_log_counts_attempts_on_every_line(tmp_path: Path) -> None:
    handler = Answers(503, 200, 502)
    async with Upstream(handler) as upstream:
        config = write_config(
            tmp_path,
            _config(
                upstream.url,
                "retries: { attempts: 1, retry_on: [503] }\n"
                "            circuit_breaker: { failures: 1, failure_on: [502], open_for: 10s }",
            ),
        )
        process = SidecarProcess(config)
        await process.start()
        try:
            async with aiohttp.ClientSession() as session:
                for expected in (200, 502, 503):  # retried; opened the circuit; refused
                    async with session.get(f"{process.url}/app/x") as response:
                        await response.read()
                        assert response.status == expected
            await process.wait_for_event("access", count=3)
        finally:
            await process.stop()
    lines = process.events("access")
    assert [line["attempts"] for line in lines] == [2, 1, 0]
    assert [line["error"] for line in lines] == [None, None, "circuit_open"]


async def test_the_pools_repeat_on_a_stale_connection_spends_from_the_retry_budget(tmp_path: Path) -> None:
    """An upstream that closes every kept-alive connection on its second request:
    the pool repeats a GET on a fresh connection, but only while the retry budget
    has room (here one retry per window), so a flaky upstream never sees more
    load than the budget allows."""

    async def first_request_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request_head(reader)  # the next request on this connection: hang up unanswered
        writer.transport.abort()

    budget = "retries: { attempts: 0, budget: { ratio: 0, min_per_second: 0.1 } }"  # one retry per 10 s
    async with ScriptedUpstream(first_request_only) as upstream:
        async with running_sidecar(tmp_path, _config(upstream.url, budget)) as sidecar:
            pool = sidecar.generation().pools["app"]
            statuses = []
            async with aiohttp.ClientSession() as session:
                for _ in range(3):
                    async with session.get(f"{proxy_url(sidecar)}/app/x") as response:
                        statuses.append(response.status)
            # 1: a fresh connection. 2: its connection is stale, repeated on a new one
            # (the budget's one retry). 3: stale again, no budget left: the 502 stands.
            assert statuses == [200, 200, 502]
            assert upstream.connections == 2  # the third request was not repeated on a third
            assert pool.retries.results == {"sent": 1, "budget_exhausted": 1}
            await eventually(lambda: pool.admission.in_flight == 0 and pool.stats().active == 0)
