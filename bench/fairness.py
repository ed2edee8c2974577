"""Fair shares and adaptive concurrency, measured end to end.

    .venv/bin/python -m bench.fairness fairness [--duration 10]
    .venv/bin/python -m bench.fairness adaptive [--duration 10]

The upstream (a child process) works on ``--capacity`` requests at once, 50 ms
each, and queues the rest internally, as real servers do; it tells, in a
response header, how long each request spent inside it.

* ``fairness``: live (10 closed-loop callers) and batch (200) through one
  upstream that serves 8 at once, via the sidecar with ``weights: {live: 9,
  batch: 1}``, the sidecar with no weights (its plain FIFO) and the naive
  aiohttp + httpx proxy: live's p50/p99 and its share of the completions.
* ``adaptive``: 60 callers, an upstream that serves 8 at once, the sidecar
  with a static ``max_concurrent_requests: 100`` vs ``adaptive: true``:
  goodput, p50/p99 as the callers see them, and the time inside the upstream.

Results: ``bench/results/fairness.md`` and ``bench/results/adaptive.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.naive_httpx_proxy import run_loop
from bench.overload import ROOT, _spawn, naive_proxy, percentile

SERVICE = 0.05
WARM_UP = 2.0
WEIGHTS = "live: 9, batch: 1"


# ---------------------------------------------------------------- the upstream


async def _serve_upstream(capacity: int) -> None:
    turn = asyncio.Semaphore(capacity)

    async def handle(request: web.Request) -> web.Response:
        arrived = time.monotonic()
        async with turn:
            await asyncio.sleep(SERVICE)
        inside = time.monotonic() - arrived
        return web.Response(text="ok", headers={"X-Inside-Ms": f"{inside * 1000:.1f}"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=2048)
    await site.start()
    server = site._server
    assert server is not None
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)  # type: ignore[attr-defined]
    await asyncio.Event().wait()


@contextlib.contextmanager
def upstream(capacity: int) -> Iterator[str]:
    child, line = _spawn(["-m", "bench.fairness", "--serve-upstream", "--capacity", str(capacity)], "listening")
    try:
        yield f"http://127.0.0.1:{line.split()[-1]}"
    finally:
        child.stop()


@contextlib.contextmanager
def sidecar(config: str) -> Iterator[str]:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "upstreams.yaml"
        path.write_text(config)
        child, line = _spawn(
            ["-m", "sidecar", "run", "-c", str(path), "--listen", "127.0.0.1:0", "--log-format", "json"],
            '"event": "started"',
        )
        try:
            port = line.split('"listen": "', 1)[1].split('"', 1)[0].rsplit(":", 1)[1]
            yield f"http://127.0.0.1:{port}/api/work"
        finally:
            child.stop()


# -------------------------------------------------------------- load and stats


@dataclass
class Sample:
    caller: str
    started: float
    latency: float
    status: int
    inside: float | None  # seconds inside the upstream, from its header


async def load(url: str, callers: dict[str, int], duration: float) -> list[Sample]:
    samples: list[Sample] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        origin = time.monotonic()
        stop_at = origin + duration

        async def caller(name: str) -> None:
            headers = {"X-Sidecar-Caller": name}
            while time.monotonic() < stop_at:
                started = time.monotonic()
                inside = None
                try:
                    async with session.get(url, headers=headers) as response:
                        await response.read()
                        status = response.status
                        if "X-Inside-Ms" in response.headers:
                            inside = float(response.headers["X-Inside-Ms"]) / 1000
                except (TimeoutError, aiohttp.ClientError):
                    status = 0
                samples.append(Sample(name, started - origin, time.monotonic() - started, status, inside))
                if status != 200:
                    await asyncio.sleep(0.05)  # refused: back off a little, do not spin

        await asyncio.gather(*(caller(name) for name, count in callers.items() for _ in range(count)))
    return samples


def measure(url: str, callers: dict[str, int], duration: float) -> list[Sample]:
    holder: list[list[Sample]] = []

    async def go() -> None:
        await asyncio.sleep(0.3)
        holder.append(await load(url, callers, duration))

    run_loop()(go())
    return [s for s in holder[0] if s.started >= WARM_UP]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


# ---------------------------------------------------------------- scenarios

FAIR_CONFIG = """\
admin: off
callers: {{ weights: {{ {weights} }} }}
upstreams:
  api:
    url: {url}
    limits: {{ max_connections: 8, max_pending: 400 }}
    timeouts: {{ pool: 5s }}
"""

ADAPTIVE_CONFIG = """\
admin: off
upstreams:
  api:
    url: {url}
    limits: {{ max_connections: 100, max_concurrent_requests: 100, max_pending: 400, adaptive: {adaptive} }}
    timeouts: {{ pool: 5s }}
"""


def fairness(duration: float) -> str:
    rows = []
    with upstream(8) as up:
        runs = [
            (
                "sidecar, weights live 9 : batch 1",
                lambda: sidecar(FAIR_CONFIG.format(url=up, weights="live: 9, batch: 1")),
            ),
            ("sidecar, no weights (FIFO)", lambda: sidecar(FAIR_CONFIG.format(url=up, weights=""))),
            ("naive aiohttp + httpx proxy", lambda: naive_proxy(up)),
        ]
        for name, start in runs:
            print(f"  {name} ...", flush=True)
            with start() as url:
                samples = measure(url, {"live": 10, "batch": 200}, duration)
            live_ok = [s.latency for s in samples if s.caller == "live" and s.status == 200]
            batch_ok = [s for s in samples if s.caller == "batch" and s.status == 200]
            total = len(live_ok) + len(batch_ok)
            refused_live = sum(1 for s in samples if s.caller == "live" and s.status != 200)
            refused_batch = sum(1 for s in samples if s.caller == "batch" and s.status != 200)
            span = duration - WARM_UP
            rows.append(
                f"| {name} | {len(live_ok) / span:.0f} | {100 * len(live_ok) / max(1, total):.0f} % "
                f"| {ms(percentile(live_ok, 0.5))} | {ms(percentile(live_ok, 0.99))} | {refused_live} "
                f"| {len(batch_ok) / span:.0f} | {refused_batch} |"
            )
    return (
        "# Fair shares: live (10 callers) and batch (200) through one upstream\n\n"
        f"Upstream: 8 requests at once, {SERVICE * 1000:.0f} ms each (about 160 req/s), the rest queued inside it. "
        f"Closed-loop callers for {duration:g} s, the first {WARM_UP:g} s not counted; refused callers pause 50 ms. "
        f"Everything on one machine ({platform.machine()}, Python {platform.python_version()}).\n\n"
        "| path | live ok/s | live share | live p50 ms | live p99 ms | live refused | batch ok/s | batch refused |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n" + "\n".join(rows) + "\n"
    )


def adaptive(duration: float) -> str:
    rows = []
    with upstream(8) as up:
        for name, flag in (("static max_concurrent_requests: 100", "false"), ("adaptive: true", "true")):
            print(f"  {name} ...", flush=True)
            with sidecar(ADAPTIVE_CONFIG.format(url=up, adaptive=flag)) as url:
                samples = measure(url, {"caller": 60}, duration)
            ok = [s.latency for s in samples if s.status == 200]
            inside = [s.inside for s in samples if s.status == 200 and s.inside is not None]
            refused = sum(1 for s in samples if s.status != 200)
            rows.append(
                f"| {name} | {len(ok) / (duration - WARM_UP):.0f} | {ms(percentile(ok, 0.5))} "
                f"| {ms(percentile(ok, 0.99))} | {ms(percentile(inside, 0.5))} | {ms(percentile(inside, 0.99))} "
                f"| {refused} |"
            )
    return (
        "# Adaptive concurrency: 60 callers, an upstream that serves 8 at once\n\n"
        f"Upstream: 8 requests at once, {SERVICE * 1000:.0f} ms each, the rest queued inside it. 60 closed-loop "
        f"callers for {duration:g} s, the first {WARM_UP:g} s not counted. Goodput cannot rise above the upstream's "
        "160 req/s, and with a fixed number of callers the time they wait in total is the same (Little's law): "
        "what the adaptive limit changes is *where* they wait — in the sidecar's queue, where the deadline, "
        "the fair shares and `timeouts.pool` apply, instead of inside the upstream.\n\n"
        "| sidecar | ok/s | caller p50 ms | caller p99 ms | inside upstream p50 ms | inside upstream p99 ms "
        "| refused |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n" + "\n".join(rows) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", nargs="?", choices=("fairness", "adaptive"))
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--capacity", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        run_loop()(_serve_upstream(args.capacity))
        return
    if args.scenario is None:
        parser.error("which scenario: fairness or adaptive")
    report = fairness(args.duration) if args.scenario == "fairness" else adaptive(args.duration)
    out = ROOT / "bench" / "results" / f"{args.scenario}.md"
    out.write_text(report)
    sys.stdout.write(report)


if __name__ == "__main__":
    main()
