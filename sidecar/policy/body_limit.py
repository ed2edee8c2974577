"""A request whose declared body is over ``inbound.max_request_body`` is refused
before it waits for a slot (413 ``request_too_large``).

Bodies without a declared length (chunked) are counted while they stream; that
check lives with the body relay in ``forward.py``, since it can only fire
mid-upload.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import RequestTooLarge
from . import Stage

if TYPE_CHECKING:
    from ..exchange import Exchange


def over_limit(declared: int | None, limit: int | None) -> bool:
    """The decision: is a declared length over the configured limit?"""
    return limit is not None and declared is not None and declared > limit


class DeclaredBodyLimit(Stage):
    """Refuses a declared ``Content-Length`` over the limit, at once."""

    __slots__ = ()
    name = "body_limit"

    def admit_now(self, exchange: Exchange) -> bool:
        generation = exchange.generation
        limit = generation.inbound.max_request_body if generation is not None else None
        if over_limit(exchange.declared_length, limit):
            raise RequestTooLarge(
                f"request body of {exchange.declared_length} bytes is over the limit of {limit}",
                upstream=exchange.upstream,
            )
        return True
