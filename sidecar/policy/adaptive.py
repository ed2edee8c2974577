"""Adaptive concurrency: an in-flight limit that follows the upstream's latency.

:class:`GradientLimit` is the decision logic (plain code, fed a clock value
with each sample); :class:`AdaptiveStage` is its shell: it sees every attempt's
time to the response head and acts only through the admission capacity
(``Admission.resize``), never by refusing anything itself.

Once per window (at least 100 ms and 5 samples) the limit moves by the
gradient ``min_rtt * 1.1 / median latency of the window`` (clamped to
0.5 to 2.0) plus a headroom of ``sqrt(limit)``, like Envoy's adaptive
concurrency filter, and is kept between ``min_concurrent`` and
``max_concurrent_requests``.  The known failure modes of that design are
avoided on purpose (docs/callers-and-adaptive-limits.md):

* no burst of refusals while the minimum latency is measured: it is the
  lowest single latency seen (the first requests at an idle upstream show it)
  and is re-measured by *halving* the limit for one window, not by dropping
  it to the minimum — requests wait in the queue a little longer meanwhile;
* no growth without end: the limit only grows while the requests actually
  use at least half of it, and never past ``max_concurrent_requests``;
* no minimum that drifts up: every ``PROBE_EVERY`` seconds the re-measuring
  window replaces it with what the upstream shows while less loaded, so an
  upstream that got faster (or slower) is followed.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import Stage

if TYPE_CHECKING:
    from ..exchange import Attempt, Exchange
    from .admission import Admission

WINDOW = 0.1  # seconds, at least, between two limit updates
MIN_SAMPLES = 5  # latencies a window needs before it moves the limit
TOLERANCE = 1.1  # latency up to 10 % over the minimum counts as uncongested
GRADIENT_MIN, GRADIENT_MAX = 0.5, 2.0
PROBE_EVERY = 5.0  # seconds between two re-measurements of the minimum latency
FIRST_PROBE = 1.0  # seconds after the start to the first re-measurement
INITIAL = 20  # the first limit (within the bounds) before anything was measured


class GradientLimit:
    """The adaptive limit of one upstream; decides, never waits."""

    __slots__ = (
        "floor",
        "ceiling",
        "limit",
        "min_rtt",
        "_window_start",
        "_samples",
        "_busiest",
        "_probing",
        "_probe_min",
        "_next_probe",
    )

    def __init__(self, floor: int, ceiling: int, now: float) -> None:
        self.floor = max(1, min(floor, ceiling))
        self.ceiling = max(1, ceiling)
        self.limit = float(max(self.floor, min(self.ceiling, INITIAL)))
        self.min_rtt = math.inf
        self._window_start = now
        self._samples: list[float] = []
        self._busiest = 0  # most requests in flight seen in this window
        self._probing = False
        self._probe_min = math.inf
        # The first re-measurement comes soon: the first minimum may have been
        # taken while the upstream was already busy with other clients' work.
        self._next_probe = now + FIRST_PROBE

    @property
    def capacity(self) -> int:
        """The slots admission may hand out now."""
        value = self.limit / 2 if self._probing else self.limit
        return max(self.floor, min(self.ceiling, int(value)))

    def set_ceiling(self, ceiling: int) -> None:
        """The largest limit allowed (max_concurrent_requests, or what the HTTP/2 streams carry)."""
        self.ceiling = max(1, ceiling)
        self.floor = min(self.floor, self.ceiling)
        self.limit = max(float(self.floor), min(float(self.ceiling), self.limit))

    def sample(self, latency: float, in_flight: int, now: float) -> bool:
        """One attempt's latency; True when the capacity changed."""
        before = self.capacity
        latency = max(latency, 1e-6)
        self._samples.append(latency)
        self._busiest = max(self._busiest, in_flight)
        if self._probing:
            self._probe_min = min(self._probe_min, latency)
        elif latency < self.min_rtt:
            self.min_rtt = latency
        if now - self._window_start >= WINDOW and len(self._samples) >= MIN_SAMPLES:
            self._end_window(now)
        return self.capacity != before

    def _end_window(self, now: float) -> None:
        samples, busiest = self._samples, self._busiest
        self._samples, self._busiest, self._window_start = [], 0, now
        if self._probing:
            # The window at half the limit: its lowest latency is the new minimum.
            self._probing = False
            self.min_rtt = self._probe_min
            self._probe_min = math.inf
            self._next_probe = now + PROBE_EVERY
            return
        if now >= self._next_probe:
            self._probing = True
            return
        observed = statistics.median(samples)
        gradient = max(GRADIENT_MIN, min(GRADIENT_MAX, self.min_rtt * TOLERANCE / observed))
        proposed = self.limit * gradient + math.sqrt(self.limit)
        if busiest * 2 < self.limit:
            # The limit is not what holds the requests back: growing it would
            # only let it run away from what was ever tested.
            proposed = min(proposed, self.limit)
        self.limit = max(float(self.floor), min(float(self.ceiling), proposed))


class AdaptiveStage(Stage):
    """Feeds the upstream's latency to its :class:`GradientLimit`; resizes admission."""

    __slots__ = ("_admission", "_limit", "_clock")
    name = "adaptive"

    def __init__(self, admission: Admission, limit: GradientLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self._admission = admission
        self._limit = limit
        self._clock = clock
        self._apply()

    def observe(self, exchange: Exchange, attempt: Attempt) -> None:
        status = attempt.status
        if status is None or attempt.headers_after is None or status >= 500 or status == 429:
            # No answer, or a refusal or failure: often much faster than real
            # work, it would read as spare capacity (pacing and the breaker
            # handle those).
            return
        if self._limit.sample(attempt.headers_after, self._admission.in_flight, self._clock()):
            self._apply()

    def _apply(self) -> None:
        admission = self._admission
        capacity = self._limit.capacity
        if capacity != admission.capacity:
            admission.resize(capacity, admission.max_pending, admission.pool_timeout)


def adaptive_stages(admission: Admission, limit: GradientLimit | None) -> list[Stage]:
    """The adaptive stage when ``limits.adaptive`` is on, else nothing."""
    return [] if limit is None else [AdaptiveStage(admission, limit)]
