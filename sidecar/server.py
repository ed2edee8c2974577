"""The running sidecar: its proxy and admin listeners, and the graceful drain.

:class:`Sidecar` owns what lives as long as the process: the two listeners,
the metrics, the config generations (:mod:`sidecar.generations`: routing,
pools, reload) and the count of proxy requests in progress, which tells the
drain when it is over (docs/operations.md, "Graceful shutdown").  Process
set-up (signals, event loop, garbage collector) is :mod:`sidecar.runtime`.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator

from aiohttp import web

from . import __version__, compat
from .admin import create_admin_app
from .compat.aiohttp import parser_in_use
from .config import Config, HostPort, admin_exposure_warning
from .exchange import Generation
from .forward import Forwarder
from .generations import Generations
from .inbound import GuardedServer
from .logs import get_logger
from .metrics import Metrics
from .observe import Observer
from .pools import UpstreamPool
from .reload import ReloadResult

__all__ = ["LISTEN_BACKLOG", "Sidecar", "bind_listener"]

log = get_logger("sidecar")

# aiohttp keeps idle client connections open this long (nginx's default).
_CLIENT_KEEPALIVE = 75.0
# Past the drain deadline, aborted handlers get this long to run their cleanup
# (give back slots, close upstream responses); also aiohttp's own per-connection
# shutdown budget, which only ever sees connections that are already done.
_ABORT_GRACE = 1.0
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
        admin_socket: str | None = None,
    ) -> None:
        self.worker = worker  # index among `workers` processes (0 when there is one)
        # `workers: N`: the admin app on a private Unix socket, for the supervisor's host-wide endpoint.
        self.admin_socket = admin_socket
        self.listen = listen or config.listen
        self.admin_listen: HostPort | None = config.admin.listen if isinstance(admin, str) else admin
        self.metrics = Metrics(lambda: self.generations.observed())
        self.draining = False
        self.ready = False
        self.generations = Generations(config, metrics=self.metrics, draining=lambda: self.draining, shape=shape)
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
        self.forwarder = Forwarder(self.generations.current, Observer(self.metrics), lambda: self.draining)

    # ------------------------------------------------------------ state

    @property
    def config(self) -> Config:
        """The config in service (the last one reloaded)."""
        return self.generations.config

    def generation(self) -> Generation:
        return self.generations.current()

    def all_pools(self) -> Iterator[UpstreamPool]:
        return self.generations.pools()

    def retired_pools(self) -> frozenset[UpstreamPool]:
        return self.generations.retired()

    async def reload(self, reason: str) -> ReloadResult:
        """See :meth:`Generations.reload`: a ConfigError or ReloadRefused leaves all as it was."""
        return await self.generations.reload(reason)

    def reload_soon(self, reason: str) -> None:
        """A reload in the background whose failure is only logged (SIGHUP)."""
        self.generations.reload_soon(reason)

    async def watch_config(self) -> None:
        """Reload whenever the config file's content changes, until the drain."""
        await self.generations.watch()

    # ------------------------------------------------------------ start

    async def start(self) -> None:
        """Open pools and listeners inside the running loop."""
        compat.start_up()  # once per process: library self-checks, fast httpcore locks
        keep_freed_heap()
        self.generations.open()
        config = self.config
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
        proxy_socket = bind_listener(self.listen, reuse_port=reuse_port)
        # SockSite calls listen() again with its own backlog (128 by default).
        await web.SockSite(self._proxy_runner, proxy_socket, backlog=LISTEN_BACKLOG).start()
        self.proxy_port = proxy_socket.getsockname()[1]

        if self.admin_listen is not None or self.admin_socket is not None:
            self._admin_runner = web.AppRunner(create_admin_app(self), access_log=None, shutdown_timeout=_ABORT_GRACE)
            await self._admin_runner.setup()
        if self.admin_socket is not None and self._admin_runner is not None:
            await web.UnixSite(self._admin_runner, self.admin_socket, backlog=LISTEN_BACKLOG).start()
        if self.admin_listen is not None and self._admin_runner is not None:
            admin_tcp = bind_listener(self.admin_listen, reuse_port=reuse_port)
            await web.SockSite(self._admin_runner, admin_tcp, backlog=LISTEN_BACKLOG).start()
            self.admin_port = admin_tcp.getsockname()[1]
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
            http_parser=parser_in_use(),
            pid=os.getpid(),
            **({} if self.admin_socket is None else {"admin_socket": self.admin_socket}),
        )

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
        drained = await _wait(self._quiet, self._drain_deadline - time.monotonic())
        if not drained:
            log.warning("drain_timeout", in_flight=self._handling, shutdown_timeout=self.config.shutdown_timeout)
            self._abort_connections()
            await _wait(self._quiet, _ABORT_GRACE)
        if runner is not None:
            await runner.cleanup()  # closes the idle kept-alive connections
        await self.generations.close()
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

    async def _handle_proxy(self, request: web.BaseRequest) -> web.StreamResponse:
        """The proxy handler, counted: the drain is over when nothing is in progress."""
        self._handling += 1
        self._quiet.clear()
        try:
            response = await self.forwarder(request)
        finally:
            self._handling -= 1
            if self._handling == 0:
                self._quiet.set()
        if response.prepared:
            # Its head is on the wire.  aiohttp keeps a connection's last
            # response until the next request arrives, so every idle
            # keep-alive caller would hold its headers (about 2 KiB).
            response.headers.clear()
        return response


# glibc's mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_TRIM_THRESHOLD = 8 * 1024 * 1024
_MMAP_THRESHOLD = 1024 * 1024


def keep_freed_heap() -> None:
    """Keep up to 8 MiB of freed memory at the top of glibc's heap instead of
    giving it back to the system at once.

    A relayed body of 64 KiB or more is a buffer freed as soon as it is
    written: with glibc's default (128 KiB) the heap was shrunk and grown
    again every few requests, and every page of it faulted in anew, a few
    percent of the CPU of a 64 KiB GET. Buffers up to 1 MiB stay on the heap
    (setting one threshold fixes the other, which glibc otherwise adapts).
    Nothing happens on another C library.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return  # not glibc (musl has no mallopt)
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)


def bind_listener(address: HostPort, *, reuse_port: bool = False) -> socket.socket:
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
