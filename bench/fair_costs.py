"""The per-request CPU cost of fair admission against the plain FIFO core, in-process.

    .venv/bin/python -m bench.fair_costs

Contended: every request waits (enqueue, then granted on a release), two
callers with weights 9 and 1 vs the FIFO core.  Uncontended: a free slot taken
and given back.  Also the shell (``Admission.acquire``/``release`` on a free
slot) and the adaptive limit's per-attempt sample.  Results go to
``bench/results/fair_costs.md``.
"""

from __future__ import annotations

import asyncio
import platform
import time
from collections.abc import Callable
from pathlib import Path

from sidecar.policy.adaptive import GradientLimit
from sidecar.policy.admission import Admission
from sidecar.policy.fair_core import FairAdmissionCore

N = 200_000
OUT = Path(__file__).resolve().parent / "results" / "fair_costs.md"


def best_of(run: Callable[[], None], rounds: int = 5) -> float:
    """Microseconds per request, the best of a few rounds (the least disturbed)."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times) / N * 1e6


def fifo_contended() -> None:
    # One caller: the fair core serves it FIFO (what Part I's FIFO core did).
    core: FairAdmissionCore[int] = FairAdmissionCore(4, 1000)
    for _ in range(4):
        core.try_acquire()
    for i in range(N):
        core.enqueue(i)
        core.release(0.05)


def fair_contended() -> None:
    core: FairAdmissionCore[int] = FairAdmissionCore(4, 1000, {"live": 9, "batch": 1})
    for _ in range(4):
        core.try_acquire("live")
    names = ("live", "batch")
    for i in range(N):
        name = names[i & 1]
        core.can_wait(name)
        core.enqueue(i, name)
        core.release(0.05, names[(i + 1) & 1])


def fifo_free() -> None:
    core: FairAdmissionCore[int] = FairAdmissionCore(4, 1000)
    for _ in range(N):
        core.try_acquire()
        core.release(0.05)


def fair_free() -> None:
    core: FairAdmissionCore[int] = FairAdmissionCore(4, 1000, {"live": 9, "batch": 1})
    for _ in range(N):
        core.try_acquire("live")
        core.release(0.05, "live")


def shell_free() -> None:
    admission = Admission("api", capacity=4, max_pending=1000, pool_timeout=1.0, weights={"live": 9})

    async def go() -> None:
        for _ in range(N):
            await admission.acquire(None, "live")
            admission.release(0.05, "live")

    asyncio.run(go())


def adaptive_sample() -> None:
    limit = GradientLimit(1, 100, 0.0)
    now = 0.0
    for _ in range(N):
        now += 0.001
        limit.sample(0.05, 10, now)


def main() -> None:
    rows = [
        ("fair core, one caller (FIFO), contended (enqueue + grant)", best_of(fifo_contended)),
        ("fair core, 2 callers 9:1, contended (can_wait + enqueue + grant)", best_of(fair_contended)),
        ("fair core, one caller (FIFO), free slot (acquire + release)", best_of(fifo_free)),
        ("fair core, free slot (acquire + release)", best_of(fair_free)),
        ("fair shell, free slot (await acquire + release)", best_of(shell_free, 3)),
        ("adaptive limit, one attempt's sample", best_of(adaptive_sample)),
    ]
    text = (
        "# Fair admission and the adaptive limit: CPU per request\n\n"
        f"In-process, {N:,} requests per round, best of several rounds; Python {platform.python_version()} "
        f"on {platform.machine()}.\n\n| operation | µs per request |\n| --- | ---: |\n"
        + "\n".join(f"| {name} | {value:.2f} |" for name, value in rows)
        + f"\n\nThe fair core's extra cost when contended: {rows[1][1] - rows[0][1]:.2f} µs; "
        f"on a free slot: {rows[3][1] - rows[2][1]:.2f} µs.\n"
    )
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
