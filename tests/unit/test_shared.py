"""The shared limits' decisions that need no Redis: when Redis is skipped, when a failure is logged."""

from __future__ import annotations

from sidecar.config import parse_config
from sidecar.shared import RECHECK_AFTER, WARN_EVERY, SharedHealth
from sidecar.workers import worker_config


def test_a_failure_skips_redis_for_a_moment_then_tries_again() -> None:
    health = SharedHealth()
    assert health.usable(0.0) and health.state == "unknown"
    assert health.failed(100.0) is True
    assert health.state == "down"
    assert not health.usable(100.0 + RECHECK_AFTER / 2)
    assert health.usable(100.0 + RECHECK_AFTER)  # tried again well within 5 s of Redis returning
    health.succeeded()
    assert health.state == "ok" and health.usable(100.0)


def test_failures_are_logged_at_most_once_per_ten_seconds_and_all_counted() -> None:
    health = SharedHealth()
    logged = [t for t in (float(i) / 4 for i in range(0, 200)) if health.failed(t)]
    assert logged == [0.0, WARN_EVERY, 2 * WARN_EVERY, 3 * WARN_EVERY, 4 * WARN_EVERY]
    assert health.failures == 200


def test_workers_split_the_local_fallback_of_a_shared_rate_and_keep_it_shared() -> None:
    config = parse_config(
        "shared: { redis: 'redis://r' }\n"
        "upstreams:\n  a: { url: 'http://a', rate_limit: { rate: 10/s, burst: 4, shared: true } }\n"
    )
    limit = worker_config(config, 2, 0).upstreams[0].rate_limit
    assert limit is not None and limit.shared and limit.rate == 5.0 and limit.burst == 2
    assert worker_config(config, 2, 0).shared == config.shared
