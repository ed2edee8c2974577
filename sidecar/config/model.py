"""The typed, immutable configuration the rest of the sidecar reads.

These frozen dataclasses are the only form configuration takes past the
loader: no dict of settings travels further.  They stay plain dataclasses
(not pydantic models) because they are built once per load and then only
read, copied with ``dataclasses.replace`` (sidecar/workers.py splits limits per
worker) and walked field by field for the public view; the schema that checks
what a user wrote lives in ``schema.py``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

DEFAULT_CONFIG_PATH = "config/upstreams.yaml"
UPSTREAM_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
# HTTP/2 carries at most this many concurrent streams per connection through
# httpcore (it caps the server's SETTINGS_MAX_CONCURRENT_STREAMS at 100).
H2_STREAMS_PER_CONNECTION = 100


class ConfigError(Exception):
    """A configuration problem, located by file and YAML path."""

    def __init__(self, source: str, path: str, problem: str) -> None:
        self.source = source
        self.path = path
        self.problem = problem
        where = f"{source}: {path}: " if path else f"{source}: "
        super().__init__(where + problem)


class HTTP2Mode(enum.Enum):
    """How the sidecar speaks to an upstream."""

    OFF = "false"
    ALPN = "true"  # HTTP/2 if TLS ALPN agrees, else HTTP/1.1
    PRIOR_KNOWLEDGE = "prior-knowledge"  # h2c, no negotiation

    @property
    def yaml_value(self) -> bool | str:
        """The value as written in upstreams.yaml."""
        return {"false": False, "true": True}.get(self.value, self.value)


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int
    max_keepalive_connections: int  # resolved: never None after loading
    keepalive_expiry: float
    max_concurrent_requests: int  # resolved from the HTTP version when unset
    max_pending: int
    adaptive: bool = False  # the in-flight limit follows the upstream's latency (docs/callers-and-adaptive-limits.md)
    min_concurrent: int = 1  # the adaptive limit's floor
    # Across every replica sharing the top-level `shared.redis`; None: not shared.
    shared_max_concurrent_requests: int | None = None


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float
    read: float
    write: float
    pool: float


@dataclass(frozen=True, slots=True)
class RateLimit:
    rate: float  # requests per second
    burst: int  # tokens that may be saved up (at least 1)
    shared: bool = False  # counted across replicas in Redis (docs/shared-limits.md)
    # A shared limit in a worker of `workers: N`: the worker's part of it
    # (rate, burst), counted locally when Redis is unreachable; rate and burst
    # stay the whole, counted in Redis by every worker together.
    local: tuple[float, int] | None = None


@dataclass(frozen=True, slots=True)
class Backoff:
    base: float
    max: float


@dataclass(frozen=True, slots=True)
class RetryBudget:
    ratio: float  # retries per original request over the window
    min_per_second: float  # retries always allowed, per second of the window


@dataclass(frozen=True, slots=True)
class Retries:
    attempts: int  # extra attempts after the first; 0 = never retry
    retry_on: tuple[str | int, ...]  # "connect_error", "reset", "timeout" and statuses
    backoff: Backoff
    budget: RetryBudget
    max_body: int  # request bodies larger than this are never retried


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    failures: int  # consecutive failed attempts that open it; 0 = off
    failure_on: tuple[str | int, ...]
    open_for: float
    max_open: float


DEFAULT_RETRIES = Retries(
    attempts=1,
    retry_on=("connect_error",),
    backoff=Backoff(base=0.025, max=0.25),
    budget=RetryBudget(ratio=0.2, min_per_second=10.0),
    max_body=64 * 1024,
)
DEFAULT_CIRCUIT_BREAKER = CircuitBreaker(
    failures=0, failure_on=("connect_error", "timeout", 502, 503, 504), open_for=5.0, max_open=120.0
)


@dataclass(frozen=True, slots=True)
class Pacing:
    """Upstream pacing: honour the limits the upstream announces (docs/pacing.md)."""

    learn: bool = True
    max_pause: float = 60.0
    partition_by: str | None = None  # a caller header: one learned state per value
    spread: bool = False
    shared: bool = False  # a learned pause or budget is published to every replica


@dataclass(frozen=True, slots=True)
class Shared:
    """The top-level `shared:` section: the Redis every replica counts in (docs/shared-limits.md)."""

    redis: str  # redis:// or rediss:// URL; its password is a secret
    key_prefix: str = "sidecar:"
    timeout: float = 0.05  # every Redis call
    on_error: str = "local"  # "local" (fall back to local limits) or "deny" (503)
    lease: float = 10.0  # a concurrency lease not renewed within this is freed
    cluster: bool = False  # a Redis Cluster: each upstream's keys go to the primary serving their hash slot


@dataclass(frozen=True, slots=True)
class Callers:
    """Who is calling: the header that names a caller and the callers' weights."""

    header: str = "X-Sidecar-Caller"
    weights: tuple[tuple[str, float], ...] = ()  # configured callers; everyone else is `other`, weight 1


@dataclass(frozen=True, slots=True)
class TLSSettings:
    verify: bool
    ca_file: str | None
    client_cert: str | None
    client_key: str | None


@dataclass(frozen=True, slots=True)
class Route:
    path_prefix: str
    strip_prefix: bool
    hosts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class HeaderRules:
    set: tuple[tuple[str, str], ...]
    remove: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class UpstreamURL:
    """An upstream ``url`` split into the parts the pool needs."""

    url: str
    scheme: str  # "http" | "https"
    host: str
    port: int
    base_path: str  # "" or "/api" (never a trailing slash)


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    url: str
    scheme: str  # "http" | "https"
    host: str
    port: int
    base_path: str  # "" or "/api" (never a trailing slash)
    route: Route
    http2: HTTP2Mode
    limits: Limits
    timeouts: Timeouts
    tls: TLSSettings
    headers: HeaderRules
    rate_limit: RateLimit | None = None  # None: no local rate limit
    retries: Retries = DEFAULT_RETRIES
    circuit_breaker: CircuitBreaker = DEFAULT_CIRCUIT_BREAKER
    pacing: Pacing = Pacing()
    callers: Callers = Callers()  # the top-level `callers` section, the same for every upstream

    @property
    def host_header(self) -> str:
        """The Host header value the upstream expects."""
        default_port = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default_port else f"{host}:{self.port}"

    @property
    def speaks_http2(self) -> bool:
        """True when HTTP/2 may be used at all (h2c, or ALPN over TLS)."""
        if self.http2 is HTTP2Mode.PRIOR_KNOWLEDGE:
            return True
        return self.http2 is HTTP2Mode.ALPN and self.scheme == "https"


@dataclass(frozen=True, slots=True)
class Inbound:
    max_request_body: int | None
    header_timeout: float
    body_idle_timeout: float
    max_line_size: int
    max_field_size: int
    max_headers: int


@dataclass(frozen=True, slots=True)
class AdminSettings:
    listen: HostPort | None  # None: admin listener off
    token: str | None
    # `workers: N`: False serves one host-wide admin endpoint from the
    # supervisor; True gives every worker its own listener (port + index).
    per_worker: bool = False


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    listen: HostPort
    admin: AdminSettings
    shutdown_timeout: float
    workers: int
    inbound: Inbound
    upstreams: tuple[Upstream, ...]
    shared: Shared | None = None  # None: no shared limits
    # Values that came from ${VAR}; never printed, logged or served.
    secrets: frozenset[str] = field(default=frozenset(), compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def upstream(self, name: str) -> Upstream | None:
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        return None


def check_divisible(config: Config, workers: int) -> None:
    """Refuse limits that cannot give every worker at least one slot (ConfigError names the path).

    The one bound on ``workers``: both ``validate`` (for the file's own
    ``workers``) and ``run --workers N`` apply it.  With ``admin.per_worker``,
    worker admin ports past 65535 are refused too.
    """
    if workers <= 1:
        return
    for upstream in config.upstreams:
        limits = upstream.limits
        for name in ("max_connections", "max_concurrent_requests"):
            value = getattr(limits, name)
            if value < workers:
                raise ConfigError(
                    config.source,
                    f"upstreams.{upstream.name}.limits.{name}",
                    f"must be at least workers ({workers}) so that every worker gets one, got {value}",
                )
    # With admin.per_worker, worker i serves its admin listener on the configured port plus i.
    admin = config.admin.listen
    if config.admin.per_worker and admin is not None and admin.port != 0 and admin.port + workers - 1 > 65535:
        raise ConfigError(
            config.source,
            "workers",
            f"{workers} workers would put admin listeners past port 65535 "
            f"(worker i listens on {admin.port} + i); use fewer workers or admin port 0",
        )
