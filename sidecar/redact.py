"""Keeping secrets out of what the sidecar prints, logs and serves.

A secret is any value the config took from a ``${VAR}`` (plus the admin token
and ``headers.set`` values, which the config view hides by key).  Two ways to
keep one out of a text:

* :func:`redact` / :class:`SecretScrubber` replace each secret inside the
  text with :data:`REDACTED`: error messages, log events, tracebacks.  A
  secret shorter than :data:`MIN_LENGTH` is left alone: replacing every
  "ab" in every log line would destroy the logs and reveal little.  Longer
  secrets are replaced first, so one that contains another goes whole.
* :func:`contains_secret` tells whether a value must be hidden entirely (a
  URL in ``/config`` or ``/pools``): there a partial view could still give a
  secret away, so every secret counts, however short.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, MutableMapping
from typing import Any

__all__ = ["MIN_LENGTH", "REDACTED", "SecretScrubber", "contains_secret", "redact", "scrubber"]

REDACTED = "<redacted>"
MIN_LENGTH = 3


def _replaceable(secrets: Iterable[str]) -> tuple[str, ...]:
    """The secrets worth replacing inside a text, longest first."""
    return tuple(sorted((secret for secret in secrets if len(secret) >= MIN_LENGTH), key=len, reverse=True))


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret in it replaced (one-off: a config error message)."""
    for secret in _replaceable(secrets):
        text = text.replace(secret, REDACTED)
    return text


def contains_secret(value: str, secrets: Iterable[str]) -> bool:
    """Whether ``value`` holds any secret at all: then it is shown as :data:`REDACTED`."""
    return any(secret in value for secret in secrets)


class SecretScrubber:
    """The secrets currently loaded, replaced wherever they appear; also a structlog processor.

    As a processor it runs on every event, the access line included: one
    precompiled alternation is searched per string value, and only a hit pays
    for a replacement.
    """

    def __init__(self) -> None:
        self.secrets: tuple[str, ...] = ()
        self._pattern: re.Pattern[str] | None = None

    def update(self, secrets: frozenset[str]) -> None:
        self.secrets = _replaceable(secrets)
        self._pattern = re.compile("|".join(map(re.escape, self.secrets))) if self.secrets else None

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        pattern = self._pattern
        if pattern is not None:
            for key, value in event.items():
                if isinstance(value, str) and pattern.search(value):
                    event[key] = pattern.sub(REDACTED, value)
        return event

    def redact(self, text: str) -> str:
        pattern = self._pattern
        return text if pattern is None else pattern.sub(REDACTED, text)


# The process's secrets: every log event goes through it (see sidecar/logs.py),
# and so does any error text the admin listener answers with.
scrubber = SecretScrubber()
