"""What of a Config may be shown: /config, ``sidecar validate`` and the admin warning.

Header values under ``headers.set`` and the admin token are always redacted;
so is any other string that came from (or contains) a ${VAR} value.
"""

from __future__ import annotations

from typing import Any

from ..redact import REDACTED, contains_secret
from .model import Config, HeaderRules, HostPort, HTTP2Mode


def public_view(config: Config) -> dict[str, Any]:
    """The effective config as plain data for /config, with every secret redacted."""

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
        if isinstance(value, str) and contains_secret(value, config.secrets):
            return REDACTED
        return value

    admin = config.admin
    return {
        "source": config.source,
        "listen": str(config.listen),
        "admin": {
            "listen": None if admin.listen is None else str(admin.listen),
            "token": None if admin.token is None else REDACTED,
            "per_worker": admin.per_worker,
        },
        "shutdown_timeout": config.shutdown_timeout,
        "workers": config.workers,
        "inbound": scrub(config.inbound),
        "upstreams": {upstream.name: scrub(upstream) for upstream in config.upstreams},
        # The Redis URL is shown with its password (if any) redacted, whatever its origin.
        "shared": None
        if config.shared is None
        else {**scrub(config.shared), "redis": redis_url_shown(config.shared.redis)},
    }


def redis_url_shown(url: str) -> str:
    """A Redis URL with any user and password replaced: safe for /config, /pools and logs."""
    scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    if not sep or at < 0:
        return url
    return f"{scheme}://{REDACTED}@{rest[at + 1 :]}"


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
