"""Retry decisions and the retry budget, with a fake clock and a fixed random source."""

from __future__ import annotations

import email.utils

import pytest

from sidecar.config.model import Backoff, Retries
from sidecar.config.model import RetryBudget as BudgetSettings
from sidecar.exchange import Attempt, Exchange
from sidecar.policy.retry import Decision, RetryBudget, RetryPolicy, decide, idempotent, parse_retry_after

SETTINGS = Retries(
    attempts=2,
    retry_on=("connect_error", "reset", "timeout", 503, 429),
    backoff=Backoff(base=0.1, max=1.0),
    budget=BudgetSettings(ratio=0.2, min_per_second=0.0),
    max_body=100,
)


def _decide(**overrides: object) -> Decision:
    arguments: dict[str, object] = {
        "condition": 503,
        "attempt_number": 1,
        "idempotent": True,
        "replayable": True,
        "retry_after": None,
        "deadline_left": None,
        "budget": RetryBudget(0.0, 10.0),
        "now": 0.0,
        "rand": lambda: 1.0,
    }
    arguments.update(overrides)
    return decide(SETTINGS, **arguments)  # type: ignore[arg-type]


def test_full_jitter_exponential_backoff_capped_at_max() -> None:
    assert _decide(attempt_number=1).delay == pytest.approx(0.1)
    assert _decide(attempt_number=2).delay == pytest.approx(0.2)
    assert _decide(attempt_number=2, rand=lambda: 0.5).delay == pytest.approx(0.1)
    wide = Retries(10, (503,), Backoff(0.1, 1.0), BudgetSettings(0.2, 10.0), 100)
    delay = decide(
        wide,
        condition=503,
        attempt_number=6,
        idempotent=True,
        replayable=True,
        retry_after=None,
        deadline_left=None,
        budget=RetryBudget(0, 10),
        now=0.0,
        rand=lambda: 1.0,
    ).delay
    assert delay == pytest.approx(1.0)


def test_only_listed_conditions_and_attempts_left() -> None:
    assert _decide(condition=500) == Decision(None, None)
    assert _decide(condition=None) == Decision(None, None)
    assert _decide(attempt_number=3) == Decision(None, None)
    assert _decide(attempt_number=2).result == "sent"


def test_connect_error_is_retried_for_any_method_the_rest_only_when_idempotent() -> None:
    assert _decide(condition="connect_error", idempotent=False).result == "sent"
    for condition in ("reset", "timeout", 503):
        assert _decide(condition=condition, idempotent=False) == Decision(None, None)
    assert idempotent("PUT", False) and idempotent("DELETE", False) and idempotent("GET", False)
    assert not idempotent("POST", False) and not idempotent("PATCH", False)
    assert idempotent("POST", True)


def test_a_body_not_kept_is_never_replayed() -> None:
    assert _decide(condition="connect_error", replayable=False) == Decision(None, None)


def test_retry_after_within_backoff_max_is_waited_longer_is_relayed() -> None:
    assert _decide(retry_after=0.75).delay == 0.75
    assert _decide(retry_after=2.0) == Decision(None, None)
    assert _decide(condition=429, retry_after=1.0).delay == 1.0


def test_no_time_when_the_deadline_cannot_cover_the_delay() -> None:
    assert _decide(deadline_left=0.05) == Decision(None, "no_time")
    assert _decide(retry_after=0.5, deadline_left=0.4) == Decision(None, "no_time")
    assert _decide(deadline_left=0.5).result == "sent"


def test_budget_ratio_plus_minimum_over_a_ten_second_window() -> None:
    budget = RetryBudget(0.2, 1.0)
    assert budget.remaining(0.0) == 10.0  # the minimum: 1/s over 10 s
    for _ in range(100):
        budget.request(0.5)
    assert budget.remaining(0.5) == pytest.approx(30.0)
    spent = sum(budget.try_spend(0.5) for _ in range(50))
    assert spent == 30
    assert not budget.try_spend(5.0)
    # Ten seconds later the window has slid past them all.
    assert budget.remaining(10.6) == 10.0
    assert budget.try_spend(10.6)


def test_budget_exhausted_is_reported() -> None:
    budget = RetryBudget(0.0, 0.0)
    assert _decide(budget=budget) == Decision(None, "budget_exhausted")


def test_policy_counts_results_and_skips_other_statuses_cheaply() -> None:
    now = [0.0]
    policy = RetryPolicy("app", SETTINGS, clock=lambda: now[0], rand=lambda: 0.0)
    exchange = Exchange(request_id="r", method="GET", path="/", started=0.0, idempotent=True)
    assert policy.next_attempt(exchange, Attempt(1, 0.0, status=200)) is None
    policy.request()
    for _ in range(5):
        policy.request()
    # ratio 0.2 * 6 requests = 1.2: one retry.
    assert policy.next_attempt(exchange, Attempt(1, 0.0, status=503)) == 0.0
    assert policy.next_attempt(exchange, Attempt(1, 0.0, status=503)) is None
    assert policy.results == {"sent": 1, "budget_exhausted": 1}
    exchange.deadline = -1.0
    assert policy.next_attempt(exchange, Attempt(1, 0.0, status=503)) is None
    assert policy.results["no_time"] == 1


def test_parse_retry_after() -> None:
    assert parse_retry_after("1", 0.0) == 1.0
    assert parse_retry_after(" 120 ", 0.0) == 120.0
    assert parse_retry_after(None, 0.0) is None
    assert parse_retry_after("soon", 0.0) is None
    assert parse_retry_after("-1", 0.0) is None
    date = email.utils.formatdate(1_000_030.0, usegmt=True)
    assert parse_retry_after(date, 1_000_000.0) == pytest.approx(30.0)
