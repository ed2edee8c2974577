"""Memory scenario: sidecar RSS idle, with 10,000 idle keep-alive callers, and while streaming 1 GiB."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench import LOOPBACK, Service, pick_ports, rss_bytes, sidecar_conf

MIB = 1 << 20


async def _one_keepalive(port: int, sockets: list[asyncio.StreamWriter], gate: asyncio.Semaphore) -> bool:
    async with gate:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), 10)
            writer.write(b"GET /up/1k HTTP/1.1\r\nHost: bench\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await asyncio.wait_for(reader.readexactly(length), 10)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            return False
        sockets.append(writer)  # kept open, idle, keep-alive
        return head.startswith(b"HTTP/1.1 200")


async def _hold_idle(port: int, count: int, pid: int) -> tuple[int, int]:
    sockets: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(200)
    results = await asyncio.gather(*(_one_keepalive(port, sockets, gate) for _ in range(count)))
    await asyncio.sleep(1.0)
    rss = rss_bytes(pid)
    for writer in sockets:
        writer.close()
    return sum(results), rss


def _stream(port: int, path: str, pid: int) -> tuple[int, float, list[int]]:
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(rss_bytes(pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    received = 0
    started = time.monotonic()
    with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        sampler.start()
        buffer = bytearray(1 << 20)
        while True:
            n = sock.recv_into(buffer)
            if not n:
                break
            received += n
            if time.monotonic() - started > 120:
                break
    done.set()
    sampler.join()
    return received, time.monotonic() - started, samples


@dataclass
class MemoryResult:
    """What the memory scenario saw (RSS in bytes)."""

    idle: int
    warm: int
    opened: int  # idle keep-alive client connections held
    with_idle: int
    after_idle: int
    received: int  # bytes streamed
    took: float
    samples: list[int]  # RSS while streaming

    def report(self) -> str:
        samples = self.samples
        lines = [
            "## Memory (sidecar RSS, 1 worker)",
            "",
            "| state | RSS MiB |",
            "| --- | ---: |",
            f"| idle, just started | {self.idle / MIB:.1f} |",
            f"| after 1 s of load (c=10) | {self.warm / MIB:.1f} |",
            f"| holding {self.opened:,} idle keep-alive client connections | {self.with_idle / MIB:.1f} "
            f"(+{(self.with_idle - self.warm) / MIB:.1f}) |",
            f"| after those closed | {self.after_idle / MIB:.1f} |",
            f"| streaming {self.received / MIB:,.0f} MiB in {self.took:.1f} s "
            f"({self.received / MIB / max(self.took, 1e-9):,.0f} MiB/s): "
            f"min / max of {len(samples)} samples | {min(samples, default=0) / MIB:.1f} / "
            f"{max(samples, default=0) / MIB:.1f} |",
            f"| the same samples: first / last | {samples[0] / MIB if samples else 0:.1f} / "
            f"{samples[-1] / MIB if samples else 0:.1f} |",
        ]
        return "\n".join(lines)


def memory_scenario(work: Path, upstream_port: int, python: str, env: dict[str, str], quick: bool) -> MemoryResult:
    port, admin = pick_ports(2)
    conf = sidecar_conf(work, "sidecar-memory", port, admin, upstream_port, upstream_port, upstream_port, 1)
    service = Service(
        "sidecar-memory",
        [python, "-m", "sidecar", "run", "-c", str(conf), "--log-format", "json"],
        port,
        "0,1",
        work,
        env,
    )
    idle_connections = 2000 if quick else 10_000
    service.start()
    try:
        time.sleep(1.0)
        idle = rss_bytes(service.pid)
        subprocess.run(
            ["wrk", "-t1", "-c10", "-d1s", f"http://{LOOPBACK}:{port}/up/1k"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        warm = rss_bytes(service.pid)
        opened, with_idle = asyncio.run(_hold_idle(port, idle_connections, service.pid))
        time.sleep(1.0)
        after_idle = rss_bytes(service.pid)
        received, took, samples = _stream(port, "/up/1g", service.pid)
    finally:
        service.stop()
    return MemoryResult(idle, warm, opened, with_idle, after_idle, received, took, samples)
