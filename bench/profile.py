"""Profile the sidecar under load: pyinstrument around ``sidecar run``, wrk at c=50, 1 KiB via nginx.

Usage: .venv/bin/python bench/profile.py [--seconds 10] [--concurrency 50] [--cprofile] [--body 64k]
Writes bench/results/profile.txt (pyinstrument text, or cProfile top functions by tottime).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import BENCH, LOOPBACK, PY, Service, pick_ports, raise_nofile, sidecar_conf, upstream_nginx_conf, wrk


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--upstream", default="up", help="up (HTTP/1.1, default) or h2 (h2c upstream)")
    parser.add_argument("--body", default="1k", help="1k (default) or 64k: the size of the upstream's response")
    parser.add_argument("--top", type=int, default=60, help="cProfile: how many functions to list")
    parser.add_argument("--out", default=str(BENCH / "results" / "profile.txt"))
    args = parser.parse_args()
    raise_nofile()
    work = Path(tempfile.mkdtemp(prefix="sidecar-profile-"))
    h1, h2c, port, admin = pick_ports(4)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    upstream = Service(
        "upstream-nginx",
        [nginx, "-e", str(work / "early.log"), "-c", str(upstream_nginx_conf(work, h1, h2c))],
        h1,
        "1",
        work,
    )
    conf = sidecar_conf(work, "sidecar", port, admin, h1, h2c, h1, 1)
    raw = work / "profile.raw"
    if args.cprofile:
        runner = [PY, "-m", "cProfile", "-o", str(raw), "-m", "sidecar"]
    else:
        runner = [PY, "-m", "pyinstrument", "-r", "text", "--show-all", "-o", str(raw), "-m", "sidecar"]
    sidecar = Service("sidecar", [*runner, "run", "-c", str(conf), "--log-format", "json"], port, "0", work)
    upstream.start()
    try:
        sidecar.start()
        url = f"http://{LOOPBACK}:{port}/{args.upstream}/{args.body}"
        wrk(url, args.concurrency, 2, latency=False)
        out = wrk(url, args.concurrency, args.seconds)
        print(out)
        sidecar.stop()
        time.sleep(0.5)
    finally:
        sidecar.stop()
        upstream.stop()
    if args.cprofile:
        import pstats

        with open(args.out, "w") as fh:
            pstats.Stats(str(raw), stream=fh).sort_stats("tottime").print_stats(args.top)
    else:
        shutil.copy(raw, args.out)
    print(Path(args.out).read_text()[:20000])
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
