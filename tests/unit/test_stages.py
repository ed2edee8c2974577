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


class _Hooks(Stage):
    """Counts the hook calls a stage gets."""

    __slots__ = ("calls", "on")

    def __init__(self, on: bool = True) -> None:
        self.calls: list[str] = []
        self.on = on

    @property
    def active(self) -> bool:
        return self.on


async def test_a_hook_a_stage_does_not_override_is_never_called_and_an_inactive_stage_is_skipped() -> None:
    class Observer(_Hooks):
        def observe(self, exchange: Exchange, attempt: Attempt) -> None:
            self.calls.append("observe")

        def release(self, exchange: Exchange) -> None:
            self.calls.append("release")

    active, inactive = Observer(), Observer(on=False)
    stages = Stages([active, inactive])
    assert stages.stages == (active, inactive)  # both still there for what they report
    exchange = new_exchange()
    await stages.admit(exchange)
    stages.observe(exchange, exchange.begin_attempt(0.0))
    assert stages.next_attempt(exchange, exchange.attempts[0]) is None
    await stages.before_retry(exchange, exchange.attempts[0])
    stages.release(exchange)
    assert active.calls == ["observe", "release"] and inactive.calls == []


async def test_admit_now_lets_a_request_through_without_admit_and_admit_decides_the_rest() -> None:
    class Sometimes(_Hooks):
        def __init__(self, now: bool) -> None:
            super().__init__()
            self.now = now

        def admit_now(self, exchange: Exchange) -> bool:
            self.calls.append("admit_now")
            return self.now

        async def admit(self, exchange: Exchange) -> None:
            self.calls.append("admit")

    class NeverWaits(_Hooks):
        def admit_now(self, exchange: Exchange) -> bool:
            self.calls.append("admit_now")
            if exchange.method == "POST":
                raise SidecarError("refused at once")
            return True

    fast, slow, sync = Sometimes(True), Sometimes(False), NeverWaits()
    await Stages([fast, slow, sync]).admit(new_exchange())
    assert fast.calls == ["admit_now"] and slow.calls == ["admit_now", "admit"] and sync.calls == ["admit_now"]
    await sync.admit(new_exchange())  # called directly, admit is what admit_now decides
    assert sync.calls == ["admit_now", "admit_now"]
    refused = Exchange(request_id="r", method="POST", path="/", started=0.0)
    journal: list[str] = []
    with pytest.raises(SidecarError, match="at once"):
        await Stages([Recording("a", journal), sync, Recording("c", journal)]).admit(refused)
    assert journal == ["admit a", "release a"]


async def test_a_subclass_that_overrides_admit_is_not_bypassed_by_an_inherited_admit_now() -> None:
    calls: list[str] = []

    class Base(Stage):
        def admit_now(self, exchange: Exchange) -> bool:
            calls.append("base admit_now")
            return True

        async def admit(self, exchange: Exchange) -> None:
            calls.append("base admit")

    class Shared(Base):  # as SharedPacingStage over PacingStage: its own admit must run
        async def admit(self, exchange: Exchange) -> None:
            calls.append("shared admit")
            await super().admit(exchange)

    await Stages([Shared()]).admit(new_exchange())
    assert calls == ["shared admit", "base admit"]


def test_an_upstream_with_nothing_configured_has_only_its_default_policies_on_the_path() -> None:
    from sidecar.config import parse_config
    from sidecar.policy.pacing import PacingStage
    from sidecar.pools import UpstreamPool

    def on_path(yaml: str) -> list[str]:
        pool = UpstreamPool(parse_config(yaml).upstreams[0])
        stages = pool.stages
        assert any(isinstance(stage, PacingStage) for stage in stages.stages)  # /pools and metrics read it
        return [stage.name for _, stage, _ in stages._admitting] + [f"observe {s.name}" for s in stages._observing]

    default = on_path("upstreams:\n  api: {url: 'http://127.0.0.1:9'}\n")
    # pacing learns by default and retries are on by default (one retry on connect errors)
    assert default == ["body_limit", "deadline", "pacing", "admission", "retries", "observe pacing"]
    off = on_path(
        "upstreams:\n  api:\n    url: http://127.0.0.1:9\n    pacing: {learn: false}\n    retries: {attempts: 0}\n"
    )
    assert off == ["body_limit", "deadline", "admission", "retries"]  # retries still count for the budget
    configured = on_path(
        "upstreams:\n  api:\n    url: http://127.0.0.1:9\n    circuit_breaker: {failures: 3}\n"
        "    rate_limit: {rate: 100/s}\n    limits: {adaptive: true}\n"
    )
    assert configured == [
        "body_limit",
        "deadline",
        "circuit_breaker",
        "pacing",
        "rate_limit",
        "admission",
        "retries",
        "observe circuit_breaker",
        "observe pacing",
        "observe adaptive",
    ]
