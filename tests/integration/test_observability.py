"""Observability through real sockets: /metrics, /pools, /config, access logs, secrets (docs/observability.md)."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.support import LOOPBACK
from tests.support.metrics import scrape, value
from tests.support.rest import eventually
from tests.support.sidecar import SidecarProcess, admin_url, proxy_url, running_sidecar
from tests.support.upstreams import Upstream, unused_port
from tests.support.yaml import upstreams_yaml, write_config

SPEC_ACCESS_FIELDS = {
    "request_id",
    "method",
    "path",
    "upstream",
    "status",
    "duration_ms",
    "pool_wait_ms",
    "upstream_http_version",
    "bytes_in",
    "bytes_out",
    "error",
}

async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        assert response.status == 200, await response.text()
        return await response.json()




# ---------------------------------------------------------------- /metrics


async def test_requests_total_rises_by_exactly_the_requests_sent(tmp_path: Path) -> None:
    async def by_path(request: web.Request) -> web.StreamResponse:
        return web.Response(status=404 if request.path.endswith("/missing") else 200, text="body")

    async with (
        Upstream(by_path) as upstream,
        running_sidecar(
            tmp_path,
            f"""
        upstreams:
          alpha: {{url: {upstream.url}}}
          beta: {{url: {upstream.url}}}
        """,
        ) as sidecar,
        aiohttp.ClientSession() as client,
    ):
        proxy, admin = proxy_url(sidecar), admin_url(sidecar)
        before = await scrape(client, admin)
        for _ in range(5):
            async with client.get(proxy + "/alpha/x") as response:
                assert response.status == 200
        for _ in range(3):
            async with client.get(proxy + "/beta/missing") as response:
                assert response.status == 404
        for _ in range(2):
            async with client.post(proxy + "/beta/upload", data=b"x" * 1000) as response:
                assert response.status == 200
        async with client.request("PROPFIND", proxy + "/alpha/pot") as response:
            assert response.status == 200
        for _ in range(4):
            async with client.get(proxy + "/nowhere") as response:
                assert response.status == 404
                assert response.headers["X-Sidecar-Error"] == "no_route"
        after = await scrape(client, admin)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("sidecar_requests_total", upstream="alpha", method="GET", status="200") == 5
    assert delta("sidecar_requests_total", upstream="beta", method="GET", status="404") == 3
    assert delta("sidecar_requests_total", upstream="beta", method="POST", status="200") == 2
    assert delta("sidecar_requests_total", upstream="alpha", method="OTHER", status="200") == 1
    assert delta("sidecar_requests_total", upstream="none", method="GET", status="404") == 4
    total = sum(v for (name, _), v in after.items() if name == "sidecar_requests_total")
    assert total == 15  # nothing counted twice, nothing else counted
    assert not any(dict(labels).get("method") == "PROPFIND" for _, labels in after)
    assert delta("sidecar_rejected_requests_total", upstream="none", reason="no_route") == 4
    assert delta("sidecar_request_bytes_total", upstream="beta") == 2000
    assert delta("sidecar_response_bytes_total", upstream="alpha") == 6 * len("body")
    assert delta("sidecar_request_duration_seconds_count", upstream="alpha") == 6
    assert delta("sidecar_upstream_response_seconds_count", upstream="beta") == 5
    assert delta("sidecar_pool_wait_seconds_count", upstream="beta") == 5
    assert value(after, "sidecar_max_connections", upstream="alpha") == 100
    assert value(after, "sidecar_upstream_connections", upstream="alpha", state="idle") >= 1


async def test_overload_gauges_read_live_state_and_return_to_zero(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(text="slow")

    async with (
        Upstream(slow) as upstream,
        running_sidecar(
            tmp_path,
            f"""
        upstreams:
          slow:
            url: {upstream.url}
            limits: {{max_connections: 2, max_pending: 4}}
            timeouts: {{pool: 60s}}
        """,
        ) as sidecar,
        aiohttp.ClientSession() as client,
        aiohttp.ClientSession() as admin_client,
    ):
        proxy, admin = proxy_url(sidecar), admin_url(sidecar)

        async def call() -> tuple[int, str]:
            async with client.get(proxy + "/slow/x") as response:
                return response.status, await response.text()

        callers = [asyncio.create_task(call()) for _ in range(6)]
        try:
            await _overload_then_recover(client, admin_client, proxy, admin, upstream, release, callers)
        finally:
            release.set()
            for caller in callers:
                caller.cancel()
            await asyncio.gather(*callers, return_exceptions=True)


async def _overload_then_recover(
    client: aiohttp.ClientSession,
    admin_client: aiohttp.ClientSession,
    proxy: str,
    admin: str,
    upstream: Upstream,
    release: asyncio.Event,
    callers: list[asyncio.Task[tuple[int, str]]],
) -> None:

    async def saturated() -> bool:
        samples = await scrape(admin_client, admin)
        return (
            value(samples, "sidecar_inflight_requests", upstream="slow") == 2
            and value(samples, "sidecar_pending_requests", upstream="slow") == 4
        )

    await eventually(saturated)
    samples = await scrape(admin_client, admin)
    assert value(samples, "sidecar_upstream_connections", upstream="slow", state="active") == 2
    assert value(samples, "sidecar_upstream_connections", upstream="slow", state="idle") == 0
    assert value(samples, "sidecar_oldest_pending_seconds", upstream="slow") > 0

    snapshot = (await get_json(admin_client, admin + "/pools"))["upstreams"]["slow"]
    assert snapshot["in_flight"] == 2
    assert snapshot["pending"] == 4
    assert snapshot["oldest_wait_s"] > 0
    assert snapshot["limits"]["max_connections"] == 2
    assert snapshot["limits"]["max_pending"] == 4
    # What the pool reports is what the upstream actually sees on its sockets.
    assert snapshot["connections"]["active"] == 2
    assert snapshot["connections"]["open"] == upstream.open_connections == len(upstream.peers) == 2

    # A seventh caller finds the queue full: refused at once, and counted.
    started = time.monotonic()
    async with client.get(proxy + "/slow/x") as response:
        assert response.status == 503
        assert response.headers["X-Sidecar-Error"] == "queue_full"
    assert time.monotonic() - started < 2.0
    samples = await scrape(admin_client, admin)
    assert value(samples, "sidecar_rejected_requests_total", upstream="slow", reason="queue_full") == 1

    release.set()
    results = await asyncio.gather(*callers)
    assert results == [(200, "slow")] * 6

    async def drained() -> bool:
        samples = await scrape(admin_client, admin)
        return (
            value(samples, "sidecar_inflight_requests", upstream="slow") == 0
            and value(samples, "sidecar_pending_requests", upstream="slow") == 0
        )

    await eventually(drained)
    samples = await scrape(admin_client, admin)
    assert value(samples, "sidecar_requests_total", upstream="slow", method="GET", status="200") == 6
    assert value(samples, "sidecar_requests_total", upstream="slow", method="GET", status="503") == 1
    assert value(samples, "sidecar_upstream_connections", upstream="slow", state="active") == 0
    assert value(samples, "sidecar_oldest_pending_seconds", upstream="slow") == 0

    snapshot = (await get_json(admin_client, admin + "/pools"))["upstreams"]["slow"]
    assert snapshot["in_flight"] == snapshot["pending"] == 0
    assert snapshot["connections"]["active"] == 0
    assert snapshot["connections"]["idle"] == upstream.open_connections == 2
    assert snapshot["connections"]["opened_total"] == len(upstream.peers) == 2
    assert snapshot["http_versions"] == {"HTTP/1.1": 2}
    assert snapshot["totals"] == {"requests": 7, "by_outcome": {"2xx": 6, "queue_full": 1}}


async def test_pool_timeout_and_upstream_errors_are_counted_by_reason(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(text="slow")

    async with (
        Upstream(slow) as upstream,
        running_sidecar(
            tmp_path,
            f"""
        upstreams:
          one:
            url: {upstream.url}
            limits: {{max_connections: 1}}
            timeouts: {{pool: 200ms}}
          dead:
            url: http://{LOOPBACK}:{unused_port()}
        """,
        ) as sidecar,
        aiohttp.ClientSession() as client,
    ):
        proxy, admin = proxy_url(sidecar), admin_url(sidecar)
        holder = asyncio.create_task(client.get(proxy + "/one/hold"))
        try:
            await eventually(lambda: sidecar.generation().pools["one"].admission.in_flight == 1)
            async with client.get(proxy + "/one/late") as response:
                assert response.status == 503
                assert response.headers["X-Sidecar-Error"] == "pool_timeout"
            async with client.get(proxy + "/dead/x") as response:
                assert response.status == 502
                assert response.headers["X-Sidecar-Error"] == "upstream_connect_error"
        finally:
            release.set()
            (await holder).release()
        samples = await scrape(client, admin)
        pools = (await get_json(client, admin + "/pools"))["upstreams"]

    assert value(samples, "sidecar_rejected_requests_total", upstream="one", reason="pool_timeout") == 1
    assert value(samples, "sidecar_upstream_errors_total", upstream="dead", kind="connect_error") == 1
    assert value(samples, "sidecar_requests_total", upstream="dead", method="GET", status="502") == 1
    # The timed-out waiter's wait is in the histogram: roughly timeouts.pool.
    assert value(samples, "sidecar_pool_wait_seconds_count", upstream="one") == 2
    assert value(samples, "sidecar_pool_wait_seconds_sum", upstream="one") >= 0.15
    assert pools["one"]["totals"]["by_outcome"] == {"2xx": 1, "pool_timeout": 1}
    assert pools["dead"]["totals"]["by_outcome"] == {"upstream_connect_error": 1}
    assert pools["dead"]["connections"]["open"] == 0


async def test_client_disconnect_counts_as_499_and_frees_the_slot(tmp_path: Path) -> None:
    entered = asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        entered.set()
        await asyncio.sleep(30)
        return web.Response(text="late")

    async with (
        Upstream(hang) as upstream,
        running_sidecar(tmp_path, f"upstreams:\n  api: {{url: {upstream.url}}}\n") as sidecar,
        aiohttp.ClientSession() as client,
    ):
        _reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
        writer.write(b"GET /api/x HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(entered.wait(), 10)
        writer.close()
        pool = sidecar.generation().pools["api"]
        await eventually(lambda: pool.admission.in_flight == 0)
        samples = await scrape(client, admin_url(sidecar))
        assert value(samples, "sidecar_requests_total", upstream="api", method="GET", status="499") == 1
        assert value(samples, "sidecar_inflight_requests", upstream="api") == 0
        assert pool.outcomes == {"client_disconnected": 1}


async def test_upstream_failing_mid_body_counts_as_body_error(tmp_path: Path) -> None:
    async def truncated(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b"x" * 100)
        assert request.transport is not None
        request.transport.abort()
        return response

    async with (
        Upstream(truncated) as upstream,
        running_sidecar(tmp_path, f"upstreams:\n  api: {{url: {upstream.url}}}\n") as sidecar,
        aiohttp.ClientSession() as client,
    ):
        try:
            async with client.get(proxy_url(sidecar) + "/api/x") as response:
                assert response.status == 200
                await response.read()
        except aiohttp.ClientPayloadError:
            pass  # the caller must see the truncation as an error
        else:
            raise AssertionError("a truncated body was delivered as complete")
        pool = sidecar.generation().pools["api"]
        await eventually(lambda: pool.admission.in_flight == 0)
        samples = await scrape(client, admin_url(sidecar))
    assert value(samples, "sidecar_upstream_errors_total", upstream="api", kind="body_error") == 1
    assert value(samples, "sidecar_requests_total", upstream="api", method="GET", status="200") == 1
    assert value(samples, "sidecar_response_bytes_total", upstream="api") == 100
    assert pool.outcomes == {"upstream_body_error": 1}


# ---------------------------------------------------------- admin isolation


async def test_admin_endpoints_are_not_reachable_through_the_proxy_port(tmp_path: Path) -> None:
    async with (
        Upstream() as upstream,
        running_sidecar(tmp_path, f"upstreams:\n  api: {{url: {upstream.url}}}\n") as sidecar,
        aiohttp.ClientSession() as client,
    ):
        proxy = proxy_url(sidecar)
        for method, path in [
            ("GET", "/metrics"),
            ("GET", "/pools"),
            ("GET", "/config"),
            ("GET", "/healthz"),
            ("GET", "/readyz"),
            ("POST", "/reload"),
        ]:
            async with client.request(method, proxy + path) as response:
                body = await response.text()
                assert response.status == 404, (path, body)
                assert response.headers["X-Sidecar-Error"] == "no_route"
                assert "sidecar_requests_total" not in body and "upstreams" not in body
        # ... and the admin port does serve them.
        async with client.get(admin_url(sidecar) + "/healthz") as response:
            assert response.status == 200
        config = await get_json(client, admin_url(sidecar) + "/config")
        assert config["bound"] == {
            "listen": f"{LOOPBACK}:{sidecar.proxy_port}",
            "admin": f"{LOOPBACK}:{sidecar.admin_port}",
        }
    assert upstream.requests == []


async def test_catch_all_route_sends_admin_paths_upstream_not_to_admin(tmp_path: Path) -> None:
    async with (
        Upstream() as upstream,
        running_sidecar(
            tmp_path,
            f"""
        upstreams:
          everything:
            url: {upstream.url}
            route: {{path_prefix: /}}
        """,
        ) as sidecar,
        aiohttp.ClientSession() as client,
    ):
        async with client.get(proxy_url(sidecar) + "/metrics") as response:
            assert response.status == 200
            assert await response.text() == "ok"
    assert [r.path for r in upstream.requests] == ["/metrics"]


# --------------------------------------------------------- process + logs


def _config_with_secrets(tmp_path: Path, upstream: Upstream, dead_port: int) -> Path:
    return write_config(
        tmp_path,
        upstreams_yaml(
            {
                "api": {
                    "url": f"{upstream.url}/${{SECRET_BASE}}",
                    "headers": {"set": {"X-Api-Key": "${SECRET_API_KEY}", "Authorization": "Bearer ${SECRET_BEARER}"}},
                },
                "dead": {
                    "url": f"http://{LOOPBACK}:{dead_port}/${{SECRET_BASE}}",
                    "headers": {"set": {"X-Api-Key": "${SECRET_API_KEY}"}},
                },
            },
            admin={"listen": "127.0.0.1:0", "token": "${ADMIN_TOKEN}"},
        ),
    )


async def test_secrets_from_env_appear_in_no_admin_output_log_line_or_error_body(tmp_path: Path) -> None:
    secrets = {
        "ADMIN_TOKEN": "admintok-7f3e9c1d",
        "SECRET_API_KEY": "apikey-51ab07e2",
        "SECRET_BEARER": "bearer-c0ffee99",
        "SECRET_BASE": "base-d34db33f",
    }
    caller_secrets = ["caller-auth-1a2b3c", "cookie-val-4d5e6f", "query-val-7a8b9c"]
    async with Upstream() as upstream:
        process = SidecarProcess(_config_with_secrets(tmp_path, upstream, unused_port()), env=secrets)
        await process.start()
        outputs: list[str] = []
        try:
            auth = {"Authorization": "Bearer " + secrets["ADMIN_TOKEN"]}
            async with aiohttp.ClientSession() as client:
                for path in ("/api/v1/x?token=" + caller_secrets[2], "/dead/x", "/nowhere", "/api/missing"):
                    async with client.get(
                        process.url + path,
                        headers={"Authorization": "Bearer " + caller_secrets[0], "Cookie": "s=" + caller_secrets[1]},
                    ) as response:
                        outputs.append(str(response.status) + repr(list(response.headers.items())))
                        outputs.append(await response.text())
                for method, path in [
                    ("GET", "/metrics"),
                    ("GET", "/pools"),
                    ("GET", "/config"),
                    ("GET", "/healthz"),
                    ("GET", "/readyz"),
                    ("POST", "/reload"),
                ]:
                    async with client.request(method, process.admin_url + path, headers=auth) as response:
                        assert response.status == 200, (path, await response.text())
                        outputs.append(repr(list(response.headers.items())) + await response.text())
                    # Without the token: refused, and the refusal shows nothing either.
                    async with client.request(method, process.admin_url + path) as response:
                        if path not in ("/healthz", "/readyz"):
                            assert response.status == 401
                        outputs.append(await response.text())
                async with client.get(process.admin_url + "/config", headers=auth) as response:
                    config = await response.json()
            await process.wait_for_event("access", count=4)
            # A reload that fails: its error body must not leak either.
            config_file = process.config_path
            config_file.write_text(config_file.read_text().replace("token:", "tokn:"))
            async with aiohttp.ClientSession() as client:
                async with client.post(process.admin_url + "/reload", headers=auth) as response:
                    assert response.status == 400
                    outputs.append(await response.text())
        finally:
            await process.stop()

    # The secrets were really in use ...
    sent = dict(upstream.requests[0].headers)
    assert sent["X-Api-Key"] == secrets["SECRET_API_KEY"]
    assert sent["Authorization"] == "Bearer " + secrets["SECRET_BEARER"]
    assert upstream.requests[0].path.startswith("/" + secrets["SECRET_BASE"] + "/v1/x")
    assert config["upstreams"]["api"]["headers"]["set"] == {"X-Api-Key": "<redacted>", "Authorization": "<redacted>"}
    assert config["upstreams"]["api"]["url"] == "<redacted>"
    assert config["admin"]["token"] == "<redacted>"
    # ... and appear nowhere we produce: admin output, error bodies, any log line.
    everything = "\n".join([*outputs, *process.raw])
    assert process.events("started") and process.events("stopped")
    for secret in [*secrets.values(), *caller_secrets]:
        assert secret not in everything, secret


async def test_one_access_line_per_request_with_every_spec_field(tmp_path: Path) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"0123456789")

    async with Upstream(echo) as upstream:
        # http2: true on an http:// url is valid but worth a config_warning event.
        config = write_config(tmp_path, f"upstreams:\n  api: {{url: {upstream.url}, http2: true}}\n")
        process = SidecarProcess(config)
        await process.start()
        returned: dict[str, tuple[str, int]] = {}
        try:
            async with aiohttp.ClientSession() as client:
                cases: list[tuple[str, str, dict[str, str], bytes | None]] = [
                    ("GET", "/api/items?secret=q1", {"X-Request-Id": "given-id-123"}, None),
                    ("GET", "/api/items/2", {}, None),
                    ("POST", "/api/upload", {}, b"a" * 1234),
                    ("HEAD", "/api/head", {}, None),
                    ("GET", "/nowhere?x=1", {}, None),
                ]
                for method, path, headers, body in cases:
                    async with client.request(method, process.url + path, headers=headers, data=body) as response:
                        await response.read()
                        returned[response.headers["X-Request-Id"]] = (path, response.status)
            await process.wait_for_event("access", count=len(cases))
        finally:
            await process.stop()

    assert "given-id-123" in returned
    access = process.events("access")
    assert len(access) == len(cases)
    by_id = {line["request_id"]: line for line in access}
    assert set(by_id) == set(returned)  # one line per request, ids as returned to the caller
    for request_id, (path, status) in returned.items():
        line = by_id[request_id]
        assert set(line) >= SPEC_ACCESS_FIELDS, SPEC_ACCESS_FIELDS - set(line)
        assert line["status"] == status
        assert line["path"] == path.split("?")[0]
        assert line["duration_ms"] >= line["pool_wait_ms"] >= 0
    ok = by_id["given-id-123"]
    assert (ok["method"], ok["upstream"], ok["upstream_http_version"], ok["error"]) == ("GET", "api", "HTTP/1.1", None)
    assert ok["bytes_out"] == 10 and ok["bytes_in"] == 0 and ok["upstream_ms"] is not None
    upload = next(line for line in access if line["method"] == "POST")
    assert upload["bytes_in"] == 1234
    head = next(line for line in access if line["method"] == "HEAD")
    assert head["bytes_out"] == 0
    missing = next(line for line in access if line["path"] == "/nowhere")
    assert (missing["upstream"], missing["error"], missing["upstream_http_version"]) == (None, "no_route", None)
    # Queries are never logged; httpx/httpcore per-request INFO lines are silenced.
    assert not any("q1" in raw or "x=1" in raw for raw in process.raw)
    assert not any(line.get("logger") in ("httpx", "httpcore") for line in process.lines)
    assert not any("HTTP Request" in raw for raw in process.raw)
    assert all(json.loads(raw) for raw in process.raw)  # JSON, one event per line
    assert "stays HTTP/1.1" in process.events("config_warning")[0]["message"]
    for event in ("started", "draining", "stopped"):
        assert len(process.events(event)) == 1, event


def _first_line_with(command: list[str], text: str, tty: bool) -> str:
    """Run the sidecar, return its first stdout line containing ``text``, stop it."""
    if tty:
        primary, secondary = pty.openpty()
        proc = subprocess.Popen(command, stdout=secondary, stderr=subprocess.STDOUT)
        os.close(secondary)
        read_fd = primary
    else:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        read_fd = proc.stdout.fileno()
    buffer = b""
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            ready, _, _ = select.select([read_fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(read_fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                buffer += chunk
                for line in buffer.decode("utf-8", "replace").splitlines():
                    if text in line:
                        return line
        raise AssertionError(f"no line with {text!r}: {buffer!r}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if tty:
            os.close(primary)
        elif proc.stdout is not None:
            proc.stdout.close()


async def test_console_format_on_request_and_on_a_tty_json_otherwise(tmp_path: Path) -> None:
    config = write_config(tmp_path, "upstreams:\n  api: {url: 'http://127.0.0.1:9'}\n")
    base = [sys.executable, "-m", "sidecar", "run", "-c", str(config), "--listen", "127.0.0.1:0", "--admin", "off"]
    loop = asyncio.get_running_loop()
    console = await loop.run_in_executor(None, _first_line_with, [*base, "--log-format", "console"], "started", False)
    on_tty = await loop.run_in_executor(None, _first_line_with, base, "started", True)
    piped = await loop.run_in_executor(None, _first_line_with, base, "started", False)
    for line in (console, on_tty):
        assert not line.lstrip().startswith("{"), line
    assert json.loads(piped)["event"] == "started"
