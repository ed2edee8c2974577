"""The admin listener: status page, health, readiness, metrics, pool snapshots, config, reload.

The endpoints see the running sidecar only through :class:`AdminTarget`, the
few things they read or ask for; :class:`sidecar.server.Sidecar` is one.  This
module never imports the server, so the server can import it.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from .config import ConfigError, public_view
from .metrics import CONTENT_TYPE
from .policy.pacing import pacing_stage
from .policy.rate_limit import rate_limit_of
from .policy.shared import shared_snapshot
from .redact import REDACTED, contains_secret, scrubber
from .reload import ReloadRefused, ReloadResult
from .statuspage import status_page, upstream_stats

if TYPE_CHECKING:
    from .config import Config, HostPort
    from .metrics import Metrics
    from .pools import UpstreamPool


class AdminTarget(Protocol):
    """What the admin endpoints need from the running sidecar."""

    @property
    def config(self) -> Config: ...  # /config, the token, the secrets to redact
    @property
    def metrics(self) -> Metrics: ...  # /metrics, /stats
    @property
    def ready(self) -> bool: ...  # /readyz
    @property
    def draining(self) -> bool: ...  # /readyz, /pools
    @property
    def worker(self) -> int: ...  # /pools: which of `workers: N` answers
    # /config "bound": the addresses actually listened on.
    @property
    def listen(self) -> HostPort: ...
    @property
    def proxy_port(self) -> int: ...
    @property
    def admin_listen(self) -> HostPort | None: ...
    @property
    def admin_port(self) -> int | None: ...
    def all_pools(self) -> Iterable[UpstreamPool]: ...  # /pools
    def retired_pools(self) -> Collection[UpstreamPool]: ...  # /pools "retiring"
    async def reload(self, reason: str) -> ReloadResult: ...  # POST /reload


SIDECAR: web.AppKey[AdminTarget] = web.AppKey("sidecar")
# The status page holds no data (it asks for the token and fetches the rest), so it is open too.
_OPEN_PATHS = frozenset({"/", "/healthz", "/readyz"})
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_admin_app(sidecar: AdminTarget) -> web.Application:
    status_page()  # read and hashed now: a broken page fails start-up, not the first visit
    app = web.Application(middlewares=[_require_token])
    app[SIDECAR] = sidecar
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/pools", pools)
    app.router.add_get("/stats", stats)
    app.router.add_get("/config", config)
    app.router.add_post("/reload", reload)
    return app


@web.middleware
async def _require_token(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Bearer token on everything but the probes, when admin.token is set."""
    token = request.app[SIDECAR].config.admin.token
    if token is not None and request.path not in _OPEN_PATHS:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return _json({"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": "Bearer"})
    return await handler(request)


def _json(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=json.dumps(body, indent=2) + "\n", status=status, content_type="application/json", headers=headers
    )


async def index(request: web.Request) -> web.Response:
    page = status_page()
    return web.Response(body=page.body, headers=page.headers)


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR]
    if sidecar.ready and not sidecar.draining:
        return _json({"status": "ready"})
    return _json({"status": "draining" if sidecar.draining else "starting"}, status=503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[SIDECAR].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def pool_snapshot(pool: UpstreamPool, secrets: frozenset[str] = frozenset()) -> dict[str, Any]:
    """One upstream's pool as JSON: limits, live occupancy, connections, totals.

    Connection counts come from the pool itself, not from request counters.
    A url that carries a ${VAR} value is redacted, as in /config.
    """
    upstream, admission, stats = pool.upstream, pool.admission, pool.stats()
    limits = upstream.limits
    url = REDACTED if contains_secret(upstream.url, secrets) else upstream.url
    return {
        "url": url,
        "http2": upstream.http2.yaml_value,
        "limits": {
            "max_connections": limits.max_connections,
            "max_keepalive_connections": limits.max_keepalive_connections,
            "keepalive_expiry_s": limits.keepalive_expiry,
            "max_concurrent_requests": admission.capacity,
            "max_pending": admission.max_pending,
            "pool_timeout_s": admission.pool_timeout,
        },
        "in_flight": admission.in_flight,
        "pending": admission.pending,
        "oldest_wait_s": round(admission.oldest_wait(), 6),
        "connections": {
            "open": stats.connections,
            "active": stats.active,
            "idle": stats.idle,
            "connecting": stats.connecting,
            "opened_total": stats.opened_total,
            "closed_total": stats.closed_total,
        },
        "http_versions": stats.http_versions,
        "rate_limit": None if (limiter := rate_limit_of(pool.stages)) is None else limiter.snapshot(),
        "circuit": pool.circuit.snapshot(),
        "retries": pool.retries.snapshot(),
        "pacing": _pacing_snapshot(pool),
        # The in-flight limit now: limits.adaptive moves it, HTTP/2 SETTINGS may cap it.
        "concurrency_limit": admission.capacity,
        "adaptive": None
        if pool.concurrency is None
        else {"limit": round(pool.concurrency.limit, 2), "min_rtt_ms": _ms(pool.concurrency.min_rtt)},
        "callers": {
            name: {"in_flight": in_flight, "pending": pending}
            for name, (in_flight, pending) in sorted(admission.per_caller().items())
        },
        "shared": shared_snapshot(pool),
        "totals": {"requests": sum(pool.outcomes.values()), "by_outcome": dict(sorted(pool.outcomes.items()))},
    }


def _ms(seconds: float) -> float | None:
    return None if seconds == float("inf") else round(seconds * 1000, 3)


def _pacing_snapshot(pool: UpstreamPool) -> dict[str, object] | None:
    stage = pacing_stage(pool.stages.stages)
    return None if stage is None else stage.snapshot()


async def pools(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR]
    secrets = sidecar.config.secrets
    body: dict[str, Any] = {
        "time": time.time(),
        "draining": sidecar.draining,
        # With `workers: N` each worker answers for itself and its share of the limits.
        "worker": {"index": sidecar.worker, "of": sidecar.config.workers},
        "upstreams": {pool.name: pool_snapshot(pool, secrets) for pool in sidecar.all_pools()},
    }
    retired = sidecar.retired_pools()
    if retired:
        body["retiring"] = [dict(pool_snapshot(pool, secrets), name=pool.name) for pool in retired]
    return _json(body)


async def stats(request: web.Request) -> web.Response:
    """Cumulative per-upstream counters and histogram buckets; the status page differences them."""
    return _json(
        {
            "time": time.time(),
            # For differencing: wall-clock time can step, this cannot.
            "monotonic": time.monotonic(),
            "upstreams": upstream_stats(request.app[SIDECAR].metrics),
        }
    )


async def config(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR]
    view = public_view(sidecar.config)
    # --listen/--admin on the command line override the file; show what is bound.
    view["bound"] = {
        "listen": f"{sidecar.listen.host}:{sidecar.proxy_port}",
        "admin": None if sidecar.admin_listen is None else f"{sidecar.admin_listen.host}:{sidecar.admin_port}",
    }
    return _json(view)


async def reload(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR]
    try:
        result = await sidecar.reload("admin")
    except ConfigError as error:
        return _json({"result": "failure", "error": scrubber.redact(str(error))}, status=400)
    except ReloadRefused as refused:
        return _json({"result": "refused", "error": str(refused)}, status=503)
    return _json({"result": "success", **result.summary()})
