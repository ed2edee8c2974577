"""The local rate limit (rate_limit: {rate, burst}) through the real sidecar on real sockets."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from sidecar.exchange import Attempt, Exchange
from sidecar.policy import Stage, Stages
from sidecar.policy.rate_limit import rate_limit_of
from tests.support.rest import eventually
from tests.support.sidecar import admin_url, proxy_url, running_sidecar
from tests.support.upstreams import Upstream


def _config(url: str, *, rate: str, burst: int, pool: str) -> str:
    return f"""
        upstreams:
          app:
            url: {url}
            limits: {{ max_connections: 50, max_pending: 500 }}
            timeouts: {{ pool: {pool} }}
            rate_limit: {{ rate: {rate}, burst: {burst} }}
        """


async def test_a_flood_gets_the_rate_and_fast_honest_refusals(tmp_path: Path) -> None:
    """10/s burst 2, 40 callers for 3 s: the upstream sees about 30 (+ the
    burst); every refusal is a fast 429 rate_limited with Retry-After >= 1."""
    async with (
        Upstream() as upstream,
        running_sidecar(tmp_path, _config(upstream.url, rate="10/s", burst=2, pool="100ms")) as sidecar,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
    ):
        pool = sidecar.generation().pools["app"]
        url = f"{proxy_url(sidecar)}/app/x"
        refusals: list[float] = []
        retry_afters: set[int] = set()
        ok = 0
        end = time.monotonic() + 3.0

        async def caller() -> None:
            nonlocal ok
            while time.monotonic() < end:
                started = time.monotonic()
                async with session.get(url) as response:
                    await response.read()
                    if response.status == 200:
                        ok += 1
                        continue
                    assert response.status == 429, response.status
                    assert response.headers["X-Sidecar-Error"] == "rate_limited"
                    refusals.append(time.monotonic() - started)
                    retry_afters.add(int(response.headers["Retry-After"]))
                await asyncio.sleep(0.02)  # a caller that backs off a little, so the machine is not only us

        await asyncio.gather(*(caller() for _ in range(40)))
        received = len(upstream.requests)
        assert received == ok
        assert 25 <= received <= 35 + 2, received
        assert len(refusals) > 100
        assert min(retry_afters) >= 1
        refusals.sort()
        assert refusals[len(refusals) // 2] < 0.1, refusals[len(refusals) // 2]  # at once, not waited out
        await eventually(lambda: pool.admission.in_flight == 0 and pool.stats().active == 0)
        limiter = rate_limit_of(pool.stages)
        assert limiter is not None and limiter.waiting == 0
        assert 'reason="rate_limited"' in sidecar.metrics.render().decode()


async def test_a_burst_within_the_wait_allowance_waits_and_all_succeed(tmp_path: Path) -> None:
    """5/s burst 1, five at once, timeouts.pool 2 s: the tokens come within the
    allowance, so all five wait their turn (about 0.8 s for the last) and pass."""
    async with (
        Upstream() as upstream,
        running_sidecar(tmp_path, _config(upstream.url, rate="5/s", burst=1, pool="2s")) as sidecar,
        aiohttp.ClientSession() as session,
    ):
        url = f"{proxy_url(sidecar)}/app/x"
        started = time.monotonic()

        async def one() -> int:
            async with session.get(url) as response:
                return response.status

        statuses = await asyncio.gather(*(one() for _ in range(5)))
        elapsed = time.monotonic() - started
        assert statuses == [200] * 5
        assert 0.6 <= elapsed <= 2.5, elapsed
        assert len(upstream.requests) == 5
        # /pools shows the limit, the tokens now and nobody waiting.
        async with session.get(f"{admin_url(sidecar)}/pools") as response:
            entry = (await response.json())["upstreams"]["app"]["rate_limit"]
        assert entry["rate_per_s"] == 5.0 and entry["burst"] == 1 and entry["waiting"] == 0
        assert 0.0 <= entry["tokens"] <= 1.0


async def test_a_token_further_away_than_the_callers_deadline_is_refused_at_once(tmp_path: Path) -> None:
    """timeouts.pool would allow the wait, the caller's 200 ms budget does not: 429 at once."""
    async with (
        Upstream() as upstream,
        running_sidecar(tmp_path, _config(upstream.url, rate="1/s", burst=1, pool="5s")) as sidecar,
        aiohttp.ClientSession() as session,
    ):
        url = f"{proxy_url(sidecar)}/app/x"
        async with session.get(url) as first:
            assert first.status == 200
        started = time.monotonic()
        async with session.get(url, headers={"X-Sidecar-Timeout": "200ms"}) as second:
            elapsed = time.monotonic() - started
            assert second.status == 429
            assert second.headers["X-Sidecar-Error"] == "rate_limited"
            assert int(second.headers["Retry-After"]) >= 1
        assert elapsed < 0.15, elapsed
        assert len(upstream.requests) == 1


async def test_cancelled_token_waiters_leave_nothing_behind(tmp_path: Path) -> None:
    """Thirty callers waiting for tokens (2/s) all give up: afterwards no waiter
    is left and every reserved token is free again, so the next one comes at
    once instead of 15 s away."""
    async with (
        Upstream() as upstream,
        running_sidecar(tmp_path, _config(upstream.url, rate="2/s", burst=1, pool="30s")) as sidecar,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
    ):
        pool = sidecar.generation().pools["app"]
        limiter = rate_limit_of(pool.stages)
        assert limiter is not None
        url = f"{proxy_url(sidecar)}/app/x"

        async def one() -> int:
            async with session.get(url) as response:
                return response.status

        started = time.monotonic()
        tasks = [asyncio.ensure_future(one()) for _ in range(30)]
        await eventually(lambda: limiter.waiting >= 25)
        assert limiter.core.reserve(time.monotonic(), 0.0)[0] is False
        for task in tasks:
            task.cancel()
        cancelled_after = time.monotonic() - started
        await asyncio.gather(*tasks, return_exceptions=True)
        await eventually(lambda: limiter.waiting == 0)
        await eventually(lambda: pool.admission.in_flight == 0 and pool.stats().active == 0 and pool.active == 0)
        # Only what the rate allowed before everyone gave up reached the upstream.
        assert len(upstream.requests) <= 2 + 2 * cancelled_after
        granted, wait = limiter.core.reserve(time.monotonic(), 1.0)
        assert granted and wait <= 1.0, wait


class _RetryAfter503(Stage):
    """Stands in for a retry policy: another attempt after each 503, up to three."""

    __slots__ = ()
    name = "retry_after_503"

    def next_attempt(self, exchange: Exchange, attempt: Attempt) -> float | None:
        return 0.0 if attempt.status == 503 and attempt.number < 3 else None


async def test_every_attempt_takes_a_token_retries_included(tmp_path: Path) -> None:
    """2/s burst 1 with a retry on 503: the retry waits for its own token (about
    0.5 s); with the allowance too short for it, no retry is made and the caller
    gets the last answer (the upstream's 503), not the limit's refusal."""
    answers = iter([503, 200, 503, 503])

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=next(answers), text="attempt")

    async with (
        Upstream(handler) as upstream,
        running_sidecar(tmp_path, _config(upstream.url, rate="2/s", burst=1, pool="2s")) as sidecar,
        aiohttp.ClientSession() as session,
    ):
        pool = sidecar.generation().pools["app"]
        pool.stages = Stages([*pool.stages.stages, _RetryAfter503()])
        started = time.monotonic()
        async with session.get(f"{proxy_url(sidecar)}/app/x") as response:
            assert response.status == 200
        assert 0.4 <= time.monotonic() - started <= 2.0
        assert len(upstream.requests) == 2
        await asyncio.sleep(0.6)  # the bucket (one token) is full again
        # The first attempt takes the token; the retry's is 0.5 s away, past a 200 ms budget.
        async with session.get(f"{proxy_url(sidecar)}/app/y", headers={"X-Sidecar-Timeout": "200ms"}) as response:
            assert response.status == 503
            assert "X-Sidecar-Error" not in response.headers  # the upstream's own answer
        assert len(upstream.requests) == 3
        await eventually(lambda: pool.admission.in_flight == 0 and pool.stats().active == 0)
