"""The policy seam: stages admitted in order, released in reverse, exactly once, on every path."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.errors import Draining, QueueFull, RequestTooLarge, SidecarError
from sidecar.exchange import Attempt, Exchange
from sidecar.policy import Stage, Stages
from sidecar.policy.admission import Admission, AdmissionStage
from sidecar.policy.body_limit import DeclaredBodyLimit, over_limit
from sidecar.policy.draining import DrainingGate


def new_exchange() -> Exchange:
    return Exchange(request_id="r", method="GET", path="/", started=0.0)


class Recording(Stage):
    """A stage that notes what happened to it in a shared journal."""

    __slots__ = ("label", "journal", "refuse", "block", "retry_in")

    def __init__(
        self,
        label: str,
        journal: list[str],
        *,
        refuse: bool = False,
        block: bool = False,
        retry_in: float | None = None,
    ) -> None:
        self.label = label
        self.journal = journal
        self.refuse = refuse
        self.block = block
        self.retry_in = retry_in

    async def admit(self, exchange: Exchange) -> None:
        self.journal.append(f"admit {self.label}")
        if self.block:
            await asyncio.Event().wait()
        if self.refuse:
            raise SidecarError(f"{self.label} refuses")

    def release(self, exchange: Exchange) -> None:
        self.journal.append(f"release {self.label}")

    def observe(self, exchange: Exchange, attempt: Attempt) -> None:
        self.journal.append(f"observe {self.label} {attempt.number}")

    def next_attempt(self, exchange: Exchange, attempt: Attempt) -> float | None:
        return self.retry_in


async def test_admitted_in_order_and_released_in_reverse() -> None:
    journal: list[str] = []
    stages = Stages([Recording("a", journal), Recording("b", journal), Recording("c", journal)])
    exchange = new_exchange()
    await stages.admit(exchange)
    stages.release(exchange)
    assert journal == ["admit a", "admit b", "admit c", "release c", "release b", "release a"]


async def test_a_refusal_releases_only_the_stages_already_passed() -> None:
    journal: list[str] = []
    stages = Stages([Recording("a", journal), Recording("b", journal, refuse=True), Recording("c", journal)])
    with pytest.raises(SidecarError, match="b refuses"):
        await stages.admit(new_exchange())
    assert journal == ["admit a", "admit b", "release a"]


async def test_cancelled_while_a_stage_waits_releases_the_stages_passed() -> None:
    journal: list[str] = []
    stages = Stages([Recording("a", journal), Recording("b", journal, block=True), Recording("c", journal)])
    task = asyncio.ensure_future(stages.admit(new_exchange()))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert journal == ["admit a", "admit b", "release a"]


async def test_every_stage_is_released_even_when_one_release_fails() -> None:
    journal: list[str] = []

    class Broken(Recording):
        def release(self, exchange: Exchange) -> None:
            super().release(exchange)
            raise RuntimeError("bookkeeping bug")

    stages = Stages([Recording("a", journal), Broken("b", journal), Recording("c", journal)])
    exchange = new_exchange()
    await stages.admit(exchange)
    with pytest.raises(RuntimeError, match="bookkeeping bug"):
        stages.release(exchange)
    assert journal[-3:] == ["release c", "release b", "release a"]


def test_observe_reaches_every_stage_and_the_first_retry_opinion_wins() -> None:
    journal: list[str] = []
    stages = Stages(
        [Recording("a", journal), Recording("b", journal, retry_in=0.5), Recording("c", journal, retry_in=9)]
    )
    exchange = new_exchange()
    attempt = exchange.begin_attempt(1.0)
    stages.observe(exchange, attempt)
    assert journal == ["observe a 1", "observe b 1", "observe c 1"]
    assert stages.next_attempt(exchange, attempt) == 0.5
    assert Stages([Recording("a", journal)]).next_attempt(exchange, attempt) is None
    assert exchange.begin_attempt(2.0).number == 2


def test_the_stack_describes_itself() -> None:
    assert repr(Stages([DrainingGate(lambda: False), DeclaredBodyLimit()])) == "<Stages draining → body_limit>"
    assert repr(Stages([])) == "<Stages (none)>"


async def test_draining_gate_refuses_only_while_draining() -> None:
    draining = False
    gate = DrainingGate(lambda: draining)
    await gate.admit(new_exchange())
    draining = True
    with pytest.raises(Draining) as info:
        await gate.admit(new_exchange())
    assert info.value.status == 503 and info.value.retry_after == 1


@pytest.mark.parametrize(
    ("declared", "limit", "over"),
    [(None, 10, False), (10, None, False), (10, 10, False), (11, 10, True), (0, 0, False), (1, 0, True)],
)
def test_declared_body_limit_decision(declared: int | None, limit: int | None, over: bool) -> None:
    assert over_limit(declared, limit) is over


async def test_admission_stage_times_the_wait_and_gives_the_slot_back() -> None:
    now = [100.0]
    admission = Admission("a", capacity=1, max_pending=0, pool_timeout=5.0, clock=lambda: now[0])
    stage = AdmissionStage(admission, clock=lambda: now[0])
    first = new_exchange()
    await stage.admit(first)
    assert first.queued and first.pool_wait == 0.0 and first.admitted_at == 100.0
    assert admission.in_flight == 1
    with pytest.raises(QueueFull):
        await stage.admit(new_exchange())  # no slot, no room to wait
    now[0] = 100.25
    stage.release(first)
    assert admission.in_flight == 0


async def test_admission_stage_records_the_queue_time_of_a_waiter() -> None:
    admission = Admission("a", capacity=1, max_pending=1, pool_timeout=5.0)
    stage = AdmissionStage(admission)
    holder, waiter = new_exchange(), new_exchange()
    await stage.admit(holder)
    waiting = asyncio.ensure_future(stage.admit(waiter))
    await asyncio.sleep(0.05)
    assert admission.pending == 1
    stage.release(holder)
    await waiting
    assert waiter.pool_wait >= 0.04 and waiter.admitted_at is not None
    stage.release(waiter)
    assert admission.in_flight == 0 and admission.pending == 0


def test_request_too_large_is_a_413() -> None:
    assert RequestTooLarge("x").status == 413


def test_the_wait_allowance_is_one_budget_for_every_stage_and_the_deadline_caps_it() -> None:
    exchange = new_exchange()
    assert exchange.wait_allowance(1.0) is None  # not routed: no budget known yet

    class _Pool:
        class admission:  # stands in for the pool's Admission
            pool_timeout = 2.0

    exchange.pool = _Pool()  # type: ignore[assignment]
    exchange.waiting_since = 10.0
    assert exchange.wait_allowance(10.0) == 2.0
    assert exchange.wait_allowance(11.5) == 0.5  # a pause or a token took 1.5 s of it
    assert exchange.wait_allowance(13.0) == 0.0
    exchange.deadline = 10.75
    assert exchange.wait_allowance(10.5) == 0.25  # the caller's deadline is nearer


async def test_before_retry_gates_each_later_attempt_in_order() -> None:
    journal: list[str] = []

    class Gate(Recording):
        async def before_retry(self, exchange: Exchange, attempt: Attempt) -> None:
            journal.append(f"gate {self.label} {attempt.number}")
            if self.refuse:
                raise SidecarError(f"{self.label} refuses the retry")

    exchange = new_exchange()
    exchange.begin_attempt(0.0)
    second = exchange.begin_attempt(1.0)
    await Stages([Gate("a", journal), Gate("b", journal)]).before_retry(exchange, second)
    assert journal == ["gate a 2", "gate b 2"]
    with pytest.raises(SidecarError, match="b refuses the retry"):
        await Stages([Gate("a", journal), Gate("b", journal, refuse=True), Gate("c", journal)]).before_retry(
            exchange, second
        )
    assert journal[-2:] == ["gate a 2", "gate b 2"]
