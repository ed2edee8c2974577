"""Splitting host-wide limits across workers: shares sum to the configured totals."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import ConfigError, HostPort, load_config
from sidecar.workers import check_divisible, share, worker_admin, worker_config
from tests.support.yaml import one_upstream, write_config


@pytest.mark.parametrize("total", [0, 1, 2, 3, 7, 10, 100, 1001])
@pytest.mark.parametrize("workers", [1, 2, 3, 4, 7])
def test_shares_sum_to_the_total_and_differ_by_at_most_one(total: int, workers: int) -> None:
    parts = [share(total, workers, index) for index in range(workers)]
    assert sum(parts) == total
    assert max(parts) - min(parts) <= 1


def _config(tmp_path: Path, **limits: int) -> Path:
    return write_config(tmp_path, one_upstream("http://127.0.0.1:9", limits=limits))


def test_worker_config_splits_every_limit(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, max_connections=5, max_pending=3, max_keepalive_connections=4))
    shares = [worker_config(config, 2, index).upstreams[0].limits for index in range(2)]
    assert [s.max_connections for s in shares] == [3, 2]
    assert [s.max_concurrent_requests for s in shares] == [3, 2]
    assert [s.max_pending for s in shares] == [2, 1]
    assert [s.max_keepalive_connections for s in shares] == [2, 2]
    assert all(worker_config(config, 2, i).workers == 2 for i in range(2))
    assert worker_config(config, 1, 0) is config


def test_fewer_connections_than_workers_is_a_config_error(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, max_connections=2))
    with pytest.raises(ConfigError) as caught:
        check_divisible(config, 3)
    assert caught.value.path == "upstreams.api.limits.max_connections"
    assert "must be at least workers (3)" in str(caught.value)
    check_divisible(config, 2)


def test_each_worker_gets_its_own_admin_port(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, max_connections=4))  # admin defaults to 127.0.0.1:8089
    assert [worker_admin(config, "config", index) for index in range(3)] == [
        HostPort("127.0.0.1", 8089),
        HostPort("127.0.0.1", 8090),
        HostPort("127.0.0.1", 8091),
    ]
    assert worker_admin(config, HostPort("0.0.0.0", 9000), 1) == HostPort("0.0.0.0", 9001)
    assert worker_admin(config, HostPort("127.0.0.1", 0), 1) == HostPort("127.0.0.1", 0)  # each picks a free one
    assert worker_admin(config, None, 1) is None  # --admin off
