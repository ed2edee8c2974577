"""The upstreams.yaml schema: what may be written where, as pydantic models.

These models describe the file as written, before inheritance: each layer
(``defaults`` and every upstream) is validated on its own, so a bad value is
reported at the YAML path where it was written even when every upstream
overrides it.  ``model_fields_set`` tells the loader which keys a layer wrote;
the defaults given here are the built-in ones, already in their parsed form.

Every model forbids unknown keys (the loader words the message with the
allowed keys, in the order declared here) and treats an empty section
(``limits:`` with nothing under it) as an empty mapping.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationInfo,
    model_validator,
)

from .fields import (
    Boolean,
    Duration,
    FailureOn,
    HeaderNames,
    HeaderValues,
    HostPortValue,
    HTTP2Value,
    NonNegativeInt,
    NonNegativeNumber,
    OptionalNonNegativeInt,
    OptionalPositiveInt,
    OptionalRate,
    OptionalSize,
    OptionalString,
    PathPrefix,
    PositiveInt,
    RetryOn,
    RouteHosts,
    Size,
    UpstreamName,
    UpstreamURLValue,
    expanded,
    optional,
)
from .model import HostPort, HTTP2Mode
from .scalars import OTHER_CALLER, caller_name, header_name, http2_mode, non_empty_string, parse_host_port, shown


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_empty_mapping(cls, data: Any) -> Any:
        return {} if data is None else data


class LimitsLayer(Section):
    max_connections: PositiveInt = 100
    max_keepalive_connections: OptionalNonNegativeInt = None  # null = max_connections
    keepalive_expiry: Duration = 5.0
    max_concurrent_requests: OptionalPositiveInt = None  # null = what the connections carry
    max_pending: NonNegativeInt = 1000
    adaptive: Boolean = False
    min_concurrent: PositiveInt = 1
    shared_max_concurrent_requests: OptionalPositiveInt = None  # across replicas (top-level shared:)


class TimeoutsLayer(Section):
    connect: Duration = 5.0
    read: Duration = 30.0
    write: Duration = 5.0
    pool: Duration = 1.0


class RateLimitLayer(Section):
    rate: OptionalRate = None  # null: no rate limit
    burst: OptionalPositiveInt = None  # null: the requests in one second of rate, at least 1
    shared: Boolean = False  # counted across replicas (top-level shared:)


def _rate_limit_off(value: Any) -> Any:
    """Under an upstream, ``rate_limit: null`` (or ``off``) turns off an inherited limit."""
    return {"rate": None} if value is None or value is False or value == "off" else value


class BackoffLayer(Section):
    base: Duration = 0.025
    max: Duration = 0.25


class BudgetLayer(Section):
    ratio: NonNegativeNumber = 0.2
    min_per_second: NonNegativeNumber = 10.0


class RetriesLayer(Section):
    attempts: NonNegativeInt = 1
    retry_on: RetryOn = ("connect_error",)
    backoff: BackoffLayer = BackoffLayer()
    budget: BudgetLayer = BudgetLayer()
    max_body: Size = 64 * 1024


class CircuitBreakerLayer(Section):
    failures: NonNegativeInt = 0
    failure_on: FailureOn = ("connect_error", "timeout", 502, 503, 504)
    open_for: Duration = 5.0
    max_open: Duration = 120.0


def _existing_file(value: object) -> str:
    path = non_empty_string(value)
    if not Path(path).is_file():
        raise ValueError(f"file not found: {path}")
    return path


def _ca_file(value: object) -> str:
    path = _existing_file(value)
    # Loaded now: a file that exists but holds no usable PEM would otherwise
    # pass `validate` and fail only when the pool opens (or reloads).
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"no usable PEM certificate: {exc}") from None
    return path


# The client certificate and key are loaded together once both are resolved
# (they may come from different layers): see loader._tls.
CAFile = Annotated[str | None, PlainValidator(expanded(optional(_ca_file)))]
KeyFile = Annotated[str | None, PlainValidator(expanded(optional(_existing_file)))]


class TLSLayer(Section):
    verify: Boolean = True
    ca_file: CAFile = None
    client_cert: KeyFile = None
    client_key: KeyFile = None


def _positive_duration(value: float) -> float:
    if value <= 0:
        raise ValueError("must be a positive duration")
    return value


class PacingLayer(Section):
    learn: Boolean = True
    max_pause: Annotated[Duration, AfterValidator(_positive_duration)] = 60.0
    partition_by: Annotated[str | None, PlainValidator(optional(header_name))] = None
    spread: Boolean = False
    shared: Boolean = False  # learned pauses published to every replica (top-level shared:)


def _redis_url(value: object) -> str:
    url = non_empty_string(value)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    from ..redis_wire import url_problem

    problem = url_problem(url)
    if problem is not None:
        raise ValueError(problem)
    return url


def _on_error(value: object) -> str:
    if value not in ("local", "deny"):
        raise ValueError(f"must be local or deny, got {shown(value)}")
    return str(value)


class SharedSection(Section):
    redis: Annotated[str, PlainValidator(expanded(_redis_url))]
    key_prefix: Annotated[str, PlainValidator(expanded(non_empty_string))] = "sidecar:"
    timeout: Annotated[Duration, AfterValidator(_positive_duration)] = 0.05
    on_error: Annotated[str, PlainValidator(expanded(_on_error))] = "local"
    lease: Annotated[Duration, AfterValidator(_positive_duration)] = 10.0
    cluster: Boolean = False  # a Redis Cluster (keys routed by hash slot)


def _caller_weights(value: object) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("must be a mapping of caller name to weight")
    weights: dict[str, float] = {}
    for name, weight in value.items():
        if not isinstance(name, str) or not caller_name(name) or name == OTHER_CALLER:
            raise ValueError(
                f"caller names must be visible ASCII, at most 64 characters, not 'other'; got {shown(name)}"
            )
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1_000_000:
            raise ValueError(f"the weight of {name!r} must be a positive number, got {shown(weight)}")
        weights[name] = float(weight)
    return weights


class CallersSection(Section):
    header: Annotated[str, PlainValidator(header_name)] = "X-Sidecar-Caller"
    weights: Annotated[dict[str, float], PlainValidator(_caller_weights)] = Field(default_factory=dict)


class DefaultsLayer(Section):
    # null under defaults has always meant "not set" (HTTP/1.1), unlike under an upstream.
    http2: Annotated[HTTP2Mode | None, PlainValidator(expanded(optional(http2_mode)))] = None
    limits: LimitsLayer = LimitsLayer()
    timeouts: TimeoutsLayer = TimeoutsLayer()
    tls: TLSLayer = TLSLayer()
    rate_limit: RateLimitLayer = RateLimitLayer()
    retries: RetriesLayer = RetriesLayer()
    circuit_breaker: CircuitBreakerLayer = CircuitBreakerLayer()
    pacing: PacingLayer = PacingLayer()


class RouteSection(Section):
    path_prefix: PathPrefix = ""  # not written: /<upstream name> (the loader knows the name)
    strip_prefix: Boolean = True
    hosts: RouteHosts = ()


class HeadersSection(Section):
    set: HeaderValues = {}
    remove: HeaderNames = ()


class UpstreamSection(Section):
    url: UpstreamURLValue
    route: RouteSection = RouteSection()
    headers: HeadersSection = HeadersSection()
    http2: HTTP2Value = HTTP2Mode.OFF
    limits: LimitsLayer = LimitsLayer()
    timeouts: TimeoutsLayer = TimeoutsLayer()
    tls: TLSLayer = TLSLayer()
    rate_limit: Annotated[RateLimitLayer, BeforeValidator(_rate_limit_off)] = RateLimitLayer()
    retries: RetriesLayer = RetriesLayer()
    circuit_breaker: CircuitBreakerLayer = CircuitBreakerLayer()
    pacing: PacingLayer = PacingLayer()


def _listen_or_off(value: object, info: ValidationInfo) -> HostPort | None:
    return None if value == "off" else expanded(parse_host_port)(value, info)


class AdminSection(Section):
    listen: Annotated[HostPort | None, PlainValidator(_listen_or_off)] = HostPort("127.0.0.1", 8089)
    token: OptionalString = None
    per_worker: Boolean = False


def _admin_forms(value: Any, info: ValidationInfo) -> Any:
    """``admin: off`` and ``admin: HOST:PORT`` are short for the mapping form."""
    if value == "off" or value is False:  # unquoted off is YAML's false
        return {"listen": "off"}
    if isinstance(value, str):
        return {"listen": expanded(parse_host_port)(value, info)}  # a bad address is reported at `admin`
    return value


class InboundSection(Section):
    max_request_body: OptionalSize = None
    header_timeout: Duration = 10.0
    body_idle_timeout: Duration = 30.0
    max_line_size: Size = 8190
    max_field_size: Size = 8190
    max_headers: PositiveInt = 128


def _at_least_one(upstreams: dict[str, UpstreamSection]) -> dict[str, UpstreamSection]:
    if not upstreams:
        raise ValueError("must define at least one upstream")
    return upstreams


def _string_keys(value: Any) -> Any:
    """Upstream names are keys: a non-string one is the mapping's problem, as in every section."""
    if value is None:
        return {}
    for key in value if isinstance(value, dict) else ():
        if not isinstance(key, str):
            raise ValueError(f"keys must be strings, got {shown(key)}")
    return value


class Document(Section):
    listen: HostPortValue = HostPort("127.0.0.1", 8088)
    admin: Annotated[AdminSection, BeforeValidator(_admin_forms)] = AdminSection()
    shutdown_timeout: Duration = 30.0
    workers: PositiveInt = 1
    inbound: InboundSection = InboundSection()
    shared: SharedSection | None = None
    defaults: DefaultsLayer = DefaultsLayer()
    callers: CallersSection = CallersSection()
    upstreams: Annotated[
        dict[UpstreamName, UpstreamSection],
        BeforeValidator(_string_keys),
        AfterValidator(_at_least_one),
    ] = Field(default_factory=dict, validate_default=True)  # validated: a file without upstreams is an error
