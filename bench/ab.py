"""Two versions of the sidecar back to back, for a change too small for the run-to-run spread.

Usage: .venv/bin/python bench/ab.py A_TREE [B_TREE] [--rounds 6] [--seconds 3] [--concurrency 50]

Each tree is a directory holding a ``sidecar/`` package (B defaults to this
checkout; for A, e.g. ``git archive <commit> sidecar | tar -x -C /tmp/a``).
Both run at once from this venv, on the same CPU, against the same upstream,
and are measured in turns (A B B A A B ...), so that the machine's drift falls
on both alike; the figure is the median of the per-round ratios B / A of the
proxy CPU µs per request.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench import (
    LOOPBACK,
    PROXY_CPU,
    PY,
    ROOT,
    Service,
    measure,
    pick_ports,
    raise_nofile,
    sidecar_conf,
    upstream_nginx_conf,
)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("a")
    parser.add_argument("b", nargs="?", default=str(ROOT))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--path", default="/up/1k")
    args = parser.parse_args()
    raise_nofile()
    work = Path(tempfile.mkdtemp(prefix="sidecar-ab-"))
    h1, h2c, port_a, admin_a, port_b, admin_b = pick_ports(6)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    upstream = Service(
        "upstream-nginx",
        [nginx, "-e", str(work / "early.log"), "-c", str(upstream_nginx_conf(work, h1, h2c))],
        h1,
        "1",
        work,
    )
    sidecars = {}
    for label, tree, port, admin in (("A", args.a, port_a, admin_a), ("B", args.b, port_b, admin_b)):
        env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve()), "PYTHONUNBUFFERED": "1"}
        env.pop("AIOHTTP_NO_EXTENSIONS", None)
        conf = sidecar_conf(work, f"sidecar-{label}", port, admin, h1, h2c, h1, 1)
        cmd = [PY, "-m", "sidecar", "run", "-c", str(conf), "--log-format", "json"]
        sidecars[label] = (Service(f"sidecar-{label}", cmd, port, PROXY_CPU, work, env), port)
    figures: dict[str, list[float]] = {"A": [], "B": []}
    ratios: list[float] = []
    upstream.start()
    try:
        for service, _ in sidecars.values():
            service.start()
        for index in range(args.rounds):
            order = ("A", "B") if index % 2 == 0 else ("B", "A")
            this: dict[str, float] = {}
            for label in order:
                service, port = sidecars[label]
                url = f"http://{LOOPBACK}:{port}{args.path}"
                run = measure(label, "ab", url, args.concurrency, args.seconds, service.pid, h1)
                this[label] = run.cpu_us or float("nan")
                figures[label].append(this[label])
                print(f"  round {index + 1} {label}: {this[label]:.0f} µs/req {run.rps:,.0f} req/s", flush=True)
            ratios.append(this["B"] / this["A"])
    finally:
        for service, _ in sidecars.values():
            service.stop()
        upstream.stop()
    median_a, median_b = statistics.median(figures["A"]), statistics.median(figures["B"])
    print(
        f"A {median_a:.0f} µs/req, B {median_b:.0f} µs/req (medians of {args.rounds}); "
        f"B/A per round {', '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.3f}"
    )
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
