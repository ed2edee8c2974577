"""The weighted fair admission core and the gradient limit: plain code, no event loop."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from sidecar.config import ConfigError, parse_config
from sidecar.policy.adaptive import PROBE_EVERY, GradientLimit
from sidecar.policy.fair_core import FairAdmissionCore


def backlogged_grants(weights: dict[str, float], rounds: int, capacity: int = 4) -> dict[str, int]:
    """Every caller keeps 20 waiting; count who gets each freed slot."""
    core: FairAdmissionCore[int] = FairAdmissionCore(capacity, 1000, weights)
    ids = itertools.count()
    owner: dict[int, str] = {}
    for _ in range(capacity):
        assert core.try_acquire("seed")
    for name in weights:
        for _ in range(20):
            waiter = next(ids)
            owner[waiter] = name
            assert core.can_wait(name)
            core.enqueue(waiter, name)
    granted = dict.fromkeys(weights, 0)
    holder = ["seed"] * capacity
    for turn in range(rounds):
        got = core.release(caller=holder[turn % capacity])
        assert got is not None
        name = owner[got]
        granted[name] += 1
        holder[turn % capacity] = name
        waiter = next(ids)  # closed loop: the caller sends its next request
        owner[waiter] = name
        core.enqueue(waiter, name)
    return granted


def test_weights_9_to_1_give_the_heavier_caller_90_percent() -> None:
    granted = backlogged_grants({"live": 9, "batch": 1}, 1000)
    assert 880 <= granted["live"] <= 920


def test_equal_weights_split_evenly() -> None:
    granted = backlogged_grants({"a": 1, "b": 1, "c": 1}, 900)
    assert all(290 <= count <= 310 for count in granted.values())


def test_one_caller_is_fifo_and_may_use_every_slot() -> None:
    core: FairAdmissionCore[int] = FairAdmissionCore(3, 100, {"live": 9})
    assert all(core.try_acquire("batch") for _ in range(3))
    assert not core.try_acquire("batch")
    for waiter in range(10):
        core.enqueue(waiter, "batch")
    order = [core.release(caller="batch") for _ in range(10)]
    assert order == list(range(10))
    assert core.in_flight == 3 and core.pending == 0


def test_an_idle_caller_saves_no_credit() -> None:
    core: FairAdmissionCore[str] = FairAdmissionCore(1, 100)
    assert core.try_acquire("a")
    for i in range(50):  # a alone for a long time
        core.enqueue(f"a{i}", "a")
        core.release(caller="a")
    for i in range(5):
        core.enqueue(f"a-late{i}", "a")
    for i in range(5):
        core.enqueue(f"b{i}", "b")
    order = [core.release(caller="x") for _ in range(10)]
    # b arrives and alternates with a from then on; it does not take all 5 first.
    assert order[:4].count("b0") + order[:4].count("b1") <= 2


def test_queue_share_refuses_the_greedy_caller_while_others_wait() -> None:
    core: FairAdmissionCore[str] = FairAdmissionCore(1, 20, {"live": 1, "batch": 1})
    assert core.try_acquire("batch")
    for i in range(20):  # alone, batch may fill the whole queue
        assert core.can_wait("batch")
        assert core.enqueue(f"b{i}", "batch") is None
    assert not core.can_wait("batch")
    evicted = []
    for i in range(10):  # live is under its share: batch's newest make room
        assert core.can_wait("live")
        evicted.append(core.enqueue(f"l{i}", "live"))
    assert evicted == [f"b{i}" for i in range(19, 9, -1)]
    assert not core.can_wait("live")  # live at its share (10 of 20) now
    assert not core.can_wait("batch")
    assert core.pending == 20
    assert core.per_caller() == {"batch": (1, 10), "live": (0, 10)}


def test_share_is_at_least_one() -> None:
    core: FairAdmissionCore[str] = FairAdmissionCore(1, 2, {"big": 1000})
    assert core.try_acquire("x")
    core.enqueue("big1", "big")
    core.enqueue("big2", "big")
    assert core.can_wait("small")
    assert core.enqueue("small1", "small") == "big2"


def test_random_storm_keeps_the_counts_exact() -> None:
    rng = random.Random(7)
    core: FairAdmissionCore[int] = FairAdmissionCore(4, 30, {"a": 3, "b": 1})
    held: list[str] = []
    queued: dict[int, str] = {}
    for step in range(20000):
        name = rng.choice("abcd")
        action = rng.random()
        if action < 0.45:
            if core.try_acquire(name):
                held.append(name)
            elif core.can_wait(name):
                evicted = core.enqueue(step, name)
                queued[step] = name
                if evicted is not None:
                    queued.pop(evicted)
        elif action < 0.85 and held:
            got = core.release(caller=held.pop(rng.randrange(len(held))))
            if got is not None:
                held.append(queued.pop(got))
        elif queued:
            waiter = rng.choice(list(queued))
            assert core.remove(waiter)
            queued.pop(waiter)
        assert core.in_flight == len(held) <= 4
        assert core.pending == len(queued) <= 30
    while held:
        got = core.release(caller=held.pop())
        if got is not None:
            held.append(queued.pop(got))
    assert core.in_flight == 0 and core.pending == 0 and core.per_caller() == {}


def drive(limit: GradientLimit, now: float, seconds: float, capacity_of_upstream: int, service: float) -> float:
    """A closed loop at an upstream that serves ``capacity_of_upstream`` at once."""
    step = 0.01
    end = now + seconds
    limit.sample(service, 1, now)  # the first request meets an idle upstream
    while now < end:
        in_flight = limit.capacity
        latency = service * max(1.0, in_flight / capacity_of_upstream)
        for _ in range(max(1, int(in_flight * step / latency) + 1)):
            limit.sample(latency, in_flight, now)
        now += step
    return now


def test_gradient_finds_a_congested_upstreams_capacity_and_follows_it_up() -> None:
    limit = GradientLimit(1, 100, 0.0)
    now = drive(limit, 0.0, 3.0, 8, 0.05)
    assert 8 <= limit.capacity <= 20
    now = drive(limit, now, 10.0, 8, 0.05)
    assert 8 <= limit.capacity <= 20  # the probes do not let it drift
    drive(limit, now, 5.0, 32, 0.05)
    assert limit.capacity >= 28


def test_gradient_never_grows_an_unused_limit_or_leaves_its_bounds() -> None:
    limit = GradientLimit(3, 50, 0.0)
    now = 0.0
    for _ in range(5000):  # fast answers but only 2 in flight
        now += 0.01
        limit.sample(0.01, 2, now)
    assert limit.capacity <= 20
    for _ in range(5000):  # slow whatever the load: it stays near what is used
        now += 0.01
        limit.sample(5.0, 3, now)
    assert 3 <= limit.capacity <= 6
    for _ in range(5000):  # congested: down to the floor, never under it
        now += 0.01
        limit.sample(0.01 * 100 ** (limit.capacity / 3), limit.capacity, now)
        assert 3 <= limit.capacity <= 50
    assert limit.capacity <= 4


def test_gradient_remeasures_the_minimum_by_halving_not_dropping_to_the_floor() -> None:
    limit = GradientLimit(1, 100, 0.0)
    now = 0.0
    seen = set()
    while now < PROBE_EVERY * 3:
        now += 0.01
        limit.sample(0.05, limit.capacity, now)
        seen.add(limit.capacity)
    assert min(seen) >= 10  # never down to 1 while it measures


def test_config_callers_and_adaptive() -> None:
    config = parse_config(
        """
callers: {header: X-Who, weights: {live: 9, batch: 1}}
defaults: {limits: {adaptive: true}}
upstreams:
  a: {url: "http://127.0.0.1:1", limits: {min_concurrent: 4, max_concurrent_requests: 10}}
"""
    )
    upstream = config.upstreams[0]
    assert upstream.callers.header == "X-Who"
    assert upstream.callers.weights == (("live", 9.0), ("batch", 1.0))
    assert upstream.limits.adaptive and upstream.limits.min_concurrent == 4


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("callers: {weights: {other: 2}}", "callers.weights"),
        ("callers: {weights: {live: 0}}", "callers.weights"),
        ("callers: {weights: {live: yes}}", "callers.weights"),
        ("callers: {weights: [live]}", "callers.weights"),
        ("callers: {header: 'not a header'}", "callers.header"),
        ("callers: {colour: red}", "callers"),
        ("defaults: {limits: {adaptive: maybe}}", "defaults.limits.adaptive"),
        ("defaults: {limits: {min_concurrent: 0}}", "defaults.limits.min_concurrent"),
        ("defaults: {limits: {min_concurrent: 20, max_concurrent_requests: 10}}", "defaults.limits.min_concurrent"),
    ],
)
def test_bad_caller_and_adaptive_settings_name_their_path(text: str, path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text + '\nupstreams: {a: {url: "http://127.0.0.1:1"}}')
    assert path in str(caught.value)


async def test_shell_storm_with_cancellations_and_evictions_leaks_nothing() -> None:
    import asyncio

    from sidecar.errors import PoolTimeout, QueueFull
    from sidecar.policy.admission import Admission

    admission = Admission("api", capacity=3, max_pending=10, pool_timeout=30.0, weights={"a": 3, "b": 1})
    rng = random.Random(3)
    outcomes: Counter[str] = Counter()

    async def one(caller: str) -> None:
        try:
            await admission.acquire(None, caller)
        except (QueueFull, PoolTimeout) as error:
            outcomes[error.code] += 1
            return
        try:
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        finally:
            admission.release(0.001, caller)
        outcomes["ok"] += 1

    tasks = []
    for _ in range(2000):
        tasks.append(asyncio.create_task(one(rng.choice("abc"))))
        if rng.random() < 0.3:
            rng.choice(tasks).cancel()
        if rng.random() < 0.5:
            await asyncio.sleep(0)
    await asyncio.gather(*tasks, return_exceptions=True)
    assert admission.in_flight == 0 and admission.pending == 0 and admission.per_caller() == {}
    assert admission._started == {} and admission._allowed == {} and admission._caller == {}
    assert outcomes["ok"] > 0 and outcomes["queue_full"] > 0


def test_the_stage_learns_from_answers_not_from_refusals_or_failures() -> None:
    import math

    from sidecar.exchange import Attempt, Exchange
    from sidecar.policy.adaptive import AdaptiveStage
    from sidecar.policy.admission import Admission

    admission = Admission("api", capacity=100, max_pending=10, pool_timeout=1.0)
    limit = GradientLimit(1, 100, 0.0)
    clock = [0.0]
    stage = AdaptiveStage(admission, limit, clock=lambda: clock[0])
    assert admission.capacity == limit.capacity == 20  # it acts through admission's capacity
    exchange = Exchange(request_id="r", method="GET", path="/", started=0.0)
    for status in (503, 500, 429, None):
        for _ in range(20):
            clock[0] += 0.02
            stage.observe(exchange, Attempt(number=1, started=0.0, status=status, headers_after=0.001))
    assert limit.min_rtt == math.inf
    stage.observe(exchange, Attempt(number=1, started=0.0, status=404, headers_after=0.05))
    assert limit.min_rtt == 0.05


def test_host_totals_add_callers_and_limits_but_not_the_minimum_latency() -> None:
    from sidecar.hostadmin import merge_pools

    one = {
        "api": {
            "concurrency_limit": 12,
            "adaptive": {"limit": 12.5, "min_rtt_ms": 50.0},
            "callers": {"a": {"in_flight": 1, "pending": 2}},
        }
    }
    two = {
        "api": {
            "concurrency_limit": 10,
            "adaptive": {"limit": 10.0, "min_rtt_ms": 52.0},
            "callers": {"a": {"in_flight": 3, "pending": 0}, "b": {"in_flight": 1, "pending": 0}},
        }
    }
    merged = merge_pools([one, two])["api"]
    assert merged["concurrency_limit"] == 22
    assert merged["adaptive"]["min_rtt_ms"] == 52.0
    assert merged["callers"] == {"a": {"in_flight": 4, "pending": 2}, "b": {"in_flight": 1, "pending": 0}}


def test_a_caller_name_is_visible_ascii_up_to_64_characters() -> None:
    from sidecar.config.scalars import caller_name

    for code in range(0x110):
        char = chr(code)
        assert caller_name(char) is ("!" <= char <= "~"), repr(char)
    assert caller_name("checkout") and caller_name("x" * 64)
    assert not caller_name("") and not caller_name("x" * 65) and not caller_name("check out")
    assert not caller_name("caf\u00e9") and not caller_name("tab\t")
