"""The body kept for replay: streamed as it arrives, kept up to max_body, replayed whole."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from sidecar.body import ReplayableBody


class Source:
    """A caller's body in chunks; counts how far it was read."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)
        self.read = 0
        self.closed = False

    async def iterate(self) -> AsyncIterator[bytes]:
        try:
            for chunk in self.chunks:
                self.read += 1
                yield chunk
        finally:
            self.closed = True


async def _take(stream: AsyncIterator[bytes], count: int | None = None) -> list[bytes]:
    got: list[bytes] = []
    async for chunk in stream:
        got.append(chunk)
        if count is not None and len(got) == count:
            break
    return got


def test_a_body_read_whole_is_replayed_byte_for_byte() -> None:
    async def go() -> None:
        source = Source(b"ab", b"cd", b"ef")
        body = ReplayableBody(source.iterate(), max_body=100)
        assert await _take(body.stream()) == [b"ab", b"cd", b"ef"]
        assert body.complete and not body.overflowed
        assert await _take(body.stream()) == [b"ab", b"cd", b"ef"]
        assert source.read == 3  # the caller's body is read once
        await body.aclose()

    asyncio.run(go())


def test_an_attempt_that_stopped_early_is_continued_where_it_stopped() -> None:
    async def go() -> None:
        source = Source(b"1", b"2", b"3", b"4")
        body = ReplayableBody(source.iterate(), max_body=100)
        assert await _take(body.stream(), 2) == [b"1", b"2"]  # the upstream answered mid-upload
        assert source.read == 2
        assert await _take(body.stream()) == [b"1", b"2", b"3", b"4"]
        # Never read at all (a connect error) is the same: the next attempt reads it.
        fresh = Source(b"x", b"y")
        unread = ReplayableBody(fresh.iterate(), max_body=100)
        assert await _take(unread.stream()) == [b"x", b"y"]

    asyncio.run(go())


def test_past_max_body_nothing_is_kept_and_the_stream_goes_on() -> None:
    async def go() -> None:
        source = Source(b"a" * 60, b"b" * 60, b"c")
        body = ReplayableBody(source.iterate(), max_body=100)
        assert await _take(body.stream()) == [b"a" * 60, b"b" * 60, b"c"]
        assert body.overflowed
        await body.aclose()
        assert source.closed

    asyncio.run(go())
