"""Hostile and broken input: never an open proxy, no smuggling, limits, upstream header injection.

Every case runs against the real sidecar; the upstream is a raw TCP server that
records every byte it receives, so "nothing reached the upstream" is checked
on the wire, not inferred.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.rest import assert_at_rest
from tests.support.sidecar import SidecarProcess, proxy_url, running_sidecar
from tests.support.upstreams import ScriptedUpstream, Upstream
from tests.support.wire import raw_exchange, requests_in, status_of
from tests.support.yaml import API_INTERNAL, one_upstream, write_config


def _sidecar_error(raw: bytes) -> tuple[int, str | None, dict[str, object] | None]:
    """Status, X-Sidecar-Error and JSON body of a raw response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    error = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"x-sidecar-error":
            error = value.strip().decode()
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    return status_of(raw), error, parsed


def _config(url: str, **top: Any) -> str:
    return one_upstream(url, route=API_INTERNAL, top=top)


# --------------------------------------------------------------------------
# Never an open proxy
# --------------------------------------------------------------------------

OPEN_PROXY_CASES = [
    # (request, status, code)
    (b"GET http://evil.example/x HTTP/1.1\r\nHost: evil.example\r\n\r\n", 403, "destination_not_allowed"),
    (b"GET http://127.0.0.1:1/x HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n", 403, "destination_not_allowed"),
    (b"CONNECT api.internal:443 HTTP/1.1\r\nHost: api.internal:443\r\n\r\n", 405, "connect_not_supported"),
    (b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", 405, "connect_not_supported"),
    (b"GET http://user:pw@api.internal/x HTTP/1.1\r\nHost: api.internal\r\n\r\n", 400, "bad_request"),
    (b"GET http://api.internal@evil.example/x HTTP/1.1\r\nHost: api.internal\r\n\r\n", 400, "bad_request"),
    (b"GET ftp://api.internal/x HTTP/1.1\r\nHost: api.internal\r\n\r\n", 400, "bad_request"),
    (b"GET gopher://api.internal/x HTTP/1.1\r\nHost: api.internal\r\n\r\n", 400, "bad_request"),
    (b"GET http://api.internal/x#frag HTTP/1.1\r\nHost: api.internal\r\n\r\n", 400, "bad_request"),
    (b"GET * HTTP/1.1\r\nHost: api.internal\r\n\r\n", 400, "bad_request"),
]


async def test_never_an_open_proxy(tmp_path: Path) -> None:
    async with ScriptedUpstream() as upstream, running_sidecar(tmp_path, _config(upstream.url)) as sidecar:
        for request, status, code in OPEN_PROXY_CASES:
            raw = await raw_exchange(sidecar.proxy_port, request)
            got_status, got_code, body = _sidecar_error(raw)
            assert (got_status, got_code) == (status, code), request
            assert body is not None and body["error"] == code
        assert upstream.received == [], "a refused request reached the upstream"
        # The configured host is still reachable in absolute form.
        absolute = b"GET http://api.internal/ok HTTP/1.1\r\nHost: api.internal\r\nConnection: close\r\n\r\n"
        raw = await raw_exchange(sidecar.proxy_port, absolute)
        assert status_of(raw) == 200
        assert upstream.all_bytes.startswith(b"GET /ok HTTP/1.1\r\n")


@pytest.mark.parametrize(
    "upgrade",
    [
        b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n",
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
    ],
    ids=["websocket", "h2c"],
)
async def test_upgrade_is_never_tunnelled(tmp_path: Path, upgrade: bytes) -> None:
    """Forwarded as a plain request without Upgrade; the answer closes the connection.

    The upstream below *would* switch protocols if asked: it answers 101 to any
    request that still carries Upgrade. The caller must see its plain 200.
    """
    switching = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    plain = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain"

    class SwitchingUpstream(ScriptedUpstream):
        async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            self.received.append(bytearray(head))
            writer.write(switching if b"upgrade:" in head.lower() else plain)
            await writer.drain()
            with contextlib.suppress(Exception):
                await reader.read()
            writer.close()

    async with SwitchingUpstream() as upstream, running_sidecar(tmp_path, _config(upstream.url)) as sidecar:
        pipelined = b"GET /api/second HTTP/1.1\r\nHost: a\r\n\r\n"
        request = b"GET /api/ws HTTP/1.1\r\nHost: a\r\n" + upgrade + b"\r\n" + pipelined
        loop = asyncio.get_running_loop()
        started = loop.time()
        raw = await raw_exchange(sidecar.proxy_port, request, timeout=10)
        assert loop.time() - started < 5, "the connection was left hanging after the upgrade request"
        assert status_of(raw) == 200
        assert raw.endswith(b"plain")
        assert b"connection: close" in raw.lower()
        assert raw.count(b"HTTP/1.1 ") == 1, "nothing is answered after an upgrade request on that connection"
        seen = upstream.all_bytes.lower()
        assert b"upgrade" not in seen and b"http2-settings" not in seen
        assert b"/second" not in seen


# --------------------------------------------------------------------------
# Request smuggling, with both HTTP parsers
# --------------------------------------------------------------------------

CHUNKED = b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
SMUGGLING = {
    "cl_and_te": b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\nGET /api/smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    "te_and_cl": b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n"
    b"0\r\n\r\nGET /api/smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    "duplicate_cl": b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 44\r\n\r\n"
    b"helloGET /api/smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    "duplicate_cl_same": b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "cl_list": b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello",
    "cl_sign": b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello",
    "obs_fold": b"GET /api/x HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n",
    "obs_fold_te": b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nX-A: b\r\n"
    b" Transfer-Encoding: chunked\r\n\r\nhello",
    "bare_lf_request_line": b"GET /api/x HTTP/1.1\nHost: a\r\n\r\n",
    "bare_lf_header": b"GET /api/x HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n",
    "bare_cr_header": b"GET /api/x HTTP/1.1\r\nHost: a\rX-A: b\r\n\r\n",
    "nul_in_header": b"GET /api/x HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n",
    "space_before_colon": b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "chunk_size_not_hex": CHUNKED + b"zz\r\nhello\r\n0\r\n\r\n",
    "chunk_size_negative": CHUNKED + b"-5\r\nhello\r\n0\r\n\r\n",
    "chunk_size_plus": CHUNKED + b"+5\r\nhello\r\n0\r\n\r\n",
    "chunk_size_0x": CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n",
    "chunk_bare_lf": CHUNKED + b"5\nhello\n0\n\n",
    "chunk_ext_lf": CHUNKED + b"5;a\nb\r\nhello\r\n0\r\n\r\n",
    "te_chunked_identity": b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    "te_identity": b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\nhello",
    "te_duplicate": b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "missing_host_http11": b"GET /api/x HTTP/1.1\r\n\r\n",
}


@pytest.mark.parametrize("parser", ["c", "python"])
async def test_smuggling_attempts_get_400_and_never_reach_the_upstream(tmp_path: Path, parser: str) -> None:
    env = {"AIOHTTP_NO_EXTENSIONS": "1" if parser == "python" else ""}
    async with ScriptedUpstream() as upstream:
        process = SidecarProcess(write_config(tmp_path, _config(upstream.url)), env=env)
        await process.start()
        try:
            assert process.events("started")[0]["http_parser"] == parser
            failures = []
            for name, request in SMUGGLING.items():
                raw = await raw_exchange(process.proxy_port, request)
                status, code, _ = _sidecar_error(raw)
                if (status, code) != (400, "bad_request") or len(re.findall(rb"HTTP/1\.[01] \d{3} ", raw)) != 1:
                    failures.append((name, raw[:200]))
            assert failures == []
            await asyncio.sleep(0.1)
            assert upstream.received == [], f"bytes reached the upstream: {upstream.all_bytes[:300]!r}"
            # Still serving, and a well-formed chunked request passes.
            ok = await raw_exchange(
                process.proxy_port,
                b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                b"5\r\nhello\r\n0\r\n\r\n",
            )
            assert status_of(ok) == 200
            assert b"Traceback" not in "\n".join(process.raw).encode()
        finally:
            await process.stop()


@pytest.mark.parametrize("parser", ["c", "python"])
async def test_chunk_size_overflow_never_smuggles(tmp_path: Path, parser: str) -> None:
    """A chunk size past 2**64: llhttp refuses it (400); the pure-Python parser
    reads it as one enormous chunk, so what follows is body, never a second
    request. Documented in SECURITY.md; bounded by max_request_body and
    body_idle_timeout."""
    env = {"AIOHTTP_NO_EXTENSIONS": "1" if parser == "python" else ""}
    async with ScriptedUpstream() as upstream:
        config = _config(upstream.url, inbound={"body_idle_timeout": "1s"})
        process = SidecarProcess(write_config(tmp_path, config), env=env)
        await process.start()
        try:
            request = (
                CHUNKED + b"fffffffffffffffffff\r\nhello\r\n0\r\n\r\nGET /api/smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
            )
            raw = await raw_exchange(process.proxy_port, request, timeout=8)
            await asyncio.sleep(0.2)
            if parser == "c":
                assert _sidecar_error(raw)[:2] == (400, "bad_request")
                assert upstream.received == []
            else:
                assert _sidecar_error(raw)[:2] == (408, "request_timeout")
                # One request, whose (never finished) body holds the would-be second one.
                framed = requests_in(upstream.all_bytes)
                assert [(r.method, r.target, r.complete) for r in framed] == [("POST", "/x", False)]
                assert b"/api/smuggled" in framed[0].body
        finally:
            await process.stop()


# --------------------------------------------------------------------------
# Limits on the request line, headers and body
# --------------------------------------------------------------------------


async def test_request_line_and_header_limits(tmp_path: Path) -> None:
    inbound = {"max_line_size": 2048, "max_field_size": 1024, "max_headers": 20}
    async with (
        ScriptedUpstream() as upstream,
        running_sidecar(tmp_path, _config(upstream.url, inbound=inbound)) as sidecar,
    ):
        cases = [
            (b"GET /api/" + b"a" * 3000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414, "uri_too_long"),
            (b"GET /api/x HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 1500 + b"\r\n\r\n", 431, "headers_too_large"),
            (b"GET /api/x HTTP/1.1\r\nHost: a\r\nX-" + b"n" * 1500 + b": v\r\n\r\n", 431, "headers_too_large"),
            (
                b"GET /api/x HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(30)) + b"\r\n",
                431,
                "headers_too_large",
            ),
        ]
        for request, status, code in cases:
            raw = await raw_exchange(sidecar.proxy_port, request)
            assert _sidecar_error(raw)[:2] == (status, code), request[:60]
            assert b"vvvvvvvvvv" not in raw and b"aaaaaaaaaa" not in raw, "the offending bytes were echoed back"
        # Just under every limit passes.
        fine = (
            b"GET /api/"
            + b"a" * 1900
            + b" HTTP/1.1\r\nHost: a\r\nX-Big: "
            + b"v" * 900
            + b"\r\n"
            + b"".join(b"X-%d: v\r\n" % i for i in range(15))
            + b"Connection: close\r\n\r\n"
        )
        assert status_of(await raw_exchange(sidecar.proxy_port, fine)) == 200
        assert len(upstream.received) == 1
        metrics = sidecar.metrics.render().decode()
        assert 'sidecar_client_errors_total{kind="uri_too_long"} 1.0' in metrics
        assert 'sidecar_client_errors_total{kind="headers_too_large"} 3.0' in metrics


async def test_declared_body_over_limit_is_refused_before_the_upstream(tmp_path: Path) -> None:
    async with (
        ScriptedUpstream() as upstream,
        running_sidecar(tmp_path, _config(upstream.url, inbound={"max_request_body": "1KiB"})) as sidecar,
    ):
        request = b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000
        raw = await raw_exchange(sidecar.proxy_port, request)
        status, code, body = _sidecar_error(raw)
        assert (status, code) == (413, "request_too_large")
        assert body is not None and body["upstream"] == "api"
        await asyncio.sleep(0.1)
        assert upstream.received == [], "the upstream was contacted for a body known to be too large"
        pool = sidecar.generation().pools["api"]
        await assert_at_rest(pool)


async def test_chunked_body_over_limit_is_cut_off(tmp_path: Path) -> None:
    async with (
        ScriptedUpstream(answer_after=b"never") as upstream,
        running_sidecar(tmp_path, _config(upstream.url, inbound={"max_request_body": "10KiB"})) as sidecar,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.proxy_port)
        writer.write(CHUNKED)
        sent = 0
        answer = b""
        try:
            for _ in range(64):  # up to 64 KiB, far over the limit
                writer.write(b"400\r\n" + b"y" * 1024 + b"\r\n")
                await writer.drain()
                sent += 1024
                await asyncio.sleep(0.005)
        except ConnectionError:
            pass
        try:
            async with asyncio.timeout(5):
                answer = await reader.read(65536)
        except (TimeoutError, ConnectionError):
            pass
        writer.transport.abort()
        assert _sidecar_error(answer)[:2] == (413, "request_too_large")
        await asyncio.sleep(0.1)
        # The upstream got a body that never finished, on a connection that was then closed.
        framed = requests_in(upstream.all_bytes)
        assert [(r.method, r.complete) for r in framed] == [("POST", False)]
        assert len(framed[0].body) <= 10 * 1024
        pool = sidecar.generation().pools["api"]
        await assert_at_rest(pool)
        assert pool.stats().connections == 0


# --------------------------------------------------------------------------
# Headers from the upstream
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nX-Bad: a\x00Injected: yes\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-Bad: a\rInjected: yes\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-Bad: a\r\n Injected: yes\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX Bad: a\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 Fine\r\nInjected: yes\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=["nul", "bare-cr", "obs-fold", "space-in-name", "double-content-length", "header-in-reason"],
)
async def test_broken_upstream_headers_are_never_reflected(tmp_path: Path, response: bytes) -> None:
    async with ScriptedUpstream(response) as upstream, running_sidecar(tmp_path, _config(upstream.url)) as sidecar:
        raw = await raw_exchange(sidecar.proxy_port, b"GET /api/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        # obs-fold: refused with 502 (RFC 9112 §5.2 lets a proxy reject it), so
        # it can never become a header of its own.
        if b"Fine\r\nInjected" in response:
            # A well-formed header after a custom reason: forwarded as a header, reason dropped.
            assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"Fine" not in raw
            return
        status, code, _ = _sidecar_error(raw)
        assert (status, code) == (502, "upstream_protocol_error"), raw[:200]
        assert b"Injected" not in raw and b"\x00" not in raw


async def test_upstream_reason_phrase_is_not_forwarded(tmp_path: Path) -> None:
    response = b"HTTP/1.1 404 Totally <script>Custom</script>\r\nContent-Length: 2\r\n\r\nno"
    async with ScriptedUpstream(response) as upstream, running_sidecar(tmp_path, _config(upstream.url)) as sidecar:
        raw = await raw_exchange(sidecar.proxy_port, b"GET /api/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 404 Not Found\r\n")
        assert b"Custom" not in raw


# --------------------------------------------------------------------------
# Admin
# --------------------------------------------------------------------------


async def test_admin_token_protects_all_but_the_probes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADMIN_TOKEN_FOR_TEST", "s3cret-admin-token")
    async with (
        Upstream() as upstream,
        running_sidecar(
            tmp_path,
            f"""
        admin: {{ listen: 127.0.0.1:0, token: "${{ADMIN_TOKEN_FOR_TEST}}" }}
        upstreams:
          api:
            url: {upstream.url}
        """,
        ) as sidecar,
        aiohttp.ClientSession() as client,
    ):
        base = f"http://127.0.0.1:{sidecar.admin_port}"
        for path in ("/healthz", "/readyz"):
            async with client.get(base + path) as response:
                assert response.status == 200
        protected = [("GET", "/metrics"), ("GET", "/pools"), ("GET", "/config"), ("POST", "/reload")]
        for method, path in protected:
            for header in (None, "Bearer wrong", "s3cret-admin-token", "Bearer s3cret-admin-toke"):
                headers = {"Authorization": header} if header else {}
                async with client.request(method, base + path, headers=headers) as response:
                    assert response.status == 401, (method, path, header)
                    assert response.headers["WWW-Authenticate"] == "Bearer"
            async with client.request(
                method, base + path, headers={"Authorization": "Bearer s3cret-admin-token"}
            ) as response:
                assert response.status == 200, (method, path)
                assert "s3cret-admin-token" not in await response.text()
        async with client.get(base + "/nope") as response:
            assert response.status == 401  # unknown paths reveal nothing either


async def test_admin_binds_loopback_by_default(tmp_path: Path) -> None:
    from sidecar.config import load_config

    config = load_config(write_config(tmp_path, _config("http://127.0.0.1:9")))
    assert config.admin.listen is not None and config.admin.listen.host == "127.0.0.1"
    assert config.listen.host == "127.0.0.1"
    assert config.warnings == ()


async def test_exposed_admin_without_token_logs_a_loud_warning(tmp_path: Path) -> None:
    path = write_config(tmp_path, _config("http://127.0.0.1:9"))
    # The config file keeps the loopback default; the command line exposes it.
    process = SidecarProcess(path, extra_args=["--admin", "0.0.0.0:0"])
    await process.start()
    try:
        warnings = [e for e in process.lines if e.get("level") == "warning" and "admin listener" in str(e)]
        assert warnings, process.raw
        assert "no token" in warnings[0]["message"]
    finally:
        await process.stop()


async def test_proxy_survives_a_caller_that_vanishes_mid_error(tmp_path: Path) -> None:
    """Bad requests from callers that disconnect at once leave nothing behind."""
    async with ScriptedUpstream() as upstream, running_sidecar(tmp_path, _config(upstream.url)) as sidecar:
        for _ in range(50):
            _, writer = await asyncio.open_connection("127.0.0.1", sidecar.proxy_port)
            writer.write(SMUGGLING["cl_and_te"])
            writer.transport.abort()
        await asyncio.sleep(0.3)
        async with aiohttp.ClientSession() as client, client.get(proxy_url(sidecar) + "/api/x") as response:
            assert response.status == 200
