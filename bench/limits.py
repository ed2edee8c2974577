"""Deadlines and rate limits: the sidecar vs. a naive aiohttp + httpx proxy.

    .venv/bin/python -m bench.limits [--duration 8] [--clients 100] [--out bench/results/limits.md]

The upstream is the overload benchmark's (200 ms per request) behind ten
pooled connections: 50 req/s capacity.  Two workloads, each through the
sidecar (a real child process) and through the naive proxy
(:mod:`bench.naive_httpx_proxy`, pool timeout 1 s), side by side:

* **rate limit**: the upstream's quota is 20 req/s (``rate_limit: { rate: 20/s,
  burst: 5 }``).  Callers honour ``Retry-After`` (plus jitter).  What reaches
  the upstream is every 200 (each is one upstream request): the sidecar holds
  it to the quota and refuses the rest at once; the naive proxy, which knows
  no quota, passes up to the pool's 50 req/s, which a real API would answer
  with its own 429s.
* **deadlines**: every caller sends ``X-Sidecar-Timeout: 500ms`` (it gives up
  after that anyway); ``timeouts.pool`` is 5 s.  The sidecar answers 504
  ``deadline_exceeded`` after about 500 ms for what it cannot serve in time;
  the naive proxy ignores the header and keeps callers waiting up to its
  pool timeout.  The sidecar runs twice: with a long queue (``max_pending:
  1000``) and with one the budget can drain (``max_pending: 10``).

Reported: ok req/s (= upstream requests), refusals by status, p50/p99/max of
successes and refusals, and the longest any caller waited.  Every process
runs on this machine: the numbers include their contention.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.naive_httpx_proxy import run_loop
from bench.overload import POOL_CONNECTIONS, ROOT, _spawn, naive_proxy, percentile, upstream

RATE = 20.0
BURST = 5
BUDGET_MS = 500
SHORT_QUEUE = 10  # 10 waiting at 50 req/s: at most 200 ms in the queue, + 200 ms upstream < the budget

SIDECAR_CONFIG = """\
admin: off
upstreams:
  api:
    url: {url}
    limits: {{ max_connections: {connections}, max_pending: {pending} }}
    timeouts: {{ pool: {pool} }}
{extra}"""


@contextlib.contextmanager
def sidecar(upstream_url: str, *, pool: str, extra: str = "", pending: int = 1000) -> Iterator[str]:
    with tempfile.TemporaryDirectory() as directory:
        config = Path(directory) / "upstreams.yaml"
        config.write_text(
            SIDECAR_CONFIG.format(
                url=upstream_url, connections=POOL_CONNECTIONS, pool=pool, extra=extra, pending=pending
            )
        )
        child, line = _spawn(
            ["-m", "sidecar", "run", "-c", str(config), "--listen", "127.0.0.1:0", "--log-format", "json"],
            '"event": "started"',
        )
        try:
            port = line.split('"listen": "', 1)[1].split('"', 1)[0].rsplit(":", 1)[1]
            yield f"http://127.0.0.1:{port}/api/work"
        finally:
            child.stop()


@dataclass
class Sample:
    started: float
    latency: float
    status: int  # 0: the caller gave up or the connection broke


@dataclass
class Result:
    name: str
    duration: float
    samples: list[Sample]
    budget: float | None = None  # the callers' X-Sidecar-Timeout, when they send one

    def latencies(self, status: int) -> list[float]:
        return [s.latency for s in self.samples if s.status == status]

    def ok_per_second(self) -> float:
        return (
            sum(1 for s in self.samples if s.status == 200 and s.started + s.latency <= self.duration) / self.duration
        )

    def useful_per_second(self) -> float:
        """Successes that came within the caller's budget (all of them without one), per second."""
        budget = self.budget if self.budget is not None else float("inf")
        inside = [s for s in self.samples if s.status == 200 and s.started + s.latency <= self.duration]
        return sum(1 for s in inside if s.latency <= budget) / self.duration

    def by_status(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for s in self.samples:
            counts[s.status] = counts.get(s.status, 0) + 1
        return dict(sorted(counts.items()))

    def longest(self) -> float:
        return max((s.latency for s in self.samples), default=0.0)


async def hammer(url: str, clients: int, duration: float, headers: dict[str, str], give_up: float) -> list[Sample]:
    """Closed-loop callers that honour Retry-After (429/503) and give up after ``give_up`` s."""
    samples: list[Sample] = []
    timeout = aiohttp.ClientTimeout(total=give_up)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        origin = time.monotonic()
        stop_at = origin + duration

        async def caller() -> None:
            while time.monotonic() < stop_at:
                started = time.monotonic()
                retry_after = 0.0
                try:
                    async with session.get(url, headers=headers) as response:
                        await response.read()
                        status = response.status
                        if status in (429, 503):
                            retry_after = float(response.headers.get("Retry-After", "1"))
                except (TimeoutError, aiohttp.ClientError):
                    status = 0
                samples.append(Sample(started - origin, time.monotonic() - started, status))
                if retry_after:
                    pause = retry_after + random.uniform(0, 0.5)
                    await asyncio.sleep(min(pause, max(0.0, stop_at - time.monotonic())))

        await asyncio.gather(*(caller() for _ in range(clients)))
    return samples


def run(
    name: str, url: str, clients: int, duration: float, headers: dict[str, str], give_up: float, budget: float | None
) -> Result:
    print(f"  {name}: {clients} callers for {duration:g}s ...", flush=True)
    holder: list[list[Sample]] = []

    async def go() -> None:
        await asyncio.sleep(0.3)
        holder.append(await hammer(url, clients, duration, headers, give_up))

    run_loop()(go())
    return Result(name, duration, holder[0], budget)


def _ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1000:,.0f}"


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{_ms(percentile(values, 0.5))} / {_ms(percentile(values, 0.99))} / {_ms(max(values))}"


def table(results: list[Result]) -> str:
    lines = [
        "| workload, proxy | ok req/s (= upstream req/s) | ok within the budget, req/s | answers by status "
        "| ok p50 / p99 / max (ms) | refusals p50 / p99 / max (ms) | longest wait (ms) |",
        "| --- | ---: | ---: | --- | --- | --- | ---: |",
    ]
    for r in results:
        refused = [s.latency for s in r.samples if s.status in (429, 503, 504)]
        counts = ", ".join(f"{'gave up' if k == 0 else k}: {v:,}" for k, v in r.by_status().items())
        lines.append(
            f"| {r.name} | {r.ok_per_second():.1f} | {r.useful_per_second():.1f} | {counts} "
            f"| {_spread(r.latencies(200))} "
            f"| {_spread(refused)} | {_ms(r.longest())} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="deadlines and rate limits benchmark")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "limits.md")
    args = parser.parse_args(argv)
    results: list[Result] = []
    rate_limit = f"    rate_limit: {{ rate: {RATE:g}/s, burst: {BURST} }}\n"
    budget = {"X-Sidecar-Timeout": f"{BUDGET_MS}ms"}
    give_up = BUDGET_MS / 1000 + 0.2  # a caller with a budget does not wait much longer either
    with upstream() as upstream_url:
        with sidecar(upstream_url, pool="1s", extra=rate_limit) as url:
            results.append(run(f"rate limit {RATE:g}/s, sidecar", url, args.clients, args.duration, {}, 10.0, None))
        with naive_proxy(upstream_url) as url:
            results.append(run(f"rate limit {RATE:g}/s, naive proxy", url, args.clients, args.duration, {}, 10.0, None))
        for pending in (1000, SHORT_QUEUE):
            with sidecar(upstream_url, pool="5s", pending=pending) as url:
                name = f"deadline {BUDGET_MS} ms, sidecar, max_pending {pending}"
                results.append(run(name, url, args.clients, args.duration, budget, give_up, BUDGET_MS / 1000))
        with naive_proxy(upstream_url) as url:
            name = f"deadline {BUDGET_MS} ms, naive proxy"
            results.append(run(name, url, args.clients, args.duration, budget, give_up, BUDGET_MS / 1000))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    text = "\n".join(
        [
            "# Deadlines and rate limits: sidecar vs. a naive aiohttp + shared httpx.AsyncClient proxy",
            "",
            f"Upstream: 200 ms per request, {POOL_CONNECTIONS} pooled connections = 50 req/s. "
            f"{args.clients} closed-loop callers for {args.duration:g} s per row, honouring Retry-After "
            "(plus up to 0.5 s of jitter).",
            "",
            f"Reproduce: `.venv/bin/python -m bench.limits --clients {args.clients} --duration {args.duration:g}`",
            "",
            table(results),
            "",
            f"*Rate limit*: the sidecar has `rate_limit: {{ rate: {RATE:g}/s, burst: {BURST} }}` and "
            "`timeouts.pool: 1s`; every 200 is one upstream request, so *ok req/s* is what the upstream "
            f"received. Target: about {RATE:g} req/s (plus the burst once), refusals answered at once. "
            "The naive proxy has no notion of a quota: it lets the pool's full 50 req/s through, which an "
            "API with that quota would answer with its own 429s (and, for many, count against the key).",
            "",
            f"*Deadline*: every caller sends `X-Sidecar-Timeout: {BUDGET_MS}ms` and gives up after "
            f"{give_up:g} s; the sidecar has `timeouts.pool: 5s`. Target: nobody waits much longer than "
            f"{BUDGET_MS} ms for the sidecar's answer (504 deadline_exceeded when it cannot serve in time). "
            "The naive proxy ignores the header; *gave up* counts callers whose own timeout fired. "
            "*ok within the budget* counts only the successes that came in time to be of use. "
            "The sidecar does not know how long the upstream takes: a request that queued for most of its "
            "budget is still sent with what is left and then cut off at the deadline (504). Under sustained "
            "overload with a long queue (`max_pending 1000`) every request queues that long, so nearly all "
            "of the upstream's work is for requests that cannot finish: goodput collapses, though nobody "
            f"waits past the budget. A queue no longer than the budget can drain (`max_pending {SHORT_QUEUE}`: "
            "at most 200 ms at 50 req/s) keeps the upstream's work useful and refuses the excess at once "
            "(503 queue_full, with Retry-After).",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"load average before the run {load}. Upstream, proxies and load generator share the machine "
            "with other jobs: expect noise.",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
