"""Pure routing: request line + Host header → (upstream, target).

The rules are in docs/routing-and-forwarding.md, "Routing".

No I/O and no aiohttp here, so every rule is unit-tested directly.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .config import Upstream
from .errors import BadRequest, ConnectNotSupported, DestinationNotAllowed, NoRoute


@dataclass(frozen=True, slots=True)
class RouteMatch:
    upstream: Upstream
    target: str  # the request target to send upstream: path and query, byte for byte


# What an upstream may take for a segment separator: "/", its percent-encoding
# (servers that decode before splitting), and a backslash, raw or encoded
# (servers that treat it as "/").
_SEPARATOR = re.compile(r"/|\\|%2f|%5c", re.IGNORECASE)
_ENCODED_DOT = re.compile(r"%2e", re.IGNORECASE)


def climbs_out(path: str) -> bool:
    """True when the dot-segments of ``path`` (no query) climb above where it starts.

    Conservative on purpose, so that no upstream's reading of the path is more
    permissive than ours: ``%2e`` counts as a dot, ``..;param`` as ``..`` (some
    servers drop path parameters first), and an empty segment is not a level
    (some servers merge slashes). Climbing above at any point counts, even if a
    later segment comes back down.
    """
    if "." not in path and "%" not in path:
        return False  # no segment can be a dot-segment, however it is split
    depth = 0
    for segment in _SEPARATOR.split(path):
        name = _ENCODED_DOT.sub(".", segment).split(";", 1)[0]
        if name == "..":
            depth -= 1
            if depth < 0:
                return True
        elif name not in ("", "."):
            depth += 1
    return False


def _stays_inside(free_path_and_query: str) -> str:
    """Refuse a path that would leave the upstream's fixed part (see :meth:`Router.resolve`)."""
    if climbs_out(free_path_and_query.partition("?")[0]):
        raise BadRequest("the request path climbs out of the upstream's base path with '..' segments")
    return free_path_and_query


# RFC 3986 §3.2.2 host (reg-name, which covers IPv4, or a bracketed IP literal)
# and §3.2.3 port: what a Host header may hold (RFC 9110 §7.2).
_HOST = re.compile(r"(?:(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*|\[([0-9A-Fa-f:.]+)\])(?::[0-9]*)?")


# Host values found valid: the same few arrive on every request (a bounded number kept).
_VALID_HOSTS: set[str] = set()
_VALID_HOSTS_KEPT = 1024


def valid_host(value: str) -> bool:
    """Whether a Host header value is a syntactically valid ``host[:port]``."""
    if value in _VALID_HOSTS:
        return True
    if _valid_host(value):
        if len(_VALID_HOSTS) < _VALID_HOSTS_KEPT:
            _VALID_HOSTS.add(value)
        return True
    return False


def _valid_host(value: str) -> bool:
    match = _HOST.fullmatch(value)
    if match is None:
        return False
    literal = match.group(1)
    if literal is not None:
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return False
    return True


def _split_host(authority: str) -> str:
    """``Host`` value → lower-case host without port (IPv6 brackets kept)."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        end = authority.find("]")
        return authority[: end + 1] if end != -1 else authority
    return authority.rsplit(":", 1)[0] if ":" in authority else authority


class Router:
    """Routes requests to upstreams; built once per loaded config."""

    __slots__ = ("_by_host", "_by_prefix")

    def __init__(self, upstreams: tuple[Upstream, ...]) -> None:
        self._by_host: dict[str, Upstream] = {}
        self._by_prefix: dict[str, Upstream] = {}
        for upstream in upstreams:
            self._by_prefix[upstream.route.path_prefix] = upstream
            for host in upstream.route.hosts:
                self._by_host[host] = upstream

    def resolve(self, method: str, raw_target: str, host_header: str | None) -> RouteMatch:
        """Match a request; raises a SidecarError subclass when it must be refused.

        The target is forwarded byte for byte, with one exception: a path whose
        dot-segments would climb above the upstream's fixed part is refused
        (400), since it would reach other paths of the same host, with the
        credentials ``headers.set`` adds. The fixed part is the base path of the
        upstream's ``url``, plus the route's prefix when it is not stripped.
        """
        if method == "CONNECT":
            raise ConnectNotSupported(
                "CONNECT is not supported: point the service at http:// and let the sidecar originate TLS"
            )
        if host_header is not None and not valid_host(host_header.strip(" \t")):
            # RFC 9112 §3.2. Not quoted back: it is whatever the caller put there.
            raise BadRequest("the Host header is not a valid host[:port]")
        if "#" in raw_target:
            # A fragment is the client's business (RFC 9110 §4.2.5), never part of
            # a request target: whatever an upstream would make of it, it is not ours.
            raise BadRequest("a request target must not carry a fragment")
        if raw_target.startswith("/"):
            if host_header and self._by_host:
                upstream = self._by_host.get(host_header.strip().lower()) or self._by_host.get(_split_host(host_header))
                if upstream is not None:
                    return RouteMatch(upstream, self._join(upstream, _stays_inside(raw_target)))
            return self._by_path(raw_target)
        if "://" in raw_target[:16]:
            return self._absolute(raw_target)
        raise BadRequest(f"unsupported request target form: {raw_target[:100]!r}")

    def _absolute(self, raw_target: str) -> RouteMatch:
        scheme, _, rest = raw_target.partition("://")
        if scheme.lower() not in ("http", "https"):
            raise BadRequest(f"unsupported scheme in absolute-form target: {scheme[:20]!r}")
        slash = len(rest)
        for delimiter in "/?":
            index = rest.find(delimiter)
            if index != -1:
                slash = min(slash, index)
        authority, path_and_query = rest[:slash], rest[slash:]
        if "@" in authority:
            raise BadRequest("a request target must not carry userinfo")
        if not authority:
            raise BadRequest("absolute-form target without a host")
        upstream = self._by_host.get(authority.lower()) or self._by_host.get(_split_host(authority))
        if upstream is None:
            raise DestinationNotAllowed(
                f"destination {_split_host(authority)[:255]!r} is not a configured upstream host"
            )
        if not path_and_query.startswith("/"):
            path_and_query = "/" + path_and_query
        return RouteMatch(upstream, self._join(upstream, _stays_inside(path_and_query)))

    def _by_path(self, raw_target: str) -> RouteMatch:
        path, question, query = raw_target.partition("?")
        # Walk up the segments: /a/b/c, /a/b, /a, / — a prefix always ends on a boundary.
        candidate = path.rstrip("/") or "/"
        while True:
            upstream = self._by_prefix.get(candidate)
            if upstream is not None:
                # The prefix is fixed whether stripped or not: only what follows it is the caller's.
                free = path if candidate == "/" else path[len(candidate) :]
                _stays_inside(free)
                if upstream.route.strip_prefix:
                    path = free
                return RouteMatch(upstream, self._join(upstream, path + question + query))
            if candidate == "/":
                break
            candidate = candidate.rsplit("/", 1)[0] or "/"
        raise NoRoute(f"no upstream route matches {path[:200]!r}")

    @staticmethod
    def _join(upstream: Upstream, path_and_query: str) -> str:
        """Prefix the upstream's base path; an empty path becomes the base itself."""
        if not path_and_query.startswith("/"):
            return (upstream.base_path or "/") + path_and_query
        return upstream.base_path + path_and_query
