"""10,000 random byte strings over raw sockets: the sidecar stays up, keeps
serving, leaks no descriptor or slot, and logs at most one line per input,
never a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.sidecar import SidecarProcess
from tests.support.upstreams import Upstream
from tests.support.yaml import write_config

INPUTS = 10_000
CONCURRENCY = 50
VALID = b"POST /api/echo?a=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello"
SEEDS = [
    VALID,
    b"GET /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),  # a TLS ClientHello on the plain port
    b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n",
    b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
]
NASTY = [b"\r", b"\n", b"\x00", b" ", b":", b"\r\n\r\n", b"\r\n ", b"\xff", b"%", b"?", b"#", b"\t"]


def _inputs(rng: random.Random) -> list[bytes]:
    inputs = []
    for i in range(INPUTS):
        kind = i % 3
        if kind == 0:  # pure noise
            inputs.append(rng.randbytes(rng.randint(1, 2048)))
        else:  # a plausible request with mutations: truncated, bytes flipped, nasty bytes inserted
            data = bytearray(rng.choice(SEEDS))
            for _ in range(rng.randint(1, 6)):
                pos = rng.randrange(len(data) + 1)
                action = rng.random()
                if action < 0.4:
                    data[pos:pos] = rng.choice(NASTY)
                elif action < 0.7 and data:
                    data[min(pos, len(data) - 1)] = rng.randrange(256)
                elif action < 0.85:
                    del data[pos:]
                    if not data:
                        data = bytearray(b"G")
                else:
                    data[pos:pos] = rng.randbytes(rng.randint(1, 64))
            inputs.append(bytes(data))
    return inputs


async def _throw(port: int, data: bytes) -> None:
    with contextlib.suppress(OSError, TimeoutError):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(data)
            await writer.drain()
            writer.write_eof()
            async with asyncio.timeout(5):
                while await reader.read(65536):
                    pass
        finally:
            writer.transport.abort()


@pytest.mark.slow
async def test_random_bytes_never_take_it_down(tmp_path: Path) -> None:
    async with Upstream() as upstream:
        config = """
        inbound: { header_timeout: 2s, body_idle_timeout: 2s }
        upstreams:
          api:
            url: %s
        """ % upstream.url  # noqa: UP031
        process = SidecarProcess(write_config(tmp_path, config))
        await process.start()
        assert process.proc is not None
        try:
            baseline_fds = len(os.listdir(f"/proc/{process.proc.pid}/fd"))
            inputs = _inputs(random.Random(20261125))
            queue: asyncio.Queue[bytes] = asyncio.Queue()
            for data in inputs:
                queue.put_nowait(data)

            async def worker() -> None:
                while not queue.empty():
                    await _throw(process.proxy_port, queue.get_nowait())

            started = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(CONCURRENCY))), 100)
            elapsed = time.monotonic() - started

            assert process.proc.poll() is None, "the sidecar died"
            async with aiohttp.ClientSession() as client:
                async with client.post(process.url + "/api/echo", data=b"still here") as response:
                    assert response.status == 200
                async with client.get(process.admin_url + "/pools") as response:
                    pool = (await response.json())["upstreams"]["api"]
            assert (pool["in_flight"], pool["pending"]) == (0, 0)
            await asyncio.sleep(0.5)
            assert len(os.listdir(f"/proc/{process.proc.pid}/fd")) <= baseline_fds + 5
            output = "\n".join(process.raw)
            assert "Traceback" not in output
            assert len(process.raw) == len(process.lines), "every log line is one JSON event"
            complaints = process.events("bad_request_from_client")
            assert 0 < len(complaints) <= INPUTS
            assert all(len(str(event.get("reason", ""))) <= 200 for event in complaints)
            assert not [e for e in process.lines if e.get("level") in ("error", "critical")]
            print(f"{INPUTS} inputs in {elapsed:.1f}s, {len(complaints)} bad_request lines")
        finally:
            await process.stop()
