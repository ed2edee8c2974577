"""Reading an upstream's own rate-limit signals from its response headers.

Pure functions, no clock of their own (the caller passes the wall-clock time
for HTTP-dates and Unix-time resets): every family the sidecar understands
(see docs/pacing.md) is parsed here and unit-tested on the header values the
services document.

* ``Retry-After`` on a 429 or 503, delay-seconds or HTTP-date (RFC 9110
  §10.2.3): a pause;
* ``RateLimit: "name";r=<remaining>;t=<seconds>`` (the IETF structured
  field, several items: the most restrictive wins);
* ``RateLimit-Remaining`` + ``RateLimit-Reset`` (the earlier drafts);
* ``X-RateLimit-Remaining`` + ``X-RateLimit-Reset`` (a reset above 10⁹ is a
  Unix time, as GitHub sends; otherwise seconds);
* ``X-RateLimit-Remaining-Requests`` + ``X-RateLimit-Reset-Requests`` (Go
  durations such as ``6m0s``, as OpenAI sends).

A malformed field is ignored and named in :attr:`Reading.ignored`, so that it
is counted and never becomes an error for the caller.
"""

from __future__ import annotations

import email.utils
import math
import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass

# A reset this large is a Unix time, not a number of seconds (GitHub).
EPOCH_THRESHOLD = 1_000_000_000
_DIGITS = re.compile(r"[0-9]+\Z")
_GO_DURATION = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:h|ms|us|µs|μs|ns|m|s)")
_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9}
_GO_PART = re.compile(r"([0-9]*\.?[0-9]*)(h|ms|us|µs|μs|ns|m|s)")
_NAME = operator.itemgetter(0)
# Every header of interest has one of these in its lower-cased name.
_MARKERS = (b"ratelimit", b"retry-after")


@dataclass(frozen=True, slots=True)
class Quota:
    """``remaining`` requests allowed within ``reset`` seconds from now."""

    remaining: int
    reset: float


@dataclass(frozen=True, slots=True)
class Reading:
    """What one response said: a pause, a quota, or neither; and what was ignored."""

    pause: float | None = None  # seconds from now (Retry-After on a 429/503)
    quota: Quota | None = None
    ignored: tuple[str, ...] = ()  # the (lower-cased) names of malformed fields

    @property
    def empty(self) -> bool:
        return self.pause is None and self.quota is None and not self.ignored


NOTHING = Reading()


def may_carry_signal(raw: Iterable[tuple[bytes, bytes]]) -> bool:
    """Cheap pre-check on header names only: could any rate-limit signal be here?

    This runs on every upstream response, so it looks at names only, in one
    pass over one joined, lower-cased string.
    """
    names = b"\n".join(map(_NAME, raw)).lower()
    return _MARKERS[0] in names or _MARKERS[1] in names


# ---------------------------------------------------------------- single values


def parse_delay_seconds(value: str) -> int | None:
    """A non-negative integer number of seconds (RFC 9110 delay-seconds)."""
    value = value.strip()
    return int(value) if _DIGITS.match(value) else None


def parse_retry_after(value: str, now_wall: float) -> float | None:
    """Seconds until ``Retry-After`` says to retry (0 for a date in the past), or None."""
    value = value.strip()
    if _DIGITS.match(value):
        return float(int(value))
    if not value or value[0].isdigit() or value[0] == "-":
        return None  # "1.5", "-1", "5s": not delay-seconds, not a date either
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        return None  # a date without a zone is not an HTTP-date
    return max(0.0, when.timestamp() - now_wall)


def parse_go_duration(value: str) -> float | None:
    """A Go duration as OpenAI sends it (``6m0s``, ``1s``, ``12ms``, ``0.5s``), in seconds."""
    value = value.strip()
    if not value or not re.fullmatch(f"(?:{_GO_DURATION.pattern})+", value):
        return None
    total = 0.0
    for number, unit in _GO_PART.findall(value):
        if number in ("", "."):
            return None
        total += float(number) * _GO_UNITS[unit]
    return total if math.isfinite(total) else None


def parse_reset(value: str, now_wall: float) -> float | None:
    """``X-RateLimit-Reset``: seconds from now, or a Unix time when above 10⁹."""
    value = value.strip()
    number: float
    if _DIGITS.match(value):
        number = int(value)
    else:
        try:
            number = float(value)  # some services send "1.5" or "1372700873.0"
        except ValueError:
            return None
        if not math.isfinite(number) or number < 0:
            return None
    if number > EPOCH_THRESHOLD:
        return max(0.0, number - now_wall)
    return float(number)


# ---------------------------------------------------------------- the structured field


def _sf_items(value: str) -> list[tuple[str, dict[str, str]]] | None:
    """A (lenient) RFC 8941 list: items ``"name"`` or ``token`` with ``;key=value`` parameters."""
    items: list[tuple[str, dict[str, str]]] = []
    for raw_item in value.split(","):
        raw_item = raw_item.strip()
        if not raw_item:
            return None
        if raw_item.startswith('"'):
            end = raw_item.find('"', 1)
            if end < 0:
                return None
            name, rest = raw_item[1:end], raw_item[end + 1 :]
        else:
            name, _, tail = raw_item.partition(";")
            rest = ";" + tail if tail else ""
            name = name.strip()
            if not name or not re.fullmatch(r"[A-Za-z*][A-Za-z0-9_.:%*/!#$&'+^`|~-]*", name):
                return None
        params: dict[str, str] = {}
        rest = rest.strip()
        if rest and not rest.startswith(";"):
            return None
        for part in rest.split(";")[1:]:
            key, equals, param = part.strip().partition("=")
            if not key or not equals:
                if key and not equals:
                    params[key.lower()] = "?1"  # a bare key is boolean true
                    continue
                return None
            params[key.lower()] = param.strip()
        items.append((name, params))
    return items


def most_restrictive(quotas: Iterable[Quota]) -> Quota | None:
    """The quota allowing the fewest requests per second (``r / t``); ties go to the longest ``t``."""
    best: Quota | None = None
    best_rate = math.inf
    for quota in quotas:
        rate = quota.remaining / quota.reset if quota.reset > 0 else math.inf
        if best is None or rate < best_rate or (rate == best_rate and quota.reset > best.reset):
            best, best_rate = quota, rate
    return best


def parse_ratelimit_field(value: str) -> Quota | None:
    """``RateLimit: "default";r=50;t=30, "hour";r=900;t=3000`` → the most restrictive item.

    Every item must carry a non-negative integer ``r`` and ``t``; one bad
    item makes the whole field malformed (a partial reading could be the
    wrong, looser one).
    """
    items = _sf_items(value)
    if not items:
        return None
    quotas = []
    for _, params in items:
        remaining = parse_delay_seconds(params.get("r", ""))
        reset = parse_delay_seconds(params.get("t", ""))
        if remaining is None or reset is None:
            return None
        quotas.append(Quota(remaining, float(reset)))
    return most_restrictive(quotas)


# ---------------------------------------------------------------- one response


# Remaining/reset pairs: (remaining name, reset name, how the reset is parsed).
_PAIRS: tuple[tuple[str, str, str], ...] = (
    ("ratelimit-remaining", "ratelimit-reset", "seconds"),
    ("x-ratelimit-remaining", "x-ratelimit-reset", "reset"),
    ("x-ratelimit-remaining-requests", "x-ratelimit-reset-requests", "go"),
)


def read_signals(status: int, raw: Iterable[tuple[bytes, bytes]], now_wall: float) -> Reading:
    """Everything one response says about the upstream's limits.

    ``Retry-After`` counts on a 429 or 503 only and takes precedence over the
    quota fields.  Among the quota families present, the most restrictive
    wins.  The first value of a repeated field is the one read.
    """
    fields: dict[str, str] = {}
    for name, value in raw:
        key = name.decode("latin-1").lower()
        if key not in fields:
            fields[key] = value.decode("latin-1")
    ignored: list[str] = []
    if status in (429, 503) and "retry-after" in fields:
        pause = parse_retry_after(fields["retry-after"], now_wall)
        if pause is not None:
            return Reading(pause=pause)
        ignored.append("retry-after")
    quotas: list[Quota] = []
    if "ratelimit" in fields:
        quota = parse_ratelimit_field(fields["ratelimit"])
        if quota is None:
            ignored.append("ratelimit")
        else:
            quotas.append(quota)
    for remaining_name, reset_name, form in _PAIRS:
        if remaining_name not in fields or reset_name not in fields:
            continue
        remaining = parse_delay_seconds(fields[remaining_name])
        if remaining is None:
            ignored.append(remaining_name)
            continue
        reset_value = fields[reset_name]
        if form == "go":
            reset = parse_go_duration(reset_value)
        elif form == "reset":
            reset = parse_reset(reset_value, now_wall)
        else:
            seconds = parse_delay_seconds(reset_value)
            reset = None if seconds is None else float(seconds)
        if reset is None:
            ignored.append(reset_name)
            continue
        quotas.append(Quota(remaining, reset))
    return Reading(quota=most_restrictive(quotas), ignored=tuple(ignored))


__all__ = [
    "EPOCH_THRESHOLD",
    "NOTHING",
    "Quota",
    "Reading",
    "may_carry_signal",
    "most_restrictive",
    "parse_delay_seconds",
    "parse_go_duration",
    "parse_ratelimit_field",
    "parse_reset",
    "parse_retry_after",
    "read_signals",
]
