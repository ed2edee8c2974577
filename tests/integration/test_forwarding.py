"""Forwarding through the real sidecar on real sockets. SPEC §4-§6.

Upstreams are real servers on port 0: :class:`Upstream` (aiohttp) where a
framework is fine, :class:`ScriptedUpstream` where the test needs bytes no
framework would send.  Callers are aiohttp clients or raw sockets.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sidecar.server import Sidecar
from tests.support import LOOPBACK
from tests.support.sidecar import proxy_url, running_sidecar
from tests.support.tls import tls_server_context
from tests.support.upstreams import ScriptedUpstream, TLSUpstream, Upstream
from tests.support.wire import raw_request, read_request_head, read_response

MiB = 1024 * 1024


def one_upstream(url: str, extra: str = "", hosts: str = "[api.internal]") -> str:
    return f"""
        upstreams:
          api:
            url: {url}/base
            route: {{ hosts: {hosts} }}
            {extra}
        """


def get(target: str, *headers: str, method: str = "GET", host: str = "localhost") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", *headers, "", ""]
    return "\r\n".join(lines).encode("latin-1")


def assert_sidecar_error(response_status: int, headers: object, body: bytes, status: int, code: str) -> dict:  # type: ignore[type-arg]
    assert response_status == status
    get_header = headers.get if hasattr(headers, "get") else None  # type: ignore[attr-defined]
    assert get_header is not None
    assert get_header("X-Sidecar-Error") == code
    payload = json.loads(body)
    assert payload["error"] == code
    assert isinstance(payload["message"], str) and payload["message"]
    assert payload["request_id"] == get_header("X-Request-Id")
    assert set(payload) == {"error", "message", "upstream", "request_id"}
    return payload  # type: ignore[no-any-return]


class _Headers:
    """Case-insensitive .get over a RawResponse's header list."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs

    def get(self, name: str) -> str | None:
        for key, value in self.pairs:
            if key.lower() == name.lower():
                return value
        return None


# =========================================================== routing


async def test_absolute_form_via_raw_socket(tmp_path: Path) -> None:
    async with Upstream() as upstream, running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar:
        # Configured host: forwarded with the upstream's base path, query byte for byte.
        response = await raw_request(sidecar.proxy_port, get("http://api.internal/v1/x?b=%20&a=1", host="api.internal"))
        assert response.status == 200 and response.body == b"ok"
        assert upstream.requests[-1].path == "/base/v1/x?b=%20&a=1"
        assert dict(upstream.requests[-1].headers)["Host"] == f"{LOOPBACK}:{upstream.port}"

        # With a port, and a Host header that disagrees: the target's authority decides.
        response = await raw_request(sidecar.proxy_port, get("http://api.internal:80/y", host="evil.example"))
        assert response.status == 200
        assert upstream.requests[-1].path == "/base/y"

        # Unknown host: 403, never an open proxy; nothing reaches any upstream.
        before = len(upstream.requests)
        for target in (
            f"http://{LOOPBACK}:{upstream.port}/base/x",
            "http://evil.example/",
            "http://api.internal.evil/",
        ):
            response = await raw_request(sidecar.proxy_port, get(target, host="api.internal"))
            payload = assert_sidecar_error(
                response.status, _Headers(response.headers), response.body, 403, "destination_not_allowed"
            )
            assert payload["upstream"] is None
        assert len(upstream.requests) == before


async def test_host_header_and_prefix_routing(tmp_path: Path) -> None:
    async with Upstream() as upstream, running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar:
        async with aiohttp.ClientSession() as client:
            async with client.get(proxy_url(sidecar) + "/v1/x?q=1", headers={"Host": "api.internal"}) as response:
                assert response.status == 200
            async with client.get(proxy_url(sidecar) + "/api/v1/x?q=1") as response:
                assert response.status == 200
            async with client.get(proxy_url(sidecar) + "/apix/v1") as response:
                assert response.status == 404
        assert [r.path for r in upstream.requests] == ["/base/v1/x?q=1", "/base/v1/x?q=1"]


async def test_no_route_is_404_with_json_body(tmp_path: Path) -> None:
    async with Upstream() as upstream, running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar:
        async with aiohttp.ClientSession() as client:
            async with client.get(proxy_url(sidecar) + "/nowhere/x", headers={"X-Request-Id": "req-404"}) as response:
                body = await response.read()
                payload = assert_sidecar_error(response.status, response.headers, body, 404, "no_route")
                assert response.headers["Content-Type"].startswith("application/json")
                assert payload["upstream"] is None
                assert payload["request_id"] == "req-404"
                assert "/nowhere/x" in payload["message"]
        assert upstream.requests == []


async def test_connect_is_405(tmp_path: Path) -> None:
    async with Upstream() as upstream, running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar:
        response = await raw_request(
            sidecar.proxy_port, get("api.internal:443", method="CONNECT", host="api.internal:443")
        )
        payload = assert_sidecar_error(
            response.status, _Headers(response.headers), response.body, 405, "connect_not_supported"
        )
        assert "http://" in payload["message"]
        assert upstream.requests == []


@pytest.mark.parametrize(
    "target",
    ["http://user:pw@api.internal/x", "http://api.internal/x#frag", "ftp://api.internal/x"],
    ids=["userinfo", "fragment", "scheme"],
)
async def test_malformed_absolute_form_is_400(tmp_path: Path, target: str) -> None:
    async with Upstream() as upstream, running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar:
        response = await raw_request(sidecar.proxy_port, get(target, host="api.internal"))
        assert_sidecar_error(response.status, _Headers(response.headers), response.body, 400, "bad_request")
        assert upstream.requests == []


# ====================================================== header hygiene

HOP_BY_HOP_SENT = [
    "Connection: keep-alive, X-Hop-Named, x-other-named",
    "X-Hop-Named: must-not-pass",
    "X-Other-Named: must-not-pass",
    "Connection: X-Second-Line",  # a second Connection line names more
    "X-Second-Line: must-not-pass",
    "Keep-Alive: timeout=5",
    "Proxy-Connection: keep-alive",
    "TE: trailers",
    "Trailer: X-Checksum",
    "Proxy-Authorization: Basic c2VjcmV0",
]


async def test_request_header_hygiene(tmp_path: Path) -> None:
    extra = """headers:
              set: { Authorization: "Bearer from-config", X-Added: added }
              remove: [X-Debug]"""
    async with Upstream() as upstream, running_sidecar(tmp_path, one_upstream(upstream.url, extra)) as sidecar:
        response = await raw_request(
            sidecar.proxy_port,
            get(
                "/api/x",
                *HOP_BY_HOP_SENT,
                "Authorization: Bearer from-caller",
                "X-Debug: 1",
                "X-Custom: kept",
                "X-Repeated: one",
                "X-Repeated: two",
                "Accept: text/plain",
                "User-Agent: caller/1.0",
                host="caller-facing-name:8088",
            ),
        )
        assert response.status == 200
        (recorded,) = upstream.requests
        names = [name.lower() for name, _ in recorded.headers]
        for gone in (
            "connection",
            "x-second-line",
            "x-hop-named",
            "x-other-named",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "proxy-authorization",
            "x-debug",
        ):
            assert gone not in names, gone
        sent = recorded.headers
        assert [v for n, v in sent if n.lower() == "host"] == [f"{LOOPBACK}:{upstream.port}"]
        assert [v for n, v in sent if n.lower() == "authorization"] == ["Bearer from-config"]
        assert [v for n, v in sent if n.lower() == "x-added"] == ["added"]
        assert [v for n, v in sent if n.lower() == "x-custom"] == ["kept"]
        assert [v for n, v in sent if n.lower() == "x-repeated"] == ["one", "two"]
        assert [v for n, v in sent if n.lower() == "user-agent"] == ["caller/1.0"]
        # Nothing invented by the HTTP client: no Accept-Encoding, no httpx User-Agent, no body framing on a GET.
        assert "accept-encoding" not in names
        assert "content-length" not in names and "transfer-encoding" not in names
        assert names.count("x-request-id") == 1


async def test_response_header_hygiene(tmp_path: Path) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.Response(body=b"hello")
        response.headers["Connection"] = "X-Upstream-Hop"  # aiohttp sends this as-is on keep-alive
        response.headers["X-Upstream-Hop"] = "secret"
        response.headers.add("Connection", "X-Second-Hop")
        response.headers["X-Second-Hop"] = "secret"
        response.headers["Keep-Alive"] = "timeout=5"
        response.headers["Proxy-Authenticate"] = "Basic"
        response.headers["Trailer"] = "X-Checksum"
        response.headers["Upgrade"] = "h2c"
        response.headers["X-Kept"] = "yes"
        return response

    async with Upstream(handler) as upstream, running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar:
        response = await raw_request(sidecar.proxy_port, get("/api/x"))
        assert response.status == 200 and response.body == b"hello"
        names = {name.lower() for name, _ in response.headers}
        for gone in ("x-upstream-hop", "x-second-hop", "keep-alive", "proxy-authenticate", "trailer", "upgrade"):
            assert gone not in names, gone
        assert response.all("Connection") in ([], ["keep-alive"])  # only the sidecar's own, about its own hop
        assert response.header("X-Kept") == "yes"


async def test_request_id_is_kept_or_generated_and_returned(tmp_path: Path) -> None:
    async with Upstream() as upstream, running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar:
        async with aiohttp.ClientSession() as client:
            async with client.get(proxy_url(sidecar) + "/api/a", headers={"X-Request-Id": "caller-id-1"}) as response:
                assert response.headers["X-Request-Id"] == "caller-id-1"
            async with client.get(proxy_url(sidecar) + "/api/b") as response:
                generated = response.headers["X-Request-Id"]
                assert re.fullmatch(r"[0-9a-f]{32}", generated)
        first, second = ([v for n, v in r.headers if n.lower() == "x-request-id"] for r in upstream.requests)
        assert first == ["caller-id-1"]
        assert second == [generated]


async def test_unsafe_caller_request_id_is_replaced(tmp_path: Path) -> None:
    async with Upstream() as upstream, running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar:
        for unsafe in ("caf\u00e9".encode(), b"a b", b"x" * 201, b"tab\there"):
            response = await raw_request(
                sidecar.proxy_port, get("/api/x")[:-2] + b"X-Request-Id: " + unsafe + b"\r\n\r\n"
            )
            assert response.status == 200
            returned = response.header("X-Request-Id")
            assert returned is not None and re.fullmatch(r"[0-9a-f]{32}", returned)
            sent = [v for n, v in upstream.requests[-1].headers if n.lower() == "x-request-id"]
            assert sent == [returned]


async def test_non_ascii_header_bytes_pass_unchanged(tmp_path: Path) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.Response(text="ok")
        response.headers["X-Utf8"] = "caf\u00e9 \u2713"
        response.headers["Content-Disposition"] = "attachment; filename*=UTF-8''na%C3%AFve.txt"
        return response

    async with Upstream(handler) as upstream, running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar:
        utf8, latin1 = "caf\u00e9 \u2713".encode(), "na\u00efve".encode("latin-1")
        response = await raw_request(
            sidecar.proxy_port, get("/api/x")[:-2] + b"X-Utf8: " + utf8 + b"\r\nX-Latin1: " + latin1 + b"\r\n\r\n"
        )
        assert response.status == 200
        sent = {n.lower(): v.encode("latin-1") for n, v in upstream.requests[-1].headers}
        assert sent["x-utf8"] == utf8
        assert sent["x-latin1"] == latin1
        # read_response decodes as ISO-8859-1: encoding back gives the bytes on the wire.
        assert response.header("X-Utf8").encode("latin-1") == utf8  # type: ignore[union-attr]


async def test_upstream_request_id_does_not_replace_ours(tmp_path: Path) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(text="x", headers={"X-Request-Id": "upstream-made-this-up"})

    async with Upstream(handler) as upstream, running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar:
        response = await raw_request(sidecar.proxy_port, get("/api/x", "X-Request-Id: mine"))
        assert response.all("X-Request-Id") == ["mine"]


async def test_three_set_cookie_lines_arrive_as_three_lines(tmp_path: Path) -> None:
    cookies = ["a=1; Path=/", "b=2; Expires=Wed, 21 Oct 2037 07:28:00 GMT; HttpOnly", "c=3, with comma; Secure"]

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.Response(text="ok")
        for cookie in cookies:
            response.headers.add("Set-Cookie", cookie)
        response.headers.add("X-Multi", "1")
        response.headers.add("X-Multi", "2")
        return response

    async with Upstream(handler) as upstream, running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar:
        response = await raw_request(sidecar.proxy_port, get("/api/x"))
        assert response.all("Set-Cookie") == cookies
        assert response.all("X-Multi") == ["1", "2"]


async def test_one_callers_cookies_never_reach_another_caller(tmp_path: Path) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.Response(text=request.headers.get("Cookie", "-"))
        response.headers.add("Set-Cookie", f"session={request.query['who']}; Path=/")
        return response

    async with Upstream(handler) as upstream, running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar:
        # Alice gets a cookie from the upstream; she does not send it back herself.
        alice = await raw_request(sidecar.proxy_port, get("/api/x?who=alice"))
        assert alice.all("Set-Cookie") == ["session=alice; Path=/"]
        # Bob, then Alice again, on new connections and on the same pooled upstream connection.
        bob = await raw_request(sidecar.proxy_port, get("/api/x?who=bob"))
        assert bob.body == b"-"
        carol = await raw_request(sidecar.proxy_port, get("/api/x?who=carol", "Cookie: mine=carol"))
        assert carol.body == b"mine=carol"
        again = await raw_request(sidecar.proxy_port, get("/api/x?who=alice"))
        assert again.body == b"-"
        assert len(upstream.peers) == 1  # all through one kept-alive upstream connection
        sent_cookies = [[v for n, v in r.headers if n.lower() == "cookie"] for r in upstream.requests]
        assert sent_cookies == [[], [], ["mine=carol"], []]


@pytest.mark.parametrize(
    ("method", "status", "upstream_headers"),
    [
        ("HEAD", 200, {"Content-Length": "1234", "Content-Type": "text/plain"}),
        ("GET", 204, {}),
        ("GET", 304, {"ETag": '"v1"'}),
        ("POST", 204, {}),
    ],
)
async def test_bodyless_responses_have_no_body(
    tmp_path: Path, method: str, status: int, upstream_headers: dict[str, str]
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers=upstream_headers)

    async with Upstream(handler) as upstream, running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar:
        reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
        try:
            # Twice on one connection: a stray body byte would corrupt the second response.
            for _ in range(2):
                writer.write(get("/api/x", "Content-Length: 0", method=method))
                response = await asyncio.wait_for(read_response(reader, method=method), 5)
                assert response.status == status
                assert response.body == b""
                for name, value in upstream_headers.items():
                    assert response.header(name) == value
                assert response.header("Transfer-Encoding") is None
            writer.write(get("/api/x", "Content-Length: 0", "Connection: close", method=method))
            final = await asyncio.wait_for(read_response(reader, method=method), 5)
            assert final.status == status
            assert await asyncio.wait_for(reader.read(), 5) == b""  # and nothing after it
        finally:
            writer.close()


async def test_upstream_reason_phrase_is_not_forwarded(tmp_path: Path) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=int(request.query["s"]), reason="Custom Upstream Words", text="x")

    async with Upstream(handler) as upstream, running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar:
        for status, standard in ((200, "OK"), (418, "I'm a Teapot"), (299, "")):
            response = await raw_request(sidecar.proxy_port, get(f"/api/x?s={status}"))
            assert "Custom" not in response.status_line
            assert response.status_line.rstrip() == f"HTTP/1.1 {status} {standard}".rstrip()


async def test_no_invented_content_type_or_server_header(tmp_path: Path) -> None:
    async def bare(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Only: this\r\n\r\nbare")
            await writer.drain()

    async with ScriptedUpstream(bare) as upstream, running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar:
        response = await raw_request(sidecar.proxy_port, get("/api/x"))
        assert response.status == 200 and response.body == b"bare"
        assert response.header("Content-Type") is None
        assert response.header("Server") is None
        assert response.header("X-Only") == "this"
        assert response.header("Date") is not None  # RFC 9110 §6.6.1: a forwarder with a clock adds one


async def test_expect_100_continue(tmp_path: Path) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        return web.Response(body=await request.read())

    refused = f"http://{LOOPBACK}:{_unused_port()}"
    config = f"""
        upstreams:
          api: {{ url: "{{up}}/base" }}
          down: {{ url: "{refused}" }}
        """
    async with (
        Upstream(echo, read_body=False) as upstream,
        running_sidecar(tmp_path, config.replace("{up}", upstream.url)) as sidecar,
    ):
        reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
        try:
            writer.write(get("/api/x", "Content-Length: 5", "Expect: 100-continue", method="POST"))
            interim = await asyncio.wait_for(read_response(reader), 5)
            assert interim.status == 100
            writer.write(b"hello")
            final = await asyncio.wait_for(read_response(reader), 5)
            assert final.status == 200 and final.body == b"hello"
        finally:
            writer.close()
        assert all(name.lower() != "expect" for name, _ in upstream.requests[0].headers)

        # Refused before the body is wanted: the final answer comes at once, no 100, no upload.
        for target, status in (("/down/x", 502), ("/nowhere", 404)):
            response = await raw_request(
                sidecar.proxy_port,
                get(target, "Content-Length: 5", "Expect: 100-continue", "Connection: close", method="POST"),
            )
            assert response.status == status


# ============================================================ streaming


async def test_gzip_bodies_pass_byte_identical_both_ways(tmp_path: Path) -> None:
    original = os.urandom(64 * 1024) + b"compressible " * 20_000
    compressed = gzip.compress(original, mtime=0)

    async def handler(request: web.Request) -> web.StreamResponse:
        received = await request.read()  # the upstream does not decompress either (auto_decompress=False)
        assert request.headers["Content-Encoding"] == "gzip"
        return web.Response(
            body=compressed,
            headers={
                "Content-Encoding": "gzip",
                "Content-Type": "application/json",
                "X-Received-Sha256": hashlib.sha256(received).hexdigest(),
            },
        )

    async with (
        Upstream(handler, read_body=False) as upstream,
        running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar,
    ):
        async with aiohttp.ClientSession(auto_decompress=False) as client:
            async with client.post(
                proxy_url(sidecar) + "/api/x",
                data=compressed,
                headers={"Content-Encoding": "gzip", "Accept-Encoding": "gzip"},
            ) as response:
                body = await response.read()
                assert response.status == 200
                assert response.headers["Content-Encoding"] == "gzip"
                assert response.headers["Content-Length"] == str(len(compressed))
                assert response.headers["X-Received-Sha256"] == hashlib.sha256(compressed).hexdigest()
                assert body == compressed
        sent = dict((n.lower(), v) for n, v in upstream.requests[0].headers)
        assert sent["accept-encoding"] == "gzip"
        assert sent["content-length"] == str(len(compressed))


async def test_chunked_upload_without_content_length(tmp_path: Path) -> None:
    async def digest(request: web.Request) -> web.StreamResponse:
        hasher, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(64 * 1024):
            hasher.update(chunk)
            size += len(chunk)
        return web.json_response({"sha256": hasher.hexdigest(), "size": size})

    pieces = [os.urandom(n) for n in (1, 1000, 70_000, 3, 200_000)]

    async def body() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece
            await asyncio.sleep(0.01)  # arrive in separate reads

    async with (
        Upstream(digest, read_body=False) as upstream,
        running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar,
    ):
        async with aiohttp.ClientSession() as client:
            async with client.post(proxy_url(sidecar) + "/api/upload", data=body()) as response:
                assert response.status == 200
                result = await response.json()
        expected = b"".join(pieces)
        assert result == {"sha256": hashlib.sha256(expected).hexdigest(), "size": len(expected)}
        sent = dict((n.lower(), v) for n, v in upstream.requests[0].headers)
        assert "content-length" not in sent
        assert sent["transfer-encoding"] == "chunked"


async def test_upstream_body_delimited_by_close(tmp_path: Path) -> None:
    payload = os.urandom(300_000)

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + payload)  # no length, no chunking: ends at close
        await writer.drain()
        writer.close()

    async with (
        ScriptedUpstream(until_close) as upstream,
        running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar,
    ):
        for _ in range(2):
            response = await raw_request(sidecar.proxy_port, get("/api/x"))
            assert response.status == 200
            assert response.body == payload
        assert upstream.connections == 2  # such a connection is never reused
        await eventually(lambda: sidecar.generation().pools["api"].stats().connections == 0)


def _block(seed: int) -> bytes:
    """1 MiB of incompressible, reproducible data."""
    return hashlib.sha256(seed.to_bytes(8, "big")).digest() * (MiB // 32)


class _RssWatch:
    """Samples a process's RSS in the background; keeps the peak."""

    def __init__(self, rss: object) -> None:
        self._rss = rss
        self.baseline = rss()  # type: ignore[operator]
        self.peak = self.baseline
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self._rss())  # type: ignore[operator]
            await asyncio.sleep(0.02)

    def __enter__(self) -> _RssWatch:
        self._task = asyncio.get_running_loop().create_task(self._sample())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self.peak = max(self.peak, self._rss())  # type: ignore[operator]

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


async def test_large_bodies_stream_with_flat_memory(tmp_path: Path) -> None:
    from tests.support.sidecar import SidecarProcess
    from tests.support.yaml import write_config

    upload_size, download_size = 64 * MiB, 256 * MiB
    block = _block(1)

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            hasher, size, paused = hashlib.sha256(), 0, False
            async for chunk in request.content.iter_chunked(256 * 1024):
                hasher.update(chunk)
                size += len(chunk)
                if not paused and size >= 16 * MiB:
                    # An upstream that stops reading: the sidecar must stop reading
                    # from the caller too, not buffer the upload for it.
                    paused = True
                    await asyncio.sleep(1.0)
            return web.json_response({"sha256": hasher.hexdigest(), "size": size})
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = download_size
        await response.prepare(request)
        for _ in range(download_size // MiB):
            await response.write(block)
        return response

    expected = hashlib.sha256()
    for _ in range(download_size // MiB):
        expected.update(block)

    async with Upstream(handler, read_body=False) as upstream:
        process = SidecarProcess(write_config(tmp_path, one_upstream(upstream.url, "timeouts: { read: 60s }")))
        await process.start()
        try:
            timeout = aiohttp.ClientTimeout(total=120)
            async with aiohttp.ClientSession(timeout=timeout) as client:
                async with client.get(process.url + "/api/warmup") as response:  # imports, pools, buffers
                    await response.read()
                watch = _RssWatch(process.rss_bytes)
                with watch:
                    upload_hash = hashlib.sha256()

                    async def upload() -> AsyncIterator[bytes]:
                        for seed in range(upload_size // MiB):
                            chunk = _block(seed)
                            upload_hash.update(chunk)
                            yield chunk

                    async with client.post(process.url + "/api/up", data=upload()) as response:
                        assert response.status == 200
                        result = await response.json()
                    assert result == {"sha256": upload_hash.hexdigest(), "size": upload_size}
                    upload_growth = watch.growth

                    download_hash, received, paused = hashlib.sha256(), 0, False
                    async with client.get(process.url + "/api/down") as response:
                        assert response.status == 200
                        assert response.headers["Content-Length"] == str(download_size)
                        async for chunk in response.content.iter_chunked(MiB):
                            download_hash.update(chunk)
                            received += len(chunk)
                            if not paused and received >= 16 * MiB:
                                paused = True
                                # A caller that stops reading: the sidecar must stop reading
                                # from the upstream too (backpressure), not buffer for it.
                                await asyncio.sleep(1.0)
                    assert received == download_size
                    assert download_hash.hexdigest() == expected.hexdigest()
            print(f"sidecar RSS: baseline {watch.baseline / MiB:.1f} MiB, growth {watch.growth / MiB:.1f} MiB")
            assert watch.growth < 100 * MiB, f"sidecar RSS grew by {watch.growth / MiB:.1f} MiB"
            # The whole upload (64 MiB) fits under that bound; holding even most of it does not fit under this.
            assert upload_growth < 40 * MiB, f"sidecar RSS grew by {upload_growth / MiB:.1f} MiB during the upload"
        finally:
            await process.stop()
        assert all("Traceback" not in line for line in process.raw)


# =================================================== upstream failures


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


def _pool_is_clean(sidecar: Sidecar, name: str = "api") -> None:
    pool = sidecar.generation().pools[name]
    assert pool.admission.in_flight == 0
    assert pool.admission.pending == 0
    assert pool.active == 0
    assert pool.stats().active == 0


async def test_upstream_refused_is_502_connect_error(tmp_path: Path) -> None:
    port = _unused_port()
    async with running_sidecar(tmp_path, one_upstream(f"http://{LOOPBACK}:{port}")) as sidecar:
        async with aiohttp.ClientSession() as client:
            async with client.get(proxy_url(sidecar) + "/api/x") as response:
                payload = assert_sidecar_error(
                    response.status, response.headers, await response.read(), 502, "upstream_connect_error"
                )
                assert payload["upstream"] == "api"
        _pool_is_clean(sidecar)
        assert sidecar.generation().pools["api"].stats().connections == 0


async def test_upstream_closing_before_headers_is_502_protocol_error(tmp_path: Path) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.close()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"this is not HTTP\r\n\r\n")
        await writer.drain()

    for behaviour in (hang_up, garbage):
        async with (
            ScriptedUpstream(behaviour) as upstream,
            running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar,
        ):
            async with aiohttp.ClientSession() as client:
                for method in ("GET", "POST"):
                    async with client.request(method, proxy_url(sidecar) + "/api/x", data=b"x") as response:
                        payload = assert_sidecar_error(
                            response.status, response.headers, await response.read(), 502, "upstream_protocol_error"
                        )
                        assert payload["upstream"] == "api"
            _pool_is_clean(sidecar)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\nContent-Length: 2\r\n\r\nok",  # aiohttp would refuse to write it
        b"HTTP/1.1 200 OK\r\nX-Bad: a\x7fb\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX Bad: v\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    ],
    ids=["control-char", "del-char", "space-in-name", "bad-status-line", "conflicting-length"],
)
async def test_malformed_upstream_response_is_502(tmp_path: Path, head: bytes) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(head)
        await writer.drain()
        await asyncio.sleep(1)

    async with ScriptedUpstream(answer) as upstream, running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar:
        response = await raw_request(sidecar.proxy_port, get("/api/x"))
        assert_sidecar_error(response.status, _Headers(response.headers), response.body, 502, "upstream_protocol_error")
        await eventually(lambda: sidecar.generation().pools["api"].stats().connections == 0)
        _pool_is_clean(sidecar)


async def test_upstream_read_timeout_is_504(tmp_path: Path) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.Response(text="too late")

    extra = "timeouts: { read: 300ms }"
    async with Upstream(slow) as upstream, running_sidecar(tmp_path, one_upstream(upstream.url, extra)) as sidecar:
        started = time.monotonic()
        async with aiohttp.ClientSession() as client:
            async with client.get(proxy_url(sidecar) + "/api/x") as response:
                payload = assert_sidecar_error(
                    response.status, response.headers, await response.read(), 504, "upstream_timeout"
                )
        assert payload["upstream"] == "api"
        assert time.monotonic() - started < 3  # the read timeout, not the upstream's 5 s
        _pool_is_clean(sidecar)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_upstream_breaking_mid_body_aborts_the_caller(tmp_path: Path, framing: str) -> None:
    async def breaks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        if framing == "content-length":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 100_000)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000\r\n" + b"x" * 0x10000 + b"\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.transport.abort()

    async with ScriptedUpstream(breaks) as upstream, running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar:
        async with aiohttp.ClientSession() as client:
            async with client.get(proxy_url(sidecar) + "/api/x") as response:
                assert response.status == 200  # headers were already out
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()
        # Raw socket: the connection ends without a clean end of body (no final chunk).
        response_bytes = b""
        reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
        writer.write(get("/api/x"))
        while chunk := await asyncio.wait_for(reader.read(65536), 5):
            response_bytes += chunk
        writer.close()
        assert response_bytes.startswith(b"HTTP/1.1 200 OK\r\n")
        assert not response_bytes.endswith(b"0\r\n\r\n")
        _pool_is_clean(sidecar)
        # And the sidecar keeps serving.
        async with aiohttp.ClientSession() as client:
            async with client.get(proxy_url(sidecar) + "/nowhere") as response:
                assert response.status == 404


async def test_mid_body_failure_logs_no_traceback(tmp_path: Path) -> None:
    from tests.support.sidecar import SidecarProcess
    from tests.support.yaml import write_config

    async def breaks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        await writer.drain()
        writer.transport.abort()

    async with ScriptedUpstream(breaks) as upstream:
        process = SidecarProcess(write_config(tmp_path, one_upstream(upstream.url)))
        await process.start()
        try:
            async with aiohttp.ClientSession() as client:
                for _ in range(3):
                    async with client.get(process.url + "/api/x") as response:
                        with pytest.raises(aiohttp.ClientPayloadError):
                            await response.read()
            access = await process.wait_for_event("access", count=3)
            assert access["status"] == 200 and access["error"] == "upstream_body_error"
        finally:
            await process.stop()
        assert not [line for line in process.raw if "Traceback" in line or '"exception"' in line]


# ================================================ slots and connections


async def test_aborted_downloads_release_their_pool_slots(tmp_path: Path) -> None:
    chunk = b"z" * 65536

    async def endless(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/small"):
            return web.Response(text="small")
        response = web.StreamResponse()
        await response.prepare(request)
        while True:  # until the sidecar goes away
            await response.write(chunk)
            await asyncio.sleep(0.001)

    async def slow_headers(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.Response(text="late")

    async def sink(request: web.Request) -> web.StreamResponse:
        size = 0
        async for piece in request.content.iter_any():
            size += len(piece)
        return web.Response(text=str(size))

    async def route(request: web.Request) -> web.StreamResponse:
        handler = {"/base/slow": slow_headers, "/base/upload": sink}.get(request.path, endless)
        return await handler(request)

    # A generous pool timeout: "promptly" is asserted below, not by the admission clock on a busy machine.
    extra = "limits: { max_connections: 5, max_pending: 1000 }\n            timeouts: { pool: 10s }"
    async with (
        Upstream(route, read_body=False) as upstream,
        running_sidecar(tmp_path, one_upstream(upstream.url, extra)) as sidecar,
    ):
        pool = sidecar.generation().pools["api"]
        assert pool.admission.capacity == 5 and pool.admission.pool_timeout == 10

        async def abort_mid_download() -> None:
            reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
            writer.write(get("/api/big"))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200")
            await asyncio.wait_for(reader.readexactly(1000), 10)  # some body, then vanish
            writer.transport.abort()

        async def abort_waiting_for_headers() -> None:
            _, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
            writer.write(get("/api/slow"))
            await writer.drain()
            await eventually(lambda: pool.admission.in_flight > 0)  # it holds a slot upstream
            writer.transport.abort()

        async def abort_mid_upload() -> None:
            _, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
            writer.write(get("/api/upload", "Content-Length: 10000000", method="POST") + b"u" * 100_000)
            await writer.drain()
            await eventually(lambda: pool.admission.in_flight > 0)
            writer.transport.abort()

        async def batch(make: object, total: int, concurrency: int) -> None:
            for start in range(0, total, concurrency):
                await asyncio.gather(*(make() for _ in range(min(concurrency, total - start))))  # type: ignore[operator]

        await batch(abort_mid_download, 500, 5)
        await batch(abort_waiting_for_headers, 50, 1)
        await batch(abort_mid_upload, 50, 1)

        # Every slot is back: the next 50 go through promptly, 5 at a time at most upstream.
        started = time.monotonic()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:

            async def small() -> int:
                async with client.get(proxy_url(sidecar) + "/api/small") as response:
                    await response.read()
                    return response.status

            statuses = await asyncio.gather(*(small() for _ in range(50)))
        assert statuses == [200] * 50
        assert time.monotonic() - started < 10
        await eventually(lambda: pool.admission.in_flight == 0 and pool.stats().active == 0)
        _pool_is_clean(sidecar)
        assert pool.stats().connections <= 5
        assert upstream.max_open <= 5


async def test_upstream_connections_are_kept_alive_and_reused(tmp_path: Path) -> None:
    async with Upstream() as upstream, running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar:
        async with aiohttp.ClientSession() as client:
            for _ in range(20):
                async with client.post(proxy_url(sidecar) + "/api/x", data=b"body") as response:
                    assert response.status == 200
                async with client.get(proxy_url(sidecar) + "/api/x") as response:
                    assert response.status == 200
        assert len(upstream.peers) == 1
        stats = sidecar.generation().pools["api"].stats()
        assert (stats.connections, stats.idle, stats.opened_total) == (1, 1, 1)


async def test_stale_kept_alive_connection_is_retried_for_idempotent_requests(tmp_path: Path) -> None:
    async def one_request_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Answer the first request as keep-alive, then drop the connection when the
        # next one arrives: the race of an upstream closing an idle connection.
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request_head(reader)
        writer.transport.abort()

    async with (
        ScriptedUpstream(one_request_per_connection) as upstream,
        running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar,
    ):
        async with aiohttp.ClientSession() as client:
            for _ in range(3):
                async with client.get(proxy_url(sidecar) + "/api/x") as response:
                    assert response.status == 200 and await response.read() == b"ok"
            # Only GET/HEAD/OPTIONS/TRACE without a body are repeated: a POST may have had effects.
            async with client.post(proxy_url(sidecar) + "/api/x", data=b"pay") as response:
                assert response.status == 502
                assert response.headers["X-Sidecar-Error"] == "upstream_protocol_error"
        # GET 1 opens #1; GETs 2 and 3 find their kept-alive connection dropped and are
        # retried on #2 and #3; the POST meets the same fate on #3 and is not retried.
        assert upstream.connections == 3
        _pool_is_clean(sidecar)


async def test_upstream_closed_idle_connection_is_not_reused(tmp_path: Path) -> None:
    async def close_after_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # without saying Connection: close

    async with (
        ScriptedUpstream(close_after_one) as upstream,
        running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar,
    ):
        async with aiohttp.ClientSession() as client:
            for _ in range(5):
                await asyncio.sleep(0.1)  # the FIN has arrived by now
                async with client.post(proxy_url(sidecar) + "/api/x", data=b"not retryable") as response:
                    assert response.status == 200
        assert upstream.connections == 5


@pytest.mark.parametrize(
    ("method", "sent_headers", "body", "expected"),
    [
        ("POST", ["Content-Length: 0"], b"", {"content-length": "0"}),
        ("POST", ["Content-Length: 5"], b"hello", {"content-length": "5"}),
        ("PUT", ["Transfer-Encoding: chunked"], b"5\r\nhello\r\n0\r\n\r\n", {"transfer-encoding": "chunked"}),
        ("GET", [], b"", {}),
        ("DELETE", [], b"", {}),
    ],
)
async def test_request_body_framing_is_exactly_one_of_length_or_chunked(
    tmp_path: Path, method: str, sent_headers: list[str], body: bytes, expected: dict[str, str]
) -> None:
    async with Upstream() as upstream, running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar:
        response = await raw_request(sidecar.proxy_port, get("/api/x", *sent_headers, method=method) + body)
        assert response.status == 200
        (recorded,) = upstream.requests
        framing = {n.lower(): v for n, v in recorded.headers if n.lower() in ("content-length", "transfer-encoding")}
        assert framing == expected
        assert recorded.method == method
        assert recorded.body == (b"hello" if b"hello" in body else b"")


async def test_draining_refusal_really_closes_the_connection(tmp_path: Path) -> None:
    async with Upstream() as upstream, running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar:
        sidecar.draining = True
        try:
            reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
            writer.write(get("/api/x"))
            response = await asyncio.wait_for(read_response(reader), 5)
            assert_sidecar_error(response.status, _Headers(response.headers), response.body, 503, "draining")
            assert response.header("Connection") == "close"
            assert response.header("Retry-After") == "1"
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the sidecar, not left open
            writer.close()
        finally:
            sidecar.draining = False
        assert upstream.requests == []


async def test_tls_upstream_verified_and_handshake_failure_is_502(tmp_path: Path) -> None:
    server_context, ca_file = tls_server_context(tmp_path, "localhost")
    async with TLSUpstream(server_context, _echo_target) as upstream:
        config = f"""
            upstreams:
              trusted:
                url: https://localhost:{upstream.port}/base
                tls: {{ ca_file: "{ca_file}" }}
              untrusted:
                url: https://localhost:{upstream.port}/base
        """
        async with running_sidecar(tmp_path, config) as sidecar, aiohttp.ClientSession() as client:
            async with client.get(proxy_url(sidecar) + "/trusted/x?q=1") as response:
                assert response.status == 200
                assert await response.text() == "/base/x?q=1"
            async with client.get(proxy_url(sidecar) + "/untrusted/x") as response:
                payload = assert_sidecar_error(
                    response.status, response.headers, await response.read(), 502, "upstream_connect_error"
                )
                assert payload["upstream"] == "untrusted"
                assert "certificate" in payload["message"]


async def _echo_target(request: web.Request) -> web.StreamResponse:
    return web.Response(text=request.raw_path)


async def test_upstream_connect_timeout_is_504(tmp_path: Path) -> None:
    # A listener that never accepts, with its backlog filled: further SYNs are dropped.
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex((LOOPBACK, port))
            fillers.append(filler)
        await asyncio.sleep(0.1)
        extra = "timeouts: { connect: 300ms }"
        async with running_sidecar(tmp_path, one_upstream(f"http://{LOOPBACK}:{port}", extra)) as sidecar:
            started = time.monotonic()
            async with aiohttp.ClientSession() as client:
                async with client.get(proxy_url(sidecar) + "/api/x") as response:
                    payload = assert_sidecar_error(
                        response.status, response.headers, await response.read(), 504, "upstream_timeout"
                    )
            assert "connecting" in payload["message"]
            assert time.monotonic() - started < 3
            _pool_is_clean(sidecar)
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_target_passes_byte_for_byte(tmp_path: Path) -> None:
    async with Upstream() as upstream, running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar:
        targets = [
            "/api/a/../b/%2e%2E/./c",
            "/api//double//slash/",
            "/api/x%2Fy%20z?b=2&a=1&a=%41&plus=a+b&empty=&=&&",
            "/api/q?x=|{}^`'",
            "/api/semi;param=1/x",
        ]
        for target in targets:
            response = await raw_request(sidecar.proxy_port, get(target))
            assert response.status == 200
            assert upstream.requests[-1].path == "/base" + target.removeprefix("/api")
        response = await raw_request(sidecar.proxy_port, get("http://api.internal/a/../%7e?x=%zz", host="api.internal"))
        assert response.status == 200
        assert upstream.requests[-1].path == "/base/a/../%7e?x=%zz"


async def test_caller_leaving_while_the_upstream_connection_opens_leaks_nothing(tmp_path: Path) -> None:
    # TRAPS.md §2: a request cancelled while its connection is being opened must not
    # leave a phantom connection (or slot) behind.
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex((LOOPBACK, port))
            fillers.append(filler)
        await asyncio.sleep(0.1)
        extra = "limits: { max_connections: 2 }\n            timeouts: { connect: 30s }"
        async with running_sidecar(tmp_path, one_upstream(f"http://{LOOPBACK}:{port}", extra)) as sidecar:
            pool = sidecar.generation().pools["api"]
            for _ in range(50):
                _, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
                writer.write(get("/api/x"))
                await writer.drain()
                await eventually(lambda: pool.stats().connecting == 1)
                writer.transport.abort()
                # At once, not by the idle sweeper (1 s) finding a dead connection later.
                await eventually(lambda: pool.stats().connections == 0 and pool.admission.in_flight == 0, 0.9)
            _pool_is_clean(sidecar)
            assert pool.stats().opened_total == pool.stats().closed_total == 50
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
