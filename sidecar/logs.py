"""structlog setup and the per-request access event (SPEC §8).

One JSON event per line on stdout (console rendering on a TTY or when asked).
Secrets loaded from ${VAR} are scrubbed from every event, whatever logged it.
"""

from __future__ import annotations

import io
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp.http_exceptions import HttpProcessingError

if TYPE_CHECKING:
    from .exchange import Exchange

REDACTED = "<redacted>"


class SecretScrubber:
    """A structlog processor replacing any known secret inside string values.

    It runs on every event, the access line included: one precompiled
    alternation is searched per string value, and only a hit pays for a
    replacement.
    """

    def __init__(self) -> None:
        self.secrets: tuple[str, ...] = ()
        self._pattern: re.Pattern[str] | None = None

    def update(self, secrets: frozenset[str]) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        self.secrets = tuple(sorted((s for s in secrets if len(s) >= 3), key=len, reverse=True))
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


scrubber = SecretScrubber()


class _ClientGarbageFilter(logging.Filter):
    """aiohttp logs a full traceback for every malformed request; one line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], HttpProcessingError):
            exc = record.exc_info[1]
            record.msg = "bad_request_from_client"
            record.args = ()
            record.exc_info = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.__dict__["reason"] = f"{type(exc).__name__}: {exc.message}"[:200]
        return True


def configure_logging(log_format: str | None = None, level: str = "info") -> None:
    """Configure structlog and route stdlib logging (aiohttp, asyncio) through it."""
    if log_format is None:
        log_format = "console" if sys.stdout.isatty() else "json"
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"unknown log level {level!r}")
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
        if log_format == "console"
        else structlog.processors.JSONRenderer()
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Tracebacks are rendered to text first, so the scrubber sees them too.
    final: list[Any] = [structlog.processors.format_exc_info, scrubber, renderer]
    if isinstance(sys.stdout, io.TextIOWrapper):
        # One line at a time: logs must reach `docker logs` and pipes promptly.
        sys.stdout.reconfigure(line_buffering=True)
    structlog.configure(
        processors=[*shared, *final],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.WriteLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared, structlog.stdlib.ExtraAdder()],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
        )
    )
    handler.addFilter(_ClientGarbageFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    # httpx/httpcore log every request at INFO/DEBUG: noise at our volume.
    for noisy in ("httpx", "httpcore", "hpack", "h2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str = "sidecar") -> Any:
    return structlog.get_logger(name)


def log_access(logger: Any, exchange: Exchange, duration: float) -> None:
    """The one access event per request, with every SPEC §8 field.

    Never the query string, never a header value: the path is logged encoded
    and without its query, and no header is read here at all.
    """
    upstream_time = exchange.upstream_time
    logger.info(
        "access",
        request_id=exchange.request_id,
        method=exchange.method,
        path=exchange.path,
        upstream=exchange.upstream,
        status=exchange.status or None,
        duration_ms=round(duration * 1000, 3),
        pool_wait_ms=round(exchange.pool_wait * 1000, 3),
        upstream_ms=None if upstream_time is None else round(upstream_time * 1000, 3),
        upstream_http_version=exchange.http_version,
        bytes_in=exchange.bytes_in,
        bytes_out=exchange.bytes_out,
        error=exchange.error,
        attempts=len(exchange.attempts),
    )
