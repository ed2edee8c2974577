"""The scalar forms of upstreams.yaml: durations, sizes, addresses, URLs, headers.

Each parser is a pure function raising ``ValueError`` with the message the user
sees after ``file: yaml.path:``; ``sidecar/config/fields.py`` plugs them into
the pydantic schema.
"""

from __future__ import annotations

import ipaddress
import math
import re
import reprlib
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .model import UPSTREAM_NAME, HostPort, HTTP2Mode, UpstreamURL

T = TypeVar("T")

# A bad value is quoted in its message; one that is a list or mapping (which an
# alias can make as large as it likes) only by its beginning.
_SHORT = reprlib.Repr()  # keyword arguments only from Python 3.12
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 40, 40


def shown(value: object) -> str:
    """``value`` as quoted in an error message."""
    if value is None or isinstance(value, (str, int, float)):
        return repr(value)
    return _SHORT.repr(value)


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
        raise ValueError(f"must be a duration like 250ms, 5s or 2m, got {shown(value)}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError(f"must be a duration like 250ms, 5s or 2m, got {shown(value)}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"must be a positive duration, got {shown(value)}")
    return seconds


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(value: object) -> float:
    """``100/s``, ``600/m``, ``1000/h`` (n > 0, may be fractional) → requests per second."""
    match = _RATE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"must be a rate like 100/s, 600/m or 1000/h, got {shown(value)}")
    per_second = float(match.group(1)) / _RATE_UNITS[match.group(2)]
    if not math.isfinite(per_second) or per_second <= 0:
        raise ValueError(f"must be a positive rate, got {shown(value)}")
    return per_second


def parse_size(value: object) -> int:
    """``512KiB``, ``10MiB``, ``1GiB`` or a number of bytes → bytes."""
    if isinstance(value, bool):
        raise ValueError(f"must be a size like 512KiB or 10MiB, got {shown(value)}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    else:
        raise ValueError(f"must be a size like 512KiB or 10MiB, got {shown(value)}")
    if size <= 0:
        raise ValueError(f"must be a positive size, got {shown(value)}")
    return size


def parse_host_port(value: object) -> HostPort:
    """``HOST:PORT`` (IPv6 as ``[::1]:8088``) → HostPort; port 0 picks a free port."""
    if isinstance(value, HostPort):
        return value
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"must be HOST:PORT, got {shown(value)}")
    host, _, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError(f"must be HOST:PORT with a host, got {shown(value)}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"must be HOST:PORT with a port 0-65535, got {shown(value)}")
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


def positive_int(value: object) -> int:
    number = _integer(value)
    if number is None or number <= 0:
        raise ValueError(f"must be a positive integer, got {shown(value)}")
    return number


def non_negative_int(value: object) -> int:
    number = _integer(value)
    if number is None or number < 0:
        raise ValueError(f"must be a non-negative integer, got {shown(value)}")
    return number


def non_negative_number(value: object) -> float:
    """A finite number ≥ 0 (an int, a float, or their digits from a ${VAR})."""
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number) or number < 0:
        raise ValueError(f"must be a number ≥ 0, got {shown(value)}")
    return number


# What an attempt's outcome may be matched on: the failures without a response
# head, and response statuses (429 and 5xx).
ATTEMPT_FAILURES = ("connect_error", "reset", "timeout")


def attempt_conditions(*, allow_429: bool) -> Callable[[Any], tuple[str | int, ...]]:
    """A list of ``connect_error``, ``reset``, ``timeout`` and statuses (5xx, and 429 if allowed)."""
    statuses = "429 or 500-599" if allow_429 else "500-599"

    def parse(value: Any) -> tuple[str | int, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise ValueError(f"must be a list of {', '.join(ATTEMPT_FAILURES)} or statuses ({statuses})")
        seen: list[str | int] = []
        for item in value:
            code = _integer(item) if not isinstance(item, str) or item.strip().isdigit() else None
            if isinstance(item, str) and item in ATTEMPT_FAILURES:
                condition: str | int = item
            elif code is not None and (500 <= code <= 599 or (allow_429 and code == 429)):
                condition = code
            elif code == 429:
                raise ValueError("429 never counts as a failure (it is the upstream pacing callers)")
            else:
                raise ValueError(f"{shown(item)} is not one of {', '.join(ATTEMPT_FAILURES)} or a status ({statuses})")
            if condition not in seen:
                seen.append(condition)
        return tuple(seen)

    return parse


# ${VAR} always expands to a string; these are the spellings a boolean may take then.
_BOOLEAN_WORDS = {"true": True, "false": False}


def boolean(value: object) -> bool:
    if isinstance(value, str) and value in _BOOLEAN_WORDS:
        return _BOOLEAN_WORDS[value]
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {shown(value)}")
    return value


def non_empty_string(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {shown(value)}")
    return value


def http2_mode(value: object) -> HTTP2Mode:
    if isinstance(value, str) and value in _BOOLEAN_WORDS:
        value = _BOOLEAN_WORDS[value]
    if value is False:
        return HTTP2Mode.OFF
    if value is True:
        return HTTP2Mode.ALPN
    if value == "prior-knowledge":
        return HTTP2Mode.PRIOR_KNOWLEDGE
    raise ValueError(f"must be false, true or prior-knowledge, got {shown(value)}")


def upstream_name(value: object) -> str:
    if not isinstance(value, str) or not UPSTREAM_NAME.match(value):
        raise ValueError("upstream names must match [a-z0-9][a-z0-9_-]*")
    return value


# ---------------------------------------------------------------- upstream URLs

# A host name: letters, digits, '-', '.', '_' (container names use it); IDN
# host names may use any other letter or digit (httpx encodes them).
_HOST_CHARS = re.compile(r"^[A-Za-z0-9._-]+$")
# RFC 3986 path characters: unreserved, sub-delims, ':', '@', '/' and %XX.
_PATH = re.compile(r"^(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2})*$")


def parse_upstream_url(value: object) -> UpstreamURL:
    url = non_empty_string(value)
    # Checked before urlsplit: it silently drops tabs and newlines anywhere in
    # a URL and strips leading and trailing spaces, so what it returns would
    # not be what the file says.
    if any(char.isspace() or not char.isprintable() for char in url):
        raise ValueError(
            f"must not contain spaces or control characters (percent-encode them in the path, e.g. %20), got {url!r}"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc}): {url!r}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"must start with http:// or https://, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"must name a host, got {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials; use headers.set with ${VAR} instead")
    if parts.query or parts.fragment:
        raise ValueError(f"must not have a query or fragment, got {url!r}")
    if port == 0:
        raise ValueError(f"must have a port 1-65535, not port 0 (nothing can be reached there), got {url!r}")
    if not _valid_host(parts.hostname):
        raise ValueError(f"has an invalid character in its host, got {url!r}")
    if not _PATH.match(parts.path):
        raise ValueError(f"has an invalid character in its path (use %XX escapes), got {url!r}")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return UpstreamURL(url=url, scheme=parts.scheme, host=parts.hostname, port=port, base_path=parts.path.rstrip("/"))


def _valid_host(host: str) -> bool:
    if ":" in host:  # only a bracketed IPv6 literal has one left after urlsplit
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return True
    # Dot-separated labels of 1-63 characters, an optional trailing dot (fully
    # qualified), 253 characters in all: "a..b" or ".a" could never resolve.
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if len(host) > 253 or any(not 1 <= len(label) <= 63 for label in labels):
        return False
    return all(char.isalnum() if ord(char) > 0x7F else _HOST_CHARS.match(char) for char in host)


# ---------------------------------------------------------------- headers

_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def header_name(value: object) -> str:
    if not isinstance(value, str) or not _HEADER_NAME.match(value):
        raise ValueError("is not a valid header name")
    return value


OTHER_CALLER = "other"
_MAX_CALLER = 64


def caller_name(value: str) -> bool:
    """A caller header value that names a caller: visible ASCII, at most 64 characters."""
    # Visible ASCII is printable ASCII but the space (str methods: no loop here, it runs per request).
    return 0 < len(value) <= _MAX_CALLER and value.isascii() and value.isprintable() and " " not in value


def header_value(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("must be a string")
    text = str(value)
    if any(char in text for char in "\r\n\0"):
        raise ValueError("must not contain CR, LF or NUL")
    return text


# ---------------------------------------------------------------- routes


def path_prefix(value: object) -> str:
    prefix = non_empty_string(value)
    if not prefix.startswith("/"):
        raise ValueError(f"must start with '/', got {prefix!r}")
    return prefix if prefix == "/" else prefix.rstrip("/")


def route_host(value: object) -> str:
    return non_empty_string(value).lower()  # host names are case-insensitive
