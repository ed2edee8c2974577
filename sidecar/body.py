"""The caller's request body on its way upstream: streamed, bounded, watched.

The body is never buffered whole: chunks go upstream as they arrive.  A caller
that pauses longer than ``inbound.body_idle_timeout`` while we wait for its next
bytes gets 408; one that sends more than ``inbound.max_request_body`` gets 413
(see docs/configuration.md, ``inbound``).  Either way the upstream only ever
saw an unfinished body on a connection that is then closed, never a complete
request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import HttpVersion11, StreamReader, hdrs, web

from .errors import RequestTimeout, RequestTooLarge

if TYPE_CHECKING:
    from .config import Inbound
    from .exchange import Exchange


class BodyIdle(TimeoutError):
    """Set on a request body stream whose caller stopped sending.

    A TimeoutError, so that aiohttp's lingering read after the response treats
    it as the end of waiting rather than an unhandled error.
    """


async def request_body(request: web.BaseRequest, exchange: Exchange, inbound: Inbound) -> AsyncIterator[bytes]:
    """The caller's body, chunk by chunk as it arrives."""
    if request.version >= HttpVersion11 and request.headers.get(hdrs.EXPECT, "").lower() == "100-continue":
        # Only now that the upstream is connected and wants the body: a caller
        # refused earlier (404, 503, 502) gets its final answer without uploading.
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    limit = inbound.max_request_body
    stream = request.content
    watchdog = _IdleWatchdog(stream, inbound.body_idle_timeout)
    try:
        while True:
            watchdog.waiting()
            try:
                chunk = await stream.readany()
            except BodyIdle:
                raise RequestTimeout(
                    f"request body stalled for more than {inbound.body_idle_timeout:g}s",
                    upstream=exchange.upstream,
                ) from None
            watchdog.got_data()
            if not chunk:
                return
            exchange.bytes_in += len(chunk)
            if limit is not None and exchange.bytes_in > limit:
                raise RequestTooLarge(f"request body is over the limit of {limit} bytes", upstream=exchange.upstream)
            yield chunk
    finally:
        watchdog.cancel()


class _IdleWatchdog:
    """One timer per request body instead of a ``wait_for`` per chunk.

    It only counts time spent waiting *for the caller*: while the upstream is
    slow to take the bytes we already have, the caller is not at fault.
    """

    __slots__ = ("_stream", "_timeout", "_loop", "_since", "_timer")

    def __init__(self, stream: StreamReader, timeout: float) -> None:
        self._stream = stream
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._since: float | None = None
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(timeout, self._check)

    def waiting(self) -> None:
        self._since = self._loop.time()

    def got_data(self) -> None:
        self._since = None

    def _check(self) -> None:
        now = self._loop.time()
        since = self._since
        if since is not None and now - since >= self._timeout:
            self._timer = None
            self._stream.set_exception(BodyIdle())
            return
        self._timer = self._loop.call_at((since if since is not None else now) + self._timeout, self._check)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class ReplayableBody:
    """The caller's body, kept (up to ``max_body`` bytes) while it streams, so
    that a retry can send it again.

    Nothing is read ahead: each attempt's stream first replays what was kept,
    then goes on reading the caller's body where the last attempt stopped,
    keeping each chunk before it is sent.  Once the body grows past
    ``max_body`` keeping stops (what was kept is dropped) and the request can
    no longer be repeated: the attempt under way simply streams on.
    """

    __slots__ = ("_source", "_max_body", "_kept", "_kept_size", "overflowed", "complete")

    def __init__(self, source: AsyncIterator[bytes], max_body: int) -> None:
        self._source = source
        self._max_body = max_body
        self._kept: list[bytes] = []
        self._kept_size = 0
        self.overflowed = False
        self.complete = False

    async def stream(self) -> AsyncIterator[bytes]:
        """One attempt's body."""
        for chunk in tuple(self._kept):
            yield chunk
        while not self.complete:
            try:
                chunk = await anext(self._source)
            except StopAsyncIteration:
                self.complete = True
                return
            if not self.overflowed:
                if self._kept_size + len(chunk) > self._max_body:
                    self.overflowed = True
                    self._kept.clear()
                else:
                    self._kept.append(chunk)
                    self._kept_size += len(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self._source.aclose()  # type: ignore[attr-defined]
