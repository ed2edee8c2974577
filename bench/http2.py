"""HTTP/1.1 pool vs HTTP/2 (h2c) pool to the same upstream, through the sidecar.

    .venv/bin/python -m bench.http2 [--duration 8] [--concurrency 10,100] [--max-connections 100,10]

The upstream is nginx (two listeners on one server: HTTP/1.1 and h2c prior
knowledge, same 1 KiB response); hypercorn when nginx is not installed.  The
sidecar runs as a child process with two upstreams, ``h1`` (``http2: false``)
and ``h2`` (``http2: prior-knowledge``), both ``max_connections`` wide (one
sidecar per value of ``--max-connections``).  wrk
(HTTP/1.1 callers, as services are) loads one of them at a time.

Per run it reports requests/s and p99 (from wrk), CPU µs per request of the
sidecar process (utime+stime from /proc/<pid>/stat), and the upstream TCP
connections the sidecar holds (sampled from /proc/net/tcp every 100 ms: max
and median).  Results go to stdout and bench/results/http2.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
BODY = b"x" * 1024
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "http2.md"


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The fallback upstream (hypercorn): the same 1 KiB answer as nginx."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1024")]})
    await send({"type": "http.response.body", "body": BODY})


@dataclass
class Run:
    pool: str
    max_connections: int
    concurrency: int
    requests_per_s: float
    p99_ms: float
    cpu_us_per_request: float
    connections_max: int
    connections_median: float
    errors: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


class UpstreamServer:
    """nginx with an HTTP/1.1 and an h2c listener, or hypercorn on one port for both."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.h1_port = free_port()
        self.h2_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.kind = ""

    def start(self) -> None:
        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
        if nginx:
            self.kind = "nginx " + _nginx_version(nginx)
            conf = self.workdir / "nginx.conf"
            conf.write_text(
                f"""
daemon off;
worker_processes 1;
pid {self.workdir}/nginx.pid;
error_log {self.workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path {self.workdir}/body;
    proxy_temp_path {self.workdir}/proxy;
    fastcgi_temp_path {self.workdir}/fastcgi;
    uwsgi_temp_path {self.workdir}/uwsgi;
    scgi_temp_path {self.workdir}/scgi;
    server {{
        listen {LOOPBACK}:{self.h1_port};
        listen {LOOPBACK}:{self.h2_port} http2;
        location / {{ default_type text/plain; return 200 "{BODY.decode()}"; }}
    }}
}}
"""
            )
            self.proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(self.workdir)], stderr=subprocess.DEVNULL)
        else:
            self.kind = "hypercorn (nginx not installed)"
            self.h2_port = self.h1_port  # hypercorn speaks HTTP/1.1 and h2c on one port
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hypercorn", "--bind", f"{LOOPBACK}:{self.h1_port}", "bench.http2:asgi_app"],
                cwd=ROOT,
                stderr=subprocess.DEVNULL,
            )
        wait_listening(self.h1_port)
        wait_listening(self.h2_port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if not self.kind.startswith("nginx") else signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _nginx_version(nginx: str) -> str:
    out = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr
    match = re.search(r"nginx/(\S+)", out)
    return match.group(1) if match else "?"


class SidecarServer:
    def __init__(self, workdir: Path, upstream: UpstreamServer, max_connections: int) -> None:
        self.port = free_port()
        self.config = workdir / "upstreams.yaml"
        self.config.write_text(
            f"""
upstreams:
  h1:
    url: http://{LOOPBACK}:{upstream.h1_port}
    http2: false
    limits: {{ max_connections: {max_connections}, max_pending: 10000 }}
  h2:
    url: http://{LOOPBACK}:{upstream.h2_port}
    http2: prior-knowledge
    limits: {{ max_connections: {max_connections}, max_pending: 10000 }}
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "-c", str(self.config), "--listen", f"{LOOPBACK}:{self.port}",
             "--admin", "off", "--log-level", "warning"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        wait_listening(self.port)

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def established_to(port: int) -> int:
    """TCP connections in ESTABLISHED state whose remote end is LOOPBACK:port."""
    wanted = f"0100007F:{port:04X}"
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[2] == wanted and parts[3] == "01":
            count += 1
    return count


def sample_connections(port: int, stop: threading.Event, samples: list[int]) -> None:
    while not stop.is_set():
        samples.append(established_to(port))
        stop.wait(0.1)


def wrk(url: str, concurrency: int, duration: float) -> tuple[float, float, int, int]:
    """requests/s, p99 ms, requests, errors (non-2xx + socket errors)."""
    threads = "2" if concurrency > 1 else "1"
    seconds = f"{max(1, round(duration))}s"
    out = subprocess.run(
        ["wrk", "-t", threads, "-c", str(concurrency), "-d", seconds, "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = 0
    patterns = (
        r"Non-2xx or 3xx responses: (\d+)",
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
    )
    for pattern in patterns:
        match = re.search(pattern, out)
        if match:
            errors += sum(int(g) for g in match.groups())
    return rps, p99, total, errors


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def measure(sidecar: SidecarServer, pool: str, port: int, concurrency: int, duration: float, limit: int) -> Run:
    url = f"http://{LOOPBACK}:{sidecar.port}/{pool}/"
    wrk(url, concurrency, 1.0)  # warm up: connections open, code paths hot
    samples: list[int] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_connections, args=(port, stop, samples))
    sampler.start()
    cpu_before = sidecar.cpu_seconds()
    rps, p99, total, errors = wrk(url, concurrency, duration)
    cpu = sidecar.cpu_seconds() - cpu_before
    stop.set()
    sampler.join()
    return Run(
        pool=pool,
        max_connections=limit,
        concurrency=concurrency,
        requests_per_s=rps,
        p99_ms=p99,
        cpu_us_per_request=cpu / max(total, 1) * 1e6,
        connections_max=max(samples, default=0),
        connections_median=statistics.median(samples) if samples else 0,
        errors=errors,
    )


def report(runs: list[Run], upstream: str, args: argparse.Namespace) -> str:
    lines = [
        "# HTTP/1.1 pool vs HTTP/2 (h2c) pool",
        "",
        f"Command: `.venv/bin/python -m bench.http2 --duration {args.duration:g} "
        f"--concurrency {args.concurrency} --max-connections {args.max_connections}`",
        "",
        f"Upstream: {upstream}, 1 KiB response. Load: wrk, HTTP/1.1 keep-alive callers → sidecar. "
        f"Both pools of a row have the same `max_connections`. Machine: {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}; sidecar, wrk and upstream share the CPUs.",
        "",
        "| pool | max_connections | callers | req/s | p99 ms | sidecar CPU µs/req "
        "| upstream TCP conns (max / median) | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        lines.append(
            f"| {'HTTP/1.1' if run.pool == 'h1' else 'HTTP/2 h2c'} | {run.max_connections} | {run.concurrency} "
            f"| {run.requests_per_s:,.0f} | "
            f"{run.p99_ms:.1f} | {run.cpu_us_per_request:,.0f} | {run.connections_max} / {run.connections_median:g} | "
            f"{run.errors} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measured run")
    parser.add_argument("--concurrency", default="10,100", help="comma-separated caller counts")
    parser.add_argument("--max-connections", default="100,10", help="comma-separated pool sizes")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is needed: apt-get install -y wrk", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-http2-") as tmp:
        workdir = Path(tmp)
        upstream = UpstreamServer(workdir)
        upstream.start()
        runs: list[Run] = []
        try:
            for limit in (int(n) for n in args.max_connections.split(",")):
                sidecar = SidecarServer(workdir, upstream, limit)
                try:
                    sidecar.start()
                    for concurrency in (int(c) for c in args.concurrency.split(",")):
                        for pool, port in (("h1", upstream.h1_port), ("h2", upstream.h2_port)):
                            run = measure(sidecar, pool, port, concurrency, args.duration, limit)
                            runs.append(run)
                            print(run, flush=True)
                finally:
                    sidecar.stop()
        finally:
            upstream.stop()
    text = report(runs, upstream.kind, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
