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
A ``rate_limit`` splits too: each worker gets ``rate / N`` and its share of
``burst``, at least one token.

The host has one admin endpoint, served by the supervisor from every worker's
answers (:mod:`sidecar.hostadmin`); each worker serves its admin app on a
private Unix socket only the supervisor uses.  With ``admin.per_worker``,
every worker instead runs its own admin listener on the configured admin port
plus its index (8089, 8090, ...; port 0 gives each a free port), describing
that worker and its share of each limit (docs/operations.md, "Multi-core").

Signals: SIGHUP sent to the parent is passed to every worker.  The first
SIGTERM or SIGINT is passed on too and every worker drains; a worker takes
further ones as the same request (a signal to the whole process group reaches
it twice).  A second SIGTERM/SIGINT to the parent kills every worker (exit 1),
and workers still running ``shutdown_timeout`` plus SUPERVISOR_MARGIN after
the first are killed (exit 1): the parent always exits in bounded time.  It
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
from typing import Any, Protocol

from .config import Config, HostPort, RateLimit, Upstream, check_divisible

__all__ = ["check_divisible", "reserve_port", "share", "supervise", "worker_admin", "worker_config"]

EXIT_ERROR = 1
# Past shutdown_timeout, how long the supervisor waits for workers before
# killing them: a worker's own drain ends at shutdown_timeout, then aborted
# requests, listeners and pools get about a second each to close.
SUPERVISOR_MARGIN = 5.0
# The deadline if the shutdown_timeout in effect cannot be read.
_FALLBACK_SHUTDOWN_TIMEOUT = 30.0


class SupervisorAdmin(Protocol):
    """The host's admin server, as the supervisor drives it (see sidecar/hostadmin.py)."""

    def start(self) -> None: ...  # after every fork: a thread in a process that forks no more
    def begin_drain(self) -> None: ...  # from a signal handler: must not block
    def stop(self) -> None: ...  # bounded


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
            # The adaptive floor never above the worker's share of the ceiling.
            min_concurrent=min(limits.min_concurrent, share(limits.max_concurrent_requests, workers, index)),
        ),
        rate_limit=_split_rate(upstream.rate_limit, workers, index),
        # The retry budget's floor is per process: each worker gets its part.
        retries=dataclasses.replace(
            upstream.retries,
            budget=dataclasses.replace(
                upstream.retries.budget, min_per_second=upstream.retries.budget.min_per_second / workers
            ),
        ),
    )


def _split_rate(limit: RateLimit | None, workers: int, index: int) -> RateLimit | None:
    """A worker's part of a rate limit: the rate divided evenly, the burst shared
    like the other limits but never below one token (a worker with none could
    never send)."""
    if limit is None:
        return None
    rate, burst = limit.rate / workers, max(1, share(limit.burst, workers, index))
    if limit.shared:
        # Counted in Redis for every worker together: the whole limit there;
        # the worker's part is what it falls back to when Redis is unreachable.
        return RateLimit(rate=limit.rate, burst=limit.burst, shared=True, local=(rate, burst))
    return RateLimit(rate=rate, burst=burst)


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


def supervise(
    workers: int,
    run_worker: Callable[[int], int],
    shutdown_timeout: Callable[[], float],
    admin: SupervisorAdmin | None = None,
) -> int:
    """Fork ``workers`` processes running ``run_worker(index)``; pass signals on; collect exit codes.

    The first SIGTERM/SIGINT is passed to every worker, which drains; workers
    take repeats as no news, because a signal sent to the whole process
    group (``timeout``, a terminal's Ctrl-C, an init system) reaches each of
    them twice: from the kernel and from here.  Whether a signal means "exit
    now" is decided here instead: a second one to the supervisor kills every
    worker.  From the first signal on, workers still alive after
    ``shutdown_timeout()`` plus SUPERVISOR_MARGIN are killed, so the
    supervisor always exits in bounded time.

    ``admin``, when given, is started once every worker is forked, told of
    the drain when it begins, and stopped when the last worker is gone.
    """
    children: dict[int, int] = {}  # pid -> index
    stopping = False
    stop_signals = 0
    exit_code = 0

    def kill_all(signum: int) -> None:
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def begin_stop(signum: int) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        if admin is not None:
            admin.begin_drain()
        try:
            budget = shutdown_timeout()
        except Exception:  # never let the deadline itself fail
            budget = _FALLBACK_SHUTDOWN_TIMEOUT
        signal.setitimer(signal.ITIMER_REAL, budget + SUPERVISOR_MARGIN)
        kill_all(signum)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop_signals, exit_code
        if signum == signal.SIGHUP:
            kill_all(signum)
            return
        stop_signals += 1
        if stop_signals == 1:
            begin_stop(signum)
            return
        _log().warning("forced_exit", signal=signal.Signals(signum).name, workers=len(children))
        exit_code = exit_code or EXIT_ERROR
        kill_all(signal.SIGKILL)

    def on_deadline(signum: int, frame: FrameType | None) -> None:
        nonlocal exit_code
        for pid, index in list(children.items()):
            _log().error("worker_killed", pid=pid, worker_index=index, reason="did not stop within shutdown_timeout")
        if children:
            exit_code = exit_code or EXIT_ERROR
        kill_all(signal.SIGKILL)

    # Block the signals around fork so none lands between fork and the
    # worker's own handlers (it would hit the parent's forwarding handler).
    # The admin thread starts inside this window too, so it inherits the
    # mask: a signal taken by another thread would not interrupt wait() below.
    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    masked = (*handled, signal.SIGALRM)
    signal.pthread_sigmask(signal.SIG_BLOCK, masked)
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
                signal.pthread_sigmask(signal.SIG_UNBLOCK, masked)
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
            signal.signal(signum, on_signal)
        signal.signal(signal.SIGALRM, on_deadline)
        if admin is not None:
            admin.start()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, masked)

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
            exit_code = exit_code or EXIT_ERROR
            begin_stop(signal.SIGTERM)
    signal.setitimer(signal.ITIMER_REAL, 0)
    if admin is not None:
        admin.stop()
    return exit_code


def _log() -> Any:
    from .logs import get_logger

    return get_logger("sidecar.workers")
