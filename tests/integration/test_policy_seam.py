"""The policy seam through the real sidecar: one config snapshot per request, and
a stage added to an upstream's stack (the supported hook) without touching the
request path."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from aiohttp import web

from sidecar.exchange import Attempt, Exchange
from sidecar.policy import Stage, Stages
from tests.support.rest import eventually
from tests.support.sidecar import proxy_url, running_sidecar
from tests.support.upstreams import Upstream
from tests.support.yaml import write_config


def _config(upstream_url: str, *, max_request_body: str) -> str:
    return f"""
        inbound: {{ max_request_body: {max_request_body} }}
        upstreams:
          app:
            url: {upstream_url}
            limits: {{ max_connections: 1, max_concurrent_requests: 1, max_pending: 4 }}
            timeouts: {{ pool: 10s }}
        """


async def test_a_reload_while_a_request_waits_does_not_change_the_config_it_sees(tmp_path: Path) -> None:
    """Routed under a 1 KiB body limit, admitted after a reload to 10 bytes: the
    request is judged by the config it was routed under, not by a mix of two."""
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/hold":
            await release.wait()
        return web.Response(text="ok")

    async with Upstream(handler) as upstream:
        path = write_config(tmp_path, _config(upstream.url, max_request_body="1KiB"))
        async with running_sidecar(tmp_path, _config(upstream.url, max_request_body="1KiB")) as sidecar:
            pool = sidecar.generation().pools["app"]
            async with aiohttp.ClientSession() as session:
                base = proxy_url(sidecar)
                holder = asyncio.ensure_future(session.get(f"{base}/app/hold"))
                await eventually(lambda: pool.admission.in_flight == 1)

                async def chunked_body() -> object:
                    yield b"x" * 100  # over the new limit, under the old one

                waiter = asyncio.ensure_future(session.post(f"{base}/app/upload", data=chunked_body()))
                await eventually(lambda: pool.admission.pending == 1)

                path.write_text(_config(upstream.url, max_request_body="10"))
                result = await sidecar.reload("test")
                assert result.changed == ()  # the upstream is unchanged: the same pool serves on
                assert sidecar.generation().inbound.max_request_body == 10

                release.set()
                async with await holder as held:
                    assert held.status == 200
                async with await waiter as answer:
                    assert answer.status == 200, await answer.text()
                # A request routed after the reload gets the new limit.
                async with session.post(f"{base}/app/upload", data=b"x" * 100) as late:
                    assert late.status == 413
            await eventually(lambda: pool.admission.in_flight == 0 and pool.stats().active == 0)
            assert pool.admission.pending == 0


class _RetryOnce503(Stage):
    """A stage a future retry policy could be: one more attempt after a 503."""

    __slots__ = ("observed", "released")
    name = "retry_once_503"

    def __init__(self) -> None:
        self.observed: list[int | None] = []
        self.released = 0

    def release(self, exchange: Exchange) -> None:
        self.released += 1

    def observe(self, exchange: Exchange, attempt: Attempt) -> None:
        self.observed.append(attempt.status)

    def next_attempt(self, exchange: Exchange, attempt: Attempt) -> float | None:
        return 0.01 if attempt.status == 503 and attempt.number == 1 else None


async def test_a_stage_added_to_the_stack_shapes_the_attempts(tmp_path: Path) -> None:
    answers = iter([503, 200])

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=next(answers), text="attempt")

    async with Upstream(handler) as upstream:
        async with running_sidecar(tmp_path, _config(upstream.url, max_request_body="1MiB")) as sidecar:
            pool = sidecar.generation().pools["app"]
            retry = _RetryOnce503()
            pool.stages = Stages([*pool.stages.stages, retry])
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{proxy_url(sidecar)}/app/x") as response:
                    assert response.status == 200
            assert retry.observed == [503, 200]
            assert retry.released == 1
            assert len(upstream.requests) == 2
            # A request body is kept (up to retries.max_body) and sent again whole.
            answers = iter([503, 200])
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{proxy_url(sidecar)}/app/x", data=b"body") as response:
                    assert response.status == 200
            assert retry.observed[-2:] == [503, 200] and retry.released == 2
            assert [request.body for request in upstream.requests[-2:]] == [b"body", b"body"]
            # One over max_body is never repeated, whichever stage asks: its bytes are gone once sent.
            answers = iter([503, 200])
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{proxy_url(sidecar)}/app/x", data=b"x" * 70000) as response:
                    assert response.status == 503
            assert retry.observed[-1] == 503 and retry.released == 3
            assert len(upstream.requests) == 5
            await eventually(lambda: pool.admission.in_flight == 0 and pool.stats().active == 0)
