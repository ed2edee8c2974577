"""The demo upstream's ?delay= (used to hold a request in flight, e.g. across a drain)."""

from __future__ import annotations

import pytest

from sidecar.demo import MAX_DELAY, _delay


@pytest.mark.parametrize(
    ("given", "seconds"),
    [(None, 0.0), ("", 0.0), ("1.5", 1.5), ("0", 0.0), ("-3", 0.0), ("nan", 0.0), ("soon", 0.0), ("1e9", MAX_DELAY)],
)
def test_delay_is_bounded_and_ignores_nonsense(given: str | None, seconds: float) -> None:
    assert _delay(given) == seconds
