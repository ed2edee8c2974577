"""Config generations: the one in service, reloads that build and commit the next, the file watcher.

A :class:`~sidecar.forward.Generation` is one loaded config's router and
pools.  :class:`Generations` holds the current one and replaces it on reload
(SIGHUP, ``POST /reload``, or the watcher seeing the file change; see
docs/operations.md, "Reload and shutdown"):

* the new file is loaded and checked, and pools are opened for upstreams
  added or changed (:func:`~sidecar.reload.plan_reload` decides which) while
  the running generation serves on, untouched;
* the new generation is committed in one synchronous step, so every request
  after it uses the new routing and pools;
* pools of changed or removed upstreams are retired: they finish the requests
  they have in flight (up to ``shutdown_timeout``), then close.

A reload that fails for any reason leaves the running generation as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import Any

from .config import Config, ConfigError, load_config
from .exchange import Generation
from .logs import get_logger
from .metrics import Metrics
from .pools import UpstreamPool
from .redact import scrubber
from .reload import ReloadRefused, ReloadResult, file_signature, plan_reload
from .routing import Router

__all__ = ["Generations"]

log = get_logger("sidecar")

# The config file is polled: inotify does not see edits made through Docker
# bind mounts or on network filesystems.  A change is acted on once two reads
# _WATCH_SETTLE apart agree, so a half-written file is not loaded.
_WATCH_INTERVAL = 1.0
_WATCH_SETTLE = 0.2


class Generations:
    """The config in service, its routing and pools, and everything that replaces them."""

    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics,
        draining: Callable[[], bool],
        shape: Callable[[Config], Config] | None = None,
    ) -> None:
        self.config = config
        self._metrics = metrics
        self._draining = draining  # once true, no reload starts or commits
        # Applied to every config loaded on reload (a worker's share of the limits).
        self._shape = shape
        self._current: Generation | None = None
        self._retired: set[UpstreamPool] = set()
        self._closing: dict[UpstreamPool, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._reload_lock = asyncio.Lock()
        # The content last loaded (or tried): the watcher acts when the file differs.
        self._attempted_signature = file_signature(config.source)
        scrubber.update(config.secrets)

    # ------------------------------------------------------------ state

    def current(self) -> Generation:
        assert self._current is not None, "Sidecar.start() not called"
        return self._current

    def pools(self) -> Iterator[UpstreamPool]:
        """The pools in service."""
        if self._current is not None:
            yield from self._current.pools.values()

    def retired(self) -> frozenset[UpstreamPool]:
        """Pools replaced by a reload, still finishing their requests."""
        return frozenset(self._retired)

    def observed(self) -> Iterator[UpstreamPool]:
        """Current pools first, then retiring ones still draining: both hold slots and connections."""
        yield from self.pools()
        yield from tuple(self._retired)

    # ------------------------------------------------------- first and last

    def open(self) -> None:
        """Put the config given at start-up in service (a ConfigError if a pool cannot be opened)."""
        config = self.config
        for warning in config.warnings:
            log.warning("config_warning", message=warning)
        self._current = Generation(
            router=Router(config.upstreams),
            pools=self._open_pools(config, [u.name for u in config.upstreams]),
            inbound=config.inbound,
        )

    async def close(self) -> None:
        """Stop background reloads and drains, and close every pool, retired ones included.

        Only once draining: no reload commits then (reload() checks right
        before it swaps), so the pools closed here are all there will be.
        """
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        pools = [*self.pools(), *self._retired]
        await asyncio.gather(*(self._close(pool) for pool in pools), return_exceptions=True)

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
                self._metrics.reloads.labels("failure").inc()
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
                self._metrics.reloads.labels("failure").inc()
                log.exception("config_reload_failed", reason=reason, error="unexpected error")
                raise
            if self._draining():  # the drain began while the file was loading
                self._close_all(generation.pools[name] for name in plan.opened)
                self._refuse_reload()
            self._commit(new, plan, generation)
        self._metrics.reloads.labels("success").inc()
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

    def reload_soon(self, reason: str) -> None:
        """A quiet reload in the background (safe in a signal handler)."""
        self._spawn(self.reload_quietly(reason))

    def _refuse_reload(self) -> None:
        if self._draining():
            log.info("config_reload_refused", reason="draining")
            raise ReloadRefused("the sidecar is shutting down")
        if self._current is None:
            raise ReloadRefused("the sidecar has not started")

    def _prepare(self, new: Config) -> tuple[ReloadResult, Generation]:
        """The next generation, with new pools opened for added and changed upstreams."""
        plan = plan_reload(self.config, new)
        opened = self._open_pools(new, plan.opened)
        try:
            current = self.current().pools
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
                opened[name] = UpstreamPool(upstream, config.shared)
            except Exception as exc:
                self._close_all(opened.values())
                where = f"upstreams.{name}.tls" if isinstance(exc, OSError) else f"upstreams.{name}"
                raise ConfigError(config.source, where, f"cannot open the pool: {exc}") from exc
        return opened

    def _commit(self, new: Config, plan: ReloadResult, generation: Generation) -> None:
        """Swap in one synchronous step: new requests use the new pools at once."""
        old_pools = self.current().pools
        self._current = generation
        # Old secrets stay scrubbed too: retired pools may still log.
        scrubber.update(new.secrets | self.config.secrets)
        self.config = new
        for name in plan.replaced:
            self._retire(old_pools[name])

    # --------------------------------------------------------- retiring

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

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---------------------------------------------------------- watcher

    async def watch(self) -> None:
        """Poll the config file and reload when its content changes.

        Works through bind mounts, where inotify does not.  A missing file (an
        editor replacing it) is waited out; neither a bad file nor any error
        in a reload stops the watcher.
        """
        while not self._draining():
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
