"""What an idle keep-alive caller costs: the connection, not its last exchange.

A sidecar in front of many services holds thousands of kept-alive caller
connections that are idle most of the time (bench/memory.py holds 10,000).
aiohttp keeps a connection's last request and response objects until the next
request arrives; these tests pin down that they no longer hold the response's
headers, that a connection's queue of parsed requests is the lighter one, and
that pipelined requests still go through that queue in order.  The last test
is about the cost of the process itself: no Redis client library unless the
config asks for shared limits.
"""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
from pathlib import Path

from sidecar.compat.aiohttp import Http11Response, MessageQueue, RelayedResponse
from sidecar.server import Sidecar
from tests.support import LOOPBACK
from tests.support.rest import assert_at_rest
from tests.support.upstreams import Upstream
from tests.support.wire import read_response, request_bytes


def _relayed_responses_alive() -> list[RelayedResponse]:
    gc.collect()
    return [obj for obj in gc.get_objects() if isinstance(obj, RelayedResponse)]


async def test_an_idle_keep_alive_caller_holds_no_response_headers(api_sidecar: Sidecar, upstream: Upstream) -> None:
    reader, writer = await asyncio.open_connection(LOOPBACK, api_sidecar.proxy_port)
    try:
        for path in ("/api/first", "/api/second"):
            writer.write(request_bytes(path, host="api.internal"))
            response = await asyncio.wait_for(read_response(reader), 10)
            assert response.status == 200
            assert response.header("X-Request-Id")
            # The connection is idle and kept alive: whatever aiohttp still
            # holds of the exchange just answered carries no headers.
            held = _relayed_responses_alive()
            assert held, "the test no longer sees the last response"
            assert all(len(relayed.headers) == 0 for relayed in held), [dict(r.headers) for r in held]
            assert not writer.is_closing()
    finally:
        writer.close()
    await assert_at_rest(api_sidecar)


async def test_each_caller_connection_queues_its_requests_in_a_list(api_sidecar: Sidecar) -> None:
    reader, writer = await asyncio.open_connection(LOOPBACK, api_sidecar.proxy_port)
    try:
        writer.write(request_bytes("/api/x", host="api.internal"))
        assert (await asyncio.wait_for(read_response(reader), 10)).status == 200
        server = api_sidecar._proxy_runner.server if api_sidecar._proxy_runner is not None else None
        assert server is not None
        (connection,) = server.connections
        messages: object = connection._messages
        assert type(messages) is MessageQueue
    finally:
        writer.close()
    await assert_at_rest(api_sidecar)


async def test_pipelined_requests_are_answered_in_order(api_sidecar: Sidecar, upstream: Upstream) -> None:
    paths = [f"/api/p{index}" for index in range(8)]
    reader, writer = await asyncio.open_connection(LOOPBACK, api_sidecar.proxy_port)
    try:
        # All in one write: the parser queues several heads before the first is handled.
        writer.write(b"".join(request_bytes(path, host="api.internal") for path in paths))
        for _ in paths:
            assert (await asyncio.wait_for(read_response(reader), 10)).status == 200
    finally:
        writer.close()
    assert [request.path for request in upstream.requests] == [f"/base/api/p{index}" for index in range(8)]
    await assert_at_rest(api_sidecar)


def test_redis_is_not_imported_without_a_shared_section(tmp_path: Path) -> None:
    """redis-py costs every process about 5 MiB: only a ``shared:`` section loads it."""
    config = tmp_path / "upstreams.yaml"
    config.write_text(f"listen: {LOOPBACK}:0\nadmin: off\nupstreams:\n  api:\n    url: http://{LOOPBACK}:9\n")
    script = (
        "import asyncio, sys\n"
        "import sidecar.cli, sidecar.runtime\n"
        "from sidecar.config import load_config\n"
        "from sidecar.server import Sidecar\n"
        "async def main():\n"
        f"    sidecar = Sidecar(load_config({str(config)!r}))\n"
        "    await sidecar.start()\n"
        "    await sidecar.shutdown()\n"
        "asyncio.run(main())\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'redis'))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr


async def test_an_idle_caller_answered_with_an_error_holds_no_error_response(api_sidecar: Sidecar) -> None:
    reader, writer = await asyncio.open_connection(LOOPBACK, api_sidecar.proxy_port)
    try:
        writer.write(request_bytes("/nowhere", host="elsewhere.internal"))
        response = await asyncio.wait_for(read_response(reader), 10)
        assert response.status == 404
        assert response.header("X-Sidecar-Error")
        assert response.json()["error"]
        gc.collect()
        held = [obj for obj in gc.get_objects() if isinstance(obj, Http11Response)]
        assert held, "the test no longer sees the last response"
        assert all(len(error.headers) == 0 and error.body is None for error in held), [dict(e.headers) for e in held]
        # Still kept alive, and still answering.
        writer.write(request_bytes("/api/x", host="api.internal"))
        assert (await asyncio.wait_for(read_response(reader), 10)).status == 200
    finally:
        writer.close()
    await assert_at_rest(api_sidecar)
