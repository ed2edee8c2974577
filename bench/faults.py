"""Faults: retries with a budget and the circuit breaker against failing upstreams.

    .venv/bin/python -m bench.faults [--duration 20] [--dead-duration 8] [--out bench/results/faults.md]

(a) **Flaky upstream**: 20 % of requests fail at random (half 503, half a
    connection reset before the response headers), 5 ms per request; 50
    closed-loop callers send GETs for ``--duration`` seconds through

    * the sidecar with ``retries: {attempts: 2, retry_on: [connect_error,
      reset, 503], budget: {ratio: 0.2}}``;
    * the naive aiohttp + httpx proxy (:mod:`bench.naive_httpx_proxy`), which
      relays every failure.

    Reported: the callers' success rate, and the upstream's load
    amplification (requests the upstream saw per caller request; the
    target is ≤ 1 + the budget ratio).

(b) **Dead upstream**, for ``--dead-duration`` seconds each: a port nothing
    listens on, and a black hole that accepts connections and never answers
    (``timeouts.read: 2s``).  50 callers through the sidecar with the
    circuit breaker off and on (``failures: 5, open_for: 5s``): the callers'
    p50/p99 time to an answer.  After an error answer a caller waits 10 ms
    before the next request (a client's minimal pause; without it the
    callers would only measure how fast two shared cores can refuse).

Every process runs on this machine: the numbers include their contention.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.naive_httpx_proxy import run_loop
from bench.overload import _spawn, percentile

FAILURE_RATE = 0.2
LATENCY = 0.005
CALLERS = 50
RATIO = 0.2
SIDECAR_ADMIN: list[str] = []  # the admin URL of the sidecar running now, if it has one

FLAKY_CONFIG = """\
admin: 127.0.0.1:0
upstreams:
  api:
    url: {url}
    limits: {{ max_connections: 50 }}
    retries: {{ attempts: 2, retry_on: [connect_error, reset, 503], budget: {{ ratio: {ratio}, min_per_second: 1 }} }}
"""

DEAD_CONFIG = """\
admin: off
upstreams:
  api:
    url: {url}
    limits: {{ max_connections: 100 }}
    timeouts: {{ read: 2s, connect: 2s }}
    circuit_breaker: {{ failures: {failures}, open_for: 5s }}
"""


# ------------------------------------------------------------- the upstreams


def _serve_flaky() -> None:
    seen = {"requests": 0}

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/__count":
            return web.Response(text=str(seen["requests"]))
        seen["requests"] += 1
        await asyncio.sleep(LATENCY)
        roll = random.random()
        if roll < FAILURE_RATE / 2:
            return web.Response(status=503, text="unavailable")
        if roll < FAILURE_RATE:
            assert request.transport is not None
            request.transport.abort()  # reset before the response headers
            return web.Response(text="never sent")
        return web.Response(text="ok")

    async def main() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        server = site._server
        assert server is not None
        print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)  # type: ignore[attr-defined]
        await asyncio.Event().wait()

    run_loop()(main())


def _serve_black_hole() -> None:
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(swallow, "127.0.0.1", 0, backlog=1024)
        print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Event().wait()

    run_loop()(main())


@contextlib.contextmanager
def upstream(kind: str) -> Iterator[str]:
    child, line = _spawn(["-m", "bench.faults", f"--serve-{kind}"], "listening")
    try:
        yield f"http://127.0.0.1:{line.split()[-1]}"
    finally:
        child.stop()


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@contextlib.contextmanager
def sidecar(config_text: str) -> Iterator[str]:
    with tempfile.TemporaryDirectory() as directory:
        config = Path(directory) / "upstreams.yaml"
        config.write_text(config_text)
        child, line = _spawn(
            ["-m", "sidecar", "run", "-c", str(config), "--listen", "127.0.0.1:0", "--log-format", "json"],
            '"event": "started"',
        )
        try:
            port = line.split('"listen": "', 1)[1].split('"', 1)[0].rsplit(":", 1)[1]
            admin = line.split('"admin": "', 1)[1].split('"', 1)[0] if '"admin": "' in line else None
            SIDECAR_ADMIN[:] = [] if admin is None else [f"http://{admin}"]
            yield f"http://127.0.0.1:{port}/api/work"
        finally:
            SIDECAR_ADMIN[:] = []
            child.stop()


@contextlib.contextmanager
def naive_proxy(upstream_url: str) -> Iterator[str]:
    child, line = _spawn(["-m", "bench.naive_httpx_proxy", "--upstream", upstream_url], "listening")
    try:
        yield f"http://127.0.0.1:{line.split()[-1]}/work"
    finally:
        child.stop()


# ------------------------------------------------------------------- load


@dataclass
class Run:
    name: str
    latencies: list[float]
    statuses: list[int]  # 0: the connection broke or the client gave up
    upstream_requests: int | None = None
    budget_retries: int | None = None  # retries the sidecar's attempt loop made (sidecar_retries_total sent)

    @property
    def success_rate(self) -> float:
        return sum(1 for s in self.statuses if s == 200) / max(1, len(self.statuses))

    @property
    def amplification(self) -> float | None:
        if self.upstream_requests is None:
            return None
        return self.upstream_requests / max(1, len(self.statuses))


async def _hammer(url: str, duration: float, pause_after_error: float) -> tuple[list[float], list[int]]:
    latencies: list[float] = []
    statuses: list[int] = []
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        stop_at = time.monotonic() + duration

        async def caller() -> None:
            while time.monotonic() < stop_at:
                started = time.monotonic()
                try:
                    async with session.get(url) as response:
                        await response.read()
                        status = response.status
                except (TimeoutError, aiohttp.ClientError):
                    status = 0
                latencies.append(time.monotonic() - started)
                statuses.append(status)
                if status != 200 and pause_after_error:
                    await asyncio.sleep(pause_after_error)

        await asyncio.gather(*(caller() for _ in range(CALLERS)))
    return latencies, statuses


async def _count(upstream_url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"{upstream_url}/__count") as response:
        return int(await response.text())


async def _retries_sent() -> int | None:
    if not SIDECAR_ADMIN:
        return None
    async with aiohttp.ClientSession() as session, session.get(f"{SIDECAR_ADMIN[0]}/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith("sidecar_retries_total{") and 'result="sent"' in line:
                return int(float(line.rsplit(" ", 1)[1]))
    return None


def flaky_run(name: str, url: str, upstream_url: str, duration: float) -> Run:
    print(f"  {name}: {CALLERS} callers for {duration:g}s ...", flush=True)

    async def go() -> Run:
        await asyncio.sleep(0.3)
        before = await _count(upstream_url)
        latencies, statuses = await _hammer(url, duration, 0.0)
        after = await _count(upstream_url)
        return Run(name, latencies, statuses, after - before, await _retries_sent())

    return run_loop()(go())


def dead_run(name: str, url: str, duration: float) -> Run:
    print(f"  {name}: {CALLERS} callers for {duration:g}s ...", flush=True)

    async def go() -> Run:
        await asyncio.sleep(0.3)
        latencies, statuses = await _hammer(url, duration, 0.01)
        return Run(name, latencies, statuses)

    return run_loop()(go())


# ------------------------------------------------------------------ report


def _ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1000:,.1f}"


def report(flaky: list[Run], dead: list[Run], duration: float, dead_duration: float) -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        "# Faults: retries with a budget, and the circuit breaker",
        "",
        f"Reproduce: `bench/run faults` (`.venv/bin/python -m bench.faults --duration {duration:g} "
        f"--dead-duration {dead_duration:g}`)",
        "",
        f"## (a) An upstream failing {FAILURE_RATE:.0%} of requests (half 503, half a reset before the headers)",
        "",
        f"{CALLERS} closed-loop callers (GET) for {duration:g} s, {LATENCY * 1000:.0f} ms per upstream request. "
        "Sidecar: `retries: {attempts: 2, retry_on: [connect_error, reset, 503], "
        f"budget: {{ratio: {RATIO}, min_per_second: 1}}}}`. "
        "The naive proxy relays every failure.",
        "",
        "| proxy | caller requests | success rate | upstream requests per caller request "
        "| of which budgeted retries | p50 / p99 (ms) |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for run in flaky:
        amplification = run.amplification
        budgeted = "-" if run.budget_retries is None else f"{run.budget_retries / max(1, len(run.statuses)):.3f}"
        lines.append(
            f"| {run.name} | {len(run.statuses):,} | {run.success_rate:.1%} "
            f"| {amplification:.3f} | {budgeted} "
            f"| {_ms(percentile(run.latencies, 0.5))} / {_ms(percentile(run.latencies, 0.99))} |"
        )
    sidecar_run = next((run for run in flaky if run.name.startswith("sidecar")), None)
    if sidecar_run is not None and sidecar_run.amplification is not None:
        met = sidecar_run.amplification <= 1 + RATIO + 0.01
        lines += [
            "",
            f"Target: load amplification ≤ 1 + budget ratio = {1 + RATIO:.2f}: "
            f"{'met' if met else 'NOT met'} ({sidecar_run.amplification:.3f}). The budget's floor "
            "(`min_per_second: 1`, 10 retries per 10 s) adds a little on top of the ratio. The *budgeted "
            "retries* column counts every extra attempt the budget allowed (`sidecar_retries_total{result="
            '"sent"}`): the retry stage\'s, and the connection pool\'s own repeat of a GET whose kept-alive '
            "connection broke before any response byte (it cannot tell a connection that went stale while "
            "idle from one the upstream reset after reading the request), which spends from the same budget.",
        ]
    lines += [
        "",
        "## (b) A dead upstream: callers' time to an answer",
        "",
        f"{CALLERS} callers for {dead_duration:g} s each, `timeouts: {{read: 2s, connect: 2s}}`; circuit on = "
        "`circuit_breaker: {failures: 5, open_for: 5s}`. A caller pauses 10 ms after an error answer.",
        "",
        "| upstream | circuit | answers | p50 (ms) | p90 (ms) | p99 (ms) | max (ms) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in dead:
        where, circuit = run.name.rsplit(", ", 1)
        lines.append(
            f"| {where} | {circuit} | {len(run.statuses):,} | {_ms(percentile(run.latencies, 0.5))} "
            f"| {_ms(percentile(run.latencies, 0.9))} "
            f"| {_ms(percentile(run.latencies, 0.99))} | {_ms(max(run.latencies, default=float('nan')))} |"
        )
    lines += [
        "",
        "A closed port refuses at once: the circuit changes little there (each refusal already costs "
        "one connect attempt, now none). A black hole costs every caller the whole read timeout "
        "until the circuit opens; then callers get 503 circuit_open in about a millisecond, and only "
        "one probe per period goes to the upstream. The slow answers left with the circuit on are "
        f"the first {CALLERS} requests, all sent before it could open.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average before the run {load}. Upstream, proxy and callers share the machine.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="faults benchmark: retries and the circuit breaker")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--dead-duration", type=float, default=8.0)
    parser.add_argument("--out", default="bench/results/faults.md")
    parser.add_argument("--serve-flaky", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-black-hole", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_flaky:
        _serve_flaky()
        return 0
    if args.serve_black_hole:
        _serve_black_hole()
        return 0
    print("(a) flaky upstream", flush=True)
    flaky: list[Run] = []
    with upstream("flaky") as url:
        with sidecar(FLAKY_CONFIG.format(url=url, ratio=RATIO)) as proxy:
            flaky.append(flaky_run("sidecar (retries + budget)", proxy, url, args.duration))
        with naive_proxy(url) as proxy:
            flaky.append(flaky_run("naive httpx proxy", proxy, url, args.duration))
    print("(b) dead upstream", flush=True)
    dead: list[Run] = []
    for where, target in (
        ("closed port", contextlib.nullcontext(closed_port())),
        ("black hole", upstream("black-hole")),
    ):
        with target as url:
            for failures, label in ((0, "off"), (5, "on")):
                with sidecar(DEAD_CONFIG.format(url=url, failures=failures)) as proxy:
                    dead.append(dead_run(f"{where}, {label}", proxy, args.dead_duration))
    text = report(flaky, dead, args.duration, args.dead_duration)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
