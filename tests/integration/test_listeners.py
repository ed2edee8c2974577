"""The listening sockets themselves, as the kernel sees them: the accept backlog."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from sidecar.server import LISTEN_BACKLOG
from tests.support.sidecar import SidecarProcess, running_sidecar
from tests.support.upstreams import Upstream
from tests.support.yaml import write_config


def _somaxconn() -> int:
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        return 0


SOMAXCONN = _somaxconn()
# The kernel caps every backlog at net.core.somaxconn.
EXPECTED = min(LISTEN_BACKLOG, SOMAXCONN)
pytestmark = [
    pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read the listen backlog"),
    pytest.mark.skipif(SOMAXCONN <= 128, reason="net.core.somaxconn is too small to tell 4096 from aiohttp's 128"),
]


def backlogs(port: int) -> list[int]:
    """The accept backlog of every socket listening on ``port``: ss shows it as Send-Q."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    return [int(line.split()[2]) for line in out.splitlines() if line.strip()]


async def test_proxy_and_admin_listeners_keep_the_large_backlog(tmp_path: Path) -> None:
    assert LISTEN_BACKLOG == 4096
    async with (
        Upstream() as upstream,
        running_sidecar(tmp_path, f"upstreams:\n  api:\n    url: {upstream.url}\n") as sidecar,
    ):
        assert sidecar.admin_port is not None
        assert backlogs(sidecar.proxy_port) == [EXPECTED]
        assert backlogs(sidecar.admin_port) == [EXPECTED]


async def test_every_worker_listens_with_the_large_backlog(tmp_path: Path) -> None:
    async with Upstream() as upstream:
        config = write_config(tmp_path, f"upstreams:\n  api:\n    url: {upstream.url}\n")
        sidecar = SidecarProcess(config, extra_args=["--workers", "2"])
        await sidecar.start()
        try:
            started = await sidecar.wait_for_event("started", count=2)
            assert started
            lines = sidecar.events("started")
            port = int(str(lines[0]["listen"]).rsplit(":", 1)[1])
            # SO_REUSEPORT: one listening socket per worker on the same port.
            assert backlogs(port) == [EXPECTED, EXPECTED]
            # One admin listener for the host, the supervisor's.
            assert sidecar.admin_port is not None
            assert backlogs(sidecar.admin_port) == [EXPECTED]
        finally:
            sidecar.signal(signal.SIGTERM)
            code = await sidecar.wait(30)
        assert code == 0
