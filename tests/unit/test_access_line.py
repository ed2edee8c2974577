"""The access line written directly is the line structlog's JSON pipeline writes, byte for byte.

Each case logs the same access fields twice in a child process set up by
``configure_logging("json")``: once through ``log_access`` with the access
logger (the direct writer) and once through a structlog logger of its own (the
pipeline).  The two lines must be equal but for the timestamp's value.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent(
    """
    import math, sys, time
    import structlog
    from structlog.testing import capture_logs
    from sidecar.exchange import Exchange
    from sidecar.logs import configure_logging, get_logger, json_lines
    from sidecar.observe import access_log, log_access
    from sidecar.redact import scrubber

    configure_logging("json", "info")
    pipeline = get_logger("sidecar.access.pipeline")

    def exchange(**fields):
        made = Exchange("r" * 32, "GET", "/a/b", started=100.0)
        for name, value in fields.items():
            setattr(made, name, value)
        return made

    cases = [
        exchange(),
        exchange(upstream="api", status=200, pool_wait=0.0000123, upstream_time=0.000456, http_version="HTTP/1.1",
                 bytes_in=12, bytes_out=1024, caller="checkout", deadline=102.5),
        exchange(path="/caf\\u00e9/%2F\\"quoted\\"\\\\back\\x01\\u2028", method="PURGE", error="upstream_timeout",
                 request_id="id-with-%s-and-%%"),
        exchange(upstream="api", status=503, error="queue_full", pool_wait=1.5, caller="other"),
        exchange(upstream_time=float("nan"), pool_wait=float("inf")),
        exchange(status=True),  # a value the direct writer leaves to the pipeline
    ]
    for case in cases:
        print("case", flush=True)
        log_access(access_log, case, 0.0123456)
        log_access(pipeline, case, 0.0123456)
    print("secrets", flush=True)
    scrubber.update(frozenset({"s3cr3t", "ccess"}))
    case = exchange(path="/x/s3cr3t/y", request_id="s3cr3t-id", upstream="api")
    log_access(access_log, case, 0.5)
    log_access(pipeline, case, 0.5)
    log_access(access_log, cases[1], 0.5)  # secrets loaded, none in this line
    log_access(pipeline, cases[1], 0.5)
    scrubber.update(frozenset())
    print("context", flush=True)
    structlog.contextvars.bind_contextvars(worker=3, path="not this one", event="nor this", zone="eu-1")
    log_access(access_log, cases[1], 0.25)
    log_access(pipeline, cases[1], 0.25)
    structlog.contextvars.bind_contextvars(level="context level")
    log_access(access_log, cases[1], 0.25)
    log_access(pipeline, cases[1], 0.25)
    structlog.contextvars.clear_contextvars()
    print("captured", flush=True)
    with capture_logs() as events:
        log_access(access_log, cases[1], 0.25)
    print(len(events), events[0]["event"], events[0]["upstream"], flush=True)
    print("zero micros", flush=True)
    time.time_ns = lambda: 1_764_547_200 * 10**9 + 999
    print(json_lines()._timestamp(), flush=True)
    """
)
_TIMESTAMP = re.compile(r'"timestamp": "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z"')


def _blocks(output: str) -> dict[str, list[list[str]]]:
    blocks: dict[str, list[list[str]]] = {}
    for line in output.splitlines():
        if not line.startswith("{"):
            blocks.setdefault(line, []).append([])
        else:
            blocks[next(reversed(blocks))][-1].append(line)
    return blocks


@pytest.fixture(scope="module")
def output() -> str:
    result = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=60, check=True)
    return result.stdout


def test_direct_access_lines_are_the_pipelines_lines(output: str) -> None:
    blocks = _blocks(output)
    lines = [line for name in ("case", "secrets", "context") for block in blocks[name] for line in block]
    assert len(lines) == 20
    for direct, piped in zip(lines[::2], lines[1::2], strict=True):
        assert _TIMESTAMP.search(direct) and _TIMESTAMP.search(piped)
        assert _TIMESTAMP.sub("T", direct) == _TIMESTAMP.sub("T", piped)
        assert json.loads(direct)["request_id"]
    secret = blocks["secrets"][0][0]
    assert "s3cr3t" not in secret and '"event": "a<redacted>"' in secret
    in_context = json.loads(blocks["context"][0][0])
    assert in_context["worker"] == 3 and in_context["zone"] == "eu-1" and in_context["path"] == "/a/b"
    keys = list(in_context)
    assert keys.index("caller") < keys.index("event") < keys.index("worker") < keys.index("level")


def test_direct_writer_steps_aside_for_capture_logs_and_stamps_like_structlog(output: str) -> None:
    blocks = _blocks(output)
    lines = output.splitlines()
    captured = lines[lines.index("captured") + 1]
    assert captured == "1 access api"
    assert blocks["captured"] == [[]]
    # isoformat() leaves the fraction out when the microseconds are zero.
    assert lines[lines.index("zero micros") + 1] == "2025-12-01T00:00:00Z"
