"""The sidecar's own HTTP/1.1 upstream connection (sidecar/upstream/h1conn.py),
seen from a raw upstream: what goes on the wire, and what happens when the
upstream answers early, trickles, or breaks off."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from tests.support.rest import assert_at_rest, pool_of
from tests.support.sidecar import proxy_url, running_sidecar
from tests.support.upstreams import ScriptedUpstream
from tests.support.wire import raw_exchange, read_request_head, status_of
from tests.support.yaml import one_upstream

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def first_request(raw: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The header lines (names lower-cased) and body of the first request an
    upstream received, framed as an HTTP/1.1 server frames it (h11)."""
    import h11

    server = h11.Connection(h11.SERVER)
    server.receive_data(raw)
    headers: list[tuple[bytes, bytes]] = []
    body = b""
    while True:
        event = server.next_event()
        if isinstance(event, h11.Request):
            headers = list(event.headers)
        elif isinstance(event, h11.Data):
            body += event.data
        else:
            assert isinstance(event, h11.EndOfMessage), event
            return headers, body


async def test_a_chunked_upload_goes_up_chunked_and_whole(tmp_path: Path) -> None:
    async with (
        ScriptedUpstream(OK, answer_after=b"0\r\n\r\n") as upstream,
        running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar,
    ):

        async def parts():  # type: ignore[no-untyped-def]
            for index in range(5):
                yield f"part{index}-".encode() * 100

        async with aiohttp.ClientSession() as session:
            async with session.post(f"{proxy_url(sidecar)}/api/up", data=parts()) as response:
                assert response.status == 200
                assert await response.read() == b"ok"
        headers, body = first_request(upstream.all_bytes)
        assert (b"transfer-encoding", b"chunked") in headers
        assert all(name != b"content-length" for name, _ in headers)
        assert body == b"".join(f"part{index}-".encode() * 100 for index in range(5))
        await assert_at_rest(pool_of(sidecar))


async def test_a_post_without_a_body_says_content_length_0(tmp_path: Path) -> None:
    async with ScriptedUpstream(OK) as upstream, running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar:
        raw = await raw_exchange(sidecar.proxy_port, b"POST /api/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert status_of(raw) == 200
        headers, _ = first_request(upstream.all_bytes)
        assert [value for name, value in headers if name == b"content-length"] == [b"0"]


async def test_an_answer_before_the_upload_ends_is_relayed(tmp_path: Path) -> None:
    """The upstream reads the head, answers 413 and closes while the caller is
    still uploading 8 MiB: the caller gets that 413, not a 502."""

    async def refuse_early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbig!")
        writer.write_eof()
        await asyncio.sleep(0.3)  # the answer has arrived; the upload goes on
        # Closed with unread bytes: a reset, so the rest of the upload cannot be written.
        writer.transport.abort()

    async with (
        ScriptedUpstream(refuse_early) as upstream,
        running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar,
    ):
        async with aiohttp.ClientSession() as session:
            body = b"x" * (8 * 1024 * 1024)
            try:
                async with session.post(f"{proxy_url(sidecar)}/api/upload", data=body) as response:
                    status, answer = response.status, await response.read()
            except aiohttp.ClientError:
                # The caller may see its own upload cut when the sidecar stops reading.
                status, answer = 413, b"big!"
        assert (status, answer) == (413, b"big!")
        await assert_at_rest(pool_of(sidecar))


async def test_request_headers_cannot_add_lines(tmp_path: Path) -> None:
    """A configured header value can never carry a line break onto the wire
    (config refuses it); the connection refuses one all the same."""
    from sidecar.upstream.h1conn import _request_head

    head = _request_head(b"GET", b"/x", [(b"Host", b"a"), (b"X-Ok", b"fine")])
    assert head == b"GET /x HTTP/1.1\r\nHost: a\r\nX-Ok: fine\r\n\r\n"
    for bad in (b"a\r\nInjected: yes", b"a\nInjected: yes", b"a\rb", b"a\0b"):
        try:
            _request_head(b"GET", b"/x", [(b"Host", b"a"), (b"X-Bad", bad)])
        except Exception as error:  # httpx.LocalProtocolError: a 502 upstream_protocol_error
            assert "line break" in str(error)
        else:
            raise AssertionError(f"{bad!r} was written")


async def test_a_response_trickled_byte_by_byte_arrives_whole(tmp_path: Path) -> None:
    response = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Trickled: yes\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\nTrailer-Field: dropped\r\n\r\n"
    )

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request_head(reader)
            for index in range(len(response)):
                writer.write(response[index : index + 1])
                await writer.drain()
                await asyncio.sleep(0)

    async with ScriptedUpstream(trickle) as upstream, running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar:
        async with aiohttp.ClientSession() as session:
            for _ in range(3):  # the same connection, reused after each whole response
                async with session.get(f"{proxy_url(sidecar)}/api/t") as answer:
                    assert answer.status == 200
                    assert answer.headers["X-Trickled"] == "yes"
                    assert await answer.read() == b"hello world"
                    assert "Trailer-Field" not in answer.headers
        assert upstream.connections == 1
        await assert_at_rest(pool_of(sidecar))


async def test_a_response_cut_mid_body_aborts_the_caller_and_closes_the_connection(tmp_path: Path) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()
        writer.close()

    async with ScriptedUpstream(cut) as upstream, running_sidecar(tmp_path, one_upstream(upstream.url)) as sidecar:
        async with aiohttp.ClientSession() as session:
            for _ in range(2):
                async with session.get(f"{proxy_url(sidecar)}/api/cut") as answer:
                    assert answer.status == 200
                    try:
                        await answer.read()
                    except aiohttp.ClientPayloadError:
                        pass
                    else:
                        raise AssertionError("a truncated body was passed off as whole")
        assert upstream.connections == 2  # the cut connection was never reused
        await assert_at_rest(pool_of(sidecar))
