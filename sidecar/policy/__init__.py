"""Admission policies: the stages a request passes before it touches its upstream.

A stage is one module here, in two layers:

* a **core** — plain synchronous code that decides (admit, wait until t, refuse
  with a code and ``Retry-After``) and never waits; its unit tests drive it with
  a fake clock and no event loop;
* a **shell** — a :class:`Stage` subclass that asks the core, and only waits
  and wakes.

:class:`Stages` runs an ordered list of them for one request.  The request
path (``forward.py``) knows only :class:`Stages`; which stages exist and in
what order is decided in one place, :mod:`sidecar.policy.stack`, so a new
policy is a new module plus one line there (see docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..exchange import Attempt, Exchange


class Stage:
    """One policy in front of an upstream; subclasses override what they need.

    The contract every stage relies on:

    * :meth:`admit` returns (the request may go on) or raises a
      :class:`~sidecar.errors.SidecarError` (the sidecar answers it);
    * :meth:`release` is called exactly once for every :meth:`admit` that
      returned, synchronously, on every path — success, error, cancellation —
      so whatever admit took (a slot, a token, a lease) always goes back;
    * :meth:`observe` sees every attempt at the upstream, in order;
    * :meth:`next_attempt` is asked after an attempt that may be repeated;
    * :meth:`before_retry` gates every attempt after the first, while the
      request keeps what :meth:`admit` gave it (its slot): a stage that gates
      each attempt (a circuit, a learned pause, a rate-limit token) checks
      in :meth:`admit` for the first attempt and here for the others.
    """

    __slots__ = ()
    name = "stage"

    async def admit(self, exchange: Exchange) -> None:
        """Let the request through, possibly after a bounded wait, or raise."""

    def release(self, exchange: Exchange) -> None:
        """Give back what :meth:`admit` took; must not raise, must not wait."""

    def observe(self, exchange: Exchange, attempt: Attempt) -> None:
        """One upstream attempt ended (it has a status, or an error code)."""

    def next_attempt(self, exchange: Exchange, attempt: Attempt) -> float | None:
        """Seconds to wait before another attempt, or None for no other."""
        return None

    async def before_retry(self, exchange: Exchange, attempt: Attempt) -> None:
        """Another attempt (``attempt``, not yet sent) is about to be made: let it
        go, possibly after a bounded wait, or raise a SidecarError."""


class Stages:
    """An ordered stack of stages: admitted first to last, released last to first."""

    __slots__ = ("stages",)

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = tuple(stages)

    async def admit(self, exchange: Exchange) -> None:
        """Pass every stage in order.  If one refuses (or the caller goes away
        while one waits), the stages already passed are released before the
        error propagates; after a normal return the caller owes one
        :meth:`release`."""
        passed = 0
        try:
            for stage in self.stages:
                await stage.admit(exchange)
                passed += 1
        except BaseException:
            self._release(exchange, passed)
            raise

    def release(self, exchange: Exchange) -> None:
        self._release(exchange, len(self.stages))

    def _release(self, exchange: Exchange, passed: int) -> None:
        # Every stage gets its release even if an earlier one raised: a slot
        # must never leak because a token's bookkeeping had a bug.
        failure: BaseException | None = None
        for stage in reversed(self.stages[:passed]):
            try:
                stage.release(exchange)
            except BaseException as exc:  # re-raised below, after the others
                failure = failure or exc
        if failure is not None:
            raise failure

    def observe(self, exchange: Exchange, attempt: Attempt) -> None:
        for stage in self.stages:
            stage.observe(exchange, attempt)

    def next_attempt(self, exchange: Exchange, attempt: Attempt) -> float | None:
        """The first stage that wants another attempt decides its delay."""
        for stage in self.stages:
            delay = stage.next_attempt(exchange, attempt)
            if delay is not None:
                return delay
        return None

    async def before_retry(self, exchange: Exchange, attempt: Attempt) -> None:
        for stage in self.stages:
            await stage.before_retry(exchange, attempt)

    def __repr__(self) -> str:
        return f"<Stages {' → '.join(stage.name for stage in self.stages) or '(none)'}>"


__all__ = ["Stage", "Stages"]
