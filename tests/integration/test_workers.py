"""``--workers 2``: one port, two processes, host-wide limits, signals passed on, exit codes kept."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.workers import SUPERVISOR_MARGIN
from tests.support.sidecar import SidecarProcess
from tests.support.upstreams import Upstream
from tests.support.yaml import write_config


async def _started(sidecar: SidecarProcess, workers: int) -> list[dict[str, Any]]:
    await sidecar.wait_for_event("started", count=workers)
    started = sidecar.events("started")
    admin = next((line["admin"] for line in started if line.get("admin")), None)
    if admin is not None:  # admin.per_worker; else the supervisor's, read at start
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
            admin: {{ per_worker: true }}
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

            # admin.per_worker: each worker has its own admin listener showing its
            # share of the host-wide limits; together they account for every request.
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


# ------------------------------------------------------------ stopping workers


def _slow_upstream() -> tuple[Upstream, asyncio.Event]:
    """An upstream answering after ?delay= seconds, and an event set once a request reached it."""
    arrived = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        arrived.set()
        await asyncio.sleep(float(request.query.get("delay", "0")))
        return web.Response(text="done")

    return Upstream(slow), arrived


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by a parent that is gone) counts as gone.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


async def _stop_workers_under_load(tmp_path: Path, send: Callable[[SidecarProcess], None]) -> SidecarProcess:
    """Two workers, a 2 s request in flight through one of them, then ``send``: the request must complete."""
    upstream, arrived = _slow_upstream()
    async with upstream:
        config = write_config(tmp_path, f"shutdown_timeout: 10s\nupstreams:\n  api:\n    url: {upstream.url}\n")
        sidecar = SidecarProcess(config, extra_args=["--workers", "2"], new_session=True)
        await sidecar.start()
        try:
            started = await _started(sidecar, 2)
            async with aiohttp.ClientSession() as client:
                slow = asyncio.ensure_future(_get(client, sidecar.url + "/api/slow?delay=2"))
                await asyncio.wait_for(arrived.wait(), 10)
                signalled = time.monotonic()
                send(sidecar)
                assert await asyncio.wait_for(slow, 15) == (200, "done"), "the request in flight must be drained"
            code = await sidecar.wait(10 + 5)
            took = time.monotonic() - signalled
        finally:
            await sidecar.stop()
            assert sidecar.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sidecar.proc.pid, signal.SIGKILL)  # never leave a worker behind
    assert code == 0, sidecar.raw[-20:]
    assert took < 10, f"stopping took {took:.1f}s"
    assert sidecar.events("forced_exit") == []
    stopped = sidecar.events("stopped")
    assert sorted(line["worker"] for line in stopped) == [0, 1]
    assert all(line["drained"] for line in stopped)
    for line in started:
        assert not _alive(line["pid"]), f"worker {line['pid']} outlived the supervisor"
    return sidecar


async def _get(client: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with client.get(url) as response:
        return response.status, await response.text()


async def test_sigterm_to_the_whole_process_group_drains_once(tmp_path: Path) -> None:
    # What `timeout`, a terminal's Ctrl-C and some init systems do: every
    # worker gets the signal from the kernel and again from the supervisor.
    def to_group(sidecar: SidecarProcess) -> None:
        assert sidecar.proc is not None
        os.killpg(sidecar.proc.pid, signal.SIGTERM)

    await _stop_workers_under_load(tmp_path, to_group)


async def test_sigint_to_the_whole_process_group_drains_once(tmp_path: Path) -> None:
    def ctrl_c(sidecar: SidecarProcess) -> None:
        assert sidecar.proc is not None
        os.killpg(sidecar.proc.pid, signal.SIGINT)

    await _stop_workers_under_load(tmp_path, ctrl_c)


async def test_sigterm_to_the_supervisor_alone_drains_every_worker(tmp_path: Path) -> None:
    await _stop_workers_under_load(tmp_path, lambda sidecar: sidecar.signal(signal.SIGTERM))


@pytest.mark.slow
async def test_a_worker_that_does_not_stop_in_time_is_killed_and_the_supervisor_exits(tmp_path: Path) -> None:
    async with Upstream() as upstream:
        config = write_config(tmp_path, f"shutdown_timeout: 1s\nupstreams:\n  api:\n    url: {upstream.url}\n")
        sidecar = SidecarProcess(config, extra_args=["--workers", "2"], new_session=True)
        await sidecar.start()
        try:
            started = await _started(sidecar, 2)
            stuck = started[0]["pid"]
            os.kill(stuck, signal.SIGSTOP)  # it cannot drain, nor exit, until killed
            signalled = time.monotonic()
            sidecar.signal(signal.SIGTERM)
            code = await sidecar.wait(30)
            took = time.monotonic() - signalled
        finally:
            await sidecar.stop()
            assert sidecar.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sidecar.proc.pid, signal.SIGKILL)
    assert code == 1, "a worker had to be killed: not a clean shutdown"
    assert took < 1 + SUPERVISOR_MARGIN + 3, f"the supervisor took {took:.1f}s to exit"
    killed = sidecar.events("worker_killed")
    assert [line["pid"] for line in killed] == [stuck]
    assert not _alive(stuck)
    assert [line["worker"] for line in sidecar.events("stopped")] == [started[1]["worker"]]


async def test_a_second_signal_to_the_supervisor_stops_every_worker_at_once(tmp_path: Path) -> None:
    upstream, arrived = _slow_upstream()
    async with upstream:
        config = write_config(tmp_path, f"shutdown_timeout: 30s\nupstreams:\n  api:\n    url: {upstream.url}\n")
        sidecar = SidecarProcess(config, extra_args=["--workers", "2"], new_session=True)
        await sidecar.start()
        try:
            started = await _started(sidecar, 2)
            async with aiohttp.ClientSession() as client:
                slow = asyncio.ensure_future(_get(client, sidecar.url + "/api/slow?delay=60"))
                await asyncio.wait_for(arrived.wait(), 10)
                sidecar.signal(signal.SIGTERM)
                await sidecar.wait_for_event("draining", count=2)
                signalled = time.monotonic()
                sidecar.signal(signal.SIGTERM)
                code = await sidecar.wait(10)
                took = time.monotonic() - signalled
                with contextlib.suppress(aiohttp.ClientError):
                    await slow
        finally:
            await sidecar.stop()
            assert sidecar.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sidecar.proc.pid, signal.SIGKILL)
    assert code == 1
    assert took < 3, f"exit took {took:.1f}s"
    assert sidecar.events("forced_exit")
    for line in started:
        assert not _alive(line["pid"])
