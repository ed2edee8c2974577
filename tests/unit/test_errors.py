"""One error vocabulary: every way a request ends is a member of the error tree,
and the metrics' label sets are derived from it (no copied lists)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine, LineTooLong

from sidecar import errors, metrics
from sidecar.errors import (
    BadRequest,
    HeadersTooLarge,
    HttpVersionNotSupported,
    SidecarError,
    UriTooLong,
    client_error_codes,
    codes_counted_as,
    from_parser_error,
)

SIDECAR = Path(__file__).resolve().parents[2] / "sidecar"


def _tree_codes() -> set[str]:
    found, todo = set(), [SidecarError]
    while todo:
        cls = todo.pop()
        found.add(cls.code)
        todo.extend(cls.__subclasses__())
    return found


def test_the_metrics_label_sets_come_from_the_tree() -> None:
    assert codes_counted_as("rejected") == metrics.REJECTION_REASONS
    assert codes_counted_as("upstream") == metrics.UPSTREAM_ERRORS
    assert client_error_codes() == metrics.CLIENT_ERROR_KINDS
    assert {
        "queue_full",
        "pool_timeout",
        "draining",
        "no_route",
        "destination_not_allowed",
        "connect_not_supported",
        "bad_request",
        "request_too_large",
        "deadline_exceeded",
        "rate_limited",
        "circuit_open",
        "upstream_rate_limited",
        "upstream_paused",
        "shared_limits_unavailable",
    } == metrics.REJECTION_REASONS
    assert {
        "upstream_connect_error",
        "upstream_protocol_error",
        "upstream_timeout",
        "upstream_body_error",
    } == metrics.UPSTREAM_ERRORS
    assert "internal_error" not in metrics.REJECTION_REASONS | metrics.UPSTREAM_ERRORS
    assert metrics.CLIENT_CLOSED_STATUS == errors.ClientDisconnected.status == 499


def test_no_outcome_code_is_a_bare_string_outside_the_tree() -> None:
    """Every ``exchange.error = "..."`` in the package names a code of the tree."""
    written: set[str] = set()
    for path in SIDECAR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and any(
                isinstance(target, ast.Attribute)
                and target.attr == "error"
                and isinstance(target.value, ast.Name)
                and target.value.id == "exchange"
                for target in node.targets
            ):
                for value in ast.walk(node.value):
                    if isinstance(value, ast.Constant) and isinstance(value.value, str):
                        written.add(value.value)
    assert written <= _tree_codes(), written - _tree_codes()


@pytest.mark.parametrize(
    ("exc", "line_too_long", "expected", "words"),
    [
        (LineTooLong("x", "8190"), True, UriTooLong, "request line is longer than 100"),
        (LineTooLong("x", "8190"), False, HeadersTooLarge, "a request header is longer than 200"),
        (BadHttpMessage("Too many headers received"), False, HeadersTooLarge, "more than 30"),
        (BadStatusLine("Invalid HTTP version: 'HTTP/1.2'"), False, HttpVersionNotSupported, "HTTP/1.1"),
        (BadHttpMessage("Invalid header value char: b'\\x00evil'"), False, BadRequest, "malformed request"),
    ],
)
def test_parser_errors_map_into_the_tree(
    exc: BadHttpMessage, line_too_long: bool, expected: type[SidecarError], words: str
) -> None:
    error = from_parser_error(exc, line_too_long=line_too_long, max_line_size=100, max_field_size=200, max_headers=30)
    assert type(error) is expected
    assert words in error.message
    assert "evil" not in error.message  # the offending bytes are never quoted back
