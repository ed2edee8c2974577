"""Reload latency, drain timing and fd stability of the real process.

    .venv/bin/python -m bench.lifecycle [edits] [reloads]

* edit → routed: seconds from writing a new upstream into the file to the
  first 200 on its prefix (the watcher polls every second);
* SIGTERM → exit, idle and with a request stuck past shutdown_timeout (1 s);
* open fds of the process before and after ``reloads`` POST /reload calls
  that each replace one pool, under light load.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.support.sidecar import SidecarProcess
from tests.support.upstreams import Upstream


def _config(url: str, names: list[str], read: int = 10, shutdown: str = "1s") -> str:
    blocks = "".join(f"  {name}:\n    url: {url}\n    timeouts: {{ read: {read}s }}\n" for name in names)
    return f"shutdown_timeout: {shutdown}\nupstreams:\n{blocks}"


async def _status(session: aiohttp.ClientSession, url: str) -> int:
    try:
        async with session.get(url) as response:
            await response.read()
            return response.status
    except aiohttp.ClientError:
        return 0


async def _stall(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(float(request.query.get("delay", "0")))
    return web.Response(text="ok")


async def edit_to_routed(directory: Path, edits: int) -> list[float]:
    path = directory / "upstreams.yaml"
    took = []
    async with Upstream(_stall) as upstream:
        names = ["base"]
        path.write_text(_config(upstream.url, names))
        sidecar = await SidecarProcess(path).start()
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
                for i in range(edits):
                    names.append(f"added{i}")
                    path.write_text(_config(upstream.url, names))
                    written = time.monotonic()
                    for _ in range(1000):  # 10 s at most
                        if await _status(session, f"{sidecar.url}/added{i}/x") == 200:
                            break
                        await asyncio.sleep(0.01)
                    took.append(time.monotonic() - written)
                    await asyncio.sleep(0.3)
        finally:
            await sidecar.stop()
    return took


async def sigterm_to_exit(directory: Path, stuck: bool) -> float:
    path = directory / "upstreams.yaml"
    async with Upstream(_stall) as upstream:
        path.write_text(_config(upstream.url, ["a"], shutdown="1s"))
        sidecar = await SidecarProcess(path).start()
        async with aiohttp.ClientSession() as session:
            request = None
            if stuck:
                request = asyncio.ensure_future(_status(session, sidecar.url + "/a/x?delay=60"))
                for _ in range(500):
                    if upstream.requests:
                        break
                    await asyncio.sleep(0.01)
            signalled = time.monotonic()
            sidecar.signal(signal.SIGTERM)
            code = await sidecar.wait(30)
            took = time.monotonic() - signalled
            if request is not None:
                await request
        assert code == 0, code
    return took


async def fds_across_reloads(directory: Path, reloads: int) -> tuple[int, int]:
    path = directory / "upstreams.yaml"
    async with Upstream() as upstream:
        path.write_text(_config(upstream.url, ["a", "b"]))
        sidecar = await SidecarProcess(path).start()
        pid = sidecar.proc.pid  # type: ignore[union-attr]
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
                await _status(session, sidecar.url + "/a/x")
                await _status(session, sidecar.url + "/b/x")  # one idle upstream connection each, as after
                await asyncio.sleep(0.5)
                before = len(os.listdir(f"/proc/{pid}/fd"))
                for i in range(reloads):
                    text = (
                        _config(upstream.url, ["a"])
                        + f"  b:\n    url: {upstream.url}\n    timeouts: {{ read: {11 + i}s }}\n"
                    )
                    path.write_text(text)
                    async with session.post(sidecar.admin_url + "/reload") as response:
                        assert response.status == 200
                    await _status(session, sidecar.url + "/a/x")
                    await _status(session, sidecar.url + "/b/x")
                await asyncio.sleep(0.5)
                after = len(os.listdir(f"/proc/{pid}/fd"))
        finally:
            await sidecar.stop()
    return before, after


async def main(edits: int, reloads: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        took = await edit_to_routed(directory, edits)
        print(
            f"edit -> routed over {edits} edits: min {min(took):.2f}s median {statistics.median(took):.2f}s "
            f"max {max(took):.2f}s"
        )
        print(f"SIGTERM -> exit, idle: {await sigterm_to_exit(directory, stuck=False):.2f}s")
        print(
            "SIGTERM -> exit, request stuck past shutdown_timeout=1s: "
            f"{await sigterm_to_exit(directory, stuck=True):.2f}s"
        )
        before, after = await fds_across_reloads(directory, reloads)
        print(f"open fds before/after {reloads} pool-replacing reloads under light load: {before} / {after}")


if __name__ == "__main__":
    arguments = [int(arg) for arg in sys.argv[1:]]
    asyncio.run(main(*(arguments + [10, 200][len(arguments) :])))
