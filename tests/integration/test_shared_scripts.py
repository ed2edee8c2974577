"""The shared limits' scripts against a real redis-server: the GCRA take and the refund's arithmetic.

The interval is one second, so the microseconds that pass between the calls
of a test are negligible next to it; the server's clock (TIME) is read
around each call to bracket when it ran.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sidecar.redis_wire import Command, Redis, endpoint_from_url
from sidecar.shared import SCRIPTS
from tests.support.redis import RedisServer

pytestmark = pytest.mark.timeout(60)

SECOND = 1_000_000  # µs
INTERVAL = SECOND  # rate: 1/s
BURST = 10
KEYS = ("t:{api}:rate", "t:{api}:rate_takes")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    redis = Redis(endpoint_from_url(redis_server.url), 1.0, tuple(SCRIPTS.values()))
    yield redis
    await redis.aclose()


TAKE = Command(SCRIPTS["gcra"], KEYS, (INTERVAL, INTERVAL * BURST))
REFUND = Command(SCRIPTS["refund"], KEYS, (INTERVAL,))


def now_us(server: RedisServer) -> int:
    seconds, micros = server.query("TIME")
    return int(seconds) * SECOND + int(micros)


def tat(server: RedisServer) -> int:
    value = server.query("GET", KEYS[0])
    return 0 if value is None else int(value)


async def take(client: Redis, server: RedisServer) -> tuple[int, int]:
    """One granted take: (its number, the server time just before it)."""
    before = now_us(server)
    granted, _wait, number = await client.call(TAKE, (10 * SECOND,))
    assert granted == 1
    return int(number), before


async def test_a_refund_in_a_drawn_down_bucket_gives_exactly_one_interval_back(
    client: Redis, redis_server: RedisServer
) -> None:
    """5 tokens spent, mine taken, two others after it: the TAT goes back exactly one interval."""
    redis_server.query("SET", KEYS[0], now_us(redis_server) + 5 * INTERVAL)
    redis_server.query("SET", KEYS[1], 1000)
    mine, _ = await take(client, redis_server)
    await take(client, redis_server)
    await take(client, redis_server)
    before = tat(redis_server)
    assert await client.call(REFUND, (mine,)) == 1
    assert tat(redis_server) == before - INTERVAL
    # The takes counter is untouched: it numbers takes, and refunds are not takes.
    assert int(redis_server.query("GET", KEYS[1])) == mine + 2


async def test_a_refund_right_after_a_take_from_a_full_bucket_leaves_it_full(
    client: Redis, redis_server: RedisServer
) -> None:
    mine, taken_at = await take(client, redis_server)
    assert tat(redis_server) >= taken_at + INTERVAL
    assert await client.call(REFUND, (mine,)) == 1
    after = now_us(redis_server)
    # At most "now": every token is free again, and none more than burst.
    assert taken_at <= tat(redis_server) <= after


async def test_a_refund_never_goes_below_the_tat_without_that_token(client: Redis, redis_server: RedisServer) -> None:
    """Full bucket: mine, then two others.  Without mine, the others alone make TAT = their first + 2 intervals
    (the bucket was full when they came); the refund must not go under that, though TAT - interval would."""
    mine, _ = await take(client, redis_server)
    _, second_at = await take(client, redis_server)
    await take(client, redis_server)
    with_mine = tat(redis_server)
    assert await client.call(REFUND, (mine,)) == 1
    without_mine_at_least = second_at + 2 * INTERVAL
    assert tat(redis_server) >= without_mine_at_least
    assert with_mine - INTERVAL < without_mine_at_least  # the naive refund would have gone below it
    assert tat(redis_server) < with_mine  # but something came back: the bucket was not drawn down by others


async def test_a_refund_of_a_token_the_bucket_has_since_refilled_for_changes_nothing(
    client: Redis, redis_server: RedisServer
) -> None:
    mine, _ = await take(client, redis_server)
    redis_server.query("SET", KEYS[0], now_us(redis_server) - SECOND)  # as if a second had passed: full again
    before = tat(redis_server)
    assert await client.call(REFUND, (mine,)) == 0
    assert tat(redis_server) == before


async def test_no_refund_without_the_takes_counter_it_was_numbered_by(client: Redis, redis_server: RedisServer) -> None:
    """A counter that is gone (a restarted Redis, a flush) cannot say how many came after: nothing is refunded."""
    mine, _ = await take(client, redis_server)
    redis_server.query("DEL", KEYS[1])
    before = tat(redis_server)
    assert await client.call(REFUND, (mine,)) == 0
    assert tat(redis_server) == before


async def test_a_new_counter_starts_past_every_number_handed_out_before(
    client: Redis, redis_server: RedisServer
) -> None:
    first, _ = await take(client, redis_server)
    redis_server.query("DEL", KEYS[1])
    again, _ = await take(client, redis_server)
    assert again > first


async def test_random_takes_and_refunds_never_give_back_more_than_was_taken(
    client: Redis, redis_server: RedisServer
) -> None:
    """A random mix on a partly drawn-down bucket, checked against a model that replays only the kept takes.

    GCRA's TAT after takes at times s_1..s_n is max_j(s_j + (takes from j on) * interval); with a take
    removed it is computed the same way without it.  The refunds must leave the real TAT at or above the
    model's (never more tokens than the takes kept would leave), and below what every take, refunded ones
    included, would have made of it (they did give tokens back)."""
    rng = random.Random(7)
    start = now_us(redis_server)
    redis_server.query("SET", KEYS[0], start + 4 * INTERVAL)
    redis_server.query("SET", KEYS[1], 1)
    kept: list[int] = [start + 4 * INTERVAL - INTERVAL]  # the preset TAT as a take one interval before it
    taken: dict[int, int] = {}  # number -> server time before it
    order: list[int] = []
    every: list[int] = []  # the times of every take, refunded or not
    for _ in range(60):
        if taken and rng.random() < 0.4:
            number = rng.choice(list(taken))
            del taken[number]
            order.remove(number)
            await client.call(REFUND, (number,))
        elif tat(redis_server) - now_us(redis_server) < (BURST - 1) * INTERVAL:
            number, at = await take(client, redis_server)
            taken[number] = at
            order.append(number)
            every.append(at)
        model = _tat(kept + [taken[n] for n in order])
        assert tat(redis_server) >= model - SECOND // 20  # µs that passed between the calls, at most
    assert len(every) > len(order) + 5  # some were refunded
    assert tat(redis_server) < _tat(kept + every)


def _tat(times: list[int]) -> int:
    """GCRA's TAT after takes at these times (in order), starting from an empty record."""
    value = 0
    for at in times:
        value = max(value, at) + INTERVAL
    return value
