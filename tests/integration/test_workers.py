"""``--workers 2``: one port, two processes, host-wide limits, signals passed on, exit codes kept."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.harness import SidecarProcess, Upstream, write_config


async def _started(sidecar: SidecarProcess, workers: int) -> list[dict[str, Any]]:
    await sidecar.wait_for_event("started", count=workers)
    started = sidecar.events("started")
    admin = next(line["admin"] for line in started if line.get("admin"))
    sidecar.admin_port = int(str(admin).rsplit(":", 1)[1])
    return started


async def test_two_workers_share_the_port_and_never_exceed_max_connections(tmp_path: Path) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.05)
        return web.Response(text="ok")

    async with Upstream(slow) as upstream:
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
        await sidecar.start()
        try:
            started = await _started(sidecar, 2)
            assert {line["worker"] for line in started} == {0, 1}
            assert len({line["pid"] for line in started}) == 2
            assert len({line["listen"] for line in started}) == 1  # one port for both

            async def one_client() -> list[int]:
                # A connection per request: SO_REUSEPORT spreads new connections.
                statuses = []
                for _ in range(4):
                    async with aiohttp.ClientSession() as client, client.get(sidecar.url + "/api/x") as response:
                        statuses.append(response.status)
                        await response.read()
                return statuses

            results = await asyncio.gather(*(one_client() for _ in range(30)))
            assert [s for r in results for s in r] == [200] * 120
            access = await sidecar.wait_for_event("access", count=120)
            assert access
            served_by = {line["worker"] for line in sidecar.events("access")}
            assert served_by == {0, 1}, "both workers must serve requests"
            # Host-wide cap: 4 across both workers (2 each), never more.
            assert 1 <= upstream.max_open <= 4
            assert len(upstream.requests) == 120

            # Each worker has its own admin listener showing its share of the
            # host-wide limits; together they account for every request.
            admins = sorted({(line["worker"], line["admin"]) for line in started})
            assert len({admin for _, admin in admins}) == 2, admins
            served = 0
            async with aiohttp.ClientSession() as client:
                for index, admin in admins:
                    async with client.get(f"http://{admin}/pools") as response:
                        pools = await response.json()
                    assert pools["worker"] == {"index": index, "of": 2}
                    limits = pools["upstreams"]["api"]["limits"]
                    assert limits["max_connections"] == 2
                    assert limits["max_concurrent_requests"] == 2
                    assert limits["max_pending"] == 250
                    served += pools["upstreams"]["api"]["totals"]["requests"]
            assert served == 120
        finally:
            sidecar.signal(signal.SIGTERM)
            code = await sidecar.wait(30)
        assert code == 0
        assert len(sidecar.events("stopped")) == 2  # SIGTERM reached both workers, both drained


async def test_sighup_reaches_every_worker(tmp_path: Path) -> None:
    async with Upstream() as upstream:
        config = write_config(tmp_path, f"upstreams:\n  api:\n    url: {upstream.url}\n")
        sidecar = SidecarProcess(config, extra_args=["--workers", "2"])
        await sidecar.start()
        try:
            await _started(sidecar, 2)
            sidecar.signal(signal.SIGHUP)
            await sidecar.wait_for_event("config_reloaded", count=2)
            assert {line["worker"] for line in sidecar.events("config_reloaded")} == {0, 1}
        finally:
            await sidecar.stop()
        assert sidecar.proc is not None and sidecar.proc.returncode == 0


async def test_a_worker_that_dies_stops_the_others_and_the_exit_code_says_so(tmp_path: Path) -> None:
    async with Upstream() as upstream:
        config = write_config(tmp_path, f"upstreams:\n  api:\n    url: {upstream.url}\n")
        sidecar = SidecarProcess(config, extra_args=["--workers", "2"])
        await sidecar.start()
        try:
            started = await _started(sidecar, 2)
            os.kill(started[0]["pid"], signal.SIGKILL)
            code = await sidecar.wait(30)
        finally:
            await sidecar.stop()
        assert code == 1
        assert len(sidecar.events("stopped")) == 1  # the survivor drained and stopped
        for line in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(line["pid"], 0)
                raise AssertionError(f"worker {line['pid']} outlived the parent")


def test_fewer_connections_than_workers_exits_2_naming_the_field(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, "upstreams:\n  api:\n    url: http://127.0.0.1:9\n    limits: { max_connections: 1 }\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "-c", str(config), "--workers", "2", "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "upstreams.api.limits.max_connections" in done.stderr
    assert "must be at least workers (2)" in done.stderr
