"""Reload and graceful shutdown against the real process: real files, real signals (docs/operations.md).

Most tests run ``python -m sidecar run`` as a child process (``SidecarProcess``)
and change it the way an operator does: by editing upstreams.yaml, sending
SIGHUP/SIGTERM/SIGINT or calling ``POST /reload``.  The in-process tests
(``running_sidecar``) cover what a child process cannot show: asyncio tasks,
and faults injected into a reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.pools import UpstreamPool
from sidecar.reload import ReloadRefused
from tests.support import LOOPBACK
from tests.support.sidecar import SidecarProcess, admin_url, proxy_url, running_sidecar
from tests.support.upstreams import Upstream
from tests.support.yaml import upstreams_yaml, write_config

# --------------------------------------------------------------------------- helpers


async def slow_handler(request: web.Request) -> web.StreamResponse:
    """Answers after ?delay= seconds (0 by default)."""
    await asyncio.sleep(float(request.query.get("delay", "0")))
    return web.Response(text="done")


async def headers_then_stall(request: web.Request) -> web.StreamResponse:
    """Sends headers and a first chunk, then stalls far beyond any drain budget."""
    response = web.StreamResponse()
    response.content_length = 1_000_000
    await response.prepare(request)
    await response.write(b"x" * 1000)
    await asyncio.sleep(60)
    return response


@asynccontextmanager
async def sidecar_process(config_path: Path) -> AsyncIterator[SidecarProcess]:
    process = await SidecarProcess(config_path).start()
    try:
        yield process
    finally:
        await process.stop()


def fresh_session() -> aiohttp.ClientSession:
    """A client that opens a new connection per request, so the sidecar keeps none of ours."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


async def get_status(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as response:
        await response.read()
        return response.status


async def reload_count(session: aiohttp.ClientSession, admin: str, result: str) -> float:
    async with session.get(admin + "/metrics") as response:
        text = await response.text()
    found = re.search(rf'^sidecar_config_reloads_total{{result="{result}"}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def wait_until(predicate_coro, timeout: float, what: str, interval: float = 0.05) -> float:  # type: ignore[no-untyped-def]
    """Poll an async predicate; returns the seconds it took."""
    started = time.monotonic()
    while True:
        if await predicate_coro():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not within {timeout}s")
        await asyncio.sleep(interval)


async def wait_for_requests(upstream: Upstream, count: int, timeout: float = 5.0) -> None:
    async def arrived() -> bool:
        return len(upstream.requests) >= count

    await wait_until(arrived, timeout, f"{count} request(s) at the upstream")


def upstream_block(name: str, url: str, **fields: Any) -> tuple[str, dict[str, Any]]:
    return name, {"url": url, **fields}


def config_text(*blocks: tuple[str, dict[str, Any]], shutdown_timeout: str = "10s") -> str:
    return upstreams_yaml(dict(blocks), shutdown_timeout=shutdown_timeout)


def rewrite(path: Path, text: str) -> None:
    """Edit the config file the way a quick editor does: truncate and write."""
    path.write_text(text)


def fd_count(pid: int | str) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ------------------------------------------------------------------------ reload


@pytest.mark.slow
async def test_upstream_added_by_editing_the_file_is_routed_while_a_slow_request_completes(tmp_path: Path) -> None:
    async with Upstream(slow_handler) as first, Upstream() as second:
        path = write_config(tmp_path, config_text(upstream_block("a", first.url)))
        async with sidecar_process(path) as sidecar, fresh_session() as session:
            pid = sidecar.proc.pid  # type: ignore[union-attr]
            assert await get_status(session, sidecar.url + "/b/x") == 404
            slow = asyncio.ensure_future(get_text(session, sidecar.url + "/a/slow?delay=3"))
            await wait_for_requests(first, 1)

            edited_at = time.monotonic()
            rewrite(path, config_text(upstream_block("a", first.url), upstream_block("b", second.url)))

            async def routed() -> bool:
                return await get_status(session, sidecar.url + "/b/x") == 200

            await wait_until(routed, 3.0, "the added upstream routed")
            assert time.monotonic() - edited_at <= 3.0
            assert not slow.done(), "the slow request should still be in flight when the new route works"
            assert await slow == (200, "done")
            assert sidecar.proc.poll() is None and sidecar.proc.pid == pid  # type: ignore[union-attr]
            assert len(sidecar.events("started")) == 1
            reloaded = sidecar.events("config_reloaded")
            assert [(e["reason"], e["added"], e["unchanged"]) for e in reloaded] == [("file_changed", ["b"], ["a"])]


async def get_text(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as response:
        return response.status, await response.text()


async def post_text(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.post(url) as response:
        return response.status, await response.text()


@pytest.mark.slow
async def test_broken_file_keeps_old_config_counts_and_logs_failure_then_fix_reloads(tmp_path: Path) -> None:
    async with Upstream() as first, Upstream() as second:
        path = write_config(tmp_path, config_text(upstream_block("a", first.url)))
        async with sidecar_process(path) as sidecar, fresh_session() as session:
            admin = sidecar.admin_url
            rewrite(path, config_text(upstream_block("a", first.url, limits={"max_connections": -3})))
            failed = await sidecar.wait_for_event("config_reload_failed", timeout=5)
            assert failed["reason"] == "file_changed"
            assert failed["path"] == "upstreams.a.limits.max_connections"
            assert "upstreams.a.limits.max_connections" in failed["error"]
            assert str(path) in failed["error"]
            assert await reload_count(session, admin, "failure") == 1
            assert await get_status(session, sidecar.url + "/a/x") == 200, "the old config keeps serving"

            # The same broken content is not retried every poll: one failure per change.
            await asyncio.sleep(2.5)
            assert await reload_count(session, admin, "failure") == 1

            async with session.post(admin + "/reload") as response:
                assert response.status == 400
                body = await response.json()
            assert body["result"] == "failure"
            assert "upstreams.a.limits.max_connections" in body["error"]
            assert "must be a positive integer" in body["error"]

            sidecar.signal(signal.SIGHUP)
            hup = await sidecar.wait_for_event("config_reload_failed", timeout=5, count=3)
            assert hup["reason"] == "sighup"
            assert await reload_count(session, admin, "failure") == 3
            assert await reload_count(session, admin, "success") == 0
            assert await get_status(session, sidecar.url + "/a/x") == 200

            rewrite(path, config_text(upstream_block("a", first.url), upstream_block("b", second.url)))
            reloaded = await sidecar.wait_for_event("config_reloaded", timeout=5)
            assert reloaded["added"] == ["b"]
            assert await reload_count(session, admin, "success") == 1
            assert await get_status(session, sidecar.url + "/b/x") == 200


async def test_unchanged_upstream_keeps_its_connection_across_every_kind_of_reload(tmp_path: Path) -> None:
    async with Upstream() as kept, Upstream() as replaced:
        keepalive = {"keepalive_expiry": "60s"}

        def text(read_timeout: str) -> str:
            return config_text(
                upstream_block("kept", kept.url, limits=keepalive),
                upstream_block("changed", replaced.url, limits=keepalive, timeouts={"read": read_timeout}),
            )

        path = write_config(tmp_path, text("10s"))
        async with sidecar_process(path) as sidecar, fresh_session() as session:

            async def one_of_each() -> None:
                for name in ("kept", "changed"):
                    assert await get_status(session, f"{sidecar.url}/{name}/x") == 200

            await one_of_each()
            await one_of_each()
            rewrite(path, text("11s"))  # file change
            await sidecar.wait_for_event("config_reloaded", timeout=5)
            await one_of_each()
            rewrite(path, text("12s"))
            sidecar.signal(signal.SIGHUP)  # SIGHUP (and the watcher may reload the same content too)

            async def hup_reloaded() -> bool:
                return any(e["reason"] == "sighup" for e in sidecar.events("config_reloaded"))

            await wait_until(hup_reloaded, 5, "a reload on SIGHUP")
            await one_of_each()
            rewrite(path, text("13s"))
            async with session.post(sidecar.admin_url + "/reload") as response:  # admin
                assert response.status == 200
                summary = await response.json()
            assert "kept" in summary["unchanged"]  # "changed" too if the watcher got there first
            await one_of_each()

        assert len(kept.requests) == 5
        assert len(kept.peers) == 1, f"the unchanged upstream saw new connections: {kept.peers}"
        # The changed upstream got a new pool, hence a new connection, each time.
        assert len(replaced.peers) == 4


@pytest.mark.slow
async def test_lowering_max_connections_under_load_caps_the_upstream_once_the_old_pool_drains(
    tmp_path: Path,
) -> None:
    async def busy(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.1)
        return web.Response(text="ok")

    def text(max_connections: int) -> str:
        limits = {"max_connections": max_connections, "max_pending": 1000}
        return config_text(upstream_block("api", upstream.url, limits=limits, timeouts={"pool": "30s"}))

    async with Upstream(busy) as upstream:
        path = write_config(tmp_path, text(10))
        async with sidecar_process(path) as sidecar, fresh_session() as session:
            statuses: list[int] = []
            stop = asyncio.Event()

            async def worker() -> None:
                while not stop.is_set():
                    statuses.append(await get_status(session, sidecar.url + "/api/x"))

            workers = [asyncio.ensure_future(worker()) for _ in range(10)]
            try:

                async def saturated() -> bool:
                    return upstream.max_open >= 8

                await wait_until(saturated, 10, "the old pool using many connections")
                rewrite(path, text(2))
                await sidecar.wait_for_event("pool_closed", timeout=15)
                assert sidecar.events("pool_closed")[0]["drained"] is True

                async def old_connections_gone() -> bool:
                    return upstream.open_connections <= 2

                await wait_until(old_connections_gone, 5, "the old pool's connections closed")
                upstream.max_open = 0
                sampled = 0
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline:
                    sampled = max(sampled, upstream.open_connections)
                    await asyncio.sleep(0.01)
            finally:
                stop.set()
                await asyncio.gather(*workers)
        assert max(sampled, upstream.max_open) <= 2, (sampled, upstream.max_open)
        assert upstream.max_open >= 1
        assert set(statuses) == {200}


@pytest.mark.slow
async def test_watcher_survives_a_missing_file_and_a_pool_that_cannot_be_built(tmp_path: Path) -> None:
    not_a_certificate = tmp_path / "ca.pem"
    rewrite(not_a_certificate, "this is not a PEM certificate\n")
    async with Upstream() as first, Upstream() as second:
        path = write_config(tmp_path, config_text(upstream_block("a", first.url)))
        async with sidecar_process(path) as sidecar, fresh_session() as session:
            # Editors replace files: a briefly missing file is not an error.
            path.unlink()
            await asyncio.sleep(2.5)
            assert sidecar.events("config_reload_failed") == []
            assert await get_status(session, sidecar.url + "/a/x") == 200

            # Valid YAML whose pool cannot be opened (the CA file is garbage).
            bad_tls = {"ca_file": str(not_a_certificate)}
            rewrite(
                path, config_text(upstream_block("a", first.url), upstream_block("s", "https://x.test", tls=bad_tls))
            )
            failed = await sidecar.wait_for_event("config_reload_failed", timeout=5)
            assert failed["path"] == "upstreams.s.tls.ca_file"  # caught while loading the config
            assert await reload_count(session, sidecar.admin_url, "failure") == 1
            assert await get_status(session, sidecar.url + "/a/x") == 200

            rewrite(path, config_text(upstream_block("a", first.url), upstream_block("b", second.url)))
            reloaded = await sidecar.wait_for_event("config_reloaded", timeout=5)
            assert reloaded["added"] == ["b"]
            assert await get_status(session, sidecar.url + "/b/x") == 200


async def test_watcher_keeps_running_after_an_unexpected_reload_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: whatever a reload raises, the next edit is still picked up."""
    import sidecar.generations as generations_module

    real_load = generations_module.load_config  # type: ignore[attr-defined]
    calls = 0

    def load_failing_once(path: str) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected failure")
        return real_load(path)

    monkeypatch.setattr(generations_module, "load_config", load_failing_once)
    monkeypatch.setattr(generations_module, "_WATCH_INTERVAL", 0.05)
    async with Upstream() as first, Upstream() as second:
        async with running_sidecar(tmp_path, config_text(upstream_block("a", first.url))) as sidecar:
            path = Path(sidecar.config.source)
            watcher = asyncio.ensure_future(sidecar.watch_config())
            try:
                rewrite(path, config_text(upstream_block("a", first.url, timeouts={"read": "11s"})))

                async def failed_once() -> bool:
                    return calls == 1

                await wait_until(failed_once, 5, "the injected failure")
                rewrite(path, config_text(upstream_block("a", first.url), upstream_block("b", second.url)))

                async def reloaded() -> bool:
                    return sidecar.config.upstream("b") is not None

                await wait_until(reloaded, 5, "the next edit reloaded")
                assert not watcher.done()
                assert (
                    sidecar.metrics.registry.get_sample_value("sidecar_config_reloads_total", {"result": "failure"})
                    == 1
                )
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher


async def test_startup_with_a_pool_that_cannot_be_built_exits_2_naming_the_field(tmp_path: Path) -> None:
    not_a_certificate = tmp_path / "ca.pem"
    rewrite(not_a_certificate, "this is not a PEM certificate\n")
    path = write_config(
        tmp_path, config_text(upstream_block("s", "https://x.test", tls={"ca_file": str(not_a_certificate)}))
    )
    process = SidecarProcess(path)
    with pytest.raises(RuntimeError, match="exited with 2"):
        await process.start()
    output = "\n".join(process.raw)
    # Caught while loading the config (so `validate` rejects it too), naming the field.
    assert "upstreams.s.tls.ca_file: no usable PEM certificate" in output
    assert "Traceback" not in output


# ---------------------------------------------------------------------- shutdown


async def test_sigterm_drains_an_in_flight_request_and_exits_zero(tmp_path: Path) -> None:
    async with Upstream(slow_handler) as upstream:
        path = write_config(tmp_path, config_text(upstream_block("a", upstream.url), shutdown_timeout="5s"))
        async with sidecar_process(path) as sidecar, fresh_session() as session:
            # A caller's kept-alive connection, idle when the drain starts.
            reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
            request = f"GET /a/x HTTP/1.1\r\nHost: {LOOPBACK}\r\n\r\n".encode()
            writer.write(request)
            status, headers, _ = await read_response(reader)
            assert status == 200 and headers.get("connection") != "close"

            slow = asyncio.ensure_future(get_text(session, sidecar.url + "/a/slow?delay=2"))
            await wait_for_requests(upstream, 2)
            signalled = time.monotonic()
            sidecar.signal(signal.SIGTERM)

            async def not_ready() -> bool:
                return await get_status(session, sidecar.admin_url + "/readyz") == 503

            await wait_until(not_ready, 1.0, "/readyz 503", interval=0.02)

            # A request on the kept-alive connection: 503 draining, and the connection is closed.
            writer.write(request)
            status, headers, body = await read_response(reader)
            assert status == 503
            assert headers["x-sidecar-error"] == "draining"
            assert headers["connection"] == "close"
            assert headers["retry-after"] == "1"
            assert b'"draining"' in body
            assert await asyncio.wait_for(reader.read(), 1.0) == b"", "the sidecar must close the connection"
            assert not slow.done(), "the connection must close while the drain is still going on"
            writer.close()

            # No new connections are accepted.
            with pytest.raises(OSError):
                _, refused = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
                refused.close()

            assert await slow == (200, "done")
            assert await sidecar.wait(10) == 0
            took = time.monotonic() - signalled
            assert took < 5.0, f"exit took {took:.1f}s, over shutdown_timeout"
            assert sidecar.events("stopped")
            assert sidecar.events("drain_timeout") == []


async def test_request_longer_than_shutdown_timeout_is_aborted_and_exit_is_on_time(tmp_path: Path) -> None:
    async with Upstream(headers_then_stall, read_body=False) as streaming, Upstream(slow_handler) as silent:
        path = write_config(
            tmp_path,
            config_text(
                upstream_block("stream", streaming.url), upstream_block("silent", silent.url), shutdown_timeout="1s"
            ),
        )
        async with sidecar_process(path) as sidecar, fresh_session() as session:
            # One response mid-body, one still waiting for its headers.
            async with session.get(sidecar.url + "/stream/x") as streaming_response:
                assert streaming_response.status == 200
                assert len(await streaming_response.content.readexactly(1000)) == 1000
                waiting = asyncio.ensure_future(post_text(session, sidecar.url + "/silent/x?delay=60"))
                await wait_for_requests(silent, 1)
                signalled = time.monotonic()
                sidecar.signal(signal.SIGINT)
                with pytest.raises(aiohttp.ClientPayloadError):
                    await streaming_response.read()
            with pytest.raises(aiohttp.ServerDisconnectedError):
                await waiting  # a POST: the client does not retry it on a fresh connection
            assert await sidecar.wait(10) == 0
            took = time.monotonic() - signalled
            assert took < 1.0 + 1.5, f"exit took {took:.1f}s with shutdown_timeout 1s"
            timeout_event = sidecar.events("drain_timeout")
            assert timeout_event and timeout_event[0]["in_flight"] == 2

        async def upstreams_released() -> bool:
            return streaming.open_connections == 0 and silent.open_connections == 0

        await wait_until(upstreams_released, 5, "the upstream connections closed")


async def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    async with Upstream(slow_handler) as upstream:
        path = write_config(tmp_path, config_text(upstream_block("a", upstream.url), shutdown_timeout="30s"))
        async with sidecar_process(path) as sidecar, fresh_session() as session:
            slow = asyncio.ensure_future(get_text(session, sidecar.url + "/a/x?delay=60"))
            await wait_for_requests(upstream, 1)
            sidecar.signal(signal.SIGTERM)
            await sidecar.wait_for_event("draining", timeout=5)
            signalled = time.monotonic()
            sidecar.signal(signal.SIGTERM)
            assert await sidecar.wait(5) == 1
            assert time.monotonic() - signalled < 2.0
            assert sidecar.events("forced_exit")
            with pytest.raises(aiohttp.ClientError):
                await slow


async def test_pool_retired_by_a_reload_still_drains_when_the_process_shuts_down(tmp_path: Path) -> None:
    async with Upstream(slow_handler) as upstream:

        def text(read_timeout: str) -> str:
            return config_text(upstream_block("a", upstream.url, timeouts={"read": read_timeout}))

        path = write_config(tmp_path, text("10s"))
        async with sidecar_process(path) as sidecar, fresh_session() as session:
            slow = asyncio.ensure_future(get_text(session, sidecar.url + "/a/x?delay=2"))
            await wait_for_requests(upstream, 1)
            rewrite(path, text("11s"))
            async with session.post(sidecar.admin_url + "/reload") as response:
                assert (await response.json())["changed"] == ["a"]
            async with session.get(sidecar.admin_url + "/pools") as response:
                retiring = (await response.json())["retiring"]
            assert [(p["name"], p["in_flight"]) for p in retiring] == [("a", 1)]
            sidecar.signal(signal.SIGTERM)
            assert await slow == (200, "done")
            assert await sidecar.wait(10) == 0
            assert sidecar.events("drain_timeout") == []


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 5)
    return status, headers, body


# ------------------------------------------------------------------------- leaks


@pytest.mark.slow
async def test_fifty_reloads_under_light_load_leak_no_fds_or_connections(tmp_path: Path) -> None:
    async with Upstream() as kept, Upstream() as replaced:
        short = {"keepalive_expiry": "500ms"}

        def text(read_seconds: int) -> str:
            return config_text(
                upstream_block("kept", kept.url, limits=short),
                upstream_block("changed", replaced.url, limits=short, timeouts={"read": f"{read_seconds}s"}),
            )

        path = write_config(tmp_path, text(10))
        async with sidecar_process(path) as sidecar, fresh_session() as session:
            pid = sidecar.proc.pid  # type: ignore[union-attr]
            admin = sidecar.admin_url

            async def quiet() -> bool:
                async with session.get(admin + "/pools") as response:
                    pools = await response.json()
                return "retiring" not in pools and all(
                    p["connections"]["open"] == 0 and p["in_flight"] == 0 for p in pools["upstreams"].values()
                )

            for name in ("kept", "changed"):
                assert await get_status(session, f"{sidecar.url}/{name}/x") == 200
            await wait_until(quiet, 10, "idle connections expired")
            await asyncio.sleep(0.3)  # our last admin connection is closed on the sidecar's side too
            before = fd_count(pid)

            statuses: list[int] = []
            stop = asyncio.Event()

            async def light_load() -> None:
                while not stop.is_set():
                    for name in ("kept", "changed"):
                        statuses.append(await get_status(session, f"{sidecar.url}/{name}/x"))
                    await asyncio.sleep(0.01)

            load = asyncio.ensure_future(light_load())
            try:
                for i in range(50):
                    rewrite(path, text(11 + i))
                    async with session.post(admin + "/reload") as response:
                        assert response.status == 200
                        assert (await response.json())["changed"] == ["changed"]
                    await asyncio.sleep(0.02)
            finally:
                stop.set()
                await load
            assert set(statuses) == {200} and len(statuses) >= 50
            assert await reload_count(session, admin, "success") == 50
            assert len(sidecar.events("pool_closed")) >= 45  # the last few may still be closing

            await wait_until(quiet, 10, "retired pools closed and connections expired")

            async def fds_back() -> bool:
                return fd_count(pid) <= before

            try:
                await wait_until(fds_back, 5, "fd count back to its baseline")
            except AssertionError:
                raise AssertionError(f"fds before {before}, after {fd_count(pid)}") from None
            assert len(sidecar.events("pool_closed")) == 50
        assert kept.open_connections == 0 and replaced.open_connections == 0


def own_tasks() -> set[asyncio.Task[object]]:
    current = asyncio.current_task()
    return {task for task in asyncio.all_tasks() if task is not current}


@pytest.mark.slow
async def test_fifty_reloads_in_process_leave_no_tasks_pools_or_fds_behind(tmp_path: Path) -> None:
    async with Upstream() as kept, Upstream() as replaced:
        short = {"keepalive_expiry": "300ms"}

        def text(read_seconds: int) -> str:
            return config_text(
                upstream_block("kept", kept.url, limits=short),
                upstream_block("changed", replaced.url, limits=short, timeouts={"read": f"{read_seconds}s"}),
            )

        async with running_sidecar(tmp_path, text(10)) as sidecar, fresh_session() as session:
            path = Path(sidecar.config.source)
            base = proxy_url(sidecar)

            def quiet() -> bool:
                return not sidecar.retired_pools() and all(
                    pool.stats().connections == 0 and pool.active == 0 for pool in sidecar.all_pools()
                )

            async def settled() -> bool:
                return quiet() and kept.open_connections == 0 and replaced.open_connections == 0

            for name in ("kept", "changed"):
                assert await get_status(session, f"{base}/{name}/x") == 200
            await wait_until(settled, 10, "idle connections expired")
            tasks_before, fds_before = len(own_tasks()), fd_count("self")
            retired = []

            statuses: list[int] = []
            stop = asyncio.Event()

            async def light_load() -> None:
                while not stop.is_set():
                    for name in ("kept", "changed"):
                        statuses.append(await get_status(session, f"{base}/{name}/x"))
                    await asyncio.sleep(0.01)

            load = asyncio.ensure_future(light_load())
            try:
                for i in range(50):
                    old = sidecar.generation().pools["changed"]
                    rewrite(path, text(11 + i))
                    result = await sidecar.reload("test")
                    assert result.changed == ("changed",)
                    retired.append(old)
                    await asyncio.sleep(0.02)
            finally:
                stop.set()
                await load
            assert set(statuses) == {200}

            await wait_until(settled, 10, "retired pools closed and connections expired")
            assert all(pool.closed and pool.stats().connections == 0 for pool in retired)
            assert all(pool.admission.in_flight == 0 and pool.admission.pending == 0 for pool in retired)

            async def tasks_back() -> bool:
                return len(own_tasks()) <= tasks_before and fd_count("self") <= fds_before

            try:
                await wait_until(tasks_back, 5, "tasks and fds back to baseline")
            except AssertionError:
                raise AssertionError(
                    f"tasks {tasks_before} -> {len(own_tasks())}, fds {fds_before} -> {fd_count('self')}: "
                    f"{sorted(repr(t.get_coro()) for t in own_tasks())}"
                ) from None


async def test_concurrent_reloads_are_serialised_and_refused_once_draining(tmp_path: Path) -> None:
    async with Upstream() as upstream:

        def text(read_seconds: int) -> str:
            return config_text(upstream_block("a", upstream.url, timeouts={"read": f"{read_seconds}s"}))

        async with running_sidecar(tmp_path, text(10)) as sidecar, fresh_session() as session:
            path = Path(sidecar.config.source)
            admin = admin_url(sidecar)

            async def admin_reload() -> tuple[int, dict[str, object]]:
                async with session.post(admin + "/reload") as response:
                    return response.status, await response.json()

            answers = []
            for i in range(5):
                rewrite(path, text(11 + i))
                answers += await asyncio.gather(*(admin_reload() for _ in range(4)))
            assert [status for status, _ in answers] == [200] * 20
            # Each content change swapped the pool exactly once; the repeats found nothing to change.
            assert sum(1 for _, body in answers if body["changed"] == ["a"]) == 5
            assert [p.upstream.timeouts.read for p in sidecar.all_pools()] == [15.0]
            assert await reload_count(session, admin, "success") == 20

            sidecar.begin_drain()
            status, body = await admin_reload()
            assert (status, body["result"]) == (503, "refused")
            with pytest.raises(ReloadRefused):
                await sidecar.reload("test")
            await sidecar.shutdown()
            assert not sidecar.retired_pools()
            assert all(pool.closed for pool in sidecar.all_pools())


async def test_reload_that_finishes_loading_after_the_drain_began_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sidecar.generations as generations_module

    real_load, real_pool = generations_module.load_config, generations_module.UpstreamPool  # type: ignore[attr-defined]
    opened: list[UpstreamPool] = []

    def slow_load(path: str) -> object:
        time.sleep(0.5)  # runs in a worker thread, like a slow (network) filesystem
        return real_load(path)

    def recording_pool(upstream: object, shared: object = None) -> UpstreamPool:
        opened.append(real_pool(upstream, shared))  # type: ignore[arg-type]
        return opened[-1]

    async with Upstream() as upstream:
        text = config_text(upstream_block("a", upstream.url))
        async with running_sidecar(tmp_path, text) as sidecar:
            monkeypatch.setattr(generations_module, "load_config", slow_load)
            monkeypatch.setattr(generations_module, "UpstreamPool", recording_pool)
            running = sidecar.generation().pools["a"]
            rewrite(
                Path(sidecar.config.source), config_text(upstream_block("a", upstream.url, timeouts={"read": "9s"}))
            )
            reloading = asyncio.ensure_future(sidecar.reload("test"))
            await asyncio.sleep(0.1)
            sidecar.begin_drain()
            with pytest.raises(ReloadRefused):
                await reloading
            assert sidecar.generation().pools["a"] is running
            assert sidecar.config.upstream("a").timeouts.read == 30.0  # type: ignore[union-attr]
            assert len(opened) == 1
            await asyncio.sleep(0)
            assert opened[0].closed
