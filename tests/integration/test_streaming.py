"""Bodies are streamed, never buffered: flat memory, backpressure, and a body that breaks midway.

See docs/routing-and-forwarding.md.

Real upstreams on port 0 (:mod:`tests.support.upstreams`), the real sidecar,
callers that are aiohttp clients or raw sockets (:mod:`tests.support.wire`).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.support import LOOPBACK
from tests.support.rest import assert_at_rest
from tests.support.sidecar import SidecarProcess, proxy_url, running_sidecar
from tests.support.upstreams import ScriptedUpstream, Upstream
from tests.support.wire import read_request_head, request_bytes
from tests.support.yaml import API_INTERNAL, one_upstream, write_config

MiB = 1024 * 1024


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


@pytest.mark.slow
async def test_large_bodies_stream_with_flat_memory(tmp_path: Path) -> None:
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
        process = SidecarProcess(
            write_config(tmp_path, one_upstream(f"{upstream.url}/base", route=API_INTERNAL, timeouts={"read": "60s"}))
        )
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

    async with (
        ScriptedUpstream(breaks) as upstream,
        running_sidecar(tmp_path, one_upstream(f"{upstream.url}/base", route=API_INTERNAL)) as sidecar,
    ):
        async with aiohttp.ClientSession() as client:
            async with client.get(proxy_url(sidecar) + "/api/x") as response:
                assert response.status == 200  # headers were already out
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()
        # Raw socket: the connection ends without a clean end of body (no final chunk).
        response_bytes = b""
        reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
        writer.write(request_bytes("/api/x"))
        while chunk := await asyncio.wait_for(reader.read(65536), 5):
            response_bytes += chunk
        writer.close()
        assert response_bytes.startswith(b"HTTP/1.1 200 OK\r\n")
        assert not response_bytes.endswith(b"0\r\n\r\n")
        await assert_at_rest(sidecar)
        # And the sidecar keeps serving.
        async with aiohttp.ClientSession() as client:
            async with client.get(proxy_url(sidecar) + "/nowhere") as response:
                assert response.status == 404


async def test_mid_body_failure_logs_no_traceback(tmp_path: Path) -> None:
    async def breaks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        await writer.drain()
        writer.transport.abort()

    async with ScriptedUpstream(breaks) as upstream:
        process = SidecarProcess(write_config(tmp_path, one_upstream(f"{upstream.url}/base", route=API_INTERNAL)))
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


async def test_the_response_head_reaches_the_caller_before_a_late_body(tmp_path: Path) -> None:
    """The head waits for the first body chunk only while that chunk is at hand."""
    body_sent = asyncio.Event()

    async def late_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1.5)
        writer.write(b"late")
        await writer.drain()
        body_sent.set()
        await reader.read()

    async with (
        ScriptedUpstream(late_body) as upstream,
        running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar,
    ):
        reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.proxy_port)
        writer.write(request_bytes("/api/x"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert not body_sent.is_set(), "the head waited for the body"
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"late"
        writer.close()
        await assert_at_rest(sidecar)
