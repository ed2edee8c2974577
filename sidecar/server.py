"""Composition root: listeners, pools, reload and graceful drain. SPEC §9.

:class:`Sidecar` owns everything that lives as long as the process: the
proxy and admin listeners, the current :class:`Generation` (router + pools),
the metrics and the reload/drain machinery.  ``serve()`` runs it until a
signal arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from . import __version__
from .config import Config, ConfigError, HostPort, admin_exposure_warning, load_config
from .forward import Exchange, Forwarder, Generation
from .inbound import GuardedServer
from .logs import get_logger, log_access, scrubber
from .metrics import Metrics, outcome
from .pools import UpstreamPool
from .routing import Router

log = get_logger("sidecar")
access_log = get_logger("sidecar.access")

# aiohttp keeps idle client connections open this long (nginx's default).
_CLIENT_KEEPALIVE = 75.0
_WATCH_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class ReloadResult:
    added: tuple[str, ...]
    changed: tuple[str, ...]
    removed: tuple[str, ...]
    unchanged: tuple[str, ...]
    restart_needed: tuple[str, ...]

    def summary(self) -> dict[str, list[str]]:
        return {
            "added": list(self.added),
            "changed": list(self.changed),
            "removed": list(self.removed),
            "unchanged": list(self.unchanged),
            "restart_needed": list(self.restart_needed),
        }


class Sidecar:
    """The running sidecar: proxy listener, admin listener, pools, reload, drain."""

    def __init__(
        self,
        config: Config,
        *,
        listen: HostPort | None = None,
        admin: HostPort | str | None = "config",
    ) -> None:
        self.config = config
        self.listen = listen or config.listen
        self.admin_listen: HostPort | None = config.admin.listen if isinstance(admin, str) else admin
        self.metrics = Metrics(self._observed_pools)
        self.draining = False
        self.ready = False
        self._generation: Generation | None = None
        self._retired: set[UpstreamPool] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._reload_lock = asyncio.Lock()
        self._file_signature = _signature(config.source)
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
            pools={u.name: UpstreamPool(u) for u in config.upstreams},
            inbound=config.inbound,
        )
        inbound = config.inbound
        proxy_server = GuardedServer(
            self.forwarder,
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
        self._proxy_runner = web.ServerRunner(proxy_server, shutdown_timeout=config.shutdown_timeout)
        await self._proxy_runner.setup()
        reuse_port = config.workers > 1
        proxy_socket = _bind(self.listen, reuse_port=reuse_port)
        await web.SockSite(self._proxy_runner, proxy_socket).start()
        self.proxy_port = proxy_socket.getsockname()[1]

        if self.admin_listen is not None:
            from .admin import create_admin_app

            self._admin_runner = web.AppRunner(create_admin_app(self), access_log=None)
            await self._admin_runner.setup()
            admin_socket = _bind(self.admin_listen, reuse_port=reuse_port)
            await web.SockSite(self._admin_runner, admin_socket).start()
            self.admin_port = admin_socket.getsockname()[1]
            if self.admin_listen != config.admin.listen:
                # --admin overrode the config file: judge the address actually bound.
                exposed = admin_exposure_warning(self.admin_listen, config.admin.token)
                if exposed is not None:
                    log.warning("config_warning", message=exposed)
        self.ready = True
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
        """Load the config file again and swap it in; raises ConfigError (old config stays)."""
        async with self._reload_lock:
            try:
                new = await asyncio.get_running_loop().run_in_executor(None, load_config, self.config.source)
            except ConfigError as error:
                self.metrics.reloads.labels("failure").inc()
                log.error("config_reload_failed", reason=reason, error=str(error))
                raise
            result = self._swap(new)
            self._file_signature = _signature(new.source)
            self.metrics.reloads.labels("success").inc()
            for warning in new.warnings:
                log.warning("config_warning", message=warning)
            for what in result.restart_needed:
                log.warning("config_restart_needed", setting=what, message=f"{what} changes take effect on restart")
            log.info("config_reloaded", reason=reason, **result.summary())
            return result

    def _swap(self, new: Config) -> ReloadResult:
        old_generation = self.generation()
        old_pools = old_generation.pools
        pools: dict[str, UpstreamPool] = {}
        added: list[str] = []
        changed: list[str] = []
        unchanged: list[str] = []
        for upstream in new.upstreams:
            current = old_pools.get(upstream.name)
            if current is not None and current.upstream == upstream:
                pools[upstream.name] = current
                unchanged.append(upstream.name)
            else:
                pools[upstream.name] = UpstreamPool(upstream)
                (changed if current is not None else added).append(upstream.name)
        removed = [name for name in old_pools if name not in pools]
        restart = [
            name
            for name, before, after in (
                ("listen", self.config.listen, new.listen),
                ("admin", self.config.admin.listen, new.admin.listen),
                ("workers", self.config.workers, new.workers),
                ("inbound.max_line_size", self.config.inbound.max_line_size, new.inbound.max_line_size),
                ("inbound.max_field_size", self.config.inbound.max_field_size, new.inbound.max_field_size),
                ("inbound.max_headers", self.config.inbound.max_headers, new.inbound.max_headers),
            )
            if before != after
        ]
        # Swap first, so new requests go to new pools at once; then retire.
        self._generation = Generation(router=Router(new.upstreams), pools=pools, inbound=new.inbound)
        # Old secrets stay scrubbed too: retired pools may still log.
        scrubber.update(new.secrets | self.config.secrets)
        self.config = new
        for name in (*changed, *removed):
            self._retire(old_pools[name])
        return ReloadResult(tuple(added), tuple(changed), tuple(removed), tuple(unchanged), tuple(restart))

    def _retire(self, pool: UpstreamPool) -> None:
        """Let a replaced pool finish its in-flight requests, then close it."""
        self._retired.add(pool)

        async def drain_then_close() -> None:
            drained = await pool.drain(self.config.shutdown_timeout)
            if not drained:
                log.warning("pool_drain_timeout", upstream=pool.name, active=pool.active)
            await pool.aclose()
            self._retired.discard(pool)
            log.info("pool_closed", upstream=pool.name, drained=drained)

        self._spawn(drain_then_close())

    async def watch_config(self) -> None:
        """Poll the config file; works through bind mounts where inotify does not."""
        while True:
            await asyncio.sleep(_WATCH_INTERVAL)
            signature = _signature(self.config.source)
            if signature is None or signature == self._file_signature:
                continue
            self._file_signature = signature
            with contextlib.suppress(ConfigError):
                await self.reload("file_changed")

    # --------------------------------------------------------- shutdown

    async def shutdown(self) -> None:
        """Drain: refuse new work, finish in-flight within shutdown_timeout, close."""
        if self.draining:
            return
        self.draining = True
        self.ready = False
        timeout = self.config.shutdown_timeout
        log.info("draining", shutdown_timeout=timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._proxy_runner is not None:
            for site in list(self._proxy_runner.sites):
                await site.stop()  # stop accepting; open connections stay
        pools = [*self.all_pools(), *self._retired]
        await asyncio.gather(*(pool.drain(max(0.0, deadline - loop.time())) for pool in pools))
        if self._proxy_runner is not None:
            # Whatever is still running past the deadline is cancelled (aborted).
            self._proxy_runner._shutdown_timeout = max(0.01, min(0.5, deadline - loop.time()))
            await self._proxy_runner.cleanup()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.gather(*(pool.aclose() for pool in pools), return_exceptions=True)
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        log.info("stopped")

    # -------------------------------------------------------- per request

    def _finished(self, exchange: Exchange) -> None:
        duration = time.monotonic() - exchange.started
        self.metrics.observe(exchange, duration)
        if exchange.pool is not None:
            exchange.pool.outcomes[outcome(exchange)] += 1
        log_access(access_log, exchange, duration)

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
        sock.listen(4096)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _signature(path: str) -> str | None:
    """Content hash of the config file (mtime alone misses same-second edits)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _parser_in_use() -> str:
    from aiohttp import http_parser

    return "c" if http_parser.HttpRequestParser is not http_parser.HttpRequestParserPy else "python"


async def serve(sidecar: Sidecar) -> int:
    """Run until SIGTERM/SIGINT; a second signal exits at once."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals_seen = 0

    def on_stop_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("forced_exit", signal=signal.Signals(signum).name)
            os._exit(1)
        log.info("signal", signal=signal.Signals(signum).name)
        stop.set()

    def on_hup() -> None:
        sidecar._spawn(_reload_quietly(sidecar, "sighup"))

    await sidecar.start()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    watcher = loop.create_task(sidecar.watch_config())
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await sidecar.shutdown()
    return 0


async def _reload_quietly(sidecar: Sidecar, reason: str) -> None:
    with contextlib.suppress(ConfigError):
        await sidecar.reload(reason)
