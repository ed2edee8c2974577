"""Running the sidecar as a process: event loop, signals, garbage collector.

:func:`run` is what ``sidecar run`` calls (once per worker with ``workers: N``):
it runs :func:`serve` on uvloop.  :func:`serve` starts the sidecar, tunes the
garbage collector once start-up is over, starts the config file watcher, and
waits for a stop signal; then it drains (docs/operations.md, "Graceful
shutdown").  SIGHUP reloads the config.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import sys

from .logs import get_logger
from .server import Sidecar

__all__ = ["run", "serve", "tune_gc"]

log = get_logger("sidecar")

# A second SIGTERM/SIGINT exits at once, with this code (1 = anything but a
# clean shutdown, see docs/operations.md, "Exit codes").
_EXIT_FORCED = 1


def run(sidecar: Sidecar, *, supervised: bool = False) -> int:
    """Serve on a uvloop event loop until stopped; the exit code."""
    import uvloop

    return uvloop.run(serve(sidecar, supervised=supervised))


def tune_gc() -> None:
    """Fewer, cheaper garbage collections for a long-running proxy.

    Objects alive after start-up (modules, config, pools) are frozen out of
    the collector's scans, so full collections only walk what requests
    allocate.  The young-generation threshold goes from 700 to 20,000
    allocations and the older ones from 10 to 20 collections.

    The young count is allocations minus deallocations, and with a thousand
    requests in flight one turn of the event loop starts or finishes a
    hundred or more at once: at 5,000 those swings alone made ~27 passes a
    second, each walking every young object in flight (~17 us of CPU per
    request at c=1000, none at c=50).  At 20,000: 8 passes in the same 4 s,
    ~3 us per request.  (An earlier (20000, 50, 100) doubled p99 at c=50,
    52 ms against 30, but then every response still left a reference cycle
    for the collector; none does now.  bench/run's p99 row checks it.)
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


async def serve(sidecar: Sidecar, *, supervised: bool = False) -> int:
    """Run until SIGTERM/SIGINT, then drain; a second signal exits at once (code 1).

    ``supervised`` (a worker of ``workers: N``): a second signal is only the
    same request again (a signal to the process group arrives both directly
    and through the supervisor), so it changes nothing; the supervisor
    decides when to stop a worker at once (see sidecar/workers.py).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals_seen = 0

    def on_stop_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        name = signal.Signals(signum).name
        if signals_seen > 1 and supervised:
            log.debug("signal_repeated", signal=name)
            return
        if signals_seen > 1:
            log.warning("forced_exit", signal=name)
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            os._exit(_EXIT_FORCED)
        log.info("signal", signal=name)
        sidecar.begin_drain()  # /readyz answers 503 from this moment
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, sidecar.reload_soon, "sighup")
    watcher: asyncio.Task[None] | None = None
    try:
        await sidecar.start()  # pools, then the proxy and admin listeners
        tune_gc()  # once start-up's objects exist, so they are frozen
        watcher = loop.create_task(sidecar.watch_config())
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await sidecar.shutdown()
    return 0
