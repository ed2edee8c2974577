"""The local rate limit: the GCRA core with a fake clock, and its stage's decisions."""

from __future__ import annotations

import asyncio
import random

import pytest

from sidecar.config import RateLimit, parse_config
from sidecar.errors import RateLimited
from sidecar.exchange import Exchange
from sidecar.policy.rate_limit import RateCore, RateLimitStage, rate_limit_stages
from sidecar.workers import worker_config


def test_a_full_bucket_gives_burst_tokens_at_once_then_one_per_interval() -> None:
    core = RateCore(10.0, 2)
    assert [core.reserve(100.0, 0.0) for _ in range(3)] == [(True, 0.0), (True, 0.0), (False, pytest.approx(0.1))]
    assert core.reserve(100.1, 0.0) == (True, 0.0)
    assert core.reserve(100.1, 0.0)[0] is False


def test_a_token_within_the_allowance_is_reserved_in_arrival_order() -> None:
    core = RateCore(10.0, 1)
    assert core.reserve(0.0, 1.0) == (True, 0.0)
    waits = [core.reserve(0.0, 1.0) for _ in range(5)]
    assert [taken for taken, _ in waits] == [True] * 5
    assert [wait for _, wait in waits] == pytest.approx([0.1 * i for i in range(1, 6)])
    # The sixth waiter would need 0.6 s more than it may wait: refused, nothing taken.
    taken, wait = core.reserve(0.0, 0.5)
    assert taken is False and wait == pytest.approx(0.6)
    assert core.reserve(0.0, 0.6 + 1e-9)[0] is True


def test_refund_gives_a_reserved_token_back() -> None:
    core = RateCore(1.0, 1)
    assert core.reserve(0.0, 0.0)[0]
    assert not core.reserve(0.0, 0.0)[0]
    core.refund()
    assert core.tokens(0.0) == pytest.approx(1.0)
    assert core.reserve(0.0, 0.0)[0]


def test_tokens_refill_to_burst_and_no_further() -> None:
    core = RateCore(2.0, 4)
    for _ in range(4):
        assert core.reserve(0.0, 0.0)[0]
    assert core.tokens(0.0) == pytest.approx(0.0)
    assert core.tokens(1.0) == pytest.approx(2.0)
    assert core.tokens(100.0) == pytest.approx(4.0)


@pytest.mark.parametrize(("rate", "burst"), [(10.0, 1), (10.0, 2), (100.0, 20), (0.5, 3), (1 / 60, 1)])
def test_over_any_window_no_more_than_burst_plus_rate_times_window(rate: float, burst: int) -> None:
    """Thousands of random arrivals: in every window of length w the grants stay
    within burst + rate * w (the GCRA bound)."""
    rng = random.Random(7)
    core = RateCore(rate, burst)
    now, granted = 0.0, []
    horizon = 50.0 / rate
    while now < horizon:
        now += rng.expovariate(rate * 3)
        ok, wait = core.reserve(now, 0.0)
        if ok:
            assert wait == 0.0
            granted.append(now)
    assert granted
    for i, start in enumerate(granted):
        for width in (0.5 / rate, 1 / rate, 5 / rate):
            inside = sum(1 for t in granted[i:] if t < start + width)
            assert inside <= burst + rate * width + 1e-9
    # And the long-run rate is the configured one.
    assert len(granted) <= burst + rate * horizon + 1


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert RateCore.retry_after(0.01) == 1
    assert RateCore.retry_after(1.0) == 1
    assert RateCore.retry_after(1.01) == 2
    assert RateCore.retry_after(1e9) == 3600


def test_bad_core_values_are_refused() -> None:
    with pytest.raises(ValueError):
        RateCore(0.0, 1)
    with pytest.raises(ValueError):
        RateCore(1.0, 0)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _exchange(deadline: float | None = None) -> Exchange:
    exchange = Exchange(request_id="r", method="GET", path="/", started=1000.0)
    exchange.deadline = deadline
    return exchange


async def test_the_stage_refuses_at_once_when_the_token_is_past_the_allowance() -> None:
    clock = _Clock()
    stage = RateLimitStage("api", RateLimit(rate=1.0, burst=1), clock=clock)
    first = _exchange()
    await stage.admit(first)  # no pool: no allowance at all, but a token is free
    with pytest.raises(RateLimited) as info:
        await stage.admit(_exchange())
    assert info.value.status == 429 and info.value.code == "rate_limited"
    assert info.value.retry_after == 1
    assert stage.waiting == 0


async def test_a_request_refused_later_gives_its_token_back_and_a_sent_one_does_not() -> None:
    clock = _Clock()
    stage = RateLimitStage("api", RateLimit(rate=1.0, burst=1), clock=clock)
    refused_later = _exchange()
    await stage.admit(refused_later)
    stage.release(refused_later)  # no attempt was made: the token is back
    sent = _exchange()
    await stage.admit(sent)
    sent.begin_attempt(clock.now)
    stage.release(sent)
    with pytest.raises(RateLimited):
        await stage.admit(_exchange())


async def test_a_cancelled_wait_gives_its_reservation_back() -> None:
    class _Pool:
        class admission:
            pool_timeout = 10.0

    stage = RateLimitStage("api", RateLimit(rate=1.0, burst=1))
    first = _exchange()
    await stage.admit(first)
    after_first = stage.core._tat
    waiter = Exchange(request_id="w", method="GET", path="/", started=0.0)
    waiter.pool = _Pool()  # type: ignore[assignment]
    task = asyncio.ensure_future(stage.admit(waiter))
    await asyncio.sleep(0.01)
    assert stage.waiting == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stage.waiting == 0
    # Only the first token is taken: the cancelled reservation went back.
    assert stage.core._tat == pytest.approx(after_first)


def test_no_rate_limit_no_stage_and_workers_divide_it() -> None:
    config = parse_config(
        """
        workers: 3
        defaults: { rate_limit: { rate: 30/s, burst: 10 } }
        upstreams:
          a: { url: "http://127.0.0.1:1", limits: { max_connections: 3 } }
          b: { url: "http://127.0.0.1:2", limits: { max_connections: 3 }, rate_limit: null }
          c: { url: "http://127.0.0.1:3", limits: { max_connections: 3 }, rate_limit: { rate: 1/m, burst: 1 } }
        """
    )
    a, b, _ = config.upstreams
    assert a.rate_limit == RateLimit(rate=30.0, burst=10)
    assert b.rate_limit is None and rate_limit_stages(b) == []
    shares = [worker_config(config, 3, i).upstreams for i in range(3)]
    assert [s[0].rate_limit for s in shares] == [
        RateLimit(rate=10.0, burst=4),
        RateLimit(rate=10.0, burst=3),
        RateLimit(rate=10.0, burst=3),
    ]
    assert all(s[1].rate_limit is None for s in shares)
    third = [s[2].rate_limit for s in shares]
    assert all(limit is not None and limit.burst == 1 for limit in third)
    assert [limit.rate for limit in third if limit is not None] == pytest.approx([1 / 180] * 3)
