"""The rate-limit signal parsers, on the header values the services document."""

from __future__ import annotations

import email.utils

import pytest

from sidecar.policy.signals import (
    Quota,
    may_carry_signal,
    most_restrictive,
    parse_go_duration,
    parse_ratelimit_field,
    parse_reset,
    parse_retry_after,
    read_signals,
)

NOW = 1_700_000_000.0  # a fixed wall-clock time (2023-11-14T22:13:20Z)


def raw(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in pairs]


# ------------------------------------------------------------ Retry-After


@pytest.mark.parametrize(("value", "seconds"), [("120", 120.0), ("0", 0.0), (" 2 ", 2.0), ("3600", 3600.0)])
def test_retry_after_delay_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(value, NOW) == seconds


def test_retry_after_http_date() -> None:
    # RFC 9110's own example form (IMF-fixdate), 90 s after NOW.
    value = email.utils.formatdate(NOW + 90, usegmt=True)
    assert parse_retry_after(value, NOW) == pytest.approx(90.0)
    # The obsolete RFC 850 and asctime forms are HTTP-dates too.
    assert parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", 784111777.0 - 7) == pytest.approx(7.0)


def test_retry_after_date_in_the_past_is_no_wait() -> None:
    assert parse_retry_after("Fri, 31 Dec 1999 23:59:59 GMT", NOW) == 0.0


@pytest.mark.parametrize("value", ["soon", "-1", "1.5", "5s", "", "  ", "2, 3", "Fri, 31 Dec 1999 23:59:59", "1e3"])
def test_retry_after_malformed(value: str) -> None:
    assert parse_retry_after(value, NOW) is None


# ------------------------------------------------------------ Go durations (OpenAI)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("12ms", 0.012), ("20ms", 0.02), ("0s", 0.0), ("1h2m3.5s", 3723.5), ("0.5s", 0.5)],
)
def test_go_durations(value: str, seconds: float) -> None:
    assert parse_go_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "6", "6 minutes", "s", "1x", "-1s", "1s2", ".s", "1.2.3s"])
def test_go_durations_malformed(value: str) -> None:
    assert parse_go_duration(value) is None


# ------------------------------------------------------------ X-RateLimit-Reset


def test_reset_unix_time_and_seconds() -> None:
    assert parse_reset("1700000060", NOW) == pytest.approx(60.0)  # GitHub: a Unix time
    assert parse_reset("60", NOW) == 60.0  # seconds
    assert parse_reset("1372700873", NOW) == 0.0  # a Unix time in the past: now
    assert parse_reset("soon", NOW) is None
    assert parse_reset("-5", NOW) is None


# ------------------------------------------------------------ the RateLimit structured field


def test_ratelimit_field_one_item() -> None:
    assert parse_ratelimit_field('"default";r=50;t=30') == Quota(50, 30.0)
    assert parse_ratelimit_field("default;r=0;t=5") == Quota(0, 5.0)  # a token name


def test_ratelimit_field_most_restrictive_item_wins() -> None:
    # 50 per 30 s (1.67/s) against 900 per 3000 s (0.3/s): the second is tighter.
    assert parse_ratelimit_field('"burst";r=50;t=30, "daily";r=900;t=3000') == Quota(900, 3000.0)
    # The same rate: the longest t wins.
    assert parse_ratelimit_field('"a";r=1;t=1, "b";r=10;t=10') == Quota(10, 10.0)
    assert most_restrictive([]) is None


def test_ratelimit_field_with_partition_key_parameter() -> None:
    assert parse_ratelimit_field('"default";r=3;t=60;pk=:dXNlcjE=:') == Quota(3, 60.0)


@pytest.mark.parametrize(
    "value",
    ['"default";r=abc;t=30', '"default";r=5', '"default";t=5', '"open;r=1;t=1', "", ",", '"a";r=-1;t=1', "1;r=1;t=1"],
)
def test_ratelimit_field_malformed(value: str) -> None:
    assert parse_ratelimit_field(value) is None


# ------------------------------------------------------------ whole responses


def test_github_headers() -> None:
    headers = raw(
        ("x-ratelimit-limit", "60"),
        ("x-ratelimit-remaining", "56"),
        ("x-ratelimit-used", "4"),
        ("x-ratelimit-reset", str(int(NOW) + 1800)),
        ("x-ratelimit-resource", "core"),
    )
    assert may_carry_signal(headers)
    assert read_signals(200, headers, NOW).quota == Quota(56, 1800.0)


def test_github_exhausted_is_remaining_zero() -> None:
    headers = raw(("X-RateLimit-Remaining", "0"), ("X-RateLimit-Reset", str(int(NOW) + 42)))
    assert read_signals(403, headers, NOW).quota == Quota(0, 42.0)


def test_openai_headers() -> None:
    headers = raw(
        ("x-ratelimit-limit-requests", "60"),
        ("x-ratelimit-limit-tokens", "150000"),
        ("x-ratelimit-remaining-requests", "59"),
        ("x-ratelimit-remaining-tokens", "149984"),
        ("x-ratelimit-reset-requests", "1s"),
        ("x-ratelimit-reset-tokens", "6m0s"),
    )
    assert read_signals(200, headers, NOW).quota == Quota(59, 1.0)


def test_draft_06_headers() -> None:
    headers = raw(("RateLimit-Limit", "10"), ("RateLimit-Remaining", "1"), ("RateLimit-Reset", "7"))
    assert read_signals(200, headers, NOW).quota == Quota(1, 7.0)


def test_ietf_headers_with_policy() -> None:
    headers = raw(("RateLimit-Policy", '"default";q=100;w=60'), ("RateLimit", '"default";r=50;t=30'))
    assert read_signals(200, headers, NOW).quota == Quota(50, 30.0)


def test_stripe_style_429() -> None:
    # A 429 with a Retry-After and a per-second quota: the Retry-After wins.
    headers = raw(("Retry-After", "2"), ("X-RateLimit-Remaining", "0"), ("X-RateLimit-Reset", "1"))
    reading = read_signals(429, headers, NOW)
    assert reading.pause == 2.0 and reading.quota is None


def test_retry_after_counts_on_429_and_503_only() -> None:
    assert read_signals(503, raw(("Retry-After", "5")), NOW).pause == 5.0
    assert read_signals(200, raw(("Retry-After", "5")), NOW).empty
    assert read_signals(301, raw(("Retry-After", "5")), NOW).empty


def test_429_without_valid_retry_after_is_no_pause_and_counted() -> None:
    reading = read_signals(429, raw(("Retry-After", "soon")), NOW)
    assert reading.pause is None and reading.ignored == ("retry-after",)
    assert read_signals(429, raw(), NOW).empty


def test_malformed_quota_fields_are_ignored_and_named() -> None:
    headers = raw(
        ("RateLimit", '"default";r=abc;t=30'),
        ("X-RateLimit-Remaining", "lots"),
        ("X-RateLimit-Reset", "60"),
        ("x-ratelimit-remaining-requests", "5"),
        ("x-ratelimit-reset-requests", "6 minutes"),
    )
    reading = read_signals(200, headers, NOW)
    assert reading.quota is None and reading.pause is None
    assert reading.ignored == ("ratelimit", "x-ratelimit-remaining", "x-ratelimit-reset-requests")


def test_a_remaining_without_its_reset_is_no_quota() -> None:
    assert read_signals(200, raw(("X-RateLimit-Remaining", "3")), NOW).empty


def test_most_restrictive_across_families() -> None:
    headers = raw(("RateLimit", '"a";r=100;t=10'), ("X-RateLimit-Remaining", "5"), ("X-RateLimit-Reset", "10"))
    assert read_signals(200, headers, NOW).quota == Quota(5, 10.0)


def test_precheck_on_names_only() -> None:
    assert not may_carry_signal(raw(("Content-Type", "text/plain"), ("Content-Length", "2"), ("Date", "x")))
    assert not may_carry_signal([])
    assert may_carry_signal(raw(("RETRY-AFTER", "1")))
    assert may_carry_signal(raw(("RateLimit", '"a";r=1;t=1')))
    assert may_carry_signal(raw(("X-RateLimit-Reset-Requests", "1s")))
