"""Side-by-side proxy benchmark on loopback: the sidecar against real peers.

Run through ``bench/run`` (installs what is missing).  Everything listens on
127.0.0.1 on ports picked at start (checked free, refused if taken); every
process and every load run is bounded in time.

Layout on a 2-core machine: the proxy under test is pinned to CPU 0, the load
generator (wrk) and the upstream (nginx, delay server) to CPU 1.  The figure
that survives a noisy, shared machine is **CPU µs per request of the proxy
process** (utime+stime of its whole process tree from /proc, divided by the
requests wrk completed); req/s and latency are reported beside it, with the
ratio to a direct run in the same sweep.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PY = sys.executable
PROXY_CPU = "0"
LOAD_CPU = "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
LOOPBACK = "127.0.0.1"


# ----------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((LOOPBACK, port)) == 0


def pick_ports(count: int) -> list[int]:
    """Distinct free ports; the run is refused if any is taken by the time we check."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    busy = [p for p in ports if port_in_use(p)]
    if busy:
        sys.exit(f"bench: ports busy: {busy}; refusing to run")
    return ports


def wait_port(port: int, proc: subprocess.Popen[bytes], name: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} before listening on {port}")
        if port_in_use(port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on {port} within {timeout}s")


def children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


def tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        todo += children(current)
    return pids


def cpu_seconds(pid: int) -> float:
    """utime+stime of a process and all its live descendants (nginx/haproxy workers, sidecar workers)."""
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError, IndexError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def rss_bytes(pid: int) -> int:
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def upstream_connections(port: int, owners: set[int]) -> int:
    """Established TCP connections to the upstream port held by the given processes (ss -p)."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( dport = :{port} )"],
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    ).stdout
    count = 0
    for line in out.splitlines():
        pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if pids & owners:
            count += 1
    return count


@dataclass
class Service:
    name: str
    cmd: list[str]
    port: int
    cpu: str
    workdir: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if port_in_use(self.port):
            sys.exit(f"bench: port {self.port} for {self.name} is busy; refusing to run")
        log = open(self.workdir / f"{self.name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            ["taskset", "-c", self.cpu, *self.cmd],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.workdir,
            start_new_session=True,
        )
        wait_port(self.port, self.proc, self.name)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


# ----------------------------------------------------------------- configs


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def nginx_common(work: Path, name: str) -> tuple[str, str]:
    tmp = work / f"{name}-tmp"
    tmp.mkdir(exist_ok=True)
    return (
        f"""
        worker_processes 1;
        daemon off;
        pid {work}/{name}.pid;
        error_log {work}/{name}-error.log warn;
        worker_rlimit_nofile 19000;
        events {{ worker_connections 9000; multi_accept on; }}
    """,
        f"""
        access_log off;
        client_body_temp_path {tmp}/body;
        proxy_temp_path {tmp}/proxy;
        fastcgi_temp_path {tmp}/fastcgi;
        uwsgi_temp_path {tmp}/uwsgi;
        scgi_temp_path {tmp}/scgi;
        keepalive_requests 10000000;
        keepalive_timeout 120s;
        default_type application/octet-stream;
    """,
    )


def upstream_nginx_conf(work: Path, h1: int, h2c: int) -> Path:
    main, http = nginx_common(work, "upstream-nginx")
    www = work / "www"
    www.mkdir(exist_ok=True)
    (www / "1k").write_bytes(b"x" * 1024)
    (www / "64k").write_bytes(b"y" * 65536)
    with open(www / "1g", "wb") as big:  # sparse: zeros on disk for free
        big.truncate(1 << 30)
    return write(
        work / "upstream-nginx.conf",
        f"""
        user root;
        {main}
        http {{
            {http}
            sendfile on;
            http2_max_concurrent_streams 1000;
            server {{
                listen {LOOPBACK}:{h1} reuseport backlog=8192;
                listen {LOOPBACK}:{h2c} http2 backlog=8192;
                root {www};
            }}
        }}
        """,
    )


def proxy_nginx_conf(work: Path, port: int, upstream: int) -> Path:
    main, http = nginx_common(work, "proxy-nginx")
    return write(
        work / "proxy-nginx.conf",
        f"""
        user root;
        {main}
        http {{
            {http}
            upstream up {{
                server {LOOPBACK}:{upstream};
                keepalive 2048;
                keepalive_requests 10000000;
            }}
            server {{
                listen {LOOPBACK}:{port} backlog=8192;
                location / {{
                    proxy_pass http://up;
                    proxy_http_version 1.1;
                    proxy_set_header Connection "";
                }}
            }}
        }}
        """,
    )


def haproxy_conf(work: Path, port: int, upstream: int) -> Path:
    return write(
        work / "haproxy.cfg",
        f"""
        global
            nbthread 1
            maxconn 9000
        defaults
            mode http
            timeout connect 5s
            timeout client 60s
            timeout server 60s
            option http-keep-alive
            http-reuse always
        frontend fe
            bind {LOOPBACK}:{port}
            default_backend be
        backend be
            server s1 {LOOPBACK}:{upstream} maxconn 2000
        """,
    )


def sidecar_conf(work: Path, name: str, port: int, admin: int, h1: int, h2c: int, delay: int, workers: int) -> Path:
    return write(
        work / f"{name}.yaml",
        f"""
        listen: {LOOPBACK}:{port}
        admin: {LOOPBACK}:{admin}
        workers: {workers}
        defaults:
          limits: {{ max_connections: 1000, max_pending: 5000 }}
          timeouts: {{ pool: 5s }}
        upstreams:
          up:
            url: http://{LOOPBACK}:{h1}
          h2:
            url: http://{LOOPBACK}:{h2c}
            http2: prior-knowledge
            limits: {{ max_connections: 10 }}
          delay:
            url: http://{LOOPBACK}:{delay}
        """,
    )


def sidecar_all_stages_conf(work: Path, name: str, port: int, admin: int, h1: int) -> Path:
    """The sidecar with every Part II stage that needs no Redis configured on its one upstream.

    Callers send ``X-Sidecar-Caller`` (two named callers, weights 9:1) and an
    ``X-Sidecar-Timeout`` (the deadline stage) — see :data:`PART2_SCRIPT`;
    pacing learns (the default; nginx sends no rate-limit signal), a rate
    limit far above what a run reaches (never refuses), one retry on connect
    errors, resets and 502-504, a circuit breaker that opens after 5 failures.
    The adaptive limit is left off: it would change how many requests run at
    once, not only what each costs.
    """
    return write(
        work / f"{name}.yaml",
        f"""
        listen: {LOOPBACK}:{port}
        admin: {LOOPBACK}:{admin}
        workers: 1
        callers:
          header: X-Sidecar-Caller
          weights: {{ checkout: 9, batch: 1 }}
        defaults:
          limits: {{ max_connections: 1000, max_pending: 5000 }}
          timeouts: {{ pool: 5s }}
        upstreams:
          up:
            url: http://{LOOPBACK}:{h1}
            pacing: {{ learn: true }}
            rate_limit: {{ rate: 10000000/s, burst: 1000000 }}
            retries: {{ attempts: 1, retry_on: [connect_error, reset, 502, 503, 504] }}
            circuit_breaker: {{ failures: 5 }}
        """,
    )


# Two callers, alternately, each with a deadline: what the sidecar with every
# Part II stage reads.  The Part I row of the same scenario sends headers of
# the same sizes that nothing reads, so that wrk does the same work for both.
PART2_SCRIPT = """
local heads = {}
init = function(args)
  heads[1] = wrk.format(nil, nil, {["X-Sidecar-Caller"] = "checkout", ["X-Sidecar-Timeout"] = "5s"})
  heads[2] = wrk.format(nil, nil, {["X-Sidecar-Caller"] = "batch", ["X-Sidecar-Timeout"] = "5s"})
end
local n = 0
request = function()
  n = n + 1
  return heads[n % 2 + 1]
end
"""
PART1_SCRIPT = PART2_SCRIPT.replace("X-Sidecar-Caller", "X-Benchmark-Tags").replace(
    "X-Sidecar-Timeout", "X-Benchmark-Hints"
)
PART2_SCENARIO = "every Part II stage"


# ----------------------------------------------------------------- load


@dataclass
class Run:
    target: str
    scenario: str
    concurrency: int
    rps: float = 0.0
    requests: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_us: float | None = None
    upstream_conns: int = 0
    errors: int = 0
    ratio: float | None = None
    settled: bool = True  # False: still busy 20 s after the load stopped (restarted before the next run)


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _latency(text: str, pct: str) -> float:
    found = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    return float(found.group(1)) * _UNITS[found.group(2)] if found else float("nan")


def parse_wrk(text: str, run: Run) -> None:
    found = re.search(r"(\d+) requests in", text)
    run.requests = int(found.group(1)) if found else 0
    found = re.search(r"Requests/sec:\s+([\d.]+)", text)
    run.rps = float(found.group(1)) if found else 0.0
    run.p50_ms = _latency(text, "50")
    run.p99_ms = _latency(text, "99")
    errors = 0
    found = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if found:
        errors += sum(int(g) for g in found.groups())
    found = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if found:
        errors += int(found.group(1))
    run.errors = errors


def wrk_cmd(url: str, concurrency: int, seconds: float, latency: bool = True, script: Path | None = None) -> list[str]:
    cmd = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s"]
    cmd += ["--timeout", "5s", *(["--latency"] if latency else []), *(["-s", str(script)] if script else []), url]
    return cmd


def wrk(url: str, concurrency: int, seconds: float, latency: bool = True, script: Path | None = None) -> str:
    cmd = wrk_cmd(url, concurrency, seconds, latency, script)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False).stdout


def settle(pid: int | None, limit: float = 20.0) -> bool:
    """Wait until the proxy is idle again (a collapsed proxy keeps working after wrk stops)."""
    if pid is None:
        time.sleep(0.3)
        return True
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        time.sleep(0.5)
        if cpu_seconds(pid) - before < 0.03:
            return True
    return False


def measure(
    target: str,
    scenario: str,
    url: str,
    concurrency: int,
    seconds: float,
    pid: int | None,
    upstream_port: int,
    script: Path | None = None,
) -> Run:
    run = Run(target, scenario, concurrency)
    wrk(url, concurrency, max(1.0, seconds / 4), latency=False, script=script)  # warm up: connections, caches
    settle(pid)
    cpu_before = cpu_seconds(pid) if pid else 0.0
    samples: list[int] = []
    proc = subprocess.Popen(
        wrk_cmd(url, concurrency, seconds, script=script), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + seconds + 60
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
        owners = set(tree(pid if pid else proc.pid))  # direct: wrk's own connections
        samples.append(upstream_connections(upstream_port, owners))
    if proc.poll() is None:
        proc.kill()
    out = proc.communicate()[0]
    if pid:
        run.cpu_us = (cpu_seconds(pid) - cpu_before) / max(1, _requests(out)) * 1e6
    parse_wrk(out, run)
    run.upstream_conns = max(samples, default=0)
    run.settled = settle(pid)
    return run


def _requests(text: str) -> int:
    found = re.search(r"(\d+) requests in", text)
    return int(found.group(1)) if found else 0


# ----------------------------------------------------------------- the run


@dataclass
class Target:
    name: str
    base: str  # URL prefix; the path of the scenario is appended
    service: Service | None
    upstream_port: int

    @property
    def pid(self) -> int | None:
        return self.service.pid if self.service else None


@dataclass
class Scenario:
    name: str
    path: str
    concurrencies: tuple[int, ...]
    targets: tuple[str, ...]
    upstream: str = "h1"  # which upstream port the connections are counted on
    results: list[Run] = field(default_factory=list)


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def aggregate(runs: list[Run]) -> Run:
    first = runs[0]
    out = Run(first.target, first.scenario, first.concurrency)
    out.rps = median([r.rps for r in runs])
    out.p50_ms = median([r.p50_ms for r in runs])
    out.p99_ms = median([r.p99_ms for r in runs])
    cpus = [r.cpu_us for r in runs if r.cpu_us is not None]
    out.cpu_us = median(cpus) if cpus else None
    out.upstream_conns = int(median([float(r.upstream_conns) for r in runs]))
    out.errors = sum(r.errors for r in runs)
    ratios = [r.ratio for r in runs if r.ratio is not None]
    out.ratio = median(ratios) if ratios else None
    return out


def fmt(value: float | None, spec: str) -> str:
    if value is None or value != value:
        return "-"
    return format(value, spec)


def table(runs: list[Run]) -> str:
    lines = [
        "| scenario | target | c | req/s | vs direct | p50 ms | p99 ms | proxy CPU µs/req | upstream conns | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        lines.append(
            f"| {r.scenario} | {r.target} | {r.concurrency} | {fmt(r.rps, ',.0f')} | {fmt(r.ratio, '.2f')} | "
            f"{fmt(r.p50_ms, '.2f')} | {fmt(r.p99_ms, '.2f')} | {fmt(r.cpu_us, ',.0f')} | {r.upstream_conns} | "
            f"{r.errors} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------- targets

MIB = 1 << 20
STREAM_FLAT_MIB = 16  # "flat": RSS moves less than this while 1 GiB streams through
IDLE_CALLERS = 10_000
IDLE_CALLERS_MIB = 150  # added to the RSS of a warmed-up sidecar
IDLE_MIB = 80


@dataclass
class Goal:
    """One line of the summary: a figure measured against its target."""

    name: str
    measured: str
    verdict: str  # met / missed / not measured (why)


def _row(rows: list[Run], scenario: str, target: str, concurrency: int) -> Run | None:
    return next(
        (r for r in rows if r.scenario == scenario and r.target == target and r.concurrency == concurrency), None
    )


def _ratio_target(name: str, ours: Run | None, theirs: Run | None, limit: float, stretch: float | None = None) -> Goal:
    """CPU µs per request of ``ours`` over ``theirs``, against ``limit`` (and a stretch goal)."""
    if ours is None or theirs is None or not ours.cpu_us or not theirs.cpu_us:
        return Goal(name, "-", "not measured (rows missing from this run)")
    ratio = ours.cpu_us / theirs.cpu_us
    verdict = "met" if ratio <= limit else "missed"
    if stretch is not None:
        verdict += f"; stretch {stretch:g}x: {'met' if ratio <= stretch else 'missed'}"
    return Goal(name, f"{ratio:.2f}x ({ours.cpu_us:,.0f} / {theirs.cpu_us:,.0f} µs)", verdict)


def summary(rows: list[Run], memory: Any = None) -> str:
    """The performance targets, each with what this run measured and whether it is met."""
    main = "GET 1 KiB"
    sidecar = {c: _row(rows, main, "sidecar", c) for c in (50, 500, 1000)}
    naive = {c: _row(rows, main, "naive-aiohttp", c) for c in (50, 1000)}
    lines: list[Goal] = [
        _ratio_target(f"sidecar CPU/req ≤ 1.5x naive-aiohttp, c={c}", sidecar[c], naive[c], 1.5, 1.2)
        for c in (50, 1000)
    ]
    lines.append(
        _ratio_target(
            "64 KiB GET: sidecar CPU/req ≤ 1.5x naive-aiohttp",
            _row(rows, "GET 64 KiB", "sidecar", 50),
            _row(rows, "GET 64 KiB", "naive-aiohttp", 50),
            1.5,
        )
    )
    for c in (50, 500):
        lines.append(
            _ratio_target(
                f"h2c upstream: CPU/req ≤ 1.5x the sidecar's HTTP/1.1 figure, c={c}",
                _row(rows, "h2c upstream", "sidecar-h2c-upstream", c),
                sidecar.get(c),
                1.5,
            )
        )
    lines.append(
        _ratio_target(
            "every Part II stage configured: CPU/req ≤ 1.15x Part I (same scenario)",
            _row(rows, PART2_SCENARIO, "sidecar-all-stages", 50),
            _row(rows, PART2_SCENARIO, "sidecar-part1", 50),
            1.15,
        )
    )
    low, high = sidecar[50], sidecar[1000]
    if low is None or high is None or not low.rps:
        lines.append(Goal("c=1000 req/s ≥ 85 % of c=50", "-", "not measured (rows missing from this run)"))
    else:
        share = high.rps / low.rps
        lines.append(
            Goal(
                "c=1000 req/s ≥ 85 % of c=50",
                f"{share:.0%} ({high.rps:,.0f} / {low.rps:,.0f} req/s)",
                "met" if share >= 0.85 else "missed",
            )
        )
    if low is None or low.p99_ms != low.p99_ms:
        lines.append(Goal("p99 at c=50 ≤ 40 ms", "-", "not measured (rows missing from this run)"))
    else:
        lines.append(Goal("p99 at c=50 ≤ 40 ms", f"{low.p99_ms:.1f} ms", "met" if low.p99_ms <= 40 else "missed"))
    if memory is None or not memory.samples:
        lines.append(Goal(f"memory flat while streaming 1 GiB (< {STREAM_FLAT_MIB} MiB)", "-", "not measured"))
        lines.append(Goal(f"+ < {IDLE_CALLERS_MIB} MiB for {IDLE_CALLERS:,} idle callers", "-", "not measured"))
        lines.append(Goal(f"idle RSS < {IDLE_MIB} MiB", "-", "not measured"))
    else:
        # Flat means it does not grow with what is streamed: the rise over the
        # RSS when streaming began.  (Max - min also counted a fall: glibc
        # handing back, mid-stream, the heap the idle callers had left.)
        rise = (max(memory.samples) - memory.samples[0]) / MIB
        spread = (max(memory.samples) - min(memory.samples)) / MIB
        streamed = memory.received / MIB
        lines.append(
            Goal(
                f"memory flat while streaming 1 GiB (RSS rises < {STREAM_FLAT_MIB} MiB over its start)",
                f"+{rise:.1f} MiB over {streamed:,.0f} MiB streamed (max - min {spread:.1f} MiB)",
                ("met" if rise < STREAM_FLAT_MIB else "missed")
                if streamed >= 1024
                else f"not judged ({streamed:,.0f} MiB streamed)",
            )
        )
        added = (memory.with_idle - memory.warm) / MIB
        lines.append(
            Goal(
                f"+ < {IDLE_CALLERS_MIB} MiB for {IDLE_CALLERS:,} idle callers (over the RSS after warm-up)",
                f"+{added:.1f} MiB with {memory.opened:,} ({memory.warm / MIB:.1f} → {memory.with_idle / MIB:.1f} MiB)",
                ("met" if added < IDLE_CALLERS_MIB else "missed")
                if memory.opened >= IDLE_CALLERS
                else f"not judged (this run held {memory.opened:,}; bench/run without --quick holds {IDLE_CALLERS:,})",
            )
        )
        idle = memory.idle / MIB
        lines.append(Goal(f"idle RSS < {IDLE_MIB} MiB", f"{idle:.1f} MiB", "met" if idle < IDLE_MIB else "missed"))
    table = ["| target | measured | verdict |", "| --- | --- | --- |"]
    table += [f"| {line.name} | {line.measured} | {line.verdict} |" for line in lines]
    return "\n".join(
        [
            "## Targets",
            "",
            "CPU figures are the proxy's CPU µs per request from the table above (medians), both sides measured "
            "in the same run; ratios over 1 are the sidecar costing more.",
            "",
            *table,
        ]
    )


def rows_from(text: str) -> list[Run]:
    """The main table of a results file, back as runs (what the summary reads)."""

    def value(cell: str) -> float:
        cell = cell.replace(",", "")
        return float("nan") if cell == "-" else float(cell)

    rows = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 10 or not cells[2].isdigit():
            continue
        run = Run(cells[1], cells[0], int(cells[2]), rps=value(cells[3]), p50_ms=value(cells[5]))
        run.p99_ms, cpu = value(cells[6]), value(cells[7])
        run.cpu_us = None if cpu != cpu else cpu
        rows.append(run)
    return rows


def memory_from(text: str) -> Any:
    """The memory table of a results file, back as a MemoryResult (the streaming samples as first, min and max)."""
    from memory import MemoryResult  # type: ignore[import-not-found]

    def mib(pattern: str) -> float | None:
        found = re.search(pattern, text, re.M)
        return None if found is None else float(found.group(1).replace(",", "")) * MIB

    idle, warm = mib(r"^\| idle, just started \| ([\d.]+) \|"), mib(r"^\| after 1 s of load \(c=10\) \| ([\d.]+) \|")
    held = re.search(r"^\| holding ([\d,]+) idle keep-alive client connections \| ([\d.]+)", text, re.M)
    after = mib(r"^\| after those closed \| ([\d.]+) \|")
    stream = re.search(r"^\| streaming ([\d,]+) MiB in ([\d.]+) s .*\| ([\d.]+) / ([\d.]+) \|", text, re.M)
    if None in (idle, warm, after) or held is None or stream is None:
        return None
    # The samples as first, min and max (files before the first/last row: min first, which overstates the rise).
    ends = re.search(r"^\| the same samples: first / last \| ([\d.]+) / ([\d.]+) \|", text, re.M)
    first = float(ends.group(1)) if ends else float(stream.group(3))
    samples = [int(first * MIB), int(float(stream.group(3)) * MIB), int(float(stream.group(4)) * MIB)]
    return MemoryResult(
        int(idle or 0),
        int(warm or 0),
        int(held.group(1).replace(",", "")),
        int(float(held.group(2)) * MIB),
        int(after or 0),
        int(float(stream.group(1).replace(",", "")) * MIB),
        float(stream.group(2)),
        samples,
    )


def retarget(path: Path) -> None:
    """Write the Targets section of a results file again from its own tables (after the targets changed)."""
    text = path.read_text()
    head = text.split("\n## Targets\n", 1)[0].rstrip("\n")
    path.write_text(head + "\n\n" + summary(rows_from(head), memory_from(head)) + "\n")


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {cpu}, Linux {platform.release()}, Python {platform.python_version()}"


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def raise_nofile() -> None:
    """Soft fd limit up to the hard one: c=1000 and 10,000 idle callers need the descriptors."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 sweep, short runs: for trying it")
    parser.add_argument("--sweeps", type=int, help="sweeps (default 3; 1 with --quick)")
    parser.add_argument("--seconds", type=float, help="seconds per measured run (default 5; 2 with --quick)")
    parser.add_argument("--targets", help="comma-separated subset of targets for the main scenario")
    parser.add_argument("--concurrency", help="comma-separated concurrencies (default 50,500,1000)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory scenario")
    parser.add_argument("--no-extra", action="store_true", help="only the main 1 KiB scenario")
    parser.add_argument("--out", default=str(BENCH / "results" / "latest.md"))
    parser.add_argument("--retarget", metavar="FILE", help="only write FILE's Targets section again from its tables")
    args = parser.parse_args()
    if args.retarget:
        retarget(Path(args.retarget))
        return 0
    if (os.cpu_count() or 1) < 2:
        sys.exit("bench: needs at least 2 CPUs (proxy on one, load + upstream on the other)")
    for tool in ("nginx", "haproxy", "wrk", "taskset", "ss"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"bench: {tool} is missing; run bench/run (it installs it)")
    sweeps = args.sweeps or (1 if args.quick else 3)
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    concurrencies = tuple(int(c) for c in (args.concurrency or "50,500,1000").split(","))
    raise_nofile()

    started_at = datetime.datetime.now(datetime.UTC)
    load_before = load_average()
    work = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    (
        h1,
        h2c,
        delay,
        p_nginx,
        p_haproxy,
        p_httpx,
        p_aiohttp,
        p_sidecar,
        a_sidecar,
        p_sidecar2,
        a_sidecar2,
        p_all,
        a_all,
    ) = pick_ports(13)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    sidecar_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sidecar_env.pop("AIOHTTP_NO_EXTENSIONS", None)
    services: dict[str, Service] = {
        "upstream": Service(
            "upstream-nginx",
            [nginx, "-e", str(work / "upstream-early.log"), "-c", str(upstream_nginx_conf(work, h1, h2c))],
            h1,
            LOAD_CPU,
            work,
        ),
        "delay": Service(
            "delay-server", [PY, str(BENCH / "peers" / "delay_server.py"), str(delay)], delay, LOAD_CPU, work
        ),
        "nginx": Service(
            "proxy-nginx",
            [nginx, "-e", str(work / "proxy-early.log"), "-c", str(proxy_nginx_conf(work, p_nginx, h1))],
            p_nginx,
            PROXY_CPU,
            work,
        ),
        "haproxy": Service(
            "haproxy", [haproxy, "-db", "-f", str(haproxy_conf(work, p_haproxy, h1))], p_haproxy, PROXY_CPU, work
        ),
        "naive-httpx": Service(
            "naive-httpx",
            [PY, str(BENCH / "peers" / "naive_httpx.py"), str(p_httpx), f"http://{LOOPBACK}:{h1}"],
            p_httpx,
            PROXY_CPU,
            work,
        ),
        "naive-aiohttp": Service(
            "naive-aiohttp",
            [PY, str(BENCH / "peers" / "naive_aiohttp.py"), str(p_aiohttp), f"http://{LOOPBACK}:{h1}"],
            p_aiohttp,
            PROXY_CPU,
            work,
        ),
        "sidecar": Service(
            "sidecar",
            [
                PY,
                "-m",
                "sidecar",
                "run",
                "-c",
                str(sidecar_conf(work, "sidecar", p_sidecar, a_sidecar, h1, h2c, delay, 1)),
                "--log-format",
                "json",
            ],
            p_sidecar,
            PROXY_CPU,
            work,
            sidecar_env,
        ),
        "sidecar-2w": Service(
            "sidecar-2w",
            [
                PY,
                "-m",
                "sidecar",
                "run",
                "-c",
                str(sidecar_conf(work, "sidecar-2w", p_sidecar2, a_sidecar2, h1, h2c, delay, 2)),
                "--log-format",
                "json",
            ],
            p_sidecar2,
            PROXY_CPU,
            work,
            sidecar_env,
        ),
        "sidecar-all-stages": Service(
            "sidecar-all-stages",
            [
                PY,
                "-m",
                "sidecar",
                "run",
                "-c",
                str(sidecar_all_stages_conf(work, "sidecar-all-stages", p_all, a_all, h1)),
                "--log-format",
                "json",
            ],
            p_all,
            PROXY_CPU,
            work,
            sidecar_env,
        ),
    }
    scripts = {
        "sidecar-part1": write(work / "part1.lua", PART1_SCRIPT),
        "sidecar-all-stages": write(work / "part2.lua", PART2_SCRIPT),
    }
    bases = {
        "direct": (f"http://{LOOPBACK}:{h1}", None),
        "nginx": (f"http://{LOOPBACK}:{p_nginx}", "nginx"),
        "haproxy": (f"http://{LOOPBACK}:{p_haproxy}", "haproxy"),
        "naive-httpx": (f"http://{LOOPBACK}:{p_httpx}", "naive-httpx"),
        "naive-aiohttp": (f"http://{LOOPBACK}:{p_aiohttp}", "naive-aiohttp"),
        "sidecar": (f"http://{LOOPBACK}:{p_sidecar}/up", "sidecar"),
        "sidecar-2w": (f"http://{LOOPBACK}:{p_sidecar2}/up", "sidecar-2w"),
        "direct-h1": (f"http://{LOOPBACK}:{h1}", None),
        "sidecar-h2c-upstream": (f"http://{LOOPBACK}:{p_sidecar}/h2", "sidecar"),
        "direct-delay": (f"http://{LOOPBACK}:{delay}", None),
        "sidecar-delay": (f"http://{LOOPBACK}:{p_sidecar}/delay", "sidecar"),
        "sidecar-part1": (f"http://{LOOPBACK}:{p_sidecar}/up", "sidecar"),
        "sidecar-all-stages": (f"http://{LOOPBACK}:{p_all}/up", "sidecar-all-stages"),
    }
    main_targets = tuple((args.targets or "direct,nginx,haproxy,naive-httpx,naive-aiohttp,sidecar").split(","))
    scenarios = [Scenario("GET 1 KiB", "/1k", concurrencies, main_targets)]
    if not args.no_extra:
        scenarios += [
            Scenario("GET 64 KiB", "/64k", (50,), ("direct", "nginx", "haproxy", "naive-aiohttp", "sidecar")),
            Scenario("workers", "/1k", (50, 500), ("direct", "sidecar", "sidecar-2w")),
            Scenario("h2c upstream", "/1k", (50, 500), ("direct-h1", "sidecar-h2c-upstream"), "h2c"),
            Scenario("10 ms upstream", "/10", (50, 500), ("direct-delay", "sidecar-delay"), "delay"),
            Scenario(PART2_SCENARIO, "/1k", (50,), ("sidecar-part1", "sidecar-all-stages")),
        ]
    ports = {"h1": h1, "h2c": h2c, "delay": delay}
    needed = {"upstream", "delay"} | {
        bases[t][1]
        for s in scenarios
        for t in s.targets
        if bases[t][1] is not None  # type: ignore[misc]
    }
    started: list[Service] = []
    all_runs: list[Run] = []
    try:
        for key in ("upstream", "delay", *sorted(needed - {"upstream", "delay"})):
            services[key].start()
            started.append(services[key])
        print(f"bench: work dir {work}; load average {load_before}; {sweeps} sweep(s) of {seconds:g}s runs", flush=True)
        for sweep in range(sweeps):
            for scenario in scenarios:
                for concurrency in scenario.concurrencies:
                    targets = list(scenario.targets)
                    shift = sweep % len(targets)
                    targets = targets[shift:] + targets[:shift]  # rotate: no target always goes first
                    sweep_runs: list[Run] = []
                    for name in targets:
                        base, service_key = bases[name]
                        pid = services[service_key].pid if service_key else None
                        run = measure(
                            name,
                            scenario.name,
                            base + scenario.path,
                            concurrency,
                            seconds,
                            pid,
                            ports[scenario.upstream],
                            scripts.get(name),
                        )
                        sweep_runs.append(run)
                        if not run.settled and service_key:
                            # A collapsed proxy still working through its backlog would
                            # steal CPU 0 from the next target: restart it.
                            print(f"  {name} still busy after the run: restarting it", flush=True)
                            services[service_key].stop()
                            services[service_key].start()
                        print(
                            f"  sweep {sweep + 1} {scenario.name} c={concurrency} {name}: {run.rps:,.0f} req/s "
                            f"p99 {run.p99_ms:.1f} ms cpu {fmt(run.cpu_us, ',.0f')} µs/req "
                            f"conns {run.upstream_conns} errors {run.errors}",
                            flush=True,
                        )
                    direct = next((r for r in sweep_runs if r.target.startswith("direct")), None)
                    for run in sweep_runs:
                        if direct is not None and direct.rps:
                            run.ratio = run.rps / direct.rps
                    all_runs += sweep_runs
        memory = None
        if not args.no_memory:
            from memory import memory_scenario  # type: ignore[import-not-found]

            memory = memory_scenario(work, h1, PY, sidecar_env, quick=args.quick)
    finally:
        for service in reversed(started):
            service.stop()

    rows: list[Run] = []
    for scenario in scenarios:
        for concurrency in scenario.concurrencies:
            for name in scenario.targets:
                same = [
                    r
                    for r in all_runs
                    if r.scenario == scenario.name and r.target == name and r.concurrency == concurrency
                ]
                if same:
                    rows.append(aggregate(same))
    load_after = load_average()
    report = [
        "# Benchmark results",
        "",
        f"- date: {started_at:%Y-%m-%d %H:%M} UTC; machine: {machine()}",
        f"- load average (1/5/15 min) before: {load_before}; after: {load_after} "
        "(the machine is shared: req/s and latency are noisy, CPU µs/req much less so)",
        f"- {sweeps} sweep(s), {seconds:g} s per run after a warm-up, targets rotated per sweep; medians shown, "
        "errors summed over sweeps",
        "- proxy pinned to CPU 0 (taskset); wrk (1 thread) and the upstream (nginx 1 worker, HTTP/1.1 keep-alive; "
        "h2c on a second port; aiohttp delay server) on CPU 1",
        "- `proxy CPU µs/req`: utime+stime of the proxy's process tree (/proc/<pid>/stat, nginx/haproxy/sidecar "
        "workers included) / requests completed; `upstream conns`: peak established TCP connections to the "
        "upstream port (ss)",
        "- command: `bench/run" + (" --quick" if args.quick else "") + "`",
        "",
        table(rows),
        "",
    ]
    if memory is not None:
        report += [memory.report(), ""]
    report += [summary(rows, memory), ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(report))
    print("\n".join(report))
    print(f"bench: written to {out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
