"""What one request sees and what happened to it: the per-request context.

An :class:`Exchange` is made when a request arrives and travels the whole
request path (``forward.py``): the admission stages read and write it, the
attempt loop records each upstream :class:`Attempt` on it, and at the end the
access log and the metrics are written from it, once.

It takes the configuration :class:`Generation` **once**, when the request is
routed: a reload in the middle of a request never mixes two configs in it (the
pools, limits and inbound settings all come from the same snapshot).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multidict import CIMultiDictProxy

    from .config import Inbound
    from .pools import UpstreamPool
    from .routing import RouteMatch, Router


@dataclass(slots=True)
class Generation:
    """One loaded config's routing and pools; swapped whole on reload."""

    router: Router
    pools: dict[str, UpstreamPool]
    inbound: Inbound


@dataclass(slots=True)
class Attempt:
    """One try at the upstream: what the stages learn from (status, latency, error)."""

    number: int  # 1 for the first attempt
    started: float
    status: int | None = None  # the response status, None when no response head arrived
    headers_after: float | None = None  # seconds from the start to the response head
    error: str | None = None  # the outcome code when the attempt failed
    # Why it failed without a response head: "connect_error" (never sent),
    # "reset" (broke after sending) or "timeout" (no head in time); None otherwise.
    failure: str | None = None
    retry_after: float | None = None  # the response's Retry-After, in seconds, if it had one
    # The response's raw headers, kept only when their names may carry a
    # rate-limit signal (see sidecar/policy/signals.py): None for most responses.
    signal_headers: list[tuple[bytes, bytes]] | None = None


@dataclass(slots=True)
class Exchange:
    """One request: its facts, its snapshot of the config, its timings and outcome."""

    request_id: str
    method: str
    path: str  # encoded, without the query (no secrets, no control characters)
    started: float
    declared_length: int | None = None  # the caller's Content-Length, if any
    request_headers: CIMultiDictProxy[str] | None = None  # the caller's headers, for stages that key on one
    generation: Generation | None = None  # taken once, when routed
    match: RouteMatch | None = None
    upstream: str | None = None
    pool: UpstreamPool | None = None
    # Who is calling (the caller header): the name as sent when valid, else
    # "other"; the label is the same bounded to the configured names + "other".
    caller: str = "other"
    caller_label: str = "other"
    # Waiting in the stages: one budget for every wait together.
    waiting_since: float | None = None  # when the request began passing its upstream's stages
    deadline: float | None = None  # monotonic time the caller's own budget ends; None: none given
    # Admission: set by the admission stage.
    queued: bool = False  # reached admission (pool_wait is meaningful)
    pool_wait: float = 0.0
    admitted_at: float | None = None
    # Pacing: the learned-limits partition and the request's place in it.
    pacing_key: bytes | None = None
    pacing_ticket: int = 0
    # Shared limits: the number of the first attempt's token when it came from
    # Redis (0: none, or a local one), and the concurrency lease this request
    # holds there, if any.
    shared_token: int = 0
    lease_id: str | None = None
    # Attempts at the upstream, in order.
    attempts: list[Attempt] = field(default_factory=list)
    # Retries: may the request be sent again (no body, or a body kept whole for
    # replay), and may it be repeated after it reached the upstream (an
    # idempotent method, or an Idempotency-Key)?
    replayable: bool = True
    idempotent: bool = False
    circuit_probe: bool = False  # the current attempt is the circuit's one half-open probe
    # What the caller got.
    status: int = 0
    upstream_time: float | None = None
    http_version: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    error: str | None = None
    aborted: bool = False

    def wait_allowance(self, now: float) -> float | None:
        """Seconds this request may still wait before it goes upstream.

        One ``timeouts.pool`` covers every wait in the stages together (a
        learned pause, a rate-limit token, a slot) and the connection pool's
        own wait after them, so no request waits longer in total; a caller's
        deadline bounds it further.  None before the request is routed (no
        budget is known yet).
        """
        pool = self.pool
        if pool is None:
            return None
        since = now if self.waiting_since is None else self.waiting_since
        left = pool.admission.pool_timeout - (now - since)
        if self.deadline is not None:
            left = min(left, self.deadline - now)
        return max(0.0, left)

    def begin_attempt(self, now: float) -> Attempt:
        attempt = Attempt(number=len(self.attempts) + 1, started=now)
        self.attempts.append(attempt)
        return attempt
