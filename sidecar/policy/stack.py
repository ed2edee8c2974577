"""Which stages a request passes, in which order: the one place that says so.

A new policy is a new module in this package plus one line below.  The order
for one upstream is fixed by the contract: deadline → circuit breaker →
upstream pacing → rate limit → admission (slots) → attempts → relay; stages
that refuse without waiting (the declared body limit) go first.

A policy that is not configured costs a request nothing: its stage is either
not built (no rate limit, no adaptive limit, no shared limits) or built
inactive (a circuit breaker with ``failures: 0``, pacing with
``learn: false``), kept only for what ``/pools`` and the metrics report of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from . import Stages
from .adaptive import adaptive_stages
from .admission import AdmissionStage
from .body_limit import DeclaredBodyLimit
from .breaker import CircuitBreakerStage
from .deadline import DeadlineStage
from .draining import DrainingGate
from .retry import RetryStage
from .shared import pacing_stages, shared_lease_stages, shared_rate_limit_stages

if TYPE_CHECKING:
    from ..pools import UpstreamPool


def sidecar_stages(draining: Callable[[], bool]) -> Stages:
    """Before routing: what applies to every request whatever its upstream."""
    return Stages([DrainingGate(draining)])


def upstream_stages(pool: UpstreamPool) -> Stages:
    """After routing: one upstream's policies, built once per pool."""
    return Stages(
        [
            DeclaredBodyLimit(),
            DeadlineStage(),
            CircuitBreakerStage(pool.circuit),
            *pacing_stages(pool.name, pool.upstream.pacing, pool.shared),
            *shared_rate_limit_stages(pool.upstream, pool.shared),
            AdmissionStage(pool.admission),
            *adaptive_stages(pool.admission, pool.concurrency),
            *shared_lease_stages(pool.upstream, pool.shared),
            RetryStage(pool.retries),
        ]
    )
