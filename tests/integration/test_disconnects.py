"""Callers that leave at the last moment: accounted as client_disconnected (499), never as a crash."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from sidecar.metrics import CLIENT_CLOSED_STATUS
from tests.support import LOOPBACK
from tests.support.metrics import scrape, value
from tests.support.rest import assert_at_rest, eventually
from tests.support.sidecar import SidecarProcess, admin_url, running_sidecar
from tests.support.upstreams import ScriptedUpstream
from tests.support.yaml import write_config

ROUNDS = 20


def reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), at once: the kernel tells the sidecar now, not after a FIN handshake."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_caller_gone_just_before_the_response_headers_is_499_not_unhandled_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The upstream answers and the caller resets in the same instant.

    Both land in one turn of the sidecar's event loop: the response head is
    parsed and written while the caller's transport is already closing but
    before aiohttp has run connection_lost (and cancelled the handler), so
    writing the headers fails with ConnectionResetError.
    """
    callers: list[socket.socket] = []

    async def answer_as_the_caller_resets(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            # One synchronous step: the response reaches the sidecar's upstream
            # socket, then the RST its client socket.
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            reset(callers.pop())

    caplog.set_level(logging.DEBUG)
    with capture_logs() as events:
        async with (
            ScriptedUpstream(answer_as_the_caller_resets) as upstream,
            running_sidecar(tmp_path, f"upstreams:\n  api: {{url: {upstream.url}}}\n") as sidecar,
            aiohttp.ClientSession() as client,
        ):
            pool = sidecar.generation().pools["api"]
            for _ in range(ROUNDS):
                caller = socket.create_connection((LOOPBACK, sidecar.proxy_port))
                callers.append(caller)
                caller.sendall(b"GET /api/x HTTP/1.1\r\nHost: x\r\n\r\n")
                await eventually(lambda: not callers)
            await eventually(lambda: sum(pool.outcomes.values()) == ROUNDS)
            await assert_at_rest(pool)
            samples = await scrape(client, admin_url(sidecar))

    crashes: list[Any] = [record for record in caplog.records if "unhandled_error" in record.getMessage()]
    crashes += [event for event in events if event["event"] == "unhandled_error"]
    assert crashes == [], "a caller that left is not an error of ours"
    assert [record for record in caplog.records if record.levelno >= logging.ERROR] == []
    access = [event for event in events if event["event"] == "access"]
    assert len(access) == ROUNDS
    # As for every other caller that left before a response: no status was sent.
    assert {(event["status"], event["error"]) for event in access} == {(None, "client_disconnected")}
    assert pool.outcomes == {"client_disconnected": ROUNDS}
    statuses = {
        status: value(samples, "sidecar_requests_total", upstream="api", method="GET", status=status)
        for status in ("200", "500", str(CLIENT_CLOSED_STATUS))
    }
    assert statuses == {"200": 0, "500": 0, str(CLIENT_CLOSED_STATUS): ROUNDS}


async def test_the_same_race_in_the_real_process_logs_no_traceback(tmp_path: Path) -> None:
    """As above against ``python -m sidecar run`` (uvloop, JSON logs), as in production."""
    callers: list[socket.socket] = []

    async def answer_as_the_caller_resets(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            reset(callers.pop())

    async with ScriptedUpstream(answer_as_the_caller_resets) as upstream:
        sidecar = SidecarProcess(write_config(tmp_path, f"upstreams:\n  api: {{url: {upstream.url}}}\n"))
        await sidecar.start()
        try:
            for _ in range(ROUNDS):
                caller = socket.create_connection((LOOPBACK, sidecar.proxy_port))
                callers.append(caller)
                caller.sendall(b"GET /api/x HTTP/1.1\r\nHost: x\r\n\r\n")
                await eventually(lambda: not callers)
            await sidecar.wait_for_event("access", count=ROUNDS)
            async with aiohttp.ClientSession() as client:
                samples = await scrape(client, sidecar.admin_url)
        finally:
            await sidecar.stop()
    assert [line for line in sidecar.lines if line.get("level") in ("error", "critical")] == []
    assert not any("Traceback" in line for line in sidecar.raw)
    access = sidecar.events("access")
    assert len(access) == ROUNDS
    # uvloop may hand the whole response to the transport before it sees the
    # reset: those count as sent (200), like any disconnect mid-response.
    assert {(line["status"], line["error"]) for line in access} <= {
        (None, "client_disconnected"),
        (200, "client_disconnected"),
        (200, None),
    }
    unanswered = sum(1 for line in access if line["status"] is None)
    assert value(samples, "sidecar_requests_total", upstream="api", method="GET", status="499") == unanswered
    assert value(samples, "sidecar_requests_total", upstream="api", method="GET", status="500") == 0
