"""HTTP/2 upstreams (``http2``; docs/http2.md), against real servers:
hypercorn for h2c and TLS + ALPN, and a raw h2 server for GOAWAY/RST_STREAM."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from sidecar.server import Sidecar
from tests.support.rest import assert_at_rest
from tests.support.sidecar import SidecarProcess, admin_url, proxy_url, running_sidecar
from tests.support.tls import tls_files
from tests.support.upstreams import HypercornUpstream, RawH2Server
from tests.support.yaml import one_upstream, write_config

MiB = 1024 * 1024


def _yaml(url: str, http2: str | bool, *, max_connections: int = 2, **fields: Any) -> str:
    return one_upstream(
        url,
        name="up",
        http2=http2,
        limits={"max_connections": max_connections},
        timeouts={"read": "10s", "pool": "2s"},
        **fields,
    )


async def _get(client: aiohttp.ClientSession, url: str) -> tuple[int, CIMultiDict[str], bytes]:
    async with client.get(url) as response:
        body = await response.read()
        return response.status, response.headers.copy(), body


async def _pools(client: aiohttp.ClientSession, sidecar: Sidecar) -> dict[str, Any]:
    async with client.get(admin_url(sidecar) + "/pools") as response:
        body: dict[str, Any] = await response.json()
        return body["upstreams"]["up"]


# ------------------------------------------------------------ negotiation


async def test_prior_knowledge_multiplexes_200_requests_over_max_connections(tmp_path: Path) -> None:
    async with (
        HypercornUpstream() as upstream,
        running_sidecar(tmp_path, _yaml(upstream.url, "prior-knowledge")) as sidecar,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client,
    ):
        results = await asyncio.gather(*(_get(client, proxy_url(sidecar) + "/up/") for _ in range(200)))
        assert [status for status, _, _ in results] == [200] * 200
        assert {headers["X-Http-Version"] for _, headers, _ in results} == {"2"}
        assert set(upstream.http_versions) == {"2"} and len(upstream.http_versions) == 200
        assert 1 <= len(upstream.peers) <= 2, upstream.peers
        snapshot = await _pools(client, sidecar)
        assert snapshot["http_versions"] == {"HTTP/2": snapshot["connections"]["open"]}
        assert snapshot["connections"]["opened_total"] <= 2
        await assert_at_rest(sidecar, "up")


async def test_alpn_negotiates_http2_with_ca_file(tmp_path: Path) -> None:
    from sidecar.upstream.h2conn import HTTP2Connection
    from tests.support.rest import pool_of

    tls = tls_files(tmp_path)
    async with (
        HypercornUpstream(tls=tls) as upstream,
        running_sidecar(tmp_path, _yaml(upstream.url, True, tls={"ca_file": str(tls.ca_file)})) as sidecar,
        aiohttp.ClientSession() as client,
    ):
        results = await asyncio.gather(*(_get(client, proxy_url(sidecar) + "/up/") for _ in range(20)))
        assert [status for status, _, _ in results] == [200] * 20
        assert set(upstream.http_versions) == {"2"}
        assert set((await _pools(client, sidecar))["http_versions"]) == {"HTTP/2"}
        links = [connection.link for connection in pool_of(sidecar, "up").transport._state.all.values()]
        assert links and all(isinstance(link, HTTP2Connection) for link in links), links
        await assert_at_rest(sidecar, "up")


async def test_alpn_falls_back_to_http11_when_the_server_offers_only_http11(tmp_path: Path) -> None:
    tls = tls_files(tmp_path)
    async with (
        HypercornUpstream(tls=tls, alpn=("http/1.1",)) as upstream,
        running_sidecar(
            tmp_path, _yaml(upstream.url, True, max_connections=10, tls={"ca_file": str(tls.ca_file)})
        ) as sidecar,
        aiohttp.ClientSession() as client,
    ):
        held = asyncio.gather(*(_get(client, proxy_url(sidecar) + "/up/hold") for _ in range(10)))
        for _ in range(150):  # one HTTP/1.1 connection per request, opened side by side
            if upstream.in_handler == 10:
                break
            await asyncio.sleep(0.02)
        assert upstream.in_handler == 10
        upstream.release.set()
        results = await held
        assert [status for status, _, _ in results] == [200] * 10
        assert len(upstream.peers) == 10
        assert set(upstream.http_versions) == {"1.1"}
        assert set((await _pools(client, sidecar))["http_versions"]) == {"HTTP/1.1"}
        await assert_at_rest(sidecar, "up")


async def test_an_alpn_choice_of_http11_runs_on_the_sidecars_own_connection_from_the_first_request(
    tmp_path: Path,
) -> None:
    """The TLS handshake offers h2 and http/1.1; the upstream's choice of
    HTTP/1.1 gets the sidecar's own (llhttp) connection, kept alive and reused."""
    from sidecar.upstream.h1conn import HTTP11Connection
    from tests.support.rest import pool_of

    tls = tls_files(tmp_path)
    async with (
        HypercornUpstream(tls=tls, alpn=("http/1.1",)) as upstream,
        running_sidecar(
            tmp_path, _yaml(upstream.url, True, max_connections=10, tls={"ca_file": str(tls.ca_file)})
        ) as sidecar,
        aiohttp.ClientSession() as client,
    ):
        for _ in range(20):
            status, _, body = await _get(client, proxy_url(sidecar) + "/up/x")
            assert status == 200, body
        links = [connection.link for connection in pool_of(sidecar, "up").transport._state.all.values()]
        assert links and all(isinstance(link, HTTP11Connection) for link in links), links
        assert len(upstream.peers) == 1  # one connection, reused
        assert set(upstream.http_versions) == {"1.1"}
        await assert_at_rest(sidecar, "up")


async def test_true_on_a_cleartext_url_stays_http11_and_validate_warns(tmp_path: Path) -> None:
    import subprocess
    import sys

    async with HypercornUpstream() as upstream:
        path = write_config(tmp_path, _yaml(upstream.url, True), name="validate.yaml")
        result = subprocess.run(
            [sys.executable, "-m", "sidecar", "validate", "-c", str(path)], capture_output=True, text=True
        )
        assert result.returncode == 0
        assert "stays HTTP/1.1" in result.stdout + result.stderr
        async with running_sidecar(tmp_path, _yaml(upstream.url, True)) as sidecar, aiohttp.ClientSession() as client:
            status, _, _ = await _get(client, proxy_url(sidecar) + "/up/")
            assert status == 200
            assert upstream.http_versions == ["1.1"]
            assert (await _pools(client, sidecar))["http_versions"] == {"HTTP/1.1": 1}


async def test_wrong_host_certificate_is_502_upstream_connect_error(tmp_path: Path) -> None:
    tls = tls_files(tmp_path, "wrong.example")
    async with (
        HypercornUpstream(tls=tls) as upstream,
        running_sidecar(tmp_path, _yaml(upstream.url, True, tls={"ca_file": str(tls.ca_file)})) as sidecar,
        aiohttp.ClientSession() as client,
    ):
        status, headers, body = await _get(client, proxy_url(sidecar) + "/up/")
        assert status == 502
        assert headers["X-Sidecar-Error"] == "upstream_connect_error"
        assert "certificate" in json.loads(body)["message"]
        assert upstream.http_versions == []
        await assert_at_rest(sidecar, "up")
        assert sidecar.generation().pools["up"].stats().connections == 0


async def test_verify_false_connects_and_is_logged_as_a_warning(tmp_path: Path) -> None:
    tls = tls_files(tmp_path, "wrong.example")
    async with HypercornUpstream(tls=tls) as upstream:
        path = write_config(tmp_path, _yaml(upstream.url, True, tls={"verify": False}))
        process = await SidecarProcess(path).start()
        try:
            warnings = [line["message"] for line in process.events("config_warning")]
            assert any("TLS verification is OFF" in message for message in warnings), warnings
            async with aiohttp.ClientSession() as client:
                status, headers, _ = await _get(client, process.url + "/up/")
            assert status == 200 and headers["X-Http-Version"] == "2"
            access = await process.wait_for_event("access")
            assert access["upstream_http_version"] == "HTTP/2"
        finally:
            await process.stop()


# ------------------------------------------------------ abandoned streams


async def test_abandoned_downloads_do_not_stall_the_connection(tmp_path: Path) -> None:
    """20 callers hang up mid-download; without RST_STREAM the unread data eats
    the 16 MiB connection window and every later stream on it stalls."""
    async with (
        HypercornUpstream() as upstream,
        running_sidecar(tmp_path, _yaml(upstream.url, "prior-knowledge", max_connections=1)) as sidecar,
    ):
        pool = sidecar.generation().pools["up"]
        for _ in range(20):
            async with aiohttp.ClientSession() as client:
                response = await client.get(proxy_url(sidecar) + f"/up/big?size={4 * MiB}")
                assert response.status == 200
                await response.content.readexactly(64 * 1024)
                response.close()  # hang up mid-body
        async with aiohttp.ClientSession() as client:

            async def next_requests() -> list[tuple[int, CIMultiDict[str], bytes]]:
                return await asyncio.gather(*(_get(client, proxy_url(sidecar) + "/up/") for _ in range(50)))

            results = await asyncio.wait_for(next_requests(), 5)
            assert [status for status, _, _ in results] == [200] * 50
            # the window is intact: a full large download still passes
            status, _, body = await asyncio.wait_for(_get(client, proxy_url(sidecar) + f"/up/big?size={4 * MiB}"), 10)
            assert status == 200 and len(body) == 4 * MiB
        await asyncio.sleep(0.1)
        await assert_at_rest(sidecar, "up")
        # the streams were reset, not the connection: no reconnect churn
        assert pool.stats().connections == 1 and pool.stats().opened_total == 1


async def test_callers_gone_before_response_headers_do_not_stall_the_connection(tmp_path: Path) -> None:
    """Callers hang up while waiting for headers; httpcore forgets their streams
    without RST_STREAM, and the large responses the upstream sends later for
    them would eat the connection window."""
    async with (
        HypercornUpstream() as upstream,
        running_sidecar(tmp_path, _yaml(upstream.url, "prior-knowledge", max_connections=1)) as sidecar,
    ):
        pool = sidecar.generation().pools["up"]
        async with aiohttp.ClientSession() as client:
            gone = [
                asyncio.ensure_future(_get(client, proxy_url(sidecar) + f"/up/hold?size={4 * MiB}")) for _ in range(10)
            ]
            for _ in range(100):
                if upstream.in_handler == 10:
                    break
                await asyncio.sleep(0.02)
            assert upstream.in_handler == 10
        await asyncio.gather(*gone, return_exceptions=True)  # the session closed: all hung up
        for _ in range(100):
            if pool.admission.in_flight == 0:
                break
            await asyncio.sleep(0.02)
        upstream.release.set()  # the upstream now answers the abandoned streams
        await asyncio.sleep(0.3)
        async with aiohttp.ClientSession() as client:
            results = await asyncio.wait_for(
                asyncio.gather(*(_get(client, proxy_url(sidecar) + "/up/") for _ in range(20))), 5
            )
            assert [status for status, _, _ in results] == [200] * 20
            status, _, body = await asyncio.wait_for(_get(client, proxy_url(sidecar) + f"/up/big?size={4 * MiB}"), 10)
            assert status == 200 and len(body) == 4 * MiB
        await assert_at_rest(sidecar, "up")
        assert pool.stats().opened_total == 1


async def test_hundreds_of_cancellations_leave_nothing_behind(tmp_path: Path) -> None:
    """Callers cancelled at random points (waiting, before headers, mid-body):
    every slot, stream and connection comes back, and the connection still
    carries full downloads afterwards."""
    import random

    rng = random.Random(4)
    async with (
        HypercornUpstream() as upstream,
        running_sidecar(tmp_path, _yaml(upstream.url, "prior-knowledge")) as sidecar,
    ):
        pool = sidecar.generation().pools["up"]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:

            async def download() -> None:
                async with client.get(proxy_url(sidecar) + f"/up/big?size={MiB}") as response:
                    await response.read()

            tasks = [asyncio.ensure_future(download()) for _ in range(300)]
            await asyncio.sleep(0.01)
            for task in tasks:
                asyncio.get_running_loop().call_later(rng.uniform(0, 0.3), task.cancel)
            await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(200):
            if pool.admission.in_flight == 0 and pool.stats().active == 0:
                break
            await asyncio.sleep(0.02)
        await assert_at_rest(sidecar, "up")
        async with aiohttp.ClientSession() as client:
            results = await asyncio.wait_for(
                asyncio.gather(*(_get(client, proxy_url(sidecar) + f"/up/big?size={4 * MiB}") for _ in range(5))), 20
            )
            assert [(status, len(body)) for status, _, body in results] == [(200, 4 * MiB)] * 5
        assert pool.stats().connections <= 2
        await assert_at_rest(sidecar, "up")


async def test_an_answer_before_the_upload_is_relayed_at_once_and_the_connection_goes_on(tmp_path: Path) -> None:
    """The upstream answers 413 and never reads the body: the upload, stuck on
    a shut flow-control window, stops when the answer ends the stream (not
    when timeouts.write runs out), and the stream is closed on the server."""
    async with RawH2Server() as server:
        timeouts = {"read": "10s", "write": "30s", "pool": "2s"}
        config = one_upstream(server.url, name="up", http2="prior-knowledge", timeouts=timeouts)
        async with running_sidecar(tmp_path, config) as sidecar, aiohttp.ClientSession() as client:
            started = asyncio.get_running_loop().time()
            async with client.post(proxy_url(sidecar) + "/up/early", data=b"x" * (256 * 1024)) as response:
                assert response.status == 413, await response.text()
            assert asyncio.get_running_loop().time() - started < 5
            status, _, body = await _get(client, proxy_url(sidecar) + "/up/ok")
            assert (status, body) == (200, b"ok")
            assert server.connections == 1
            await assert_at_rest(sidecar, "up")


# --------------------------------------------------------- GOAWAY and RST


async def test_rst_stream_is_502_and_the_connection_keeps_serving(tmp_path: Path) -> None:
    async with (
        RawH2Server() as server,
        running_sidecar(tmp_path, _yaml(server.url, "prior-knowledge")) as sidecar,
        aiohttp.ClientSession() as client,
    ):
        held = asyncio.gather(*(_get(client, proxy_url(sidecar) + "/up/hold") for _ in range(3)))
        await asyncio.sleep(0.05)
        status, headers, _ = await _get(client, proxy_url(sidecar) + "/up/rst")
        assert status == 502 and headers["X-Sidecar-Error"] == "upstream_protocol_error"
        assert [(s, b) for s, _, b in await held] == [(200, b"held")] * 3
        status, _, body = await _get(client, proxy_url(sidecar) + "/up/ok")
        assert (status, body) == (200, b"ok")
        assert server.connections == 1  # a stream error, not a connection error
        await assert_at_rest(sidecar, "up")


async def test_goaway_fails_that_request_cleanly_and_the_next_use_a_fresh_connection(tmp_path: Path) -> None:
    async with (
        RawH2Server() as server,
        running_sidecar(tmp_path, _yaml(server.url, "prior-knowledge", max_connections=1)) as sidecar,
        aiohttp.ClientSession() as client,
    ):
        held = asyncio.gather(*(_get(client, proxy_url(sidecar) + "/up/hold") for _ in range(3)))
        await asyncio.sleep(0.05)
        status, headers, _ = await _get(client, proxy_url(sidecar) + "/up/goaway")
        assert status == 502 and headers["X-Sidecar-Error"] == "upstream_protocol_error"
        for status, headers, body in await held:
            assert (status, body) == (200, b"held") or (
                status == 502 and headers["X-Sidecar-Error"] == "upstream_protocol_error"
            )
        results = await asyncio.gather(*(_get(client, proxy_url(sidecar) + "/up/ok") for _ in range(10)))
        assert [(s, b) for s, _, b in results] == [(200, b"ok")] * 10
        # httpcore fails every stream still waiting once GOAWAY is read (a known
        # race); the pool retries an idempotent request once on a fresh connection
        assert server.connections >= 2
        assert server.paths[-10:] == ["/ok"] * 10
        await assert_at_rest(sidecar, "up")


async def test_a_broken_connection_fails_its_streams_cleanly_and_is_replaced(tmp_path: Path) -> None:
    """One read error fails every stream on an h2 connection:
    each gets a clean 502 (or its retry succeeds), and the pool opens a fresh
    connection instead of handing out the broken one."""
    async with (
        RawH2Server() as server,
        running_sidecar(tmp_path, _yaml(server.url, "prior-knowledge", max_connections=1)) as sidecar,
        aiohttp.ClientSession() as client,
    ):
        held = asyncio.gather(*(_get(client, proxy_url(sidecar) + "/up/hold") for _ in range(3)))
        await asyncio.sleep(0.05)
        post = client.post(proxy_url(sidecar) + "/up/kill", data=b"not retried")
        async with post as response:
            assert response.status == 502
            assert response.headers["X-Sidecar-Error"] == "upstream_protocol_error"
        for status, headers, body in await held:
            assert (status, body) == (200, b"held") or (
                status == 502 and headers["X-Sidecar-Error"] == "upstream_protocol_error"
            )
        results = await asyncio.gather(*(_get(client, proxy_url(sidecar) + "/up/ok") for _ in range(10)))
        assert [(s, b) for s, _, b in results] == [(200, b"ok")] * 10
        assert server.connections >= 2
        await assert_at_rest(sidecar, "up")
        assert sidecar.generation().pools["up"].stats().connections == 1


async def test_a_stream_without_answer_times_out_alone_while_others_flow(tmp_path: Path) -> None:
    """httpcore's read timeout is per socket read, not per stream:
    with other streams keeping the connection busy, a stream that never gets its
    answer never timed out; when the connection went quiet its timeout failed
    every other stream on it too."""
    async with (
        RawH2Server(hold_seconds=0.5) as server,
        running_sidecar(
            tmp_path,
            f"""
        upstreams:
          up:
            url: {server.url}
            http2: prior-knowledge
            limits: {{ max_connections: 1 }}
            timeouts: {{ read: 1s }}
        """,
        ) as sidecar,
        aiohttp.ClientSession() as client,
    ):
        stop = asyncio.Event()
        traffic: list[int] = []

        async def keep_busy() -> None:
            while not stop.is_set():
                traffic.append((await _get(client, proxy_url(sidecar) + "/up/ok"))[0])
                await asyncio.sleep(0.05)

        async def late_hold() -> tuple[int, CIMultiDict[str], bytes]:
            await asyncio.sleep(0.8)  # in flight when the other stream's deadline fires
            return await _get(client, proxy_url(sidecar) + "/up/hold")

        busy = asyncio.ensure_future(keep_busy())
        hold = asyncio.ensure_future(late_hold())
        started = asyncio.get_running_loop().time()
        status, headers, _ = await asyncio.wait_for(_get(client, proxy_url(sidecar) + "/up/never"), 5)
        assert status == 504 and headers["X-Sidecar-Error"] == "upstream_timeout"
        assert asyncio.get_running_loop().time() - started < 3
        status, _, body = await asyncio.wait_for(hold, 5)
        assert (status, body) == (200, b"held")
        stop.set()
        await busy
        assert traffic and set(traffic) == {200}
        assert server.connections == 1  # the connection kept serving
        await assert_at_rest(sidecar, "up")


async def test_a_stalled_body_times_out_alone_while_others_flow(tmp_path: Path) -> None:
    """timeouts.read is "between bytes": it holds per stream for the body too."""
    async with (
        RawH2Server() as server,
        running_sidecar(
            tmp_path,
            f"""
        upstreams:
          up:
            url: {server.url}
            http2: prior-knowledge
            limits: {{ max_connections: 1 }}
            timeouts: {{ read: 1s }}
        """,
        ) as sidecar,
        aiohttp.ClientSession() as client,
    ):
        stop = asyncio.Event()
        traffic: list[int] = []

        async def keep_busy() -> None:
            while not stop.is_set():
                traffic.append((await _get(client, proxy_url(sidecar) + "/up/ok"))[0])
                await asyncio.sleep(0.05)

        busy = asyncio.ensure_future(keep_busy())
        async with client.get(proxy_url(sidecar) + "/up/stall") as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await asyncio.wait_for(response.read(), 5)  # aborted: never a clean, short body
        stop.set()
        await busy
        assert traffic and set(traffic) == {200}
        assert server.connections == 1
        await assert_at_rest(sidecar, "up")


async def test_a_silent_connection_is_retired_after_a_read_timeout(tmp_path: Path) -> None:
    async with (
        RawH2Server() as server,
        running_sidecar(
            tmp_path,
            f"""
        upstreams:
          up:
            url: {server.url}
            http2: prior-knowledge
            limits: {{ max_connections: 1 }}
            timeouts: {{ read: 500ms }}
        """,
        ) as sidecar,
        aiohttp.ClientSession() as client,
    ):
        status, headers, _ = await asyncio.wait_for(_get(client, proxy_url(sidecar) + "/up/freeze"), 5)
        assert status == 504 and headers["X-Sidecar-Error"] == "upstream_timeout"
        status, _, body = await asyncio.wait_for(_get(client, proxy_url(sidecar) + "/up/ok"), 5)
        assert (status, body) == (200, b"ok")
        assert server.connections == 2
        await asyncio.sleep(0.1)
        await assert_at_rest(sidecar, "up")
        assert sidecar.generation().pools["up"].stats().connections == 1


async def test_goaway_below_the_stream_is_a_clean_502(tmp_path: Path) -> None:
    """GOAWAY(last_stream_id=1) for stream 3: httpcore raises
    ConnectionNotAvailable, which is no httpx error; it must still become a
    502, never a 500."""
    async with (
        RawH2Server() as server,
        running_sidecar(tmp_path, _yaml(server.url, "prior-knowledge", max_connections=1)) as sidecar,
        aiohttp.ClientSession() as client,
    ):
        assert (await _get(client, proxy_url(sidecar) + "/up/ok"))[0] == 200
        status, headers, _ = await _get(client, proxy_url(sidecar) + "/up/goaway1")
        assert status == 502 and headers["X-Sidecar-Error"] == "upstream_protocol_error"
        status, _, body = await _get(client, proxy_url(sidecar) + "/up/ok")
        assert (status, body) == (200, b"ok")
        await assert_at_rest(sidecar, "up")


# ------------------------------------------------ MAX_CONCURRENT_STREAMS


@pytest.mark.slow
@pytest.mark.parametrize("max_connections", [1, 2])
async def test_more_requests_than_max_concurrent_streams_never_hang(tmp_path: Path, max_connections: int) -> None:
    """The server allows 5 streams per connection; 12 callers hold theirs. The
    pool carries 5 per connection and the rest get 503 pool_timeout after
    timeouts.pool, instead of waiting forever on httpcore's stream semaphore."""
    async with (
        HypercornUpstream(max_concurrent_streams=5) as upstream,
        running_sidecar(
            tmp_path,
            f"""
        upstreams:
          up:
            url: {upstream.url}
            http2: prior-knowledge
            limits: {{ max_connections: {max_connections} }}
            timeouts: {{ pool: 500ms, read: 10s }}
        """,
        ) as sidecar,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client,
    ):
        tasks = [asyncio.ensure_future(_get(client, proxy_url(sidecar) + "/up/hold")) for _ in range(12)]
        carried = 5 * max_connections
        done, _ = await asyncio.wait(tasks, timeout=4)
        refused = [task.result() for task in done]
        assert len(refused) == 12 - carried
        for status, headers, _ in refused:
            assert status == 503
            assert headers["X-Sidecar-Error"] == "pool_timeout" and int(headers["Retry-After"]) >= 1
        assert upstream.in_handler == carried
        upstream.release.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert sum(1 for status, _, _ in results if status == 200) == carried
        assert upstream.max_in_handler == carried
        assert len(upstream.peers) == max_connections
        await assert_at_rest(sidecar, "up")


def test_pool_timeout_from_the_transport_is_503_pool_timeout() -> None:
    """The transport's own wait (e.g. for an HTTP/2 stream) is capacity, not an
    upstream fault: 503 pool_timeout with Retry-After, never a 502/504."""
    import httpx

    from sidecar.errors import PoolTimeout, from_upstream_exception

    error = from_upstream_exception(httpx.PoolTimeout("no stream"), "up")
    assert isinstance(error, PoolTimeout)
    assert (error.status, error.code, error.retry_after) == (503, "pool_timeout", 1)
