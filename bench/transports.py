"""Client stacks under the real sidecar, side by side: bench/results/transports.md.

Usage: .venv/bin/python bench/transports.py [--quick] [--sweeps N] [--seconds S]
(needs what bench/run installs; run `bench/run --quick` once first on a fresh machine).
Each candidate is the real sidecar (full feature set: admission, metrics, access
log) with a different transport under each upstream's httpx.AsyncClient; see
bench/peers/sidecar_candidate.py.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
from pathlib import Path

from bench import (
    BENCH,
    LOAD_CPU,
    LOOPBACK,
    PROXY_CPU,
    PY,
    Run,
    Service,
    aggregate,
    load_average,
    machine,
    measure,
    pick_ports,
    raise_nofile,
    sidecar_conf,
    table,
    upstream_nginx_conf,
)

CANDIDATES = ("pool", "pool-httpcore2", "httpx2-stock", "aiohttp", "httpx-stock")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sweeps", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--concurrency", default="50,1000")
    parser.add_argument("--out", default=str(BENCH / "results" / "transports.md"))
    args = parser.parse_args()
    sweeps = args.sweeps or (1 if args.quick else 3)
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    candidates = args.candidates.split(",")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    raise_nofile()
    started_at = datetime.datetime.now(datetime.UTC)
    load_before = load_average()
    work = Path(tempfile.mkdtemp(prefix="sidecar-transports-"))
    h1, h2c, *ports = pick_ports(2 + 2 * len(candidates))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    upstream = Service(
        "upstream-nginx",
        [nginx, "-e", str(work / "early.log"), "-c", str(upstream_nginx_conf(work, h1, h2c))],
        h1,
        LOAD_CPU,
        work,
    )
    services: dict[str, Service] = {}
    for i, name in enumerate(candidates):
        port, admin = ports[2 * i], ports[2 * i + 1]
        conf = sidecar_conf(work, f"sidecar-{name}", port, admin, h1, h2c, h1, 1)
        services[name] = Service(
            f"sidecar-{name}",
            [PY, str(BENCH / "peers" / "sidecar_candidate.py"), name, "run", "-c", str(conf), "--log-format", "json"],
            port,
            PROXY_CPU,
            work,
            env,
        )
    runs: list[Run] = []
    started: list[Service] = []
    try:
        for service in (upstream, *services.values()):
            service.start()
            started.append(service)
        for sweep in range(sweeps):
            for concurrency in concurrencies:
                order = candidates[sweep % len(candidates) :] + candidates[: sweep % len(candidates)]
                for name in order:
                    service = services[name]
                    url = f"http://{LOOPBACK}:{service.port}/up/1k"
                    run = measure(name, "GET 1 KiB", url, concurrency, seconds, service.pid, h1)
                    runs.append(run)
                    print(
                        f"  sweep {sweep + 1} c={concurrency} {name}: {run.rps:,.0f} req/s p99 {run.p99_ms:.1f} ms "
                        f"cpu {run.cpu_us or 0:,.0f} us/req conns {run.upstream_conns} errors {run.errors}",
                        flush=True,
                    )
    finally:
        for service in reversed(started):
            service.stop()
    rows = []
    for concurrency in concurrencies:
        for name in candidates:
            same = [r for r in runs if r.target == name and r.concurrency == concurrency]
            if same:
                rows.append(aggregate(same))
    report = [
        "# Transports under the real sidecar",
        "",
        f"- date: {started_at:%Y-%m-%d %H:%M} UTC; machine: {machine()}",
        f"- load average before: {load_before}; after: {load_average()} (shared machine: CPU µs/req is the figure "
        "to compare; req/s and latency move with the other load)",
        f"- {sweeps} sweep(s) x {seconds:g} s, candidates rotated; sidecar pinned to CPU 0, wrk + nginx on CPU 1; "
        "full feature set on (admission, metrics, JSON access log to a file)",
        "- candidates: see bench/peers/sidecar_candidate.py; command: `.venv/bin/python bench/transports.py"
        + (" --quick" if args.quick else "")
        + "`",
        "",
        table(rows).replace("| vs direct ", "| vs direct ").replace("| target |", "| transport |"),
        "",
    ]
    Path(args.out).write_text("\n".join(report))
    print("\n".join(report))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
