"""Pacing: 200 callers against an upstream that enforces 50 req/s itself.

    .venv/bin/python -m bench.pacing [--duration 20] [--clients 200] [--out bench/results/pacing.md]

The upstream is a token bucket (50 tokens per second, 50 at most): a request
that finds a token gets 200 after 10 ms; one that does not gets 429 at once
with ``Retry-After`` (whole seconds until the next token, at least 1) and the
IETF ``RateLimit`` / ``RateLimit-Policy`` fields, which every 200 carries too.
200 closed-loop callers, which send again as soon as they have an answer
(whatever it was), run for ``--duration`` seconds through

* the sidecar (a real child process, default pacing settings);
* the naive aiohttp + shared ``httpx.AsyncClient`` proxy (bench/naive_httpx_proxy.py).

Each run gets a fresh upstream; its own count of the requests it had to refuse
(over the limit) is the headline number, then goodput as a share of the
upstream's 50 req/s and the callers' p50/p99 latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
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

RATE = 50.0  # tokens per second
BURST = 50.0  # bucket size
SERVICE_TIME = 0.01
ROOT = Path(__file__).resolve().parent.parent

SIDECAR_CONFIG = """\
admin: off
upstreams:
  api:
    url: {url}
"""


# ---------------------------------------------------------------- the upstream


class Bucket:
    def __init__(self) -> None:
        self.tokens = BURST
        self.at = time.monotonic()
        self.served = 0
        self.refused = 0

    def take(self) -> tuple[bool, float]:
        now = time.monotonic()
        self.tokens = min(BURST, self.tokens + (now - self.at) * RATE)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            self.served += 1
            return True, self.tokens
        self.refused += 1
        return False, self.tokens


async def _serve_upstream() -> None:
    bucket = Bucket()

    def limit_headers(tokens: float) -> dict[str, str]:
        # Seconds until the bucket is full again, at least 1: "r more within t" with t = 0 says nothing.
        to_full = max(1, math.ceil((BURST - tokens) / RATE))
        return {
            "RateLimit-Policy": f'"default";q={BURST:.0f};w=1',
            "RateLimit": f'"default";r={int(tokens)};t={to_full}',
        }

    async def handle(request: web.Request) -> web.Response:
        if request.path == "/__stats":
            return web.json_response({"served": bucket.served, "refused": bucket.refused})
        ok, tokens = bucket.take()
        if not ok:
            retry_after = max(1, math.ceil((1 - tokens) / RATE))
            return web.Response(
                status=429, text="over the limit", headers={"Retry-After": str(retry_after), **limit_headers(tokens)}
            )
        await asyncio.sleep(SERVICE_TIME)
        return web.Response(text="ok", headers=limit_headers(tokens))

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    server = site._server
    assert server is not None
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)  # type: ignore[attr-defined]
    await asyncio.Event().wait()


@contextlib.contextmanager
def upstream() -> Iterator[str]:
    child, line = _spawn(["-m", "bench.pacing", "--serve-upstream"], "listening")
    try:
        yield f"http://127.0.0.1:{line.split()[-1]}"
    finally:
        child.stop()


@contextlib.contextmanager
def sidecar(upstream_url: str) -> Iterator[str]:
    with tempfile.TemporaryDirectory() as directory:
        config = Path(directory) / "upstreams.yaml"
        config.write_text(SIDECAR_CONFIG.format(url=upstream_url))
        child, line = _spawn(
            ["-m", "sidecar", "run", "-c", str(config), "--listen", "127.0.0.1:0", "--log-format", "json"],
            '"event": "started"',
        )
        try:
            port = line.split('"listen": "', 1)[1].split('"', 1)[0].rsplit(":", 1)[1]
            yield f"http://127.0.0.1:{port}/api/work"
        finally:
            child.stop()


@contextlib.contextmanager
def naive_proxy(upstream_url: str) -> Iterator[str]:
    child, line = _spawn(["-m", "bench.naive_httpx_proxy", "--upstream", upstream_url], "listening")
    try:
        yield f"http://127.0.0.1:{line.split()[-1]}/work"
    finally:
        child.stop()


# -------------------------------------------------------------- load and stats


@dataclass
class Result:
    name: str
    duration: float
    served: int  # by the upstream
    refused: int  # by the upstream: over-limit requests it received
    ok_latencies: list[float]
    all_latencies: list[float]
    statuses: dict[str, int]

    @property
    def goodput(self) -> float:
        return len(self.ok_latencies) / self.duration


async def hammer(url: str, stats_url: str, clients: int, duration: float) -> Result:
    ok: list[float] = []
    every: list[float] = []
    statuses: dict[str, int] = {}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.sleep(0.3)
        stop_at = time.monotonic() + duration

        async def caller() -> None:
            while time.monotonic() < stop_at:
                started = time.monotonic()
                try:
                    async with session.get(url) as response:
                        await response.read()
                        key = response.headers.get("X-Sidecar-Error") or str(response.status)
                except (TimeoutError, aiohttp.ClientError):
                    key = "client error"
                latency = time.monotonic() - started
                statuses[key] = statuses.get(key, 0) + 1
                every.append(latency)
                if key == "200" and time.monotonic() <= stop_at:
                    ok.append(latency)

        await asyncio.gather(*(caller() for _ in range(clients)))
        async with session.get(stats_url) as response:
            counts = json.loads(await response.read())
    return Result("", duration, counts["served"], counts["refused"], ok, every, statuses)


def run(name: str, proxy: str, clients: int, duration: float) -> Result:
    print(f"  {name}: {clients} callers for {duration:g}s ...", flush=True)
    with upstream() as upstream_url, (sidecar if proxy == "sidecar" else naive_proxy)(upstream_url) as url:
        result = run_loop()(hammer(url, upstream_url + "/__stats", clients, duration))
    result.name = name
    return result


def _ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1000:,.0f}"


def report(results: list[Result], clients: int, duration: float) -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        "# Pacing: the sidecar vs. a naive aiohttp + httpx proxy against a rate-limited upstream",
        "",
        f"Upstream: a token bucket of {RATE:.0f} req/s (burst {BURST:.0f}), 429 + `Retry-After` + `RateLimit` "
        f"when over, {SERVICE_TIME * 1000:.0f} ms per served request. {clients} closed-loop callers that send "
        f"again at once, whatever the answer, for {duration:g} s. Sidecar: default settings (pacing on, "
        "timeouts.pool 1 s).",
        "",
        f"Reproduce: `bench/run pacing` (or `.venv/bin/python -m bench.pacing --clients {clients} "
        f"--duration {duration:g}`)",
        "",
        "| proxy | over-limit requests the upstream refused | goodput req/s | % of 50 req/s "
        "| ok p50 / p99 (ms) | all answers p50 / p99 (ms) | answers by status/code |",
        "| --- | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for r in results:
        by = ", ".join(f"{k}: {v:,}" for k, v in sorted(r.statuses.items()))
        lines.append(
            f"| {r.name} | {r.refused:,} | {r.goodput:.1f} | {100 * r.goodput / RATE:.0f} % "
            f"| {_ms(percentile(r.ok_latencies, 0.5))} / {_ms(percentile(r.ok_latencies, 0.99))} "
            f"| {_ms(percentile(r.all_latencies, 0.5))} / {_ms(percentile(r.all_latencies, 0.99))} | {by} |"
        )
    side = next((r for r in results if r.name.startswith("sidecar")), None)
    naive = next((r for r in results if r.name.startswith("naive")), None)
    lines.append("")
    if side is not None and naive is not None:
        fewer = 1 - side.refused / naive.refused if naive.refused else float("nan")
        lines += [
            "Targets:",
            "",
            f"- the sidecar sends >= 90 % fewer over-limit requests than the naive proxy: "
            f"{100 * fewer:.1f} % fewer: {'met' if fewer >= 0.9 else 'NOT met'}",
            f"- goodput >= 95 % of the upstream's 50 req/s: {100 * side.goodput / RATE:.1f} %: "
            f"{'met' if side.goodput >= 0.95 * RATE else 'NOT met'}",
            "",
        ]
    lines += [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, load average "
        f"after the run {load}. Upstream, proxy and load generator share the machine, which other jobs also use.",
        "",
        "*goodput* counts 200s completed inside the window. The burst of 50 at the start makes the most any "
        f"row can show {(RATE * duration + BURST) / duration:.1f} req/s.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="pacing benchmark")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pacing.md")
    parser.add_argument("--only", choices=("sidecar", "naive"))
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_upstream:
        run_loop()(_serve_upstream())
        return 0
    results = []
    if args.only in (None, "sidecar"):
        results.append(run("sidecar", "sidecar", args.clients, args.duration))
    if args.only in (None, "naive"):
        results.append(run("naive aiohttp + httpx", "naive", args.clients, args.duration))
    text = report(results, args.clients, args.duration)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
