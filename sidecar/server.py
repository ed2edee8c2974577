"""Composition root: listeners, pools, reload and graceful drain. SPEC §9.

:class:`Sidecar` owns everything that lives as long as the process: the
proxy and admin listeners, the current :class:`Generation` (router + pools),
the metrics and the reload/drain machinery.  ``serve()`` runs it until a
signal arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import Any

from aiohttp import web

from . import __version__
from .admin import create_admin_app
from .config import Config, ConfigError, HostPort, admin_exposure_warning, load_config
from .forward import Exchange, Forwarder, Generation
from .inbound import GuardedServer
from .logs import get_logger, log_access
from .metrics import Metrics, outcome
from .pools import UpstreamPool
from .redact import scrubber
from .reload import ReloadRefused, ReloadResult, file_signature, plan_reload
from .routing import Router

__all__ = ["ReloadRefused", "ReloadResult", "Sidecar", "serve"]

log = get_logger("sidecar")
access_log = get_logger("sidecar.access")

# aiohttp keeps idle client connections open this long (nginx's default).
_CLIENT_KEEPALIVE = 75.0
# The config file is polled: inotify does not see edits made through Docker
# bind mounts or on network filesystems.  A change is acted on once two reads
# _WATCH_SETTLE apart agree, so a half-written file is not loaded.
_WATCH_INTERVAL = 1.0
_WATCH_SETTLE = 0.2
# Past the drain deadline, aborted handlers get this long to run their cleanup
# (give back slots, close upstream responses); also aiohttp's own per-connection
# shutdown budget, which only ever sees connections that are already done.
_ABORT_GRACE = 1.0
# A second SIGTERM/SIGINT exits at once, with this code (SPEC §2: 1 = anything
# but a clean shutdown).
_EXIT_FORCED = 1
# The accept queue of both listeners: a burst of new connections waits in the
# kernel rather than being dropped (and retried by the caller a second later).
# The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 4096


class Sidecar:
    """The running sidecar: proxy listener, admin listener, pools, reload, drain."""

    def __init__(
        self,
        config: Config,
        *,
        listen: HostPort | None = None,
        admin: HostPort | str | None = "config",
        shape: Callable[[Config], Config] | None = None,
        worker: int = 0,
    ) -> None:
        self.config = config
        self.worker = worker  # index among `workers` processes (0 when there is one)
        # Applied to every config loaded on reload (a worker's share of the limits).
        self._shape = shape
        self.listen = listen or config.listen
        self.admin_listen: HostPort | None = config.admin.listen if isinstance(admin, str) else admin
        self.metrics = Metrics(self._observed_pools)
        self.draining = False
        self.ready = False
        self._generation: Generation | None = None
        self._retired: set[UpstreamPool] = set()
        self._closing: dict[UpstreamPool, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._reload_lock = asyncio.Lock()
        # The content last loaded (or tried): the watcher acts when the file differs.
        self._attempted_signature = file_signature(config.source)
        # Proxy requests in progress, across every generation of pools.
        self._handling = 0
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._drain_deadline = 0.0
        self._stopping = False
        self._stopped = asyncio.Event()
        self._proxy_runner: web.ServerRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self.proxy_port = 0
        self.admin_port: int | None = None
        self.forwarder = Forwarder(self.generation, self._finished, lambda: self.draining)
        scrubber.update(config.secrets)

    # ------------------------------------------------------------ state

    def generation(self) -> Generation:
        assert self._generation is not None, "Sidecar.start() not called"
        return self._generation

    def all_pools(self) -> Iterator[UpstreamPool]:
        if self._generation is not None:
            yield from self._generation.pools.values()

    def retired_pools(self) -> frozenset[UpstreamPool]:
        return frozenset(self._retired)

    def _observed_pools(self) -> Iterator[UpstreamPool]:
        """Current pools first, then retiring ones still draining: both hold slots and connections."""
        yield from self.all_pools()
        yield from tuple(self._retired)

    # ------------------------------------------------------------ start

    async def start(self) -> None:
        """Open pools and listeners inside the running loop."""
        config = self.config
        for warning in config.warnings:
            log.warning("config_warning", message=warning)
        self._generation = Generation(
            router=Router(config.upstreams),
            pools=self._open_pools(config, [u.name for u in config.upstreams]),
            inbound=config.inbound,
        )
        inbound = config.inbound
        proxy_server = GuardedServer(
            self._handle_proxy,
            header_timeout=lambda: self.generation().inbound.header_timeout,
            on_client_error=lambda kind: self.metrics.client_errors.labels(kind).inc(),
            handler_cancellation=True,  # a caller that disconnects frees its slot at once
            access_log=None,
            auto_decompress=False,
            keepalive_timeout=_CLIENT_KEEPALIVE,
            max_line_size=inbound.max_line_size,
            max_field_size=inbound.max_field_size,
            max_headers=inbound.max_headers,
        )
        # The drain budget is enforced by shutdown() itself (it can change on
        # reload); aiohttp's per-connection budget only covers the last flush.
        self._proxy_runner = web.ServerRunner(proxy_server, shutdown_timeout=_ABORT_GRACE)
        await self._proxy_runner.setup()
        reuse_port = config.workers > 1
        proxy_socket = _bind(self.listen, reuse_port=reuse_port)
        # SockSite calls listen() again with its own backlog (128 by default).
        await web.SockSite(self._proxy_runner, proxy_socket, backlog=LISTEN_BACKLOG).start()
        self.proxy_port = proxy_socket.getsockname()[1]

        if self.admin_listen is not None:
            self._admin_runner = web.AppRunner(create_admin_app(self), access_log=None, shutdown_timeout=_ABORT_GRACE)
            await self._admin_runner.setup()
            admin_socket = _bind(self.admin_listen, reuse_port=reuse_port)
            await web.SockSite(self._admin_runner, admin_socket, backlog=LISTEN_BACKLOG).start()
            self.admin_port = admin_socket.getsockname()[1]
            if self.admin_listen != config.admin.listen:
                # --admin overrode the config file: judge the address actually bound.
                exposed = admin_exposure_warning(self.admin_listen, config.admin.token)
                if exposed is not None:
                    log.warning("config_warning", message=exposed)
        self.ready = not self.draining
        log.info(
            "started",
            version=__version__,
            listen=f"{self.listen.host}:{self.proxy_port}",
            admin=None if self.admin_port is None else f"{self.admin_listen}".rsplit(":", 1)[0] + f":{self.admin_port}",
            upstreams=[u.name for u in config.upstreams],
            http_parser=_parser_in_use(),
            pid=os.getpid(),
        )

    # ----------------------------------------------------------- reload

    async def reload(self, reason: str) -> ReloadResult:
        """Load the config file again and swap it in.

        Raises :class:`ConfigError` if the file is invalid or a pool cannot be
        opened (the running config stays as it was), :class:`ReloadRefused`
        before start() or once shutting down.  Reloads run one at a time.
        """
        self._refuse_reload()
        async with self._reload_lock:
            self._refuse_reload()
            source = self.config.source
            # Read before loading, and kept whatever the outcome: an edit that
            # races the load shows up as a change, and a broken file is
            # reported once, not at every poll.
            self._attempted_signature = await asyncio.to_thread(file_signature, source)
            try:
                new = await asyncio.to_thread(load_config, source)
                if self._shape is not None:
                    new = self._shape(new)
                plan, generation = self._prepare(new)
            except ConfigError as error:
                self.metrics.reloads.labels("failure").inc()
                log.error(
                    "config_reload_failed",
                    reason=reason,
                    file=error.source,
                    path=error.path,
                    problem=error.problem,
                    error=str(error),
                )
                raise
            except Exception:
                self.metrics.reloads.labels("failure").inc()
                log.exception("config_reload_failed", reason=reason, error="unexpected error")
                raise
            if self.draining:  # the drain began while the file was loading
                self._close_all(generation.pools[name] for name in plan.opened)
                self._refuse_reload()
            self._commit(new, plan, generation)
        self.metrics.reloads.labels("success").inc()
        for warning in new.warnings:
            log.warning("config_warning", message=warning)
        for what in plan.restart_needed:
            log.warning("config_restart_needed", setting=what, message=f"{what} changes take effect on restart")
        log.info("config_reloaded", reason=reason, **plan.summary())
        return plan

    async def reload_quietly(self, reason: str) -> None:
        """A reload whose failure is only logged and counted (watcher, SIGHUP)."""
        with contextlib.suppress(Exception):  # reload() logged and counted it
            await self.reload(reason)

    def _refuse_reload(self) -> None:
        if self.draining:
            log.info("config_reload_refused", reason="draining")
            raise ReloadRefused("the sidecar is shutting down")
        if self._generation is None:
            raise ReloadRefused("the sidecar has not started")

    def _prepare(self, new: Config) -> tuple[ReloadResult, Generation]:
        """The next generation, with new pools opened for added and changed upstreams."""
        plan = plan_reload(self.config, new)
        opened = self._open_pools(new, plan.opened)
        try:
            current = self.generation().pools
            pools = {u.name: opened[u.name] if u.name in opened else current[u.name] for u in new.upstreams}
            generation = Generation(router=Router(new.upstreams), pools=pools, inbound=new.inbound)
        except BaseException:
            self._close_all(opened.values())
            raise
        return plan, generation

    def _open_pools(self, config: Config, names: Iterable[str]) -> dict[str, UpstreamPool]:
        """New pools; a ConfigError naming the upstream if one cannot be built.

        Validation already checked the files exist, but only building the TLS
        context reads them: a CA file that is not a certificate fails here.
        """
        opened: dict[str, UpstreamPool] = {}
        for name in names:
            upstream = config.upstream(name)
            assert upstream is not None
            try:
                opened[name] = UpstreamPool(upstream)
            except Exception as exc:
                self._close_all(opened.values())
                where = f"upstreams.{name}.tls" if isinstance(exc, OSError) else f"upstreams.{name}"
                raise ConfigError(config.source, where, f"cannot open the pool: {exc}") from exc
        return opened

    def _commit(self, new: Config, plan: ReloadResult, generation: Generation) -> None:
        """Swap in one synchronous step: new requests use the new pools at once."""
        old_pools = self.generation().pools
        self._generation = generation
        # Old secrets stay scrubbed too: retired pools may still log.
        scrubber.update(new.secrets | self.config.secrets)
        self.config = new
        for name in plan.replaced:
            self._retire(old_pools[name])

    def _retire(self, pool: UpstreamPool) -> None:
        """Let a replaced pool finish its in-flight requests, then close it."""
        self._retired.add(pool)
        timeout = self.config.shutdown_timeout

        async def drain_then_close() -> None:
            drained = await pool.drain(timeout)
            if not drained:
                log.warning("pool_drain_timeout", upstream=pool.name, in_flight=pool.active, timeout=timeout)
            await asyncio.shield(self._close(pool))
            log.info("pool_closed", upstream=pool.name, drained=drained)

        self._spawn(drain_then_close())

    def _close(self, pool: UpstreamPool) -> asyncio.Task[None]:
        """Close a pool once, in a task of its own that a cancelled caller cannot interrupt."""
        task = self._closing.get(pool)
        if task is None:
            task = asyncio.ensure_future(pool.aclose())
            self._closing[pool] = task

            def closed(_: asyncio.Task[None]) -> None:
                self._closing.pop(pool, None)
                self._retired.discard(pool)

            task.add_done_callback(closed)
        return task

    def _close_all(self, pools: Iterable[UpstreamPool]) -> None:
        for pool in pools:
            self._close(pool)

    async def watch_config(self) -> None:
        """Poll the config file and reload when its content changes.

        Works through bind mounts, where inotify does not.  A missing file (an
        editor replacing it) is waited out; neither a bad file nor any error
        in a reload stops the watcher.
        """
        while not self.draining:
            await asyncio.sleep(_WATCH_INTERVAL)
            try:
                await self._reload_if_changed()
            except Exception:
                log.exception("config_watch_error")

    async def _reload_if_changed(self) -> None:
        source = self.config.source
        signature = await asyncio.to_thread(file_signature, source)
        if signature is None or signature == self._attempted_signature:
            return
        await asyncio.sleep(_WATCH_SETTLE)
        if await asyncio.to_thread(file_signature, source) == signature:
            await self.reload_quietly("file_changed")

    # --------------------------------------------------------- shutdown

    def begin_drain(self) -> None:
        """Turn readiness off and refuse new requests, at once (safe in a signal handler)."""
        if self.draining:
            return
        self.draining = True
        self.ready = False
        self._drain_deadline = time.monotonic() + self.config.shutdown_timeout
        log.info("draining", shutdown_timeout=self.config.shutdown_timeout, in_flight=self._handling)

    async def shutdown(self) -> None:
        """Drain, then close everything; callers after the first wait for it to finish.

        Stop accepting; answer requests on kept-alive connections with 503
        ``draining`` and close them; let requests in progress finish until
        ``shutdown_timeout`` (counted from :meth:`begin_drain`), then abort
        the rest; close every pool, retired ones included.
        """
        self.begin_drain()
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        try:
            await self._drain_and_close()
        finally:
            self._stopped.set()

    async def _drain_and_close(self) -> None:
        runner = self._proxy_runner
        if runner is not None:
            for site in list(runner.sites):
                await site.stop()  # stop accepting; open connections stay
        # No reload commits from here on (reload() checks draining right
        # before it swaps), so the pools below are all there will be.
        drained = await _wait(self._quiet, self._drain_deadline - time.monotonic())
        if not drained:
            log.warning("drain_timeout", in_flight=self._handling, shutdown_timeout=self.config.shutdown_timeout)
            self._abort_connections()
            await _wait(self._quiet, _ABORT_GRACE)
        if runner is not None:
            await runner.cleanup()  # closes the idle kept-alive connections
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        pools = [*self.all_pools(), *self._retired]
        await asyncio.gather(*(self._close(pool) for pool in pools), return_exceptions=True)
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        log.info("stopped", drained=drained)

    def _abort_connections(self) -> None:
        """Past the deadline: abort every proxy connection; their handlers are cancelled."""
        server = self._proxy_runner.server if self._proxy_runner is not None else None
        if server is None:
            return
        for connection in server.connections:
            transport = connection.transport
            if transport is not None:
                transport.abort()

    # -------------------------------------------------------- per request

    def _finished(self, exchange: Exchange) -> None:
        duration = time.monotonic() - exchange.started
        self.metrics.observe(exchange, duration)
        if exchange.pool is not None:
            exchange.pool.outcomes[outcome(exchange)] += 1
        log_access(access_log, exchange, duration)

    async def _handle_proxy(self, request: web.BaseRequest) -> web.StreamResponse:
        """The proxy handler, counted: the drain is over when nothing is in progress."""
        self._handling += 1
        self._quiet.clear()
        try:
            return await self.forwarder(request)
        finally:
            self._handling -= 1
            if self._handling == 0:
                self._quiet.set()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _bind(address: HostPort, *, reuse_port: bool) -> socket.socket:
    """A listening socket; SO_REUSEPORT lets several workers share the port."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    infos = socket.getaddrinfo(address.host, address.port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    """Wait for ``event`` at most ``timeout`` seconds; True if it is set."""
    if event.is_set() or timeout <= 0:
        return event.is_set()
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True


def _parser_in_use() -> str:
    from aiohttp import http_parser

    return "c" if http_parser.HttpRequestParser is not http_parser.HttpRequestParserPy else "python"


def tune_gc() -> None:
    """Fewer, cheaper garbage collections for a long-running proxy.

    Objects alive after start-up (modules, config, pools) are frozen out of
    the collector's scans, so full collections only walk what requests
    allocate.  The young-generation threshold goes from 700 to 5,000
    allocations and the older ones from 10 to 20 collections: fewer passes,
    each small enough (at most ~100k young objects) not to show in p99.
    bench/run, 1 KiB at c=50/500/1000, CPU us per request: defaults
    499/601/715, frozen + defaults 468/610/600, frozen + (5000, 20, 20)
    468/530/568; (20000, 50, 100) was as cheap but its rare large
    collections doubled p99 at c=50 (52 ms against 30 ms).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(5_000, 20, 20)


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

    def on_hup() -> None:
        sidecar._spawn(sidecar.reload_quietly("sighup"))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    watcher: asyncio.Task[None] | None = None
    try:
        await sidecar.start()
        tune_gc()
        watcher = loop.create_task(sidecar.watch_config())
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await sidecar.shutdown()
    return 0
