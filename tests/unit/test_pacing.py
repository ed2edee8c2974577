"""The pacing core with a fake clock: pauses, budgets, spread, partitions, refusals."""

from __future__ import annotations

import pytest

from sidecar.config import Pacing
from sidecar.errors import UpstreamPaused, UpstreamRateLimited
from sidecar.exchange import Attempt, Exchange
from sidecar.policy.pacing import PacingStage
from sidecar.policy.pacing_core import (
    GO,
    REFUSE,
    SOURCE_429,
    SOURCE_503,
    SOURCE_PROBE,
    SOURCE_QUOTA,
    WAIT,
    PacingCore,
    partition_key,
)
from sidecar.policy.signals import Quota, Reading


def core(max_pause: float = 60.0, spread: bool = False, max_partitions: int = 10_000) -> PacingCore:
    return PacingCore(max_pause=max_pause, spread=spread, max_partitions=max_partitions)


def go(c: PacingCore, now: float, key: bytes | None = None, allowance: float = 1.0) -> int:
    verdict, delay, _ = c.take(key, now, allowance)
    assert verdict == GO and delay == 0.0
    return c.ticket(key)


def test_nothing_learned_everything_goes() -> None:
    c = core()
    for i in range(100):
        assert c.take(None, float(i), 0.0) == (GO, 0.0, "")


def test_retry_after_429_pauses_then_resumes() -> None:
    c = core()
    ticket = go(c, 0.0)
    c.learn(None, 429, Reading(pause=2.0), 0.0, ticket)
    assert c.take(None, 0.5, 1.0) == (REFUSE, 2.0, SOURCE_429)  # 1.5 s left > 1 s allowance: Retry-After 2
    assert c.take(None, 1.2, 1.0) == (WAIT, c.take(None, 1.2, 1.0)[1], SOURCE_429)
    verdict, left, _ = c.take(None, 1.5, 1.0)
    assert verdict == WAIT and abs(left - 0.5) < 1e-9
    assert c.take(None, 2.0, 1.0) == (GO, 0.0, "")


def test_retry_after_is_at_least_one_second() -> None:
    c = core()
    c.learn(None, 429, Reading(pause=0.3), 0.0, 0)
    assert c.take(None, 0.0, 0.0) == (REFUSE, 1.0, SOURCE_429)


def test_503_pause_refuses_as_paused() -> None:
    c = core()
    c.learn(None, 503, Reading(pause=30.0), 0.0, 0)
    assert c.take(None, 1.0, 5.0) == (REFUSE, 29.0, SOURCE_503)


def test_max_pause_caps_a_pause() -> None:
    c = core(max_pause=5.0)
    c.learn(None, 429, Reading(pause=3600.0), 0.0, 0)
    assert c.take(None, 0.0, 1.0) == (REFUSE, 5.0, SOURCE_429)
    assert c.take(None, 5.0, 1.0)[0] == GO


def test_a_shorter_pause_never_shortens_a_longer_one() -> None:
    c = core()
    c.learn(None, 429, Reading(pause=10.0), 0.0, 0)
    c.learn(None, 429, Reading(pause=1.0), 0.0, 0)
    assert c.take(None, 2.0, 1.0)[0] == REFUSE


def test_retry_after_zero_is_no_pause() -> None:
    c = core()
    c.learn(None, 429, Reading(pause=0.0), 0.0, 0)
    assert c.take(None, 0.0, 0.0)[0] == GO


def test_budget_allows_exactly_remaining_then_waits_for_the_reset() -> None:
    c = core()
    ticket = go(c, 0.0)
    c.learn(None, 200, Reading(quota=Quota(3, 10.0)), 0.0, ticket)
    for t in (1.0, 2.0, 3.0):
        assert c.take(None, t, 1.0)[0] == GO
    assert c.take(None, 4.0, 1.0) == (REFUSE, 6.0, SOURCE_QUOTA)
    assert c.take(None, 9.5, 1.0)[0] == WAIT
    # At the reset the budget is unknown again: one goes first, the others
    # wait for its answer; an answer without a signal lets everything go.
    assert c.take(None, 10.0, 1.0)[0] == GO
    assert c.take(None, 10.0, 1.0) == (WAIT, 0.5, SOURCE_PROBE)
    assert c.settle(None) and c.probing == 0
    for _ in range(10):
        assert c.take(None, 10.1, 1.0)[0] == GO


def test_after_a_pause_the_probe_answer_decides() -> None:
    c = core()
    c.learn(None, 429, Reading(pause=1.0), 0.0, go(c, 0.0))
    assert c.take(None, 0.5, 1.0)[0] == WAIT  # held back: remembered as after a block
    probe = go(c, 1.0)
    assert c.take(None, 1.25, 1.0) == (WAIT, 0.25, SOURCE_PROBE)
    c.learn(None, 200, Reading(quota=Quota(2, 10.0)), 1.2, probe)
    assert c.probing == 0
    assert [c.take(None, 1.2, 0.0)[0] for _ in range(3)] == [GO, GO, REFUSE]


def test_a_probe_without_an_answer_in_time_lets_the_others_go() -> None:
    c = core()
    c.learn(None, 503, Reading(pause=1.0), 0.0, 0)
    c.take(None, 0.0, 0.0)
    assert c.take(None, 1.0, 1.0)[0] == GO
    assert c.take(None, 1.2, 1.0)[0] == WAIT
    # No allowance left to wait for the probe's answer: refused, not sent into a
    # limit that may still hold.
    assert c.take(None, 1.2, 0.0) == (REFUSE, 1.0, SOURCE_503)
    assert c.take(None, 1.6, 1.0)[0] == GO  # the window is over
    assert c.probing == 0
    assert c.take(None, 1.6, 1.0)[0] == GO


def test_a_probe_answered_with_another_pause_pauses_again() -> None:
    c = core()
    c.learn(None, 429, Reading(pause=1.0), 0.0, 0)
    c.take(None, 0.0, 0.0)
    probe = go(c, 1.0)
    c.learn(None, 429, Reading(pause=2.0), 1.1, probe)
    assert c.take(None, 1.2, 1.0) == (REFUSE, 2.0, SOURCE_429)
    assert c.probing == 0


def test_requests_sent_after_the_reporting_one_are_taken_from_the_budget() -> None:
    c = core()
    first = go(c, 0.0)
    for _ in range(2):
        go(c, 0.0)  # two more went before the first's answer came back
    c.learn(None, 200, Reading(quota=Quota(3, 10.0)), 0.1, first)
    assert c.take(None, 0.2, 1.0)[0] == GO
    assert c.take(None, 0.2, 1.0)[0] == REFUSE


def test_remaining_zero_is_a_pause_until_the_reset() -> None:
    c = core()
    c.learn(None, 200, Reading(quota=Quota(0, 2.0)), 0.0, 0)
    verdict, left, source = c.take(None, 0.0, 5.0)
    assert (verdict, left, source) == (WAIT, 2.0, SOURCE_QUOTA)


def test_reset_is_capped_by_max_pause() -> None:
    c = core(max_pause=3.0)
    c.learn(None, 200, Reading(quota=Quota(0, 3600.0)), 0.0, 0)
    assert c.take(None, 3.0, 0.0)[0] == GO


def test_spread_spaces_the_budget_until_the_reset() -> None:
    c = core(spread=True)
    c.learn(None, 200, Reading(quota=Quota(4, 2.0)), 0.0, 0)
    delays = []
    for _ in range(4):
        verdict, delay, _ = c.take(None, 0.0, 5.0)
        assert verdict == GO
        delays.append(delay)
    assert delays == [0.0, 0.5, 1.0, 1.5]
    assert c.take(None, 0.0, 5.0)[0] == WAIT  # out of budget until the reset


def test_spread_refuses_a_slot_past_the_allowance_without_taking_it() -> None:
    c = core(spread=True)
    c.learn(None, 200, Reading(quota=Quota(2, 10.0)), 0.0, 0)
    assert c.take(None, 0.0, 1.0)[0] == GO
    assert c.take(None, 0.0, 1.0) == (REFUSE, 5.0, SOURCE_QUOTA)
    assert c.take(None, 0.0, 6.0) == (GO, 5.0, "")


def test_partitions_are_independent() -> None:
    c = core()
    a, b = partition_key("Bearer A"), partition_key("Bearer B")
    c.learn(a, 429, Reading(pause=5.0), 0.0, 0)
    assert c.take(a, 1.0, 1.0)[0] == REFUSE
    assert c.take(b, 1.0, 1.0)[0] == GO
    assert c.take(None, 1.0, 1.0)[0] == GO


def test_partition_keys_are_digests() -> None:
    key = partition_key("Bearer secret-token")
    assert key is not None and b"secret" not in key and len(key) == 16
    assert partition_key(None) is None
    assert partition_key("x") == partition_key("x")


def test_partitions_are_bounded_least_recently_used_go() -> None:
    c = core(max_partitions=3)
    keys = [partition_key(str(i)) for i in range(4)]
    c.learn(keys[0], 429, Reading(pause=60.0), 0.0, 0)
    for key in keys[1:3]:
        c.take(key, 0.0, 0.0)
    c.take(keys[0], 0.0, 0.0)  # used again: now the most recent
    c.take(keys[3], 0.0, 0.0)  # evicts keys[1]
    assert len(c) == 3
    assert c.peek(keys[1]) is None and c.peek(keys[0]) is not None
    assert c.take(keys[0], 1.0, 0.0)[0] == REFUSE


def test_malformed_fields_are_counted_and_change_nothing() -> None:
    c = core()
    c.learn(None, 429, Reading(ignored=("retry-after",)), 0.0, 0)
    c.learn(None, 200, Reading(ignored=("ratelimit", "retry-after")), 0.0, 0)
    assert c.ignored == {"retry-after": 2, "ratelimit": 1}
    assert c.take(None, 0.0, 0.0)[0] == GO


def test_a_pause_forgets_the_budget() -> None:
    c = core()
    c.learn(None, 200, Reading(quota=Quota(1, 60.0)), 0.0, 0)
    c.learn(None, 429, Reading(pause=1.0), 0.0, 0)
    for _ in range(5):
        assert c.take(None, 1.0, 0.0)[0] == GO


def test_the_fast_path_only_when_nothing_is_known() -> None:
    c = core()
    assert c.free_ticket(None, 0.0) == 0  # nothing kept yet: the full path makes the partition
    assert c.take(None, 0.0, 0.0)[0] == GO
    assert c.free_ticket(None, 0.0) == 2
    c.learn(None, 200, Reading(quota=Quota(5, 10.0)), 0.0, 2)
    assert c.free_ticket(None, 1.0) == 0  # a budget is known: take() counts it
    c.learn(None, 429, Reading(pause=1.0), 1.0, 2)
    assert c.free_ticket(None, 1.5) == 0


# ------------------------------------------------------------ the shell, without sockets


async def test_before_retry_refuses_at_once_while_paused() -> None:
    now = [100.0]
    stage = PacingStage("api", Pacing(), clock=lambda: now[0], wall=lambda: 1_700_000_000.0)
    exchange = Exchange(request_id="r", method="GET", path="/", started=0.0)
    await stage.admit(exchange)
    attempt = Attempt(number=1, started=100.0, status=503, signal_headers=[(b"Retry-After", b"7")])
    stage.observe(exchange, attempt)
    with pytest.raises(UpstreamPaused) as info:
        await stage.before_retry(exchange, Attempt(number=2, started=100.0))
    assert info.value.retry_after == 7 and info.value.status == 503
    now[0] = 107.0
    await stage.before_retry(exchange, Attempt(number=2, started=107.0))  # the pause is over: it goes
    stage.observe(exchange, Attempt(number=2, started=107.0, status=429, signal_headers=[(b"Retry-After", b"3")]))
    with pytest.raises(UpstreamRateLimited) as limited:
        await stage.admit(Exchange(request_id="s", method="GET", path="/", started=107.0))
    assert limited.value.retry_after == 3 and limited.value.status == 429
    assert stage.waiting == 0


def test_a_probe_answered_with_a_reset_of_now_lets_everything_go() -> None:
    c = core()
    c.learn(None, 429, Reading(pause=1.0), 0.0, 0)
    c.take(None, 0.0, 0.0)
    probe = go(c, 1.0)
    c.learn(None, 200, Reading(quota=Quota(10, 0.0)), 1.1, probe)
    assert [c.take(None, 1.1, 1.0)[0] for _ in range(5)] == [GO] * 5
    assert c.probing == 0


def test_a_probe_answered_with_only_malformed_fields_ends_the_probe() -> None:
    c = core()
    c.learn(None, 429, Reading(pause=1.0), 0.0, 0)
    c.take(None, 0.0, 0.0)
    probe = go(c, 1.0)
    c.learn(None, 200, Reading(ignored=("ratelimit",)), 1.1, probe)
    assert c.probing == 0
    assert [c.take(None, 1.1, 1.0)[0] for _ in range(3)] == [GO] * 3


def test_evicting_a_probing_partition_keeps_the_count_right() -> None:
    c = core(max_partitions=1)
    a, b = partition_key("a"), partition_key("b")
    c.learn(a, 429, Reading(pause=1.0), 0.0, 0)
    c.take(a, 0.0, 0.0)
    c.take(a, 1.0, 0.0)  # a's probe
    assert c.probing == 1
    c.take(b, 1.0, 0.0)  # evicts a
    assert c.probing == 0 and len(c) == 1
