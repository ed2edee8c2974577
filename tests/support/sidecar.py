"""The sidecar under test.

* :func:`running_sidecar` — the real :class:`~sidecar.server.Sidecar`,
  in-process, proxy and admin on port 0, from YAML text written to a real file.
* :class:`SidecarProcess` — ``python -m sidecar run`` as a child process, for
  signals, exit codes, RSS and file-watch tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.config import HostPort, load_config
from sidecar.server import Sidecar
from tests.support import LOOPBACK
from tests.support.yaml import write_config


@asynccontextmanager
async def running_sidecar(directory: Path, yaml_text: str, *, admin: bool = True) -> AsyncIterator[Sidecar]:
    """The real Sidecar in this process, proxy and admin on port 0."""
    path = write_config(directory, yaml_text)
    config = load_config(path)
    sidecar = Sidecar(
        config,
        listen=HostPort(LOOPBACK, 0),
        admin=HostPort(LOOPBACK, 0) if admin else None,
    )
    await sidecar.start()
    try:
        yield sidecar
    finally:
        await sidecar.shutdown()


def proxy_url(sidecar: Sidecar) -> str:
    return f"http://{LOOPBACK}:{sidecar.proxy_port}"


def admin_url(sidecar: Sidecar) -> str:
    return f"http://{LOOPBACK}:{sidecar.admin_port}"


@dataclass
class SidecarProcess:
    """``python -m sidecar run`` in a child process, its ports read from its log."""

    config_path: Path
    env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    # Its own session and process group (pid == pgid), for signals sent to the whole group.
    new_session: bool = False
    proc: subprocess.Popen[bytes] | None = None
    proxy_port: int = 0
    admin_port: int | None = None
    lines: list[dict[str, Any]] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.proxy_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    async def start(self, timeout: float = 15.0) -> SidecarProcess:
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sidecar",
                "run",
                "-c",
                str(self.config_path),
                "--listen",
                f"{LOOPBACK}:0",
                "--admin",
                f"{LOOPBACK}:0",
                "--log-format",
                "json",
                *self.extra_args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=self.new_session,
        )
        self._reader = asyncio.get_running_loop().create_task(self._read())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if line.get("event") == "admin_listening":  # `workers: N`: the supervisor's, logged first
                    self.admin_port = int(str(line["admin"]).rsplit(":", 1)[1])
                if line.get("event") == "started":
                    self.proxy_port = int(str(line["listen"]).rsplit(":", 1)[1])
                    admin = line.get("admin")
                    if admin:
                        self.admin_port = int(str(admin).rsplit(":", 1)[1])
                    return self
            if self.proc.poll() is not None:
                await asyncio.sleep(0.2)
                raise RuntimeError(f"sidecar exited with {self.proc.returncode}: {self.raw}")
            await asyncio.sleep(0.05)
        raise RuntimeError(f"sidecar did not start: {self.raw}")

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        loop = asyncio.get_running_loop()
        stdout = self.proc.stdout
        while True:
            line = await loop.run_in_executor(None, stdout.readline)
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip("\n")
            self.raw.append(text)
            with suppress(ValueError):
                self.lines.append(json.loads(text))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == name]

    async def wait_for_event(self, name: str, timeout: float = 10.0, count: int = 1) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name)
            if len(found) >= count:
                return found[count - 1]
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {name!r} event within {timeout}s; log: {self.raw[-20:]}")

    def signal(self, signum: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError("sidecar did not exit in time")
            await asyncio.sleep(0.05)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)
        return self.proc.returncode

    def rss_bytes(self) -> int:
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert match
        return int(match.group(1)) * 1024

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await self.wait(20)
            except AssertionError:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()




def assert_sidecar_error(
    response_status: int,
    headers: Mapping[str, str] | list[tuple[str, str]],
    body: bytes,
    status: int,
    code: str,
) -> dict[str, Any]:
    """A response the sidecar itself made: ``status``, ``X-Sidecar-Error: code``
    and the JSON body with exactly error, message, upstream and request_id
    (the same id as ``X-Request-Id``).  Returns the JSON body."""
    assert response_status == status

    def header(name: str) -> str | None:
        if isinstance(headers, list):
            return next((value for key, value in headers if key.lower() == name.lower()), None)
        return headers.get(name)

    assert header("X-Sidecar-Error") == code
    payload: dict[str, Any] = json.loads(body)
    assert payload["error"] == code
    assert isinstance(payload["message"], str) and payload["message"]
    assert payload["request_id"] == header("X-Request-Id")
    assert set(payload) == {"error", "message", "upstream", "request_id"}
    return payload
