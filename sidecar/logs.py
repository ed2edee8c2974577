"""structlog setup: one event per line, secrets scrubbed (docs/observability.md).

One JSON event per line on stdout (console rendering on a TTY or when asked).
Secrets loaded from ${VAR} are scrubbed from every event, whatever logged it
(sidecar/redact.py).

The access line, one per request, is written by :class:`JsonLines` when the
JSON pipeline is the one in use: the same bytes the pipeline would write,
rendered directly, without its chain of processors (most of the line's cost).
"""

from __future__ import annotations

import io
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from json.encoder import encode_basestring_ascii
from typing import Any, TextIO

import structlog
from aiohttp.http_exceptions import HttpProcessingError

from .redact import scrubber

__all__ = ["JsonLines", "configure_logging", "get_logger", "json_lines"]


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
    global _json_lines
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
    processors = [*shared, *final]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.WriteLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    # Below INFO's threshold the access line is filtered out: structlog's own
    # filtering logger drops it for nothing.
    direct = log_format == "json" and numeric_level <= logging.INFO
    _json_lines = JsonLines(sys.stdout, processors) if direct else None
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


class JsonLines:
    """Writes an INFO event as the JSON pipeline configured above would, byte for byte.

    That pipeline is: the event's fields in order, then ``event``, the
    structlog context variables not already there (``worker``), ``level`` and
    ``timestamp``; every string value scrubbed of secrets; ``json.dumps`` with
    its default separators; one line, flushed.  Here the same line is rendered
    without running the chain: values of the types the access line holds
    (None, str, int, float) are encoded as ``json.dumps`` encodes them, into
    a template made once per set of keys.  An event with a value of another
    type is left to the pipeline (:meth:`write` says so), and so is every
    event while something else has taken the pipeline's place
    (``structlog.testing.capture_logs`` swaps its processors in place).
    Single-threaded: the access line is written from the event loop only.
    """

    __slots__ = ("_stream", "_processors", "_renderer", "_templates", "_second", "_stamp")

    def __init__(self, stream: TextIO, processors: list[Any]) -> None:
        self._stream = stream
        self._processors = processors  # the very list structlog holds
        self._renderer = processors[-1]
        self._templates: dict[tuple[tuple[str, ...], str, bool], str] = {}
        self._second = -1  # the whole second _stamp was made for
        self._stamp = ""

    def write(self, event: str, keys: tuple[str, ...], values: Sequence[Any]) -> bool:
        """Write the line; False (nothing written) when only the pipeline can render it."""
        if self._processors[-1] is not self._renderer:
            return False
        context = structlog.contextvars.get_contextvars()
        if context:
            # merge_contextvars adds each one not already a field, after the event.
            context = {key: value for key, value in context.items() if key not in keys and key != "event"}
            if "level" in context or "timestamp" in context:
                return False  # the pipeline sets those in place, where the context put them
        names = (*keys, "event", *context, "level", "timestamp")
        stamp = self._timestamp()
        secrets = False
        if scrubber.secrets:
            # One pass over every string value for a secret (a false hit across
            # two values only costs the slower path); then each value on its own.
            every = (*values, event, *context.values(), "info", stamp)
            text = "\0".join([value for value in every if type(value) is str])
            secrets = scrubber.redact(text) != text
        if secrets:
            scrub = scrubber.redact
            values = [scrub(value) if type(value) is str else value for value in every]
        elif context:
            values = (*values, *context.values())
        try:
            encoded = tuple([_ENCODERS[type(value)](value) for value in values])
        except KeyError:
            return False
        template = self._templates.get((names, event, secrets))
        if template is None:
            template = self._template(names, event, secrets)
        self._stream.write(template % (encoded if secrets else (*encoded, stamp)))
        self._stream.flush()
        return True

    def _template(self, names: tuple[str, ...], event: str, secrets: bool) -> str:
        """The line with a %s for each value.  Without a secret in the line,
        the event's and level's values are written into it once, and the
        timestamp goes in as it is (digits and punctuation: nothing to escape)."""
        fixed: dict[str, str] = {}
        if not secrets:
            fixed = {"event": encode_basestring_ascii(event).replace("%", "%%"), "level": '"info"', "timestamp": '"%s"'}
        items = (f"{encode_basestring_ascii(name).replace('%', '%%')}: {fixed.get(name, '%s')}" for name in names)
        template = self._templates[(names, event, secrets)] = "{" + ", ".join(items) + "}\n"
        return template

    def _timestamp(self) -> str:
        """What TimeStamper(fmt="iso", utc=True) writes: ``datetime.isoformat()``
        in UTC with ``Z``, the microseconds left out when they are zero."""
        second, nanos = divmod(time.time_ns(), 1_000_000_000)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        micros = nanos // 1000
        return f"{self._stamp}.{micros:06d}Z" if micros else f"{self._stamp}Z"


def _float(value: float) -> str:
    # json.dumps writes NaN and ±Infinity for the values float's repr calls nan and inf.
    return float.__repr__(value) if math.isfinite(value) else json.dumps(value)


# json.dumps's encoding of each plain type (ensure_ascii, as the pipeline's default).
_ENCODERS: dict[type, Callable[[Any], str]] = {
    str: encode_basestring_ascii,
    int: int.__repr__,
    float: _float,
    type(None): lambda _: "null",
}


_json_lines: JsonLines | None = None


def json_lines() -> JsonLines | None:
    """The direct writer of JSON lines, when configure_logging set up JSON output at INFO or below."""
    return _json_lines
