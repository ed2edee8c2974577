"""``workers: N``: N processes sharing one listen port, limits held host-wide.

The parent process binds nothing it serves: it reserves the listen port (so
port 0 resolves once, for every worker), forks N workers and supervises them.
Each worker binds its own listening socket on that port with SO_REUSEPORT;
the kernel spreads new connections across them.

Limits stay host-wide totals.  Worker ``i`` of ``N`` gets, of a total ``T``,
``T // N`` plus one if ``i < T % N``: the shares sum to ``T`` exactly (10 over
3 workers: 4, 3, 3).  A limit that must be at least 1 per worker
(``max_connections``, ``max_concurrent_requests``) but is smaller than N is a
config error, since any rounding up would break the configured total.
``max_pending`` and ``max_keepalive_connections`` may split to 0.

Every worker runs its own admin listener, on the configured admin port plus
its index (8089, 8090, ... ; port 0 gives each a free port): its ``/metrics``
and ``/pools`` describe that worker and its share of each limit, so
Prometheus scrapes each worker as a target (see README, "Multi-core").  SIGTERM,
SIGINT and SIGHUP sent to the parent are passed to every worker; the parent
exits with 0 when every worker did, else with the first non-zero code.  A
worker that dies on its own takes the others down with it (exit 1): a
half-running sidecar would silently serve with part of its capacity.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import signal
import socket
import sys
from collections.abc import Callable
from types import FrameType

from .config import Config, HostPort, Upstream
from .config import check_divisible as check_divisible  # defined with the config: `validate` applies it too

EXIT_ERROR = 1


def share(total: int, workers: int, index: int) -> int:
    """Worker ``index``'s part of ``total``: the parts of all workers sum to ``total``."""
    return total // workers + (1 if index < total % workers else 0)


def worker_config(config: Config, workers: int, index: int) -> Config:
    """The config worker ``index`` runs: every upstream limit cut to its share."""
    if workers <= 1:
        return config
    check_divisible(config, workers)
    upstreams = tuple(_split(upstream, workers, index) for upstream in config.upstreams)
    return dataclasses.replace(config, workers=workers, upstreams=upstreams)


def _split(upstream: Upstream, workers: int, index: int) -> Upstream:
    limits = upstream.limits
    return dataclasses.replace(
        upstream,
        limits=dataclasses.replace(
            limits,
            max_connections=share(limits.max_connections, workers, index),
            max_keepalive_connections=share(limits.max_keepalive_connections, workers, index),
            max_concurrent_requests=share(limits.max_concurrent_requests, workers, index),
            max_pending=share(limits.max_pending, workers, index),
        ),
    )


def worker_admin(config: Config, admin: HostPort | str | None, index: int) -> HostPort | None:
    """Worker ``index``'s admin address: the configured one shifted by ``index``."""
    base = config.admin.listen if isinstance(admin, str) else admin
    if base is None or base.port == 0:
        return base
    return dataclasses.replace(base, port=base.port + index)


def reserve_port(address: HostPort) -> tuple[socket.socket, HostPort]:
    """Bind (without listening) so that port 0 becomes one concrete port for all workers."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((address.host, address.port))
    return sock, dataclasses.replace(address, port=sock.getsockname()[1])


def _die_with_parent() -> None:
    """Linux: the worker gets SIGTERM if the parent dies without stopping it."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def supervise(workers: int, run_worker: Callable[[int], int]) -> int:
    """Fork ``workers`` processes running ``run_worker(index)``; pass signals on; collect exit codes."""
    children: dict[int, int] = {}  # pid -> index
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    # Block the signals around fork so none lands between fork and the
    # worker's own handlers (it would hit the parent's forwarding handler).
    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    try:
        for index in range(workers):
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                for signum in handled:
                    signal.signal(signum, signal.SIG_DFL)
                # Until the worker's loop takes SIGHUP over, a reload request
                # must not kill it (SIGHUP's default action).
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
                _die_with_parent()
                code = EXIT_ERROR
                try:
                    code = run_worker(index)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            children[pid] = index
        for signum in handled:
            signal.signal(signum, forward)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)

    exit_code = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid not in children:
            continue
        del children[pid]
        code = os.waitstatus_to_exitcode(status)
        code = code if code >= 0 else EXIT_ERROR  # killed by a signal
        if code != 0 and exit_code == 0:
            exit_code = code
        if not stopping:
            # A worker ended on its own: stop the rest rather than run short-handed.
            stopping = True
            exit_code = exit_code or EXIT_ERROR
            for other in list(children):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(other, signal.SIGTERM)
    return exit_code
