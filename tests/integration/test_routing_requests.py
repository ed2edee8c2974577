"""Which requests are forwarded where, and which the sidecar refuses itself (docs/routing-and-forwarding.md).

Real upstreams on port 0 (:mod:`tests.support.upstreams`), the real sidecar,
callers that are aiohttp clients or raw sockets (:mod:`tests.support.wire`).
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from sidecar.server import Sidecar
from tests.support import LOOPBACK
from tests.support.sidecar import assert_sidecar_error, proxy_url
from tests.support.upstreams import Upstream
from tests.support.wire import raw_request, read_response, request_bytes

MiB = 1024 * 1024


async def test_absolute_form_via_raw_socket(upstream: Upstream, api_sidecar: Sidecar) -> None:
    # Configured host: forwarded with the upstream's base path, query byte for byte.
    response = await raw_request(
        api_sidecar.proxy_port, request_bytes("http://api.internal/v1/x?b=%20&a=1", host="api.internal")
    )
    assert response.status == 200 and response.body == b"ok"
    assert upstream.requests[-1].path == "/base/v1/x?b=%20&a=1"
    assert dict(upstream.requests[-1].headers)["Host"] == f"{LOOPBACK}:{upstream.port}"

    # With a port, and a Host header that disagrees: the target's authority decides.
    response = await raw_request(api_sidecar.proxy_port, request_bytes("http://api.internal:80/y", host="evil.example"))
    assert response.status == 200
    assert upstream.requests[-1].path == "/base/y"

    # Unknown host: 403, never an open proxy; nothing reaches any upstream.
    before = len(upstream.requests)
    for target in (
        f"http://{LOOPBACK}:{upstream.port}/base/x",
        "http://evil.example/",
        "http://api.internal.evil/",
    ):
        response = await raw_request(api_sidecar.proxy_port, request_bytes(target, host="api.internal"))
        payload = assert_sidecar_error(response.status, response.headers, response.body, 403, "destination_not_allowed")
        assert payload["upstream"] is None
    assert len(upstream.requests) == before


async def test_host_header_and_prefix_routing(upstream: Upstream, api_sidecar: Sidecar) -> None:
    async with aiohttp.ClientSession() as client:
        async with client.get(proxy_url(api_sidecar) + "/v1/x?q=1", headers={"Host": "api.internal"}) as response:
            assert response.status == 200
        async with client.get(proxy_url(api_sidecar) + "/api/v1/x?q=1") as response:
            assert response.status == 200
        async with client.get(proxy_url(api_sidecar) + "/apix/v1") as response:
            assert response.status == 404
    assert [r.path for r in upstream.requests] == ["/base/v1/x?q=1", "/base/v1/x?q=1"]


async def test_no_route_is_404_with_json_body(upstream: Upstream, api_sidecar: Sidecar) -> None:
    async with aiohttp.ClientSession() as client:
        async with client.get(proxy_url(api_sidecar) + "/nowhere/x", headers={"X-Request-Id": "req-404"}) as response:
            body = await response.read()
            payload = assert_sidecar_error(response.status, response.headers, body, 404, "no_route")
            assert response.headers["Content-Type"].startswith("application/json")
            assert payload["upstream"] is None
            assert payload["request_id"] == "req-404"
            assert "/nowhere/x" in payload["message"]
    assert upstream.requests == []


async def test_connect_is_405(upstream: Upstream, api_sidecar: Sidecar) -> None:
    response = await raw_request(
        api_sidecar.proxy_port, request_bytes("api.internal:443", method="CONNECT", host="api.internal:443")
    )
    payload = assert_sidecar_error(response.status, response.headers, response.body, 405, "connect_not_supported")
    assert "http://" in payload["message"]
    assert upstream.requests == []


@pytest.mark.parametrize(
    "target",
    ["http://user:pw@api.internal/x", "http://api.internal/x#frag", "ftp://api.internal/x"],
    ids=["userinfo", "fragment", "scheme"],
)
async def test_malformed_absolute_form_is_400(upstream: Upstream, api_sidecar: Sidecar, target: str) -> None:
    response = await raw_request(api_sidecar.proxy_port, request_bytes(target, host="api.internal"))
    assert_sidecar_error(response.status, response.headers, response.body, 400, "bad_request")
    assert upstream.requests == []


async def test_target_passes_byte_for_byte(upstream: Upstream, api_sidecar: Sidecar) -> None:
    targets = [
        "/api/a/../b/%2e%2E/./c",
        "/api//double//slash/",
        "/api/x%2Fy%20z?b=2&a=1&a=%41&plus=a+b&empty=&=&&",
        "/api/q?x=|{}^`'",
        "/api/semi;param=1/x",
    ]
    for target in targets:
        response = await raw_request(api_sidecar.proxy_port, request_bytes(target))
        assert response.status == 200
        assert upstream.requests[-1].path == "/base" + target.removeprefix("/api")
    response = await raw_request(
        api_sidecar.proxy_port, request_bytes("http://api.internal/a/../%7e?x=%zz", host="api.internal")
    )
    assert response.status == 200
    assert upstream.requests[-1].path == "/base/a/../%7e?x=%zz"


async def test_draining_refusal_really_closes_the_connection(upstream: Upstream, api_sidecar: Sidecar) -> None:
    api_sidecar.draining = True
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, api_sidecar.proxy_port)
        writer.write(request_bytes("/api/x"))
        response = await asyncio.wait_for(read_response(reader), 5)
        assert_sidecar_error(response.status, response.headers, response.body, 503, "draining")
        assert response.header("Connection") == "close"
        assert response.header("Retry-After") == "1"
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the sidecar, not left open
        writer.close()
    finally:
        api_sidecar.draining = False
    assert upstream.requests == []
