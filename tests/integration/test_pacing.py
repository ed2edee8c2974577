"""Upstream pacing end to end: real sidecar, real upstream, real sockets.

The upstream records when each request reached it, so "the upstream received
nothing during the pause" is checked on its side, not inferred.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sidecar.policy.pacing import PacingStage, pacing_stage
from sidecar.pools import UpstreamPool
from sidecar.server import Sidecar
from tests.support.sidecar import admin_url, proxy_url, running_sidecar
from tests.support.upstreams import Upstream


class Scripted:
    """An upstream handler: the n-th request (from 1) gets ``answer(n, request)``; times recorded."""

    def __init__(self, answer: Callable[[int, web.Request], web.Response]) -> None:
        self.answer = answer
        self.times: list[float] = []

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        self.times.append(time.monotonic())
        return self.answer(len(self.times), request)


def config(url: str, pacing: str = "", timeouts: str = "") -> str:
    return f"""
    upstreams:
      api:
        url: {url}
        pacing: {{ {pacing} }}
        timeouts: {{ {timeouts} }}
    """


def only_pool(sidecar: Sidecar) -> UpstreamPool:
    (pool,) = sidecar.generation().pools.values()
    return pool


def stage_of(sidecar: Sidecar) -> PacingStage:
    stage = pacing_stage(only_pool(sidecar).stages.stages)
    assert stage is not None
    return stage


async def quiet(sidecar: Sidecar) -> None:
    """Back at rest: no slot, no waiter, nothing sleeping in pacing (bounded wait)."""
    pool, stage = only_pool(sidecar), stage_of(sidecar)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        held = (pool.admission.in_flight, pool.admission.pending, pool.active, pool.stats().active)
        if held == (0, 0, 0, 0) and stage.waiting == 0 and stage.scheduled == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(
        f"not at rest: {pool.admission.in_flight=} {pool.admission.pending=} {stage.waiting=} {stage.scheduled=}"
    )


async def get(
    session: aiohttp.ClientSession, sidecar: Sidecar, headers: dict[str, str] | None = None
) -> aiohttp.ClientResponse:
    async with session.get(f"{proxy_url(sidecar)}/api/x", headers=headers) as response:
        await response.read()
        return response


def ok(_: int, __: web.Request) -> web.Response:
    return web.Response(text="ok")


def limited_first(headers: dict[str, str], status: int = 429) -> Callable[[int, web.Request], web.Response]:
    def answer(n: int, _: web.Request) -> web.Response:
        if n == 1:
            return web.Response(status=status, text="slow down", headers=headers)
        return web.Response(text="ok")

    return answer


async def test_429_retry_after_pauses_the_upstream_under_a_flood(tmp_path: Path) -> None:
    script = Scripted(limited_first({"Retry-After": "2"}))
    async with Upstream(script) as upstream, running_sidecar(tmp_path, config(upstream.url)) as sidecar:
        refused: list[tuple[float, str, str]] = []  # (seconds it took, code, Retry-After)
        statuses: list[int] = []
        stop = time.monotonic() + 3.5

        async def caller(session: aiohttp.ClientSession) -> None:
            while time.monotonic() < stop:
                started = time.monotonic()
                response = await get(session, sidecar)
                statuses.append(response.status)
                if response.headers.get("X-Sidecar-Error"):
                    refused.append(
                        (
                            time.monotonic() - started,
                            response.headers["X-Sidecar-Error"],
                            response.headers["Retry-After"],
                        )
                    )
                    await asyncio.sleep(0.05)

        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(caller(session) for _ in range(50)))
        paused_at = script.times[0]
        during = [t - paused_at for t in script.times if paused_at + 0.2 < t < paused_at + 1.9]
        assert during == []
        assert any(t > paused_at + 2.0 for t in script.times), "traffic resumes after the pause"
        assert 429 in statuses and 200 in statuses
        assert refused and {code for _, code, _ in refused} == {"upstream_rate_limited"}
        assert {retry_after for _, _, retry_after in refused} <= {"1", "2"}
        # Refused at once (1.5 s of pause left is more than timeouts.pool's 1 s), not waited out.
        assert min(took for took, _, _ in refused) < 0.5
        await quiet(sidecar)
        async with aiohttp.ClientSession() as session, session.get(f"{admin_url(sidecar)}/metrics") as response:
            text = await response.text()
        assert 'sidecar_rejected_requests_total{reason="upstream_rate_limited",upstream="api"}' in text


async def test_the_signal_carrying_response_reaches_its_caller_unchanged(tmp_path: Path) -> None:
    headers = {"Retry-After": "30", "RateLimit": '"default";r=0;t=30', "X-Custom": "kept"}
    async with (
        Upstream(Scripted(limited_first(headers))) as upstream,
        running_sidecar(tmp_path, config(upstream.url)) as sidecar,
    ):
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{proxy_url(sidecar)}/api/x") as response:
                assert response.status == 429
                assert await response.text() == "slow down"
                assert response.headers["Retry-After"] == "30"
                assert response.headers["RateLimit"] == '"default";r=0;t=30'
                assert response.headers["X-Custom"] == "kept"
                assert "X-Sidecar-Error" not in response.headers
            second = await get(session, sidecar)
        assert second.status == 429 and second.headers["X-Sidecar-Error"] == "upstream_rate_limited"
        assert 29 <= int(second.headers["Retry-After"]) <= 30
        assert len(upstream.requests) == 1


async def test_retry_after_http_date(tmp_path: Path) -> None:
    when = email.utils.formatdate(time.time() + 3, usegmt=True)
    async with (
        Upstream(Scripted(limited_first({"Retry-After": when}))) as upstream,
        running_sidecar(tmp_path, config(upstream.url, timeouts="pool: 100ms")) as sidecar,
    ):
        async with aiohttp.ClientSession() as session:
            assert (await get(session, sidecar)).status == 429
            second = await get(session, sidecar)
        assert second.headers["X-Sidecar-Error"] == "upstream_rate_limited"
        assert 1 <= int(second.headers["Retry-After"]) <= 3
        assert len(upstream.requests) == 1


async def test_503_retry_after_is_upstream_paused(tmp_path: Path) -> None:
    async with (
        Upstream(Scripted(limited_first({"Retry-After": "20"}, status=503))) as upstream,
        running_sidecar(tmp_path, config(upstream.url)) as sidecar,
    ):
        async with aiohttp.ClientSession() as session:
            assert (await get(session, sidecar)).status == 503
            second = await get(session, sidecar)
        assert second.status == 503 and second.headers["X-Sidecar-Error"] == "upstream_paused"
        assert 19 <= int(second.headers["Retry-After"]) <= 20
        assert len(upstream.requests) == 1


def _epoch_in(seconds: int) -> str:
    return str(int(time.time()) + seconds)


QUOTA_FAMILIES = {
    "ietf": lambda: {"RateLimit-Policy": '"default";q=100;w=60', "RateLimit": '"default";r=3;t=30'},
    "draft-06": lambda: {"RateLimit-Limit": "100", "RateLimit-Remaining": "3", "RateLimit-Reset": "30"},
    "github-epoch": lambda: {
        "X-RateLimit-Limit": "60",
        "X-RateLimit-Remaining": "3",
        "X-RateLimit-Reset": _epoch_in(30),
    },
    "x-delta": lambda: {"X-RateLimit-Limit": "60", "X-RateLimit-Remaining": "3", "X-RateLimit-Reset": "30"},
    "openai": lambda: {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "3",
        "x-ratelimit-reset-requests": "30s",
    },
}


@pytest.mark.parametrize("family", sorted(QUOTA_FAMILIES))
async def test_quota_remaining_3_allows_3_more_requests(tmp_path: Path, family: str) -> None:
    headers = QUOTA_FAMILIES[family]()

    def answer(n: int, _: web.Request) -> web.Response:
        return web.Response(text="ok", headers=headers if n == 1 else {})

    async with (
        Upstream(Scripted(answer)) as upstream,
        running_sidecar(tmp_path, config(upstream.url, timeouts="pool: 100ms")) as sidecar,
    ):
        async with aiohttp.ClientSession() as session:
            assert (await get(session, sidecar)).status == 200
            results = await asyncio.gather(*(get(session, sidecar) for _ in range(10)))
        codes = sorted(r.headers.get("X-Sidecar-Error", str(r.status)) for r in results)
        assert codes == ["200"] * 3 + ["upstream_rate_limited"] * 7
        assert len(upstream.requests) == 4
        async with aiohttp.ClientSession() as session, session.get(f"{admin_url(sidecar)}/pools") as response:
            pacing = (await response.json())["upstreams"]["api"]["pacing"]
        assert pacing["remaining"] == 0 and pacing["source"] == "quota" and 25 < pacing["reset_s"] <= 30
        await quiet(sidecar)


async def test_a_request_queued_during_a_short_pause_goes_after_it(tmp_path: Path) -> None:
    async with (
        Upstream(Scripted(limited_first({"Retry-After": "1"}))) as upstream,
        running_sidecar(tmp_path, config(upstream.url, timeouts="pool: 5s")) as sidecar,
    ):
        async with aiohttp.ClientSession() as session:
            assert (await get(session, sidecar)).status == 429
            started = time.monotonic()
            response = await get(session, sidecar)
            took = time.monotonic() - started
        assert response.status == 200
        assert 0.6 <= took <= 3.0
        assert len(upstream.requests) == 2
        await quiet(sidecar)


async def test_max_pause_caps_a_long_retry_after(tmp_path: Path) -> None:
    async with (
        Upstream(Scripted(limited_first({"Retry-After": "3600"}))) as upstream,
        running_sidecar(tmp_path, config(upstream.url, pacing="max_pause: 1s", timeouts="pool: 5s")) as sidecar,
    ):
        async with aiohttp.ClientSession() as session:
            assert (await get(session, sidecar)).status == 429
            started = time.monotonic()
            assert (await get(session, sidecar)).status == 200
        assert time.monotonic() - started <= 3.0


async def test_partition_by_pauses_one_key_only(tmp_path: Path) -> None:
    def answer(_: int, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") == "Bearer A":
            return web.Response(status=429, headers={"Retry-After": "30"})
        return web.Response(text="ok")

    async with (
        Upstream(Scripted(answer)) as upstream,
        running_sidecar(tmp_path, config(upstream.url, pacing="partition_by: Authorization")) as sidecar,
    ):
        a, b = {"Authorization": "Bearer A"}, {"Authorization": "Bearer B"}
        async with aiohttp.ClientSession() as session:
            assert (await get(session, sidecar, a)).status == 429
            refused = await get(session, sidecar, a)
            assert refused.headers["X-Sidecar-Error"] == "upstream_rate_limited"
            for _ in range(3):
                assert (await get(session, sidecar, b)).status == 200
            assert (await get(session, sidecar)).status == 200  # no header: its own partition
            async with session.get(f"{admin_url(sidecar)}/pools") as response:
                body = await response.text()
        assert len(upstream.requests) == 5
        assert "Bearer" not in body  # values are never exposed


async def test_learn_false_forwards_everything(tmp_path: Path) -> None:
    def answer(_: int, __: web.Request) -> web.Response:
        return web.Response(status=429, headers={"Retry-After": "30", "RateLimit": '"d";r=0;t=30'})

    async with (
        Upstream(Scripted(answer)) as upstream,
        running_sidecar(tmp_path, config(upstream.url, pacing="learn: false")) as sidecar,
    ):
        async with aiohttp.ClientSession() as session:
            results = [await get(session, sidecar) for _ in range(5)]
        assert [r.status for r in results] == [429] * 5
        assert not any("X-Sidecar-Error" in r.headers for r in results)
        assert len(upstream.requests) == 5


async def test_malformed_values_cause_no_pause_and_no_error(tmp_path: Path) -> None:
    bad = [
        (429, {"Retry-After": "soon"}),
        (503, {"Retry-After": "-1"}),
        (200, {"RateLimit": '"default";r=abc;t=30'}),
        (200, {"X-RateLimit-Remaining": "lots", "X-RateLimit-Reset": "60"}),
        (200, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6 minutes"}),
    ]

    def answer(n: int, _: web.Request) -> web.Response:
        status, headers = bad[(n - 1) % len(bad)]
        return web.Response(status=status, headers=headers, text="from upstream")

    async with Upstream(Scripted(answer)) as upstream, running_sidecar(tmp_path, config(upstream.url)) as sidecar:
        async with aiohttp.ClientSession() as session:
            results = [await get(session, sidecar) for _ in range(2 * len(bad))]
            async with session.get(f"{admin_url(sidecar)}/metrics") as response:
                text = await response.text()
        assert [r.status for r in results] == [status for status, _ in bad] * 2
        assert not any("X-Sidecar-Error" in r.headers for r in results)
        assert len(upstream.requests) == 2 * len(bad)
        assert 'sidecar_pacing_signals_ignored_total{field="retry-after",upstream="api"} 4.0' in text
        assert 'sidecar_pacing_signals_ignored_total{field="ratelimit",upstream="api"} 2.0' in text


async def test_waiters_cancelled_during_a_pause_leave_nothing_behind(tmp_path: Path) -> None:
    async with (
        Upstream(Scripted(limited_first({"Retry-After": "2"}))) as upstream,
        running_sidecar(tmp_path, config(upstream.url, timeouts="pool: 5s")) as sidecar,
    ):
        async with aiohttp.ClientSession() as session:
            assert (await get(session, sidecar)).status == 429
            tasks = [asyncio.create_task(get(session, sidecar)) for _ in range(30)]
            stage = stage_of(sidecar)
            deadline = time.monotonic() + 5
            while stage.waiting < 30 and time.monotonic() < deadline:  # noqa: ASYNC110 - polling a counter
                await asyncio.sleep(0.02)
            assert stage.waiting == 30
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await quiet(sidecar)
        assert len(upstream.requests) == 1


async def test_spread_spaces_a_learned_budget_until_its_reset(tmp_path: Path) -> None:
    def answer(n: int, _: web.Request) -> web.Response:
        return web.Response(text="ok", headers={"RateLimit": '"default";r=4;t=2'} if n == 1 else {})

    script = Scripted(answer)
    async with (
        Upstream(script) as upstream,
        running_sidecar(tmp_path, config(upstream.url, pacing="spread: true", timeouts="pool: 5s")) as sidecar,
    ):
        async with aiohttp.ClientSession() as session:
            assert (await get(session, sidecar)).status == 200
            results = await asyncio.gather(*(get(session, sidecar) for _ in range(4)))
        assert [r.status for r in results] == [200] * 4
        gaps = [b - a for a, b in zip(script.times[1:], script.times[2:], strict=False)]
        # One request every t / r = 0.5 s, not four at once.
        assert len(gaps) == 3 and all(0.3 <= gap <= 1.5 for gap in gaps), gaps
        await quiet(sidecar)


async def test_after_a_pause_one_request_goes_first(tmp_path: Path) -> None:
    answers = limited_first({"Retry-After": "1"})

    async def handler(request: web.Request) -> web.StreamResponse:
        script.times.append(time.monotonic())
        if len(script.times) == 2:
            await asyncio.sleep(0.2)  # the first request after the pause takes a while
        return answers(len(script.times), request)

    script = Scripted(answers)
    async with (
        Upstream(handler) as upstream,
        running_sidecar(tmp_path, config(upstream.url, timeouts="pool: 5s")) as sidecar,
    ):
        async with aiohttp.ClientSession() as session:
            assert (await get(session, sidecar)).status == 429
            results = await asyncio.gather(*(get(session, sidecar) for _ in range(20)))
        assert [r.status for r in results] == [200] * 20
        probe, rest = script.times[1], script.times[2:]
        assert len(rest) == 19
        assert min(rest) - probe >= 0.15  # the others waited for the probe's answer
        await quiet(sidecar)


async def test_paused_and_quota_gauges(tmp_path: Path) -> None:
    def answer(n: int, _: web.Request) -> web.Response:
        if n == 1:
            return web.Response(text="ok", headers={"X-RateLimit-Remaining": "7", "X-RateLimit-Reset": "60"})
        return web.Response(status=503, headers={"Retry-After": "30"})

    async with Upstream(Scripted(answer)) as upstream, running_sidecar(tmp_path, config(upstream.url)) as sidecar:
        async with aiohttp.ClientSession() as session:
            await get(session, sidecar)
            async with session.get(f"{admin_url(sidecar)}/metrics") as response:
                before = await response.text()
            await get(session, sidecar)
            async with session.get(f"{admin_url(sidecar)}/metrics") as response:
                after = await response.text()
            async with session.get(f"{admin_url(sidecar)}/pools") as response:
                pacing = (await response.json())["upstreams"]["api"]["pacing"]
        assert 'sidecar_upstream_quota_remaining{upstream="api"} 7.0' in before
        assert 'sidecar_upstream_paused{upstream="api"} 0.0' in before
        assert 'sidecar_upstream_paused{upstream="api"} 1.0' in after
        assert "sidecar_upstream_quota_remaining{" not in after  # a pause forgets the budget: unknown
        assert pacing["source"] == "503" and 25 < pacing["paused_s"] <= 30 and pacing["remaining"] is None


async def test_waiters_keep_their_place_in_the_queue_across_a_pause(tmp_path: Path) -> None:
    def answer(n: int, _: web.Request) -> web.Response:
        if n == 1:
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response(text="ok", headers={"RateLimit": '"default";r=3;t=30'} if n == 2 else {})

    async with (
        Upstream(Scripted(answer)) as upstream,
        running_sidecar(tmp_path, config(upstream.url, timeouts="pool: 5s")) as sidecar,
    ):
        async with aiohttp.ClientSession() as session:
            assert (await get(session, sidecar)).status == 429
            tasks = []
            for number in range(12):
                tasks.append(asyncio.create_task(get(session, sidecar, {"X-N": str(number)})))
                await asyncio.sleep(0.02)  # a known order of arrival
            results = await asyncio.gather(*tasks)
        # The probe and the budget of 3 it learned go to the first four in line.
        assert [r.status for r in results] == [200] * 4 + [429] * 8
        arrived = [dict(recorded.headers).get("X-N") for recorded in upstream.requests[1:]]
        assert arrived == ["0", "1", "2", "3"]
        await quiet(sidecar)


async def test_a_storm_with_cancellations_across_pause_and_probe_leaves_nothing_behind(tmp_path: Path) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        script.times.append(time.monotonic())
        if len(script.times) == 1:
            return web.Response(status=429, headers={"Retry-After": "1"})
        await asyncio.sleep(0.05)
        return web.Response(text="ok")

    script = Scripted(ok)
    rng = random.Random(7)
    async with (
        Upstream(handler) as upstream,
        running_sidecar(tmp_path, config(upstream.url, timeouts="pool: 5s")) as sidecar,
    ):
        async with aiohttp.ClientSession() as session:
            assert (await get(session, sidecar)).status == 429
            tasks = [asyncio.create_task(get(session, sidecar)) for _ in range(100)]
            doomed = rng.sample(tasks, 50)

            async def cancel_later(task: asyncio.Task[aiohttp.ClientResponse]) -> None:
                await asyncio.sleep(rng.uniform(0.0, 1.3))  # during the pause and around its end
                task.cancel()

            await asyncio.gather(*(cancel_later(task) for task in doomed))
            results = await asyncio.gather(*tasks, return_exceptions=True)
        survivors = [r for task, r in zip(tasks, results, strict=True) if task not in doomed]
        assert all(isinstance(r, aiohttp.ClientResponse) and r.status == 200 for r in survivors)
        await quiet(sidecar)
        assert upstream.requests
