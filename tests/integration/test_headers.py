"""Header hygiene both ways: hop-by-hop headers, request ids, cookies, status lines (docs/routing-and-forwarding.md).

Real upstreams on port 0 (:mod:`tests.support.upstreams`), the real sidecar,
callers that are aiohttp clients or raw sockets (:mod:`tests.support.wire`).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from sidecar.server import Sidecar
from tests.support import LOOPBACK
from tests.support.sidecar import proxy_url, running_sidecar
from tests.support.upstreams import ScriptedUpstream, Upstream
from tests.support.wire import raw_request, read_request_head, request_bytes
from tests.support.yaml import API_INTERNAL, one_upstream

MiB = 1024 * 1024


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
    extra: dict[str, Any] = {
        "headers": {"set": {"Authorization": "Bearer from-config", "X-Added": "added"}, "remove": ["X-Debug"]}
    }
    async with (
        Upstream() as upstream,
        running_sidecar(tmp_path, one_upstream(f"{upstream.url}/base", route=API_INTERNAL, **extra)) as sidecar,
    ):
        response = await raw_request(
            sidecar.proxy_port,
            request_bytes(
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


async def test_response_header_hygiene(upstream: Upstream, api_sidecar: Sidecar) -> None:
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

    upstream.handler = handler
    response = await raw_request(api_sidecar.proxy_port, request_bytes("/api/x"))
    assert response.status == 200 and response.body == b"hello"
    names = {name.lower() for name, _ in response.headers}
    for gone in ("x-upstream-hop", "x-second-hop", "keep-alive", "proxy-authenticate", "trailer", "upgrade"):
        assert gone not in names, gone
    assert response.all("Connection") in ([], ["keep-alive"])  # only the sidecar's own, about its own hop
    assert response.header("X-Kept") == "yes"


async def test_request_id_is_kept_or_generated_and_returned(upstream: Upstream, api_sidecar: Sidecar) -> None:
    async with aiohttp.ClientSession() as client:
        async with client.get(proxy_url(api_sidecar) + "/api/a", headers={"X-Request-Id": "caller-id-1"}) as response:
            assert response.headers["X-Request-Id"] == "caller-id-1"
        async with client.get(proxy_url(api_sidecar) + "/api/b") as response:
            generated = response.headers["X-Request-Id"]
            assert re.fullmatch(r"[0-9a-f]{32}", generated)
    first, second = ([v for n, v in r.headers if n.lower() == "x-request-id"] for r in upstream.requests)
    assert first == ["caller-id-1"]
    assert second == [generated]


async def test_unsafe_caller_request_id_is_replaced(upstream: Upstream, api_sidecar: Sidecar) -> None:
    for unsafe in ("caf\u00e9".encode(), b"a b", b"x" * 201, b"tab\there"):
        response = await raw_request(
            api_sidecar.proxy_port, request_bytes("/api/x")[:-2] + b"X-Request-Id: " + unsafe + b"\r\n\r\n"
        )
        assert response.status == 200
        returned = response.header("X-Request-Id")
        assert returned is not None and re.fullmatch(r"[0-9a-f]{32}", returned)
        sent = [v for n, v in upstream.requests[-1].headers if n.lower() == "x-request-id"]
        assert sent == [returned]


async def test_non_ascii_header_bytes_pass_unchanged(upstream: Upstream, api_sidecar: Sidecar) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.Response(text="ok")
        response.headers["X-Utf8"] = "caf\u00e9 \u2713"
        response.headers["Content-Disposition"] = "attachment; filename*=UTF-8''na%C3%AFve.txt"
        return response

    upstream.handler = handler
    utf8, latin1 = "caf\u00e9 \u2713".encode(), "na\u00efve".encode("latin-1")
    response = await raw_request(
        api_sidecar.proxy_port,
        request_bytes("/api/x")[:-2] + b"X-Utf8: " + utf8 + b"\r\nX-Latin1: " + latin1 + b"\r\n\r\n",
    )
    assert response.status == 200
    sent = {n.lower(): v.encode("latin-1") for n, v in upstream.requests[-1].headers}
    assert sent["x-utf8"] == utf8
    assert sent["x-latin1"] == latin1
    # read_response decodes as ISO-8859-1: encoding back gives the bytes on the wire.
    assert response.header("X-Utf8").encode("latin-1") == utf8  # type: ignore[union-attr]


async def test_upstream_request_id_does_not_replace_ours(upstream: Upstream, api_sidecar: Sidecar) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(text="x", headers={"X-Request-Id": "upstream-made-this-up"})

    upstream.handler = handler
    response = await raw_request(api_sidecar.proxy_port, request_bytes("/api/x", "X-Request-Id: mine"))
    assert response.all("X-Request-Id") == ["mine"]


async def test_three_set_cookie_lines_arrive_as_three_lines(upstream: Upstream, api_sidecar: Sidecar) -> None:
    cookies = ["a=1; Path=/", "b=2; Expires=Wed, 21 Oct 2037 07:28:00 GMT; HttpOnly", "c=3, with comma; Secure"]

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.Response(text="ok")
        for cookie in cookies:
            response.headers.add("Set-Cookie", cookie)
        response.headers.add("X-Multi", "1")
        response.headers.add("X-Multi", "2")
        return response

    upstream.handler = handler
    response = await raw_request(api_sidecar.proxy_port, request_bytes("/api/x"))
    assert response.all("Set-Cookie") == cookies
    assert response.all("X-Multi") == ["1", "2"]


async def test_one_callers_cookies_never_reach_another_caller(upstream: Upstream, api_sidecar: Sidecar) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.Response(text=request.headers.get("Cookie", "-"))
        response.headers.add("Set-Cookie", f"session={request.query['who']}; Path=/")
        return response

    upstream.handler = handler
    # Alice gets a cookie from the upstream; she does not send it back herself.
    alice = await raw_request(api_sidecar.proxy_port, request_bytes("/api/x?who=alice"))
    assert alice.all("Set-Cookie") == ["session=alice; Path=/"]
    # Bob, then Alice again, on new connections and on the same pooled upstream connection.
    bob = await raw_request(api_sidecar.proxy_port, request_bytes("/api/x?who=bob"))
    assert bob.body == b"-"
    carol = await raw_request(api_sidecar.proxy_port, request_bytes("/api/x?who=carol", "Cookie: mine=carol"))
    assert carol.body == b"mine=carol"
    again = await raw_request(api_sidecar.proxy_port, request_bytes("/api/x?who=alice"))
    assert again.body == b"-"
    assert len(upstream.peers) == 1  # all through one kept-alive upstream connection
    sent_cookies = [[v for n, v in r.headers if n.lower() == "cookie"] for r in upstream.requests]
    assert sent_cookies == [[], [], ["mine=carol"], []]


async def test_upstream_reason_phrase_is_not_forwarded(upstream: Upstream, api_sidecar: Sidecar) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=int(request.query["s"]), reason="Custom Upstream Words", text="x")

    upstream.handler = handler
    for status, standard in ((200, "OK"), (418, "I'm a Teapot"), (299, "")):
        response = await raw_request(api_sidecar.proxy_port, request_bytes(f"/api/x?s={status}"))
        assert "Custom" not in response.status_line
        assert response.status_line.rstrip() == f"HTTP/1.1 {status} {standard}".rstrip()


async def test_no_invented_content_type_or_server_header(tmp_path: Path) -> None:
    async def bare(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Only: this\r\n\r\nbare")
            await writer.drain()

    async with (
        ScriptedUpstream(bare) as upstream,
        running_sidecar(tmp_path, one_upstream(f"{upstream.url}/base", route=API_INTERNAL)) as sidecar,
    ):
        response = await raw_request(sidecar.proxy_port, request_bytes("/api/x"))
        assert response.status == 200 and response.body == b"bare"
        assert response.header("Content-Type") is None
        assert response.header("Server") is None
        assert response.header("X-Only") == "this"
        assert response.header("Date") is not None  # RFC 9110 §6.6.1: a forwarder with a clock adds one
