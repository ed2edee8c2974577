"""Caller deadlines: parsing the header, the budget forwarded, the stage's refusals."""

from __future__ import annotations

import pytest

from sidecar.errors import BadRequest, DeadlineExceeded
from sidecar.exchange import Exchange
from sidecar.policy.deadline import DeadlineStage, budget_gone, caller_deadline, forwarded_budget


def _exchange(deadline: float | None) -> Exchange:
    exchange = Exchange(request_id="r", method="GET", path="/", started=100.0)
    exchange.deadline = deadline
    return exchange


@pytest.mark.parametrize(
    ("value", "seconds"), [("250ms", 0.25), ("2s", 2.0), ("1.5", 1.5), ("1m", 60.0), (" 3s ", 3.0)]
)
def test_budgets_in_every_duration_form(value: str, seconds: float) -> None:
    assert caller_deadline({"X-Sidecar-Timeout": value}, 100.0) == pytest.approx(100.0 + seconds)


@pytest.mark.parametrize("value", ["abc", "0", "-1s", "0ms", "", "1.5.5", "1e3", "5 sec", "inf", "nan"])
def test_bad_budgets_are_400_naming_the_header(value: str) -> None:
    with pytest.raises(BadRequest) as info:
        caller_deadline({"X-Sidecar-Timeout": value}, 100.0)
    assert info.value.status == 400 and "X-Sidecar-Timeout" in info.value.message


def test_no_header_no_deadline() -> None:
    assert caller_deadline({}, 100.0) is None


def test_the_forwarded_budget_is_whole_milliseconds_left_rounded_down() -> None:
    exchange = _exchange(deadline=101.0)
    assert forwarded_budget(exchange, 100.0) == b"1000ms"
    assert forwarded_budget(exchange, 100.2999) == b"700ms"
    assert forwarded_budget(exchange, 100.9985) == b"1ms"
    with pytest.raises(DeadlineExceeded):
        forwarded_budget(exchange, 100.9995)  # under a millisecond: no usable budget
    assert forwarded_budget(_exchange(None), 100.0) is None


def test_budget_gone_only_with_a_deadline() -> None:
    assert not budget_gone(_exchange(None), 1e9)
    assert not budget_gone(_exchange(101.0), 100.5)
    assert budget_gone(_exchange(101.0), 101.0)


async def test_the_stage_refuses_a_request_and_a_retry_whose_budget_is_gone() -> None:
    now = [100.5]
    stage = DeadlineStage(clock=lambda: now[0])
    exchange = _exchange(101.0)
    await stage.admit(exchange)
    await stage.admit(_exchange(None))
    now[0] = 101.0
    with pytest.raises(DeadlineExceeded) as info:
        await stage.admit(exchange)
    assert info.value.status == 504 and info.value.code == "deadline_exceeded"
    attempt = exchange.begin_attempt(now[0])
    with pytest.raises(DeadlineExceeded):
        await stage.before_retry(exchange, attempt)
