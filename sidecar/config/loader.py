"""upstreams.yaml → Config: read, expand ${VAR}, validate each layer, inherit, check.

The steps, in order:

1. YAML → plain data (``yamlfile.py``): duplicate keys and runaway nesting
   are refused with a location, never a traceback.
2. Validation of the document, layer by layer, by the schema (``schema.py``):
   every value is checked where it is written, ``defaults`` included, after
   ``${VAR}`` / ``${VAR:-default}`` expansion (each expanded value is recorded
   as a secret, so that nothing prints it).  ``_config_error`` is the one
   place a pydantic ``ValidationError`` becomes a
   ``ConfigError(source, path, problem)``.
3. Inheritance, field by field (upstream, then ``defaults``, then built-in),
   and the checks that need resolved values (keepalive against
   max_connections, HTTP/2 concurrency, client certificate pairs, unique
   routes, workers against the limits), each naming the path the deciding value came from.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import BaseModel, ValidationError

from ..redact import redact
from .fields import Expansion
from .model import (
    H2_STREAMS_PER_CONNECTION,
    AdminSettings,
    Backoff,
    Callers,
    CircuitBreaker,
    Config,
    ConfigError,
    HeaderRules,
    HTTP2Mode,
    Inbound,
    Limits,
    Pacing,
    RateLimit,
    Retries,
    RetryBudget,
    Route,
    Shared,
    Timeouts,
    TLSSettings,
    Upstream,
    check_divisible,
)
from .schema import DefaultsLayer, Document, UpstreamSection
from .translate import config_error
from .view import admin_exposure_warning
from .yamlfile import read_yaml


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file. Raises ConfigError, never anything else."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, "", "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, "", f"cannot read file: {exc}") from None
    return parse_config(text, source=source, env=os.environ if env is None else env)


def parse_config(text: str, *, source: str = "<string>", env: Mapping[str, str] | None = None) -> Config:
    """Validate YAML text into a Config. Raises ConfigError, never anything else."""
    try:
        raw = read_yaml(text, source)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, "", f"malformed YAML: {where}{problem}") from None
    expansion = Expansion(os.environ if env is None else env)
    try:
        validated = Document.model_validate(raw, context=expansion)
    except ValidationError as exc:
        raise config_error(source, exc, raw, expansion.secrets) from None
    return _Builder(source, expansion.secrets).build(validated)


class _Builder:
    def __init__(self, source: str, secrets: set[str]) -> None:
        self.source = source
        self.secrets = secrets
        self.warnings: list[str] = []

    def error(self, path: str, problem: str) -> ConfigError:
        return ConfigError(self.source, path, redact(problem, self.secrets))

    def build(self, document: Document) -> Config:
        admin = AdminSettings(
            listen=document.admin.listen, token=document.admin.token, per_worker=document.admin.per_worker
        )
        if admin.token is not None:
            self.secrets.add(admin.token)
        inbound = Inbound(**document.inbound.model_dump())
        callers = Callers(header=document.callers.header, weights=tuple(document.callers.weights.items()))
        upstreams = tuple(
            dataclasses.replace(self.upstream(name, section, document.defaults), callers=callers)
            for name, section in document.upstreams.items()
        )
        self.check_routes_unique(upstreams)
        shared = self.shared(document, upstreams)
        exposed = admin_exposure_warning(admin.listen, admin.token)
        if exposed is not None:
            self.warnings.append(exposed)
        config = Config(
            source=self.source,
            listen=document.listen,
            admin=admin,
            shutdown_timeout=document.shutdown_timeout,
            workers=document.workers,
            inbound=inbound,
            upstreams=upstreams,
            shared=shared,
            secrets=frozenset(self.secrets),
            warnings=tuple(self.warnings),
        )
        # The same bound `run` applies, so that `validate` refuses what `run` would.
        check_divisible(config, config.workers)
        return config

    def upstream(self, name: str, own: UpstreamSection, defaults: DefaultsLayer) -> Upstream:
        path = f"upstreams.{name}"

        def pick(section: str, key: str) -> tuple[str, Any]:
            """Field-by-field inheritance: upstream, then defaults, then built-in."""
            own_section: BaseModel = getattr(own, section)
            if key in own_section.model_fields_set:
                return f"{path}.{section}.{key}", getattr(own_section, key)
            return f"defaults.{section}.{key}", getattr(getattr(defaults, section), key)

        url = own.url
        if "http2" in own.model_fields_set:
            http2_path, http2 = f"{path}.http2", own.http2
        else:
            http2_path, http2 = "defaults.http2", defaults.http2 or HTTP2Mode.OFF
        if http2 is HTTP2Mode.ALPN and url.scheme == "http":
            self.warnings.append(
                f"{http2_path}: true on the http:// upstream {name!r} stays HTTP/1.1 "
                "(HTTP/2 is negotiated by TLS ALPN); use prior-knowledge for h2c"
            )

        max_connections: int = pick("limits", "max_connections")[1]
        keepalive_path, keepalive = pick("limits", "max_keepalive_connections")
        if keepalive is not None and keepalive > max_connections:
            raise self.error(keepalive_path, f"must not exceed max_connections ({max_connections}), got {keepalive}")
        speaks_http2 = http2 is HTTP2Mode.PRIOR_KNOWLEDGE or (http2 is HTTP2Mode.ALPN and url.scheme == "https")
        carried = max_connections * (H2_STREAMS_PER_CONNECTION if speaks_http2 else 1)
        concurrent_path, concurrent = pick("limits", "max_concurrent_requests")
        if concurrent is None:
            concurrent = carried
        elif concurrent > carried:
            self.warnings.append(
                f"{concurrent_path}: {concurrent} is more than {max_connections} connection(s) can carry; "
                f"capped at {carried} so that no request waits inside the connection pool"
            )
            concurrent = carried
        limits = Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections if keepalive is None else keepalive,
            keepalive_expiry=pick("limits", "keepalive_expiry")[1],
            max_concurrent_requests=concurrent,
            max_pending=pick("limits", "max_pending")[1],
            adaptive=pick("limits", "adaptive")[1],
            min_concurrent=pick("limits", "min_concurrent")[1],
            shared_max_concurrent_requests=pick("limits", "shared_max_concurrent_requests")[1],
        )
        if limits.min_concurrent > concurrent:
            raise self.error(
                pick("limits", "min_concurrent")[0],
                f"must not exceed max_concurrent_requests ({concurrent}), got {limits.min_concurrent}",
            )
        timeouts = Timeouts(**{key: pick("timeouts", key)[1] for key in ("connect", "read", "write", "pool")})
        route = own.route
        headers = own.headers
        self.secrets.update(value for value in headers.set.values() if value)
        return Upstream(
            name=name,
            url=url.url,
            scheme=url.scheme,
            host=url.host,
            port=url.port,
            base_path=url.base_path,
            route=Route(
                path_prefix=route.path_prefix if "path_prefix" in route.model_fields_set else f"/{name}",
                strip_prefix=route.strip_prefix,
                hosts=route.hosts,
            ),
            http2=http2,
            limits=limits,
            timeouts=timeouts,
            tls=self.tls(name, pick),
            headers=HeaderRules(set=tuple(headers.set.items()), remove=headers.remove),
            rate_limit=self.rate_limit(name, pick),
            retries=self.retries(name, own, defaults),
            circuit_breaker=self.circuit_breaker(name, own, defaults),
            pacing=Pacing(
                **{key: pick("pacing", key)[1] for key in ("learn", "max_pause", "partition_by", "spread", "shared")}
            ),
        )

    @staticmethod
    def _nested_pick(name: str, own: UpstreamSection, defaults: DefaultsLayer) -> Callable[..., tuple[str, Any]]:
        """Field-by-field inheritance through nested sections (``retries.backoff.max``)."""

        def pick(*keys: str) -> tuple[str, Any]:
            for root, layer in ((f"upstreams.{name}", own), ("defaults", defaults)):
                node: Any = layer
                for key in keys:
                    if not isinstance(node, BaseModel) or key not in node.model_fields_set:
                        break
                    node = getattr(node, key)
                else:
                    return f"{root}.{'.'.join(keys)}", node
            node = defaults
            for key in keys:
                node = getattr(node, key)  # unset everywhere: the built-in default
            return f"defaults.{'.'.join(keys)}", node

        return pick

    def retries(self, name: str, own: UpstreamSection, defaults: DefaultsLayer) -> Retries:
        pick = self._nested_pick(name, own, defaults)
        base = pick("retries", "backoff", "base")[1]
        max_path, most = pick("retries", "backoff", "max")
        if most < base:
            raise self.error(max_path, f"must not be less than backoff.base ({base:g}s), got {most:g}s")
        return Retries(
            attempts=pick("retries", "attempts")[1],
            retry_on=pick("retries", "retry_on")[1],
            backoff=Backoff(base=base, max=most),
            budget=RetryBudget(
                ratio=pick("retries", "budget", "ratio")[1],
                min_per_second=pick("retries", "budget", "min_per_second")[1],
            ),
            max_body=pick("retries", "max_body")[1],
        )

    def circuit_breaker(self, name: str, own: UpstreamSection, defaults: DefaultsLayer) -> CircuitBreaker:
        pick = self._nested_pick(name, own, defaults)
        open_for = pick("circuit_breaker", "open_for")[1]  # a Duration: always > 0
        max_path, max_open = pick("circuit_breaker", "max_open")
        if max_open < open_for:
            raise self.error(max_path, f"must not be less than open_for ({open_for:g}s), got {max_open:g}s")
        return CircuitBreaker(
            failures=pick("circuit_breaker", "failures")[1],
            failure_on=pick("circuit_breaker", "failure_on")[1],
            open_for=open_for,
            max_open=max_open,
        )

    def rate_limit(self, name: str, pick: Callable[[str, str], tuple[str, Any]]) -> RateLimit | None:
        rate: float | None = pick("rate_limit", "rate")[1]
        burst_path, burst = pick("rate_limit", "burst")
        if rate is None:
            if burst is not None and burst_path.startswith("upstreams."):
                raise self.error(
                    burst_path, f"needs a rate (upstreams.{name}.rate_limit.rate or defaults.rate_limit.rate)"
                )
            return None
        # Unset: one second's worth of requests, so a steady caller at the rate never waits.
        return RateLimit(
            rate=rate, burst=max(1, int(rate)) if burst is None else burst, shared=pick("rate_limit", "shared")[1]
        )

    def shared(self, document: Document, upstreams: tuple[Upstream, ...]) -> Shared | None:
        """The top-level ``shared:`` section; any shared limit without it names ``shared.redis``."""
        section = document.shared
        if section is None:
            for upstream in upstreams:
                wants = [
                    what
                    for what, on in (
                        ("rate_limit.shared", upstream.rate_limit is not None and upstream.rate_limit.shared),
                        ("limits.shared_max_concurrent_requests", upstream.limits.shared_max_concurrent_requests),
                        ("pacing.shared", upstream.pacing.shared),
                    )
                    if on
                ]
                if wants:
                    raise self.error(
                        "shared.redis",
                        f"is required: upstream {upstream.name!r} sets {', '.join(wants)} "
                        "(a top-level shared: section with redis: URL)",
                    )
            return None
        password = urlsplit(section.redis).password
        if password:
            self.secrets.add(password)
            self.secrets.add(unquote(password))
        return Shared(
            redis=section.redis,
            key_prefix=section.key_prefix,
            timeout=section.timeout,
            on_error=section.on_error,
            lease=section.lease,
            cluster=section.cluster,
        )

    def tls(self, name: str, pick: Callable[[str, str], tuple[str, Any]]) -> TLSSettings:
        verify_path, verify = pick("tls", "verify")
        if not verify:
            self.warnings.append(f"{verify_path}: TLS verification is OFF for upstream {name!r}")
        cert_path, client_cert = pick("tls", "client_cert")
        _, client_key = pick("tls", "client_key")
        if client_key is not None and client_cert is None:
            raise self.error(f"upstreams.{name}.tls.client_cert", "is required when client_key is set")
        if client_cert is not None:
            try:
                # An encrypted key cannot be used (no passphrase setting): fail here, never prompt.
                ssl.create_default_context().load_cert_chain(client_cert, client_key, password=lambda: b"")
            except (ssl.SSLError, OSError) as exc:
                raise self.error(cert_path, f"no usable PEM certificate and unencrypted key: {exc}") from None
        return TLSSettings(
            verify=verify, ca_file=pick("tls", "ca_file")[1], client_cert=client_cert, client_key=client_key
        )

    def check_routes_unique(self, upstreams: tuple[Upstream, ...]) -> None:
        prefixes: dict[str, str] = {}
        hosts: dict[str, str] = {}
        for upstream in upstreams:
            owner = prefixes.setdefault(upstream.route.path_prefix, upstream.name)
            if owner != upstream.name:
                raise self.error(
                    f"upstreams.{upstream.name}.route.path_prefix",
                    f"{upstream.route.path_prefix!r} is already the prefix of upstream {owner!r}",
                )
            for host in upstream.route.hosts:
                owner = hosts.setdefault(host, upstream.name)
                if owner != upstream.name:
                    raise self.error(
                        f"upstreams.{upstream.name}.route.hosts",
                        f"{host!r} is already routed to upstream {owner!r}",
                    )
