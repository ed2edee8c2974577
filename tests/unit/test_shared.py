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


def test_workers_keep_a_shared_rate_whole_and_split_only_its_local_fallback() -> None:
    """Every worker counts the whole 10/s in Redis (together they send 10/s, not 2 x 5/s); the
    split is what each falls back to when Redis is unreachable."""
    config = parse_config(
        "shared: { redis: 'redis://r' }\n"
        "upstreams:\n  a: { url: 'http://a', rate_limit: { rate: 10/s, burst: 5, shared: true } }\n"
    )
    first, second = (worker_config(config, 2, index).upstreams[0].rate_limit for index in (0, 1))
    assert first is not None and first.shared and (first.rate, first.burst) == (10.0, 5)
    assert first.local == (5.0, 3) and second is not None and second.local == (5.0, 2)
    assert worker_config(config, 2, 0).shared == config.shared


def test_a_forked_worker_never_reuses_its_parents_redis_client() -> None:
    """A client made before a fork (outside any event loop) is the parent's: the child makes its own,
    named after its own pid, or its connections would be opened under the parent's name."""
    import os

    from sidecar.config import Shared
    from sidecar.shared import acquire

    settings = Shared(redis="redis://127.0.0.1:1/0")
    parent = acquire(settings)
    assert parent is not None and parent.redis.endpoint.client_name == f"sidecar-{os.getpid()}"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer through the pipe, never return into pytest
        try:
            child = acquire(settings)
            ok = (
                child is not None
                and child is not parent
                and child.redis.endpoint.client_name == f"sidecar-{os.getpid()}"
            )
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    os.close(read)
