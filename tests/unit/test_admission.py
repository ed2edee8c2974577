"""The admission core (pure, no event loop) and its asyncio shell.

Every test counts ``in_flight`` and ``pending`` after each step: a slot that
is lost or counted twice is exactly the bug this layer exists to prevent.
"""

from __future__ import annotations

import asyncio

import pytest

from sidecar.errors import PoolTimeout, QueueFull
from sidecar.policy.admission import RETRY_AFTER_MAX, Admission
from sidecar.policy.fair_core import FairAdmissionCore

# ------------------------------------------------------------------ the core


def full_core(capacity: int = 2, max_pending: int = 3) -> FairAdmissionCore[str]:
    core: FairAdmissionCore[str] = FairAdmissionCore(capacity, max_pending)
    for _ in range(capacity):
        assert core.try_acquire()
    return core


def test_slots_are_granted_up_to_capacity() -> None:
    core: FairAdmissionCore[str] = FairAdmissionCore(2, 5)
    assert core.try_acquire()
    assert core.try_acquire()
    assert not core.try_acquire()
    assert (core.in_flight, core.pending) == (2, 0)


def test_waiters_are_granted_in_arrival_order() -> None:
    core = full_core(capacity=1, max_pending=5)
    for name in ("a", "b", "c"):
        core.enqueue(name)
    assert core.oldest_waiter() == "a"
    assert core.release() == "a"
    assert (core.in_flight, core.pending) == (1, 2)
    assert core.release() == "b"
    assert core.release() == "c"
    assert (core.in_flight, core.pending) == (1, 0)
    assert core.release() is None
    assert (core.in_flight, core.pending) == (0, 0)


def test_a_newcomer_never_overtakes_a_waiter() -> None:
    core = full_core(capacity=1, max_pending=5)
    core.enqueue("a")
    # Between the release and "a" running, a slot looks free; it is not.
    assert core.release() == "a"
    assert not core.try_acquire()
    assert (core.in_flight, core.pending) == (1, 0)


def test_queue_full_is_decided_at_max_pending() -> None:
    core = full_core(capacity=1, max_pending=2)
    assert core.can_wait()
    core.enqueue("a")
    assert core.can_wait()
    core.enqueue("b")
    assert not core.can_wait()
    assert (core.in_flight, core.pending) == (1, 2)


def test_zero_max_pending_refuses_every_waiter() -> None:
    core = full_core(capacity=1, max_pending=0)
    assert not core.can_wait()


def test_release_hands_the_slot_to_the_next_waiter_not_back_to_the_pool() -> None:
    core = full_core(capacity=2, max_pending=5)
    core.enqueue("a")
    assert core.release() == "a"
    assert (core.in_flight, core.pending) == (2, 0)


def test_removed_waiter_is_skipped_and_costs_no_slot() -> None:
    core = full_core(capacity=1, max_pending=5)
    core.enqueue("a")
    core.enqueue("b")
    assert core.remove("a") is True
    assert core.remove("a") is False  # already gone: no double bookkeeping
    assert (core.in_flight, core.pending) == (1, 1)
    assert core.release() == "b"
    assert (core.in_flight, core.pending) == (1, 0)


def test_remove_of_unknown_waiter_changes_nothing() -> None:
    core = full_core(capacity=1, max_pending=5)
    assert core.remove("nobody") is False
    assert (core.in_flight, core.pending) == (1, 0)


def test_release_without_a_slot_is_a_bug_not_a_negative_count() -> None:
    core: FairAdmissionCore[str] = FairAdmissionCore(1, 1)
    with pytest.raises(RuntimeError):
        core.release()
    assert core.in_flight == 0


def test_raising_capacity_grants_waiters_in_order() -> None:
    core = full_core(capacity=1, max_pending=5)
    for name in ("a", "b", "c"):
        core.enqueue(name)
    assert core.resize(3, 5) == ["a", "b"]
    assert (core.capacity, core.in_flight, core.pending) == (3, 3, 1)


def test_lowering_capacity_never_revokes_a_slot() -> None:
    core = full_core(capacity=4, max_pending=5)
    core.enqueue("a")
    assert core.resize(2, 5) == []
    assert (core.in_flight, core.pending) == (4, 1)
    # The in-flight requests finish; nobody is admitted until under the new cap.
    assert core.release() is None
    assert core.release() is None
    assert core.release() == "a"
    assert (core.in_flight, core.pending) == (2, 0)
    assert not core.try_acquire()


def test_lowering_max_pending_keeps_who_already_waits() -> None:
    core = full_core(capacity=1, max_pending=5)
    core.enqueue("a")
    core.enqueue("b")
    core.resize(1, 1)
    assert core.pending == 2
    assert not core.can_wait()


def test_retry_after_is_at_least_one_second_before_any_sample() -> None:
    core = full_core(capacity=4, max_pending=8)
    assert core.retry_after() == 1


def test_retry_after_is_the_drain_time_of_the_queue_ahead() -> None:
    core = full_core(capacity=4, max_pending=8)
    core.observe_hold(2.0)  # the first sample is taken as is
    for name in range(7):
        core.enqueue(str(name))
    # 7 ahead + the retry itself, 4 slots freeing every 2 s: 4 s.
    assert core.retry_after() == 4
    core.enqueue("8")
    assert core.retry_after() == 5  # 4.5 s rounds up to whole seconds


def test_retry_after_is_clamped_to_a_minute() -> None:
    core = full_core(capacity=1, max_pending=1000)
    core.observe_hold(30.0)
    for name in range(100):
        core.enqueue(str(name))
    assert core.retry_after() == RETRY_AFTER_MAX


def test_retry_after_follows_hold_times_smoothly() -> None:
    core = full_core(capacity=1, max_pending=5)
    core.observe_hold(1.0)
    core.observe_hold(11.0)  # one outlier moves the estimate by a tenth
    assert core.retry_after() == 2
    for _ in range(60):
        core.observe_hold(0.1)
    assert core.retry_after() == 1


# ------------------------------------------------------------ the async shell


def make_admission(capacity: int = 1, max_pending: int = 8, pool_timeout: float = 5.0) -> Admission:
    return Admission("api", capacity=capacity, max_pending=max_pending, pool_timeout=pool_timeout)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_queue_full_is_raised_at_once_with_retry_after() -> None:
    admission = make_admission(capacity=1, max_pending=1)
    await admission.acquire()
    waiter = asyncio.ensure_future(admission.acquire())
    await settle()
    with pytest.raises(QueueFull) as refused:
        await admission.acquire()
    assert refused.value.retry_after >= 1
    assert refused.value.upstream == "api"
    assert (admission.in_flight, admission.pending) == (1, 1)
    admission.release()
    await waiter
    admission.release()
    assert (admission.in_flight, admission.pending) == (0, 0)


async def test_deadline_expiry_raises_pool_timeout_and_frees_the_place() -> None:
    admission = make_admission(capacity=1, pool_timeout=0.05)
    await admission.acquire()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(PoolTimeout) as refused:
        await admission.acquire()
    assert loop.time() - started >= 0.05
    assert refused.value.retry_after >= 1
    assert (admission.in_flight, admission.pending) == (1, 0)
    admission.release()
    assert (admission.in_flight, admission.pending) == (0, 0)
    await admission.acquire()  # the slot is really free
    admission.release()


async def test_waiters_are_admitted_in_arrival_order() -> None:
    admission = make_admission(capacity=1)
    await admission.acquire()
    order: list[int] = []

    async def wait(number: int) -> None:
        await admission.acquire()
        order.append(number)
        await asyncio.sleep(0)
        admission.release()

    tasks = []
    for number in range(5):
        tasks.append(asyncio.ensure_future(wait(number)))
        await settle()
    assert admission.pending == 5
    admission.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert (admission.in_flight, admission.pending) == (0, 0)


async def test_cancelled_waiter_leaves_the_queue_and_loses_no_slot() -> None:
    admission = make_admission(capacity=1)
    await admission.acquire()
    first = asyncio.ensure_future(admission.acquire())
    second = asyncio.ensure_future(admission.acquire())
    await settle()
    assert admission.pending == 2
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert (admission.in_flight, admission.pending) == (1, 1)
    admission.release()
    await second  # the slot went past the cancelled waiter
    assert (admission.in_flight, admission.pending) == (1, 0)
    admission.release()
    assert (admission.in_flight, admission.pending) == (0, 0)


async def test_waiter_cancelled_before_its_cleanup_ran_is_skipped_by_release() -> None:
    admission = make_admission(capacity=1)
    await admission.acquire()
    first = asyncio.ensure_future(admission.acquire())
    second = asyncio.ensure_future(admission.acquire())
    await settle()
    first.cancel()  # its future is cancelled, its except-block has not run yet
    admission.release()  # must pass the slot on to `second`, not to `first`
    with pytest.raises(asyncio.CancelledError):
        await first
    await second
    assert (admission.in_flight, admission.pending) == (1, 0)
    admission.release()
    assert (admission.in_flight, admission.pending) == (0, 0)


async def test_slot_granted_in_the_same_tick_as_the_cancel_goes_back() -> None:
    admission = make_admission(capacity=1)
    await admission.acquire()
    waiter = asyncio.ensure_future(admission.acquire())
    await settle()
    admission.release()  # grants `waiter`: its future now holds a result ...
    waiter.cancel()  # ... and it is cancelled before it ever ran
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (admission.in_flight, admission.pending) == (0, 0)
    await admission.acquire()
    admission.release()


async def test_granted_slot_that_races_the_cancel_goes_to_the_next_waiter() -> None:
    admission = make_admission(capacity=1)
    await admission.acquire()
    racer = asyncio.ensure_future(admission.acquire())
    await settle()
    behind = asyncio.ensure_future(admission.acquire())
    await settle()
    admission.release()
    racer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await racer
    await behind
    assert (admission.in_flight, admission.pending) == (1, 0)
    admission.release()
    assert (admission.in_flight, admission.pending) == (0, 0)


async def test_expiry_and_grant_in_the_same_tick_count_once() -> None:
    admission = make_admission(capacity=1, pool_timeout=0.02)
    await admission.acquire()
    waiter = asyncio.ensure_future(admission.acquire())
    await asyncio.sleep(0.05)  # the timer fired
    admission.release()  # must not hand the slot to the expired waiter
    with pytest.raises(PoolTimeout):
        await waiter
    assert (admission.in_flight, admission.pending) == (0, 0)


@pytest.mark.parametrize("outcome", ["success", "error", "cancelled"])
async def test_release_on_every_path_of_a_holder(outcome: str) -> None:
    admission = make_admission(capacity=1)
    queued = asyncio.Event()

    async def hold() -> None:
        await admission.acquire()
        try:
            queued.set()
            await asyncio.sleep(0.01 if outcome != "cancelled" else 10)
            if outcome == "error":
                raise ValueError("upstream broke")
        finally:
            admission.release(0.01)

    holder = asyncio.ensure_future(hold())
    await queued.wait()
    waiter = asyncio.ensure_future(admission.acquire())
    await settle()
    assert (admission.in_flight, admission.pending) == (1, 1)
    if outcome == "cancelled":
        holder.cancel()
    results = await asyncio.gather(holder, return_exceptions=True)
    assert outcome == "success" or isinstance(results[0], BaseException)
    await waiter
    assert (admission.in_flight, admission.pending) == (1, 0)
    admission.release()
    assert (admission.in_flight, admission.pending) == (0, 0)


async def test_raising_capacity_at_runtime_admits_waiters() -> None:
    admission = make_admission(capacity=1)
    await admission.acquire()
    waiters = [asyncio.ensure_future(admission.acquire()) for _ in range(3)]
    await settle()
    admission.resize(3, 8, 5.0)
    await settle()
    assert [w.done() for w in waiters] == [True, True, False]
    assert (admission.in_flight, admission.pending) == (3, 1)
    for _ in range(3):
        admission.release()
    await waiters[2]
    admission.release()
    assert (admission.in_flight, admission.pending) == (0, 0)


async def test_lowering_capacity_at_runtime_lets_in_flight_finish() -> None:
    admission = make_admission(capacity=3)
    for _ in range(3):
        await admission.acquire()
    waiter = asyncio.ensure_future(admission.acquire())
    await settle()
    admission.resize(1, 8, 5.0)
    admission.release()
    admission.release()
    await settle()
    assert not waiter.done()
    assert (admission.in_flight, admission.pending) == (1, 1)
    admission.release()
    await waiter
    admission.release()
    assert (admission.in_flight, admission.pending) == (0, 0)


async def test_many_waiters_cancelled_and_expiring_at_random_leave_nothing_behind() -> None:
    import random

    rng = random.Random(7)
    admission = make_admission(capacity=3, max_pending=50, pool_timeout=0.05)

    async def request() -> None:
        await admission.acquire()
        try:
            await asyncio.sleep(rng.random() * 0.01)
        finally:
            admission.release()

    tasks: list[asyncio.Task[None]] = []
    for _ in range(300):
        tasks.append(asyncio.ensure_future(request()))
        if rng.random() < 0.3:
            rng.choice(tasks).cancel()
        if rng.random() < 0.2:
            await asyncio.sleep(0)
    await asyncio.gather(*tasks, return_exceptions=True)
    assert (admission.in_flight, admission.pending) == (0, 0)
    assert admission.oldest_wait() == 0.0


def test_the_connection_pools_own_timeout_is_a_503_with_the_admission_retry_after() -> None:
    import httpx

    from sidecar.errors import from_upstream_exception

    error = from_upstream_exception(httpx.PoolTimeout("no stream"), "api", retry_after=3)
    assert isinstance(error, PoolTimeout)
    assert (error.status, error.code, error.retry_after, error.upstream) == (503, "pool_timeout", 3, "api")


async def test_a_waiter_past_its_deadline_is_not_handed_a_slot_when_its_timer_runs_late() -> None:
    """On a busy loop the release can run before the waiter's timer: the
    waiter has waited timeouts.pool and must get its 503, not the slot."""
    now = [100.0]
    admission = Admission("api", capacity=1, max_pending=8, pool_timeout=1.0, clock=lambda: now[0])
    await admission.acquire()
    late = asyncio.ensure_future(admission.acquire())
    await settle()
    now[0] += 0.5
    fresh = asyncio.ensure_future(admission.acquire())
    await settle()
    now[0] += 0.6  # `late` waited 1.1 s, `fresh` 0.6 s; no timer has fired yet
    admission.release()
    with pytest.raises(PoolTimeout):
        await late
    await fresh
    assert (admission.in_flight, admission.pending) == (1, 0)
    admission.release()
    assert (admission.in_flight, admission.pending) == (0, 0)


async def test_a_waiter_waits_only_for_the_allowance_it_brings() -> None:
    # Stages before admission (a pause, a token) may have used part of the
    # request's wait already: admission waits only for what is left.
    admission = Admission("a", capacity=1, max_pending=4, pool_timeout=5.0)
    await admission.acquire()
    started = asyncio.get_running_loop().time()
    with pytest.raises(PoolTimeout, match=r"within 0\.05s"):
        await admission.acquire(0.05)
    assert asyncio.get_running_loop().time() - started < 2.0  # not the 5 s timeouts.pool
    assert admission.pending == 0
    admission.release()
    assert admission.in_flight == 0


async def test_a_late_handover_respects_the_waiters_own_allowance() -> None:
    now = [0.0]
    admission = Admission("a", capacity=1, max_pending=4, pool_timeout=5.0, clock=lambda: now[0])
    await admission.acquire()
    short = asyncio.ensure_future(admission.acquire(1.0))
    await asyncio.sleep(0)
    now[0] = 1.5  # past the waiter's allowance, its timer has not run yet
    admission.release()
    with pytest.raises(PoolTimeout):
        await short
    assert admission.in_flight == 0 and admission.pending == 0
