"""``workers: N``: one admin endpoint for the host, served by the supervisor.

The workers' own admin apps sit on private Unix sockets that only the
supervisor talks to; the supervisor sums their metrics and pools, is ready
when every worker is, and passes reloads (and the admin token) to all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.support.metrics import parse_metrics
from tests.support.rest import eventually
from tests.support.sidecar import SidecarProcess
from tests.support.upstreams import Upstream
from tests.support.yaml import write_config

REPO = Path(__file__).resolve().parents[2]


async def _start(sidecar: SidecarProcess, workers: int = 2) -> list[dict[str, Any]]:
    await sidecar.start()
    await sidecar.wait_for_event("started", count=workers)
    return sidecar.events("started")


def _listening_ports(pids: list[int]) -> set[int]:
    """TCP ports in LISTEN state held by any of ``pids`` (read from /proc, as `ss -ltnp` does)."""
    inodes: set[str] = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(table).read_text().splitlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def _get(client: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with client.get(url, **kwargs) as response:
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


def _requests_total(text: str) -> float:
    samples = parse_metrics(text)
    return sum(value for (name, _), value in samples.items() if name == "sidecar_requests_total")


async def test_two_workers_one_admin_listener_whose_metrics_and_pools_sum_both(tmp_path: Path) -> None:
    async with Upstream() as upstream:
        config = write_config(
            tmp_path,
            f"""
            upstreams:
              api:
                url: {upstream.url}
                limits: {{ max_connections: 4, max_pending: 500 }}
                timeouts: {{ pool: 30s }}
            """,
        )
        sidecar = SidecarProcess(config, extra_args=["--workers", "2"])
        try:
            started = await _start(sidecar)
            assert sidecar.admin_port, "the supervisor logs the host's admin address"
            assert [line["admin"] for line in started] == [None, None], "no per-worker admin port"
            pids = [line["pid"] for line in started]
            assert sidecar.proc is not None
            assert _listening_ports([sidecar.proc.pid, *pids]) == {sidecar.proxy_port, sidecar.admin_port}

            sent = 60
            async with aiohttp.ClientSession() as client:

                async def one() -> int:
                    # A connection per request: SO_REUSEPORT spreads new connections.
                    async with aiohttp.ClientSession() as fresh, fresh.get(sidecar.url + "/api/x") as response:
                        await response.read()
                        return response.status

                assert await asyncio.gather(*(one() for _ in range(sent))) == [200] * sent
                await sidecar.wait_for_event("access", count=sent)
                assert {line["worker"] for line in sidecar.events("access")} == {0, 1}

                status, text = await _get(client, sidecar.admin_url + "/metrics")
                assert status == 200
                assert _requests_total(text) == sent
                samples = parse_metrics(text)
                assert samples[("sidecar_max_connections", frozenset({("upstream", "api")}))] == 4  # host total
                assert samples[("sidecar_build_info", frozenset({("version", started[0]["version"])}))] == 1
                assert samples[("sidecar_worker_up", frozenset({("worker", "0")}))] == 1
                assert samples[("sidecar_worker_up", frozenset({("worker", "1")}))] == 1

                status, pools = await _get(client, sidecar.admin_url + "/pools")
                assert status == 200
                api = pools["upstreams"]["api"]
                assert api["totals"]["requests"] == sent
                assert api["limits"]["max_connections"] == 4
                assert api["limits"]["max_concurrent_requests"] == 4
                assert api["limits"]["max_pending"] == 500
                assert api["limits"]["pool_timeout_s"] == 30.0  # not a sum
                assert [w["index"] for w in pools["workers"]] == [0, 1]
                assert all(w["up"] for w in pools["workers"])
                per_worker = [w["upstreams"]["api"] for w in pools["workers"]]
                assert [w["limits"]["max_connections"] for w in per_worker] == [2, 2]
                assert sum(w["totals"]["requests"] for w in per_worker) == sent
                assert sum(w["connections"]["opened_total"] for w in per_worker) == api["connections"]["opened_total"]

                await eventually(lambda: _status(client, sidecar.admin_url + "/readyz", 200), 15)
                assert (await _get(client, sidecar.admin_url + "/healthz"))[0] == 200
                status, view = await _get(client, sidecar.admin_url + "/config")
                assert status == 200
                assert view["bound"]["admin"] == f"127.0.0.1:{sidecar.admin_port}"
                assert view["bound"]["listen"] == f"127.0.0.1:{sidecar.proxy_port}"
        finally:
            await sidecar.stop()
        assert sidecar.proc is not None and sidecar.proc.returncode == 0


async def test_readyz_is_503_while_a_worker_does_not_answer_and_scrapes_do_not_hang(tmp_path: Path) -> None:
    async with Upstream() as upstream:
        config = write_config(tmp_path, f"upstreams:\n  api:\n    url: {upstream.url}\n")
        sidecar = SidecarProcess(config, extra_args=["--workers", "2"], new_session=True)
        stuck = 0
        try:
            started = await _start(sidecar)
            async with aiohttp.ClientSession() as client:
                await eventually(lambda: _status(client, sidecar.admin_url + "/readyz", 200), 15)
                for _ in range(10):  # some counts to keep while worker 0 is stopped
                    async with aiohttp.ClientSession() as fresh, fresh.get(sidecar.url + "/api/x") as response:
                        assert response.status == 200
                await sidecar.wait_for_event("access", count=10)
                _, before = await _get(client, sidecar.admin_url + "/metrics")
                assert _requests_total(before) == 10

                stuck = next(line["pid"] for line in started if line["worker"] == 0)
                os.kill(stuck, signal.SIGSTOP)
                loop = asyncio.get_running_loop()
                began = loop.time()
                status, body = await _get(client, sidecar.admin_url + "/readyz")
                assert loop.time() - began < 10, "a stopped worker must not hang the probe"
                assert status == 503
                assert body["workers"][0]["up"] is False
                assert body["workers"][1]["up"] is True

                status, pools = await _get(client, sidecar.admin_url + "/pools")
                assert status == 200
                assert [w["up"] for w in pools["workers"]] == [False, True]

                status, text = await _get(client, sidecar.admin_url + "/metrics")
                assert status == 200
                samples = parse_metrics(text)
                assert samples[("sidecar_worker_up", frozenset({("worker", "0")}))] == 0
                # The stopped worker's counters are its last known ones: a sum never goes backwards.
                assert _requests_total(text) == 10

                os.kill(stuck, signal.SIGCONT)
                stuck = 0
                await eventually(lambda: _status(client, sidecar.admin_url + "/readyz", 200), 15)
        finally:
            if stuck:
                os.kill(stuck, signal.SIGCONT)
            await sidecar.stop()
            assert sidecar.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sidecar.proc.pid, signal.SIGKILL)
        assert sidecar.proc.returncode == 0


async def _status(client: aiohttp.ClientSession, url: str, expected: int) -> bool:
    return (await _get(client, url))[0] == expected


async def test_readyz_is_503_while_the_workers_drain(tmp_path: Path) -> None:
    arrived = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        arrived.set()
        await asyncio.sleep(3)
        return web.Response(text="done")

    async with Upstream(slow) as upstream:
        config = write_config(tmp_path, f"shutdown_timeout: 20s\nupstreams:\n  api:\n    url: {upstream.url}\n")
        sidecar = SidecarProcess(config, extra_args=["--workers", "2"])
        try:
            await _start(sidecar)
            async with aiohttp.ClientSession() as client:
                await eventually(lambda: _status(client, sidecar.admin_url + "/readyz", 200), 15)
                request = asyncio.ensure_future(_get(client, sidecar.url + "/api/slow"))
                await asyncio.wait_for(arrived.wait(), 10)
                sidecar.signal(signal.SIGTERM)
                await sidecar.wait_for_event("draining", count=2)
                status, body = await _get(client, sidecar.admin_url + "/readyz")
                assert status == 503
                assert body["status"] == "draining"
                assert await asyncio.wait_for(request, 15) == (200, "done")
            assert await sidecar.wait(20) == 0
        finally:
            await sidecar.stop()


async def test_reload_reaches_every_worker(tmp_path: Path) -> None:
    async with Upstream() as upstream:
        config = write_config(tmp_path, f"upstreams:\n  api:\n    url: {upstream.url}\n")
        sidecar = SidecarProcess(config, extra_args=["--workers", "2"])
        try:
            await _start(sidecar)
            async with aiohttp.ClientSession() as client:
                await eventually(lambda: _status(client, sidecar.admin_url + "/readyz", 200), 15)
                async with client.post(sidecar.admin_url + "/reload") as response:
                    assert response.status == 200
                    body = await response.json()
            assert body["result"] == "success"
            assert [(w["index"], w["result"]) for w in body["workers"]] == [(0, "success"), (1, "success")]
            await sidecar.wait_for_event("config_reloaded", count=2)
            reloaded = sidecar.events("config_reloaded")
            assert sorted((line["worker"], line["reason"]) for line in reloaded) == [(0, "admin"), (1, "admin")]
        finally:
            await sidecar.stop()


async def test_the_admin_token_protects_the_host_endpoints(tmp_path: Path) -> None:
    async with Upstream() as upstream:
        config = write_config(
            tmp_path, f"admin: {{ listen: 127.0.0.1:0, token: s3cret }}\nupstreams:\n  api:\n    url: {upstream.url}\n"
        )
        sidecar = SidecarProcess(config, extra_args=["--workers", "2"])
        good = {"Authorization": "Bearer s3cret"}
        bad = {"Authorization": "Bearer nope"}
        try:
            await _start(sidecar)
            base = sidecar.admin_url
            async with aiohttp.ClientSession() as client:
                await eventually(lambda: _status(client, base + "/readyz", 200), 15)
                assert (await _get(client, base + "/healthz"))[0] == 200
                for path in ("/metrics", "/pools", "/config"):
                    async with client.get(base + path) as response:
                        assert response.status == 401, path
                        assert response.headers["WWW-Authenticate"] == "Bearer"
                    assert (await _get(client, base + path, headers=bad))[0] == 401, path
                    assert (await _get(client, base + path, headers=good))[0] == 200, path
                async with client.post(base + "/reload", headers=bad) as response:
                    assert response.status == 401
                async with client.post(base + "/reload", headers=good) as response:
                    assert response.status == 200
            await sidecar.wait_for_event("config_reloaded", count=2)
            assert len(sidecar.events("config_reloaded")) == 2  # only the authorised reload happened
        finally:
            await sidecar.stop()


async def test_the_shipped_config_with_two_workers_leaves_the_port_after_admin_alone(tmp_path: Path) -> None:
    # The shipped config puts admin on 8089 and the demo upstream on 8090, the
    # port a second worker's admin listener used to take.  Here: admin on a
    # free port P and the demo upstream on P + 1.
    demo, admin_port = await _upstream_after_a_free_port()
    sidecar = SidecarProcess(
        REPO / "config" / "upstreams.yaml",
        env={"DEMO_UPSTREAM_URL": demo.url},
        extra_args=["--workers", "2", "--admin", f"127.0.0.1:{admin_port}"],
    )
    try:
        await _start(sidecar)
        assert sidecar.admin_port == admin_port
        async with aiohttp.ClientSession() as client:
            for _ in range(4):
                status, text = await _get(client, sidecar.url + "/demo/hello")
                assert status == 200, text
            await eventually(lambda: _status(client, sidecar.admin_url + "/readyz", 200), 15)
            _, metrics = await _get(client, sidecar.admin_url + "/metrics")
            assert _requests_total(metrics) == 4
    finally:
        await sidecar.stop()
        await demo.stop()
    assert sidecar.proc is not None and sidecar.proc.returncode == 0


async def _upstream_after_a_free_port() -> tuple[Upstream, int]:
    """A started upstream on port P + 1 where P is free (P is returned).

    P comes from the kernel (port 0); P + 1 is bound before P is let go, so
    another process on the machine can only take P in between, not P + 1."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
            if free >= 65535:
                continue
            neighbour = socket.socket()
            try:
                neighbour.bind(("127.0.0.1", free + 1))
            except OSError:
                neighbour.close()
                continue
        neighbour.listen(128)
        return await Upstream().start(neighbour), free
    raise AssertionError("no free port below an upstream's")
