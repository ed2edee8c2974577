"""Load ``upstreams.yaml`` into typed, immutable objects.

Everything the rest of the code knows about configuration comes from the
frozen dataclasses here; no dict of settings travels past this module.  Every
error names the file, the YAML path of the offending field and what is wrong
with it, so ``sidecar validate`` can print it without a traceback.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import os
import re
import ssl
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

DEFAULT_CONFIG_PATH = "config/upstreams.yaml"
UPSTREAM_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
# How deep a YAML document may nest.  The schema needs 5 levels; PyYAML's
# loader recurses once per level and fails with RecursionError near 1,000.
MAX_YAML_DEPTH = 64
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


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float
    read: float
    write: float
    pool: float


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


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    listen: HostPort
    admin: AdminSettings
    shutdown_timeout: float
    workers: int
    inbound: Inbound
    upstreams: tuple[Upstream, ...]
    # Values that came from ${VAR}; never printed, logged or served.
    secrets: frozenset[str] = field(default=frozenset(), compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def upstream(self, name: str) -> Upstream | None:
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        return None


# --------------------------------------------------------------------------
# Scalars: durations, sizes, addresses
# --------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}


def parse_duration(value: object) -> float:
    """``250ms``, ``5s``, ``2m``, ``1h`` or a number of seconds → seconds."""
    if isinstance(value, bool):
        raise ValueError(f"must be a duration like 250ms, 5s or 2m, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError(f"must be a duration like 250ms, 5s or 2m, got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"must be a positive duration, got {value!r}")
    return seconds


def parse_size(value: object) -> int:
    """``512KiB``, ``10MiB``, ``1GiB`` or a number of bytes → bytes."""
    if isinstance(value, bool):
        raise ValueError(f"must be a size like 512KiB or 10MiB, got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    else:
        raise ValueError(f"must be a size like 512KiB or 10MiB, got {value!r}")
    if size <= 0:
        raise ValueError(f"must be a positive size, got {value!r}")
    return size


def parse_host_port(value: object) -> HostPort:
    """``HOST:PORT`` (IPv6 as ``[::1]:8088``) → HostPort; port 0 picks a free port."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"must be HOST:PORT, got {value!r}")
    host, _, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError(f"must be HOST:PORT with a host, got {value!r}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"must be HOST:PORT with a port 0-65535, got {value!r}")
    return HostPort(host, int(port_text))


def _integer(value: object) -> int | None:
    """An int, or the decimal digits a ${VAR} expanded to; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
        return int(value)
    return None


def _positive_int(value: object) -> int:
    number = _integer(value)
    if number is None or number <= 0:
        raise ValueError(f"must be a positive integer, got {value!r}")
    return number


def _non_negative_int(value: object) -> int:
    number = _integer(value)
    if number is None or number < 0:
        raise ValueError(f"must be a non-negative integer, got {value!r}")
    return number


# ${VAR} always expands to a string; these are the spellings a boolean may take then.
_BOOLEAN_WORDS = {"true": True, "false": False}


def _boolean(value: object) -> bool:
    if isinstance(value, str) and value in _BOOLEAN_WORDS:
        return _BOOLEAN_WORDS[value]
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _string(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


def _http2_mode(value: object) -> HTTP2Mode:
    if isinstance(value, str) and value in _BOOLEAN_WORDS:
        value = _BOOLEAN_WORDS[value]
    if value is False:
        return HTTP2Mode.OFF
    if value is True:
        return HTTP2Mode.ALPN
    if value == "prior-knowledge":
        return HTTP2Mode.PRIOR_KNOWLEDGE
    raise ValueError(f"must be false, true or prior-knowledge, got {value!r}")


# --------------------------------------------------------------------------
# ${VAR} substitution
# --------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _substitute(value: str, env: Mapping[str, str], secrets: set[str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            found = env[name]
        elif default is not None:
            found = default
        else:
            raise ValueError(f"environment variable {name} is not set (use ${{{name}:-default}} for a default)")
        if found:
            secrets.add(found)
        return found

    result = _VARIABLE.sub(replace, value)
    if result != value and result:
        secrets.add(result)
    return result


# --------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------

T = TypeVar("T")
REDACTED = "<redacted>"


class _Loader:
    """Walks the YAML document, tracking the path for error messages."""

    def __init__(self, source: str, env: Mapping[str, str]) -> None:
        self.source = source
        self.env = env
        self.secrets: set[str] = set()
        self.warnings: list[str] = []

    def error(self, path: str, problem: str) -> ConfigError:
        # A value that came from ${VAR} may be a secret: an error quoting it
        # ("must be a positive integer, got '...'") would print, log and serve it.
        for secret in sorted(self.secrets, key=len, reverse=True):
            if len(secret) >= 3:
                problem = problem.replace(secret, REDACTED)
        return ConfigError(self.source, path, problem)

    def mapping(self, value: object, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(path or "(top level)", f"must be a mapping, got {type(value).__name__}")
        for key in value:
            if not isinstance(key, str):
                raise self.error(path or "(top level)", f"keys must be strings, got {key!r}")
            if key not in allowed:
                hint = ", ".join(allowed)
                raise self.error(_join(path, key), f"unknown key (expected one of: {hint})")
        return value

    def convert(self, value: object, path: str, parse: Callable[[object], T]) -> T:
        try:
            return parse(self.expand(value, path))
        except ValueError as exc:
            raise self.error(path, str(exc)) from None

    def expand(self, value: object, path: str) -> object:
        if not isinstance(value, str):
            return value
        try:
            return _substitute(value, self.env, self.secrets)
        except ValueError as exc:
            raise self.error(path, str(exc)) from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


_TOP_KEYS = ("listen", "admin", "shutdown_timeout", "workers", "inbound", "defaults", "upstreams")
_INBOUND_KEYS = (
    "max_request_body",
    "header_timeout",
    "body_idle_timeout",
    "max_line_size",
    "max_field_size",
    "max_headers",
)
_SETTINGS_KEYS = ("http2", "limits", "timeouts", "tls")
_LIMIT_KEYS = (
    "max_connections",
    "max_keepalive_connections",
    "keepalive_expiry",
    "max_concurrent_requests",
    "max_pending",
)
_TIMEOUT_KEYS = ("connect", "read", "write", "pool")
_TLS_KEYS = ("verify", "ca_file", "client_cert", "client_key")
_UPSTREAM_KEYS = ("url", "route", "headers", *_SETTINGS_KEYS)
_ROUTE_KEYS = ("path_prefix", "strip_prefix", "hosts")
_HEADER_KEYS = ("set", "remove")

_BUILTIN_DEFAULTS: dict[str, dict[str, object]] = {
    "limits": {
        "max_connections": 100,
        "max_keepalive_connections": None,
        "keepalive_expiry": "5s",
        "max_concurrent_requests": None,
        "max_pending": 1000,
    },
    "timeouts": {"connect": "5s", "read": "30s", "write": "5s", "pool": "1s"},
    "tls": {"verify": True, "ca_file": None, "client_cert": None, "client_key": None},
}


@dataclass(slots=True)
class _Layer:
    """One layer of inheritable settings: where it came from and its raw values."""

    path: str
    http2: object
    sections: dict[str, dict[str, tuple[str, object]]]


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys.

    PyYAML keeps the last of two equal keys silently: a second upstream with
    the same name would replace the first without a word.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` may legitimately be overridden
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


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
        _check_depth(text, source)
        document = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, "", f"malformed YAML: {where}{problem}") from None
    loader = _Loader(source, os.environ if env is None else env)
    return _build(loader, document)


def _check_depth(text: str, source: str) -> None:
    """Refuse a document nested deeper than MAX_YAML_DEPTH, naming where.

    PyYAML's parser is a state machine (no recursion), so its event stream is
    walked before the recursive loader ever sees the document.
    """
    # One frame per open collection: [is a mapping, current key or index, next node is a key].
    frames: list[list[Any]] = []
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            frames.pop()
            continue
        if not isinstance(event, yaml.NodeEvent):
            continue
        if frames:
            frame = frames[-1]
            if not frame[0]:
                frame[1] += 1
            else:
                if frame[2]:
                    frame[1] = event.value if isinstance(event, yaml.ScalarEvent) else "?"
                frame[2] = not frame[2]
        if isinstance(event, yaml.CollectionStartEvent):
            if len(frames) >= MAX_YAML_DEPTH:
                path = ""
                for is_mapping, key, _ in frames:
                    path = _join(path, str(key)) if is_mapping else f"{path}[{key}]"
                mark = event.start_mark
                where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
                raise ConfigError(source, path, f"nested more than {MAX_YAML_DEPTH} levels deep{where}")
            frames.append([isinstance(event, yaml.MappingStartEvent), -1, True])


def _build(loader: _Loader, document: object) -> Config:
    top = loader.mapping(document, "", _TOP_KEYS)

    listen = loader.convert(top.get("listen", "127.0.0.1:8088"), "listen", parse_host_port)
    admin = _admin(loader, top.get("admin", "127.0.0.1:8089"))
    shutdown_timeout = loader.convert(top.get("shutdown_timeout", "30s"), "shutdown_timeout", parse_duration)
    workers = loader.convert(top.get("workers", 1), "workers", _positive_int)
    inbound = _inbound(loader, top.get("inbound"))

    defaults = loader.mapping(top.get("defaults"), "defaults", _SETTINGS_KEYS)
    default_layer = _layer(loader, defaults, "defaults")

    declared = top.get("upstreams")
    names = tuple(declared) if isinstance(declared, dict) else ()
    upstreams_raw = loader.mapping(declared, "upstreams", names)
    if not upstreams_raw:
        raise loader.error("upstreams", "must define at least one upstream")
    upstreams = tuple(_upstream(loader, name, raw, default_layer) for name, raw in upstreams_raw.items())
    _check_routes_unique(loader, upstreams)

    exposed = admin_exposure_warning(admin.listen, admin.token)
    if exposed is not None:
        loader.warnings.append(exposed)

    config = Config(
        source=loader.source,
        listen=listen,
        admin=admin,
        shutdown_timeout=shutdown_timeout,
        workers=workers,
        inbound=inbound,
        upstreams=upstreams,
        secrets=frozenset(loader.secrets),
        warnings=tuple(loader.warnings),
    )
    check_divisible(config, workers)  # the check `run` applies, so `validate` agrees with it
    return config


def check_divisible(config: Config, workers: int) -> None:
    """Refuse a worker count the config cannot serve (ConfigError names the path).

    Every worker needs at least one of each per-upstream slot, since the
    host-wide totals are split between them (see sidecar/workers.py), and
    worker ``i`` serves its admin listener on the configured port plus ``i``.
    Applied when the file is loaded (its own ``workers``) and by ``run`` for
    ``--workers``.
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
    admin = config.admin.listen
    if admin is not None and admin.port != 0 and admin.port + workers - 1 > 65535:
        raise ConfigError(
            config.source,
            "workers",
            f"{workers} workers would put admin listeners past port 65535 "
            f"(worker i listens on {admin.port} + i); use fewer workers or admin port 0",
        )


def _admin(loader: _Loader, raw: object) -> AdminSettings:
    if raw == "off" or raw is False:
        return AdminSettings(listen=None, token=None)
    if isinstance(raw, str):
        return AdminSettings(listen=loader.convert(raw, "admin", parse_host_port), token=None)
    section = loader.mapping(raw, "admin", ("listen", "token"))
    listen_raw = section.get("listen", "127.0.0.1:8089")
    listen = None if listen_raw == "off" else loader.convert(listen_raw, "admin.listen", parse_host_port)
    token_raw = section.get("token")
    token = None if token_raw is None else loader.convert(token_raw, "admin.token", _string)
    if token is not None:
        loader.secrets.add(token)
    return AdminSettings(listen=listen, token=token)


def _inbound(loader: _Loader, raw: object) -> Inbound:
    section = loader.mapping(raw, "inbound", _INBOUND_KEYS)
    body = section.get("max_request_body")
    return Inbound(
        max_request_body=None if body is None else loader.convert(body, "inbound.max_request_body", parse_size),
        header_timeout=loader.convert(section.get("header_timeout", "10s"), "inbound.header_timeout", parse_duration),
        body_idle_timeout=loader.convert(
            section.get("body_idle_timeout", "30s"), "inbound.body_idle_timeout", parse_duration
        ),
        max_line_size=loader.convert(section.get("max_line_size", 8190), "inbound.max_line_size", parse_size),
        max_field_size=loader.convert(section.get("max_field_size", 8190), "inbound.max_field_size", parse_size),
        max_headers=loader.convert(section.get("max_headers", 128), "inbound.max_headers", _positive_int),
    )


def _layer(loader: _Loader, raw: dict[str, Any], path: str) -> _Layer:
    sections: dict[str, dict[str, tuple[str, object]]] = {}
    for name, keys in (("limits", _LIMIT_KEYS), ("timeouts", _TIMEOUT_KEYS), ("tls", _TLS_KEYS)):
        section_path = _join(path, name)
        section = loader.mapping(raw.get(name), section_path, keys)
        sections[name] = {key: (_join(section_path, key), value) for key, value in section.items()}
    return _Layer(path=path, http2=raw.get("http2"), sections=sections)


def _pick(name: str, key: str, own: _Layer, inherited: _Layer) -> tuple[str, object]:
    """Field-by-field inheritance: upstream, then defaults, then built-in."""
    for layer in (own, inherited):
        if key in layer.sections[name]:
            return layer.sections[name][key]
    return f"defaults.{name}.{key}", _BUILTIN_DEFAULTS[name][key]


def _upstream(loader: _Loader, name: object, raw: object, defaults: _Layer) -> Upstream:
    path = f"upstreams.{name}"
    if not isinstance(name, str) or not UPSTREAM_NAME.match(name):
        raise loader.error(path, "upstream names must match [a-z0-9][a-z0-9_-]*")
    section = loader.mapping(raw, path, _UPSTREAM_KEYS)
    if "url" not in section:
        raise loader.error(_join(path, "url"), "is required")
    url_path = _join(path, "url")
    url = loader.convert(section["url"], url_path, _string)
    scheme, host, port, base_path = _parse_upstream_url(loader, url, url_path)

    own = _layer(loader, section, path)
    if "http2" in section:
        http2_path, http2_raw = _join(path, "http2"), section["http2"]
    elif defaults.http2 is not None:
        http2_path, http2_raw = "defaults.http2", defaults.http2
    else:
        http2_path, http2_raw = "defaults.http2", False
    http2 = loader.convert(http2_raw, http2_path, _http2_mode)
    if http2 is HTTP2Mode.ALPN and scheme == "http":
        loader.warnings.append(
            f"{http2_path}: true on the http:// upstream {name!r} stays HTTP/1.1 "
            "(HTTP/2 is negotiated by TLS ALPN); use prior-knowledge for h2c"
        )

    def value(section_name: str, key: str, parse: Callable[[object], T]) -> T:
        where, raw_value = _pick(section_name, key, own, defaults)
        return loader.convert(raw_value, where, parse)

    def optional(section_name: str, key: str, parse: Callable[[object], T]) -> T | None:
        where, raw_value = _pick(section_name, key, own, defaults)
        return None if raw_value is None else loader.convert(raw_value, where, parse)

    max_connections = value("limits", "max_connections", _positive_int)
    keepalive = optional("limits", "max_keepalive_connections", _non_negative_int)
    if keepalive is not None and keepalive > max_connections:
        where, _ = _pick("limits", "max_keepalive_connections", own, defaults)
        raise loader.error(where, f"must not exceed max_connections ({max_connections}), got {keepalive}")
    speaks_http2 = http2 is HTTP2Mode.PRIOR_KNOWLEDGE or (http2 is HTTP2Mode.ALPN and scheme == "https")
    carried = max_connections * (H2_STREAMS_PER_CONNECTION if speaks_http2 else 1)
    concurrent = optional("limits", "max_concurrent_requests", _positive_int)
    if concurrent is None:
        concurrent = carried
    elif concurrent > carried:
        where, _ = _pick("limits", "max_concurrent_requests", own, defaults)
        loader.warnings.append(
            f"{where}: {concurrent} is more than {max_connections} connection(s) can carry; "
            f"capped at {carried} so that no request waits inside the connection pool"
        )
        concurrent = carried
    limits = Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections if keepalive is None else keepalive,
        keepalive_expiry=value("limits", "keepalive_expiry", parse_duration),
        max_concurrent_requests=concurrent,
        max_pending=value("limits", "max_pending", _non_negative_int),
    )
    timeouts = Timeouts(
        connect=value("timeouts", "connect", parse_duration),
        read=value("timeouts", "read", parse_duration),
        write=value("timeouts", "write", parse_duration),
        pool=value("timeouts", "pool", parse_duration),
    )
    tls = _tls(loader, own, defaults, name)
    route = _route(loader, section.get("route"), _join(path, "route"), name)
    headers = _headers(loader, section.get("headers"), _join(path, "headers"))
    return Upstream(
        name=name,
        url=url,
        scheme=scheme,
        host=host,
        port=port,
        base_path=base_path,
        route=route,
        http2=http2,
        limits=limits,
        timeouts=timeouts,
        tls=tls,
        headers=headers,
    )


def _parse_upstream_url(loader: _Loader, url: str, path: str) -> tuple[str, str, int, str]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise loader.error(path, f"is not a valid URL ({exc}): {url!r}") from None
    if parts.scheme not in ("http", "https"):
        raise loader.error(path, f"must start with http:// or https://, got {url!r}")
    if not parts.hostname:
        raise loader.error(path, f"must name a host, got {url!r}")
    if parts.username is not None or parts.password is not None:
        raise loader.error(path, "must not carry credentials; use headers.set with ${VAR} instead")
    if parts.query or parts.fragment:
        raise loader.error(path, f"must not have a query or fragment, got {url!r}")
    if port == 0:
        raise loader.error(path, f"must not use port 0 (nothing can be reached there), got {url!r}")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    # urlsplit takes almost anything; these would only fail later, on every request.
    host = parts.hostname
    if not (_is_ipv6(host) if parts.netloc.rpartition("@")[2].startswith("[") else _HOST_NAME.fullmatch(host)):
        raise loader.error(path, f"host must be a DNS name or an IP address, got {host!r}")
    if not _URL_PATH.fullmatch(parts.path):
        raise loader.error(
            path, f"path may hold only URL characters (percent-encode the others, e.g. %20 for a space), got {url!r}"
        )
    return parts.scheme, host, port, parts.path.rstrip("/")


# Dot-separated labels of letters, digits, '-' and '_' (Docker service names
# use '_'), optionally fully qualified with a trailing dot; IPv4 fits too.
_HOST_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63})*\.?")
# RFC 3986 path characters: unreserved, sub-delims, ':', '@', '/' and %XX.
_URL_PATH = re.compile(r"(?:[A-Za-z0-9._~!$&'()*+,;=:@/-]|%[0-9A-Fa-f]{2})*")


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def _tls(loader: _Loader, own: _Layer, defaults: _Layer, name: str) -> TLSSettings:
    def file_or_none(key: str) -> str | None:
        where, raw = _pick("tls", key, own, defaults)
        if raw is None:
            return None
        file_path = loader.convert(raw, where, _string)
        if not Path(file_path).is_file():
            raise loader.error(where, f"file not found: {file_path}")
        return file_path

    where, raw_verify = _pick("tls", "verify", own, defaults)
    verify = loader.convert(raw_verify, where, _boolean)
    if not verify:
        loader.warnings.append(f"{where}: TLS verification is OFF for upstream {name!r}")
    client_cert, client_key = file_or_none("client_cert"), file_or_none("client_key")
    if client_key is not None and client_cert is None:
        raise loader.error(f"upstreams.{name}.tls.client_cert", "is required when client_key is set")
    ca_file = file_or_none("ca_file")
    # Load the files now: a file that exists but holds no usable PEM would
    # otherwise pass `validate` and fail only when the pool opens (or reloads).
    if ca_file is not None:
        try:
            ssl.create_default_context(cafile=ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise loader.error(_pick("tls", "ca_file", own, defaults)[0], f"no usable PEM certificate: {exc}") from None
    if client_cert is not None:
        try:
            # An encrypted key cannot be used (no passphrase setting): fail here, never prompt.
            ssl.create_default_context().load_cert_chain(client_cert, client_key, password=lambda: b"")
        except (ssl.SSLError, OSError) as exc:
            where = _pick("tls", "client_cert", own, defaults)[0]
            raise loader.error(where, f"no usable PEM certificate and unencrypted key: {exc}") from None
    return TLSSettings(verify=verify, ca_file=ca_file, client_cert=client_cert, client_key=client_key)


def _route(loader: _Loader, raw: object, path: str, name: str) -> Route:
    section = loader.mapping(raw, path, _ROUTE_KEYS)
    prefix = loader.convert(section.get("path_prefix", f"/{name}"), _join(path, "path_prefix"), _string)
    if not prefix.startswith("/"):
        raise loader.error(_join(path, "path_prefix"), f"must start with '/', got {prefix!r}")
    if prefix != "/":
        prefix = prefix.rstrip("/")
    strip = loader.convert(section.get("strip_prefix", True), _join(path, "strip_prefix"), _boolean)
    hosts_raw = section.get("hosts", [])
    if not isinstance(hosts_raw, list):
        raise loader.error(_join(path, "hosts"), f"must be a list of host names, got {hosts_raw!r}")
    hosts = tuple(
        loader.convert(host, f"{path}.hosts[{index}]", _string).lower() for index, host in enumerate(hosts_raw)
    )
    return Route(path_prefix=prefix, strip_prefix=strip, hosts=hosts)


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _headers(loader: _Loader, raw: object, path: str) -> HeaderRules:
    section = loader.mapping(raw, path, _HEADER_KEYS)
    set_raw = section.get("set") or {}
    if not isinstance(set_raw, dict):
        raise loader.error(_join(path, "set"), "must be a mapping of header name to value")
    to_set: list[tuple[str, str]] = []
    for key, raw_value in set_raw.items():
        where = f"{path}.set.{key}"
        if not isinstance(key, str) or not _HEADER_NAME.match(key):
            raise loader.error(where, "is not a valid header name")
        if isinstance(raw_value, bool) or not isinstance(raw_value, (str, int, float)):
            raise loader.error(where, "must be a string")
        header_value = str(loader.expand(raw_value, where))
        if any(char in header_value for char in "\r\n\0"):
            raise loader.error(where, "must not contain CR, LF or NUL")
        if header_value:
            loader.secrets.add(header_value)
        to_set.append((key, header_value))
    remove_raw = section.get("remove") or []
    if not isinstance(remove_raw, list):
        raise loader.error(_join(path, "remove"), "must be a list of header names")
    to_remove = []
    for index, item in enumerate(remove_raw):
        if not isinstance(item, str) or not _HEADER_NAME.match(item):
            raise loader.error(f"{path}.remove[{index}]", "is not a valid header name")
        to_remove.append(item)
    return HeaderRules(set=tuple(to_set), remove=tuple(to_remove))


def _check_routes_unique(loader: _Loader, upstreams: tuple[Upstream, ...]) -> None:
    prefixes: dict[str, str] = {}
    hosts: dict[str, str] = {}
    for upstream in upstreams:
        owner = prefixes.setdefault(upstream.route.path_prefix, upstream.name)
        if owner != upstream.name:
            raise loader.error(
                f"upstreams.{upstream.name}.route.path_prefix",
                f"{upstream.route.path_prefix!r} is already the prefix of upstream {owner!r}",
            )
        for host in upstream.route.hosts:
            owner = hosts.setdefault(host, upstream.name)
            if owner != upstream.name:
                raise loader.error(
                    f"upstreams.{upstream.name}.route.hosts",
                    f"{host!r} is already routed to upstream {owner!r}",
                )


def admin_exposure_warning(listen: HostPort | None, token: str | None) -> str | None:
    """The warning for an admin listener anyone on the network may reach, or None."""
    if listen is None or token is not None or _is_loopback(listen.host):
        return None
    return (
        f"admin listener {listen} is not on loopback and has no token: "
        "anyone who can reach it can read the config and trigger reloads (set admin.token)"
    )


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def public_view(config: Config) -> dict[str, Any]:
    """The effective config as plain data for /config, with every secret redacted.

    Header values under ``headers.set`` and the admin token are always
    redacted; any other string that came from (or contains) a ${VAR} value is
    too.
    """

    def scrub(value: object) -> Any:
        if isinstance(value, HTTP2Mode):
            return value.yaml_value
        if isinstance(value, HostPort):
            return str(value)
        if isinstance(value, HeaderRules):
            return {"set": {name: REDACTED for name, _ in value.set}, "remove": list(value.remove)}
        if hasattr(value, "__dataclass_fields__"):
            return {name: scrub(getattr(value, name)) for name in value.__dataclass_fields__}
        if isinstance(value, tuple):
            return [scrub(item) for item in value]
        if isinstance(value, str) and any(secret in value for secret in config.secrets):
            return REDACTED
        return value

    admin = config.admin
    return {
        "source": config.source,
        "listen": str(config.listen),
        "admin": {
            "listen": None if admin.listen is None else str(admin.listen),
            "token": None if admin.token is None else REDACTED,
        },
        "shutdown_timeout": config.shutdown_timeout,
        "workers": config.workers,
        "inbound": scrub(config.inbound),
        "upstreams": {upstream.name: scrub(upstream) for upstream in config.upstreams},
    }
