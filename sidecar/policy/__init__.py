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
    * :meth:`admit_now` is the part of admit that needs no wait (see there);
    * :meth:`release` is called exactly once for every :meth:`admit` that
      returned, synchronously, on every path — success, error, cancellation —
      so whatever admit took (a slot, a token, a lease) always goes back;
    * :meth:`observe` sees every attempt at the upstream, in order;
    * :meth:`next_attempt` is asked after an attempt that may be repeated;
    * :meth:`before_retry` gates every attempt after the first, while the
      request keeps what :meth:`admit` gave it (its slot): a stage that gates
      each attempt (a circuit, a learned pause, a rate-limit token) checks
      in :meth:`admit` for the first attempt and here for the others.

    A hook a stage does not override is never called (:class:`Stages` skips
    it), so a stage costs only what it does; and a stage that is not
    :attr:`active` is on no request's path at all.
    """

    __slots__ = ()
    name = "stage"

    @property
    def active(self) -> bool:
        """False for a policy configured off: it stays in the stack for what it
        reports (``/pools``, the metrics) and no request passes through it.
        Read once, when the stack is built."""
        return True

    def admit_now(self, exchange: Exchange) -> bool:
        """Admission without waiting: True when the request may go on (as if
        :meth:`admit` had returned), False when :meth:`admit` must decide;
        raises like admit.  A stage that never waits does all its admission
        here; one that may wait lets the common case through here and
        overrides :meth:`admit` for the rest.  (:class:`Stages` calls it only
        when the stage's class defines it with or after its ``admit``.)"""
        return False

    async def admit(self, exchange: Exchange) -> None:
        """Let the request through, possibly after a bounded wait, or raise.
        By default what :meth:`admit_now` decides."""
        self.admit_now(exchange)

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


def _defines(stage: Stage, hook: str) -> type | None:
    """The class in the stage's hierarchy that defines ``hook`` (None: only Stage's no-op)."""
    for owner in type(stage).__mro__:
        if owner is Stage:
            return None
        if hook in owner.__dict__:
            return owner
    return None


def _admits_now(stage: Stage) -> bool:
    """Does admit_now speak for this stage's admit?  Not when a subclass
    overrode admit but inherited the admit_now of a class above it."""
    now, later = _defines(stage, "admit_now"), _defines(stage, "admit")
    return now is not None and (later is None or issubclass(now, later))


class Stages:
    """An ordered stack of stages: admitted first to last, released last to first.

    Each hook is called only on the stages that override it, so a stage adds
    nothing to the hooks it leaves alone (see :class:`Stage`).
    """

    __slots__ = ("stages", "_admitting", "_releasing", "_observing", "_deciding", "_gating")

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = tuple(stages)
        numbered = tuple((index, stage) for index, stage in enumerate(self.stages) if stage.active)
        self._admitting = tuple(
            (index, stage, _admits_now(stage))
            for index, stage in numbered
            if _defines(stage, "admit") or _defines(stage, "admit_now")
        )
        self._releasing = tuple((index, stage) for index, stage in reversed(numbered) if _defines(stage, "release"))
        self._observing = tuple(stage for _, stage in numbered if _defines(stage, "observe"))
        self._deciding = tuple(stage for _, stage in numbered if _defines(stage, "next_attempt"))
        self._gating = tuple(stage for _, stage in numbered if _defines(stage, "before_retry"))

    async def admit(self, exchange: Exchange) -> None:
        """Pass every stage in order.  If one refuses (or the caller goes away
        while one waits), the stages already passed are released before the
        error propagates; after a normal return the caller owes one
        :meth:`release`."""
        passed = 0
        try:
            for passed, stage, now in self._admitting:  # noqa: B007 - passed is read in the handler
                if not (now and stage.admit_now(exchange)):
                    await stage.admit(exchange)
        except BaseException:
            self._release(exchange, passed)
            raise

    def release(self, exchange: Exchange) -> None:
        self._release(exchange, len(self.stages))

    def _release(self, exchange: Exchange, passed: int) -> None:
        # Every stage gets its release even if an earlier one raised: a slot
        # must never leak because a token's bookkeeping had a bug.
        failure: BaseException | None = None
        for index, stage in self._releasing:
            if index >= passed:
                continue
            try:
                stage.release(exchange)
            except BaseException as exc:  # re-raised below, after the others
                failure = failure or exc
        if failure is not None:
            raise failure

    def observe(self, exchange: Exchange, attempt: Attempt) -> None:
        for stage in self._observing:
            stage.observe(exchange, attempt)

    def next_attempt(self, exchange: Exchange, attempt: Attempt) -> float | None:
        """The first stage that wants another attempt decides its delay."""
        for stage in self._deciding:
            delay = stage.next_attempt(exchange, attempt)
            if delay is not None:
                return delay
        return None

    async def before_retry(self, exchange: Exchange, attempt: Attempt) -> None:
        for stage in self._gating:
            await stage.before_retry(exchange, attempt)

    def __repr__(self) -> str:
        return f"<Stages {' → '.join(stage.name for stage in self.stages) or '(none)'}>"


__all__ = ["Stage", "Stages"]
