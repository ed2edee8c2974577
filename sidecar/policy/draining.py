"""The sidecar-wide gate: once draining has begun, new requests are refused.

It runs before routing (a request for an unknown route during a drain is still
told ``draining``, so the caller retries on another instance).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import Draining
from . import Stage

if TYPE_CHECKING:
    from ..exchange import Exchange


class DrainingGate(Stage):
    """Refuses every request with 503 ``draining`` while the sidecar shuts down."""

    __slots__ = ("_draining",)
    name = "draining"

    def __init__(self, draining: Callable[[], bool]) -> None:
        self._draining = draining

    def admit_now(self, exchange: Exchange) -> bool:
        if self._draining():
            raise Draining("the sidecar is shutting down; retry on another instance", retry_after=1)
        return True
