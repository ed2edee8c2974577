"""structlog setup: one event per line, secrets scrubbed (docs/observability.md).

One JSON event per line on stdout (console rendering on a TTY or when asked).
Secrets loaded from ${VAR} are scrubbed from every event, whatever logged it
(sidecar/redact.py).
"""

from __future__ import annotations

import io
import logging
import sys
from typing import Any

import structlog
from aiohttp.http_exceptions import HttpProcessingError

from .redact import scrubber


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
