"""Clients services actually use, pointed at the real sidecar: curl and requests.

Both as a base URL (``http://localhost:8088/<name>``) and as an HTTP proxy
(absolute-form targets, ``HTTP_PROXY`` / ``-x``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import requests
from aiohttp import web

from sidecar.server import Sidecar
from tests.support.sidecar import proxy_url, running_sidecar
from tests.support.upstreams import Upstream

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed (.ci/run installs it)")


async def echo(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    response = web.json_response(
        {
            "method": request.method,
            "target": request.raw_path,
            "host": request.headers.get("Host"),
            "sha256": hashlib.sha256(body).hexdigest(),
            "size": len(body),
            "chunked": request.headers.get("Transfer-Encoding") == "chunked",
            "cookie": request.headers.get("Cookie"),
        }
    )
    response.headers.add("Set-Cookie", "a=1; Path=/")
    response.headers.add("Set-Cookie", "b=2; Path=/")
    return response


@asynccontextmanager
async def proxied(tmp_path: Path) -> AsyncIterator[tuple[Upstream, Sidecar]]:
    async with Upstream(echo, read_body=False) as upstream, running_sidecar(
        tmp_path,
        f"""
        upstreams:
          api:
            url: {upstream.url}/base
            route: {{ hosts: [api.internal] }}
        """,
    ) as sidecar:
        yield upstream, sidecar


async def curl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert CURL is not None
    environment = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    environment.update(env or {})

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CURL, "--silent", "--show-error", "--max-time", "20", *args],
            capture_output=True,
            text=True,
            env=environment,
            timeout=30,
        )

    return await asyncio.to_thread(run)


def split_head(output: str) -> tuple[list[str], str]:
    """curl -i output → (status line and header lines, body)."""
    head, _, body = output.replace("\r\n", "\n").partition("\n\n")
    return head.splitlines(), body


@needs_curl
async def test_curl_with_a_base_url(tmp_path: Path) -> None:
    async with proxied(tmp_path) as (upstream, sidecar):
        result = await curl("-i", proxy_url(sidecar) + "/api/v1/items?a=1&b=%20")
        assert result.returncode == 0, result.stderr
        head, body = split_head(result.stdout)
        assert head[0] == "HTTP/1.1 200 OK"
        assert [line for line in head if line.lower().startswith("set-cookie:")] == [
            "Set-Cookie: a=1; Path=/",
            "Set-Cookie: b=2; Path=/",
        ]
        answer = json.loads(body)
        assert answer["target"] == "/base/v1/items?a=1&b=%20"
        assert answer["host"] == f"127.0.0.1:{upstream.port}"


@needs_curl
async def test_curl_uploads_and_head(tmp_path: Path) -> None:
    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(3 * 1024 * 1024))
    digest = hashlib.sha256(payload.read_bytes()).hexdigest()
    async with proxied(tmp_path) as (_, sidecar):
        url = proxy_url(sidecar) + "/api/upload"
        result = await curl("--data-binary", f"@{payload}", url)
        answer = json.loads(result.stdout)
        assert (answer["sha256"], answer["chunked"]) == (digest, False)
        # Chunked upload, no Content-Length; curl sends Expect: 100-continue for large bodies.
        result = await curl("-T", str(payload), "-H", "Transfer-Encoding: chunked", url)
        answer = json.loads(result.stdout)
        assert (answer["sha256"], answer["chunked"], answer["method"]) == (digest, True, "PUT")
        result = await curl("-I", url)
        assert result.returncode == 0 and result.stdout.startswith("HTTP/1.1 200 OK")


@needs_curl
async def test_curl_as_http_proxy(tmp_path: Path) -> None:
    async with proxied(tmp_path) as (upstream, sidecar):
        # -x and the http_proxy environment variable both send absolute-form targets.
        for args, env in (
            (["-x", proxy_url(sidecar)], None),
            ([], {"http_proxy": proxy_url(sidecar)}),
        ):
            result = await curl("-i", *args, "http://api.internal/v1/x?q=%2F", env=env)
            assert result.returncode == 0, result.stderr
            head, body = split_head(result.stdout)
            assert head[0] == "HTTP/1.1 200 OK"
            assert json.loads(body)["target"] == "/base/v1/x?q=%2F"
        requests_seen = len(upstream.requests)

        # Not a configured host: 403, with the reason in a header and the body.
        result = await curl("-i", "-x", proxy_url(sidecar), "http://example.com/")
        head, body = split_head(result.stdout)
        assert head[0].startswith("HTTP/1.1 403")
        assert "X-Sidecar-Error: destination_not_allowed" in head
        assert json.loads(body)["error"] == "destination_not_allowed"

        # https:// through the proxy means CONNECT: refused with 405, curl reports it.
        result = await curl("-x", proxy_url(sidecar), "https://api.internal/")
        assert result.returncode != 0
        assert "405" in result.stderr
        assert len(upstream.requests) == requests_seen


async def test_requests_with_a_base_url(tmp_path: Path) -> None:
    async with proxied(tmp_path) as (upstream, sidecar):

        def call() -> requests.Response:
            with requests.Session() as session:
                session.trust_env = False
                session.get(proxy_url(sidecar) + "/api/first")  # the session now holds cookies a, b
                return session.post(proxy_url(sidecar) + "/api/v1/x?z=1", data=b"hello")

        response = await asyncio.to_thread(call)
        assert response.status_code == 200
        assert response.raw.headers.getlist("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
        answer = response.json()
        assert answer["target"] == "/base/v1/x?z=1"
        assert answer["sha256"] == hashlib.sha256(b"hello").hexdigest()
        assert answer["cookie"] == "a=1; b=2"  # the caller's own cookies, sent by the caller
        assert response.headers["X-Request-Id"]
        assert [r.path for r in upstream.requests] == ["/base/first", "/base/v1/x?z=1"]


async def test_requests_through_http_proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with proxied(tmp_path) as (upstream, sidecar):
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy", "https_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy_url(sidecar))
        monkeypatch.setenv("HTTPS_PROXY", proxy_url(sidecar))

        def chunks() -> Iterator[bytes]:
            yield b"part one, "
            yield b"part two"

        def call() -> tuple[requests.Response, requests.Response, requests.Response, requests.Response]:
            with requests.Session() as session:  # trust_env: HTTP_PROXY from the environment
                plain = session.get("http://api.internal/v1/x?q=%20")
                streamed = session.post("http://api.internal/upload", data=chunks())
                explicit = requests.get(
                    "http://api.internal/explicit", proxies={"http": proxy_url(sidecar)}, timeout=10
                )
                refused = session.get("http://example.com/")
                return plain, streamed, explicit, refused

        plain, streamed, explicit, refused = await asyncio.to_thread(call)
        assert plain.status_code == 200 and plain.json()["target"] == "/base/v1/x?q=%20"
        assert streamed.status_code == 200
        assert streamed.json()["chunked"] is True
        assert streamed.json()["sha256"] == hashlib.sha256(b"part one, part two").hexdigest()
        assert explicit.json()["target"] == "/base/explicit"
        assert refused.status_code == 403
        assert refused.headers["X-Sidecar-Error"] == "destination_not_allowed"
        assert len(upstream.requests) == 3  # the refused one never left the sidecar

        def https_call() -> None:
            requests.get("https://api.internal/", timeout=10)

        with pytest.raises(requests.exceptions.ProxyError) as info:
            await asyncio.to_thread(https_call)
        assert "405" in str(info.value)
