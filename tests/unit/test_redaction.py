"""Secrets from ${VAR} and headers.set never reach /config or a log line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from sidecar.config import parse_config, public_view
from sidecar.redact import REDACTED, SecretScrubber, contains_secret, redact

ENV = {"API_KEY": "k-0123456789", "BASE": "b-secretpath", "ADMIN_TOKEN": "t-admin-987", "PORT": "8443"}
YAML = """
admin: {listen: 127.0.0.1:8089, token: "${ADMIN_TOKEN}"}
upstreams:
  payments:
    url: https://payments.internal:${PORT}/${BASE}
    headers:
      set:
        Authorization: "Bearer ${API_KEY}"
        X-Static: literal-value-not-from-env
      remove: [X-Debug]
  plain:
    url: http://plain.internal/api
"""


def test_public_view_redacts_every_var_derived_value_and_every_set_header() -> None:
    config = parse_config(YAML, env=ENV)
    view = public_view(config)
    text = json.dumps(view)
    for secret in ENV.values():
        if secret != "8443":
            assert secret not in text, secret
    assert "literal-value-not-from-env" not in text
    payments = view["upstreams"]["payments"]
    assert payments["headers"] == {"set": {"Authorization": REDACTED, "X-Static": REDACTED}, "remove": ["X-Debug"]}
    assert payments["url"] == REDACTED
    assert payments["base_path"] == REDACTED
    assert view["admin"]["token"] == REDACTED
    # What is not secret stays readable.
    assert view["upstreams"]["plain"]["url"] == "http://plain.internal/api"
    assert payments["limits"]["max_connections"] == 100
    assert payments["route"]["path_prefix"] == "/payments"


def test_scrubber_replaces_secrets_inside_strings_longest_first() -> None:
    scrubber = SecretScrubber()
    scrubber.update(frozenset({"abc", "abcdef", "xy"}))  # too short to scrub safely: "xy"
    event = scrubber(None, "info", {"event": "x", "a": "pre abcdef post abc", "n": 3, "b": "xy"})
    assert event == {"event": "x", "a": f"pre {REDACTED} post {REDACTED}", "n": 3, "b": "xy"}


def test_one_off_redaction_and_whole_value_hiding_share_the_rules() -> None:
    secrets = {"abc", "abcdef", "xy"}
    assert redact("pre abcdef post abc xy", secrets) == f"pre {REDACTED} post {REDACTED} xy"
    # Hiding a whole value: any secret counts, however short.
    assert contains_secret("http://h/xy", secrets)
    assert not contains_secret("http://h/", secrets)


def test_configured_logging_scrubs_tracebacks_and_silences_httpx() -> None:
    script = textwrap.dedent(
        """
        import logging
        from sidecar.logs import configure_logging, get_logger
        from sidecar.redact import scrubber
        configure_logging("json", "info")
        scrubber.update(frozenset({"s3cr3t-value"}))
        log = get_logger("t")
        try:
            raise RuntimeError("boom s3cr3t-value")
        except RuntimeError:
            log.exception("structlog_failure")
            logging.getLogger("aiohttp.server").exception("stdlib_failure")
        logging.getLogger("httpx").info("HTTP Request: GET http://x/?token=s3cr3t-value")
        logging.getLogger("httpcore").info("chatter")
        log.info("plain", detail="has s3cr3t-value inside")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["event"] for line in lines] == ["structlog_failure", "stdlib_failure", "plain"]
    assert all("exception" in line for line in lines[:2])
    assert "RuntimeError" in lines[1]["exception"]
    assert "s3cr3t-value" not in result.stdout + result.stderr
