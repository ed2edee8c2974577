"""Slow clients: a caller that trickles its headers or its body is cut off,
and hundreds of them do not stop anyone else from being served."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import os
import re
import resource
import shutil
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.rest import assert_at_rest
from tests.support.sidecar import SidecarProcess, running_sidecar
from tests.support.upstreams import ScriptedUpstream, Upstream
from tests.support.wire import raw_exchange, requests_in, status_of
from tests.support.yaml import one_upstream, write_config


def _config(url: str, **inbound: str) -> str:
    return one_upstream(url, top={"inbound": inbound})


async def _closed_after(reader: asyncio.StreamReader, limit: float) -> float:
    """Seconds until the peer closes the connection (fails past ``limit``)."""
    started = time.monotonic()
    async with asyncio.timeout(limit):
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
    return time.monotonic() - started


async def test_silent_connection_is_closed_after_header_timeout(tmp_path: Path) -> None:
    async with (
        ScriptedUpstream() as upstream,
        running_sidecar(tmp_path, _config(upstream.url, header_timeout="1s")) as sc,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
        waited = await _closed_after(reader, 10)
        writer.close()
        assert 0.8 <= waited < 5
        assert 'sidecar_client_errors_total{kind="header_timeout"} 1.0' in sc.metrics.render().decode()


async def test_trickled_headers_do_not_extend_the_deadline(tmp_path: Path) -> None:
    async with (
        ScriptedUpstream() as upstream,
        running_sidecar(tmp_path, _config(upstream.url, header_timeout="1s")) as sc,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
        writer.write(b"GET /api/x HTTP/1.1\r\nHost: a\r\n")

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for i in range(100):
                    writer.write(b"X-%d: v\r\n" % i)
                    await writer.drain()
                    await asyncio.sleep(0.1)

        trickler = asyncio.create_task(trickle())
        waited = await _closed_after(reader, 10)
        trickler.cancel()
        writer.close()
        assert waited < 4, "a caller trickling header bytes kept its connection"
        assert upstream.received == []


@pytest.mark.slow
async def test_keepalive_connection_gets_a_fresh_deadline_per_request(tmp_path: Path) -> None:
    async with (
        ScriptedUpstream() as upstream,
        running_sidecar(tmp_path, _config(upstream.url, header_timeout="1s")) as sc,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
        request = b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n"
        for _ in range(2):
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\nok"), 5)
            assert status_of(head) == 200
            # Idle between requests is the keep-alive timeout's business, not the header deadline's.
            await asyncio.sleep(1.6)
        writer.write(b"GET /api/x HTTP/1.1\r\n")  # a head that never finishes
        waited = await _closed_after(reader, 10)
        writer.close()
        assert waited < 4
        assert len(requests_in(upstream.all_bytes)) == 2


async def test_stalled_body_gets_408_and_frees_its_slot(tmp_path: Path) -> None:
    async with (
        ScriptedUpstream(answer_after=b"never") as upstream,
        running_sidecar(tmp_path, _config(upstream.url, body_idle_timeout="1s")) as sc,
    ):
        started = time.monotonic()
        raw = await raw_exchange(
            sc.proxy_port, b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789", timeout=10
        )
        assert status_of(raw) == 408
        assert b"X-Sidecar-Error: request_timeout" in raw
        assert b"Connection: close" in raw
        assert time.monotonic() - started < 5
        framed = requests_in(upstream.all_bytes)
        assert [(r.method, r.complete, r.body) for r in framed] == [("POST", False, b"0123456789")]
        pool = sc.generation().pools["api"]
        await assert_at_rest(pool)
        await asyncio.sleep(0.1)
        assert pool.stats().connections == 0


async def test_slow_but_steady_body_is_not_cut(tmp_path: Path) -> None:
    """The idle timeout is per pause, not a deadline for the whole body."""
    async with Upstream() as upstream, running_sidecar(tmp_path, _config(upstream.url, body_idle_timeout="1s")) as sc:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
        writer.write(b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 8\r\nConnection: close\r\n\r\n")
        for byte in b"abcdefgh":
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.35)  # 8 x 0.35 s = 2.8 s in all, over the 1 s idle limit
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert status_of(raw) == 200
        assert upstream.requests[0].body == b"abcdefgh"


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _served_promptly(url: str, count: int, *, allowed: tuple[int, ...] = (200,)) -> list[float]:
    """Latencies of ``count`` ordinary requests, one after the other."""
    latencies = []
    async with aiohttp.ClientSession() as client:
        for _ in range(count):
            started = time.monotonic()
            async with client.get(url, timeout=aiohttp.ClientTimeout(total=10)) as response:
                assert response.status in allowed, response.status
                if response.status == 503:
                    assert int(response.headers["Retry-After"]) >= 1
                await response.read()
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.05)
    return latencies


@pytest.mark.slow
async def test_500_slowloris_connections_do_not_block_normal_requests(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    async with Upstream() as upstream:
        process = SidecarProcess(write_config(tmp_path, _config(upstream.url, header_timeout="3s")))
        await process.start()
        assert process.proc is not None
        try:
            baseline_fds = _fd_count(process.proc.pid)
            connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
            for _ in range(500):
                connections.append(await asyncio.open_connection("127.0.0.1", process.proxy_port))
            for _, writer in connections:
                writer.write(b"GET /api/slow HTTP/1.1\r\nHost: a\r\n")

            async def trickle() -> None:
                for i in range(40):
                    for _, writer in connections:
                        if not writer.is_closing():
                            writer.write(b"X-%d: v\r\n" % i)
                    await asyncio.sleep(0.25)

            trickler = asyncio.create_task(trickle())
            latencies = await _served_promptly(f"{process.url}/api/ok", 20)
            assert max(latencies) < 3.0, latencies  # generous: a loaded 2-core box
            print(
                f"under 500 slowloris connections: median {sorted(latencies)[10] * 1000:.1f} ms, "
                f"max {max(latencies) * 1000:.1f} ms"
            )

            # Every slowloris connection is closed by the sidecar, not by us.
            async def closed(reader: asyncio.StreamReader) -> bool:
                with contextlib.suppress(TimeoutError):
                    await _closed_after(reader, 10)
                    return True
                return False

            results = await asyncio.gather(*(closed(reader) for reader, _ in connections))
            trickler.cancel()
            assert all(results), f"{results.count(False)} slowloris connections stayed open"
            for _, writer in connections:
                writer.transport.abort()
            await asyncio.sleep(0.5)
            assert _fd_count(process.proc.pid) <= baseline_fds + 5
            assert not any("/api/slow" in line for line in process.raw), "a trickled request was forwarded"
            timeouts = re.search(r'sidecar_client_errors_total\{kind="header_timeout"\} (\d+)', await _metrics(process))
            assert timeouts is not None and int(timeouts.group(1)) >= 500
            assert b"Traceback" not in "\n".join(process.raw).encode()
        finally:
            await process.stop()


@pytest.mark.skipif(shutil.which("slowhttptest") is None, reason="slowhttptest not installed (.ci/run installs it)")
async def test_slowhttptest_slow_headers_leave_the_service_available(tmp_path: Path) -> None:
    """The real tool: 300 slowloris connections for 10 s; ordinary requests keep being served."""
    async with Upstream() as upstream:
        process = SidecarProcess(write_config(tmp_path, _config(upstream.url, header_timeout="2s")))
        await process.start()
        try:
            stats = await _slowhttptest(process, tmp_path, "-H", "GET", probes=15, allowed=(200,))
            assert max(row["Closed"] for row in stats) > 0, stats  # the sidecar closed them, not the tool
            assert 'sidecar_client_errors_total{kind="header_timeout"}' in await _metrics(process)
            assert b"Traceback" not in "\n".join(process.raw).encode()
        finally:
            await process.stop()


@pytest.mark.skipif(shutil.which("slowhttptest") is None, reason="slowhttptest not installed (.ci/run installs it)")
async def test_slowhttptest_slow_bodies_are_cut_and_the_pool_recovers(tmp_path: Path) -> None:
    """Slow bodies (R.U.D.Y.): a streaming proxy holds an upstream slot while a
    body streams, so an attacker with more connections than the pool has slots
    can fill it for up to body_idle_timeout per request (SECURITY.md). What
    must hold: the sidecar answers at once (200, or 503 + Retry-After, never a
    hang), cuts every stalled body, and the pool is whole again afterwards."""
    async with Upstream() as upstream:
        process = SidecarProcess(
            write_config(tmp_path, _config(upstream.url, header_timeout="2s", body_idle_timeout="2s"))
        )
        await process.start()
        try:
            await _slowhttptest(process, tmp_path, "-B", "POST", probes=15, allowed=(200, 503), bound=4.0)
            assert 'sidecar_client_errors_total{kind="request_timeout"}' in await _metrics(process)
            async with aiohttp.ClientSession() as client:
                deadline = time.monotonic() + 10
                while True:
                    async with client.get(process.admin_url + "/pools") as response:
                        pool = (await response.json())["upstreams"]["api"]
                    if (pool["in_flight"], pool["pending"]) == (0, 0) or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.2)
                assert (pool["in_flight"], pool["pending"]) == (0, 0)
            assert await _served_promptly(f"{process.url}/api/ok", 3)
            assert b"Traceback" not in "\n".join(process.raw).encode()
        finally:
            await process.stop()


async def _slowhttptest(
    process: SidecarProcess,
    directory: Path,
    mode: str,
    verb: str,
    *,
    probes: int,
    allowed: tuple[int, ...],
    bound: float = 3.0,
) -> list[dict[str, int]]:
    """Run slowhttptest for 10 s against the sidecar while probing it; return its per-second stats."""
    out = directory / "slowhttptest"
    attack = await asyncio.create_subprocess_exec(
        "slowhttptest", mode, "-c", "300", "-r", "150", "-i", "3", "-l", "10", "-x", "20", "-p", "2",
        "-s", "8192", "-t", verb, "-u", f"{process.url}/api/attack", "-g", "-o", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await asyncio.sleep(2)
        latencies = await _served_promptly(f"{process.url}/api/ok", probes, allowed=allowed)
        await asyncio.wait_for(attack.wait(), 40)
    finally:
        if attack.returncode is None:
            attack.kill()
            await attack.wait()
    assert max(latencies) < bound, latencies  # generous: a loaded 2-core box
    with open(f"{out}.csv", newline="") as stats:
        return [{key: int(value) for key, value in row.items()} for row in csv.DictReader(stats)]


async def _metrics(process: SidecarProcess) -> str:
    async with aiohttp.ClientSession() as client, client.get(process.admin_url + "/metrics") as response:
        return await response.text()


async def test_header_timeout_follows_a_reload(tmp_path: Path) -> None:
    async with (
        ScriptedUpstream() as upstream,
        running_sidecar(tmp_path, _config(upstream.url, header_timeout="30s")) as sc,
    ):
        write_config(tmp_path, _config(upstream.url, header_timeout="1s"))
        await sc.reload("test")
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
        waited = await _closed_after(reader, 10)
        writer.close()
        assert waited < 5


async def test_a_shorter_header_timeout_after_a_reload_holds_for_the_next_head_of_a_kept_alive_connection(
    tmp_path: Path,
) -> None:
    """The connection's one timer was set for 30 s by its first head; the next head has 1 s."""
    async with (
        ScriptedUpstream() as upstream,
        running_sidecar(tmp_path, _config(upstream.url, header_timeout="30s")) as sc,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
        writer.write(b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\nok"), 5)
        assert status_of(head) == 200
        write_config(tmp_path, _config(upstream.url, header_timeout="1s"))
        await sc.reload("test")
        writer.write(b"GET /api/x HTTP/1.1\r\n")  # a head that never finishes
        waited = await _closed_after(reader, 10)
        writer.close()
        assert waited < 5
        assert len(requests_in(upstream.all_bytes)) == 1
