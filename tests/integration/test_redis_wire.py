"""The shared limits' Redis connections (sidecar/redis_wire.py) against a real redis-server."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sidecar.redis_wire import Command, ConnectionDown, Redis, ReplyError, Script, endpoint_from_url
from tests.support.redis import RedisServer

pytestmark = pytest.mark.timeout(60)

# Returns its argument and how many commands the key has counted: which call got which reply.
ECHO = Script("return {ARGV[1], redis.call('INCR', KEYS[1])}")
FAIL = Script("return redis.error_reply('ERR on purpose')")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    redis = Redis(endpoint_from_url(redis_server.url, "sidecar-test"), 0.5, (ECHO, FAIL))
    yield redis
    await redis.aclose()


async def test_concurrent_calls_share_one_connection_and_each_gets_its_own_reply(
    client: Redis, redis_server: RedisServer
) -> None:
    echo = Command(ECHO, ("w:{t}:n",))
    replies = await asyncio.gather(*(client.call(echo, (f"call-{i}",)) for i in range(500)))
    assert [reply[0] for reply in replies] == [f"call-{i}".encode() for i in range(500)]
    assert sorted(reply[1] for reply in replies) == list(range(1, 501))
    clients = redis_server.clients("sidecar-test")
    assert len(clients) == 1, clients
    # Named: CLIENT LIST says which process a connection is.
    assert clients[0]["name"] == "sidecar-test"


async def test_an_error_reply_fails_only_its_own_call(client: Redis) -> None:
    echo, fail = Command(ECHO, ("w:{t}:n",)), Command(FAIL, ("w:{t}:n",))
    results = await asyncio.gather(
        client.call(echo, ("a",)), client.call(fail), client.call(echo, ("b",)), return_exceptions=True
    )
    assert results[0][0] == b"a" and results[2][0] == b"b"  # type: ignore[index]
    assert isinstance(results[1], ReplyError) and "on purpose" in str(results[1])


async def test_a_flushed_script_cache_is_answered_with_the_whole_script(
    client: Redis, redis_server: RedisServer
) -> None:
    echo = Command(ECHO, ("w:{t}:n",))
    assert (await client.call(echo, ("x",)))[0] == b"x"
    redis_server.query("SCRIPT", "FLUSH")
    assert (await client.call(echo, ("y",)))[0] == b"y"


async def test_a_caller_that_gives_up_leaves_the_others_their_replies(client: Redis) -> None:
    echo = Command(ECHO, ("w:{t}:n",))
    await client.call(echo, ("warm",))
    calls = [asyncio.ensure_future(client.call(echo, (str(i),))) for i in range(20)]
    await asyncio.sleep(0)
    for call in calls[::3]:
        call.cancel()
    for index, call in enumerate(calls):
        if index % 3:
            assert (await call)[0] == str(index).encode()
    assert (await client.call(echo, ("after",)))[0] == b"after"


async def test_a_redis_that_stops_answering_fails_every_pending_call_within_the_timeout(
    client: Redis, redis_server: RedisServer
) -> None:
    """SIGSTOP: the connection is open but nothing comes back.  Every call fails within about the
    timeout (0.5 s); after SIGCONT a new connection serves again."""
    echo = Command(ECHO, ("w:{t}:n",))
    await client.call(echo, ("warm",))
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        results = await asyncio.gather(*(client.call(echo, (str(i),)) for i in range(10)), return_exceptions=True)
        took = time.monotonic() - started
        assert all(isinstance(result, ConnectionDown) for result in results), results
        assert 0.4 <= took < 0.5 + 0.5, took
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    assert (await client.call(echo, ("back",)))[0] == b"back"


async def test_a_redis_that_goes_away_fails_calls_at_once_and_is_reconnected_to(
    client: Redis, redis_server: RedisServer
) -> None:
    echo = Command(ECHO, ("w:{t}:n",))
    await client.call(echo, ("warm",))
    redis_server.stop()
    started = time.monotonic()
    with pytest.raises(ConnectionDown):
        await client.call(echo, ("gone",))
    assert time.monotonic() - started < 0.5
    redis_server.start()
    assert (await client.call(echo, ("back",)))[0] == b"back"


async def test_a_wrong_password_is_refused_with_the_servers_word_and_never_the_password(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password="right-one").start()
    try:
        redis = Redis(endpoint_from_url(f"redis://:wrong-one@127.0.0.1:{server.port}/0"), 0.5, (ECHO,))
        with pytest.raises(ConnectionDown) as refused:
            await redis.call(Command(ECHO, ("w:{t}:n",)), ("x",))
        assert "WRONGPASS" in str(refused.value) and "wrong-one" not in str(refused.value)
        await redis.aclose()
        good = Redis(endpoint_from_url(f"redis://:right-one@127.0.0.1:{server.port}/3"), 0.5, (ECHO,))
        assert (await good.call(Command(ECHO, ("w:{t}:n",)), ("x",)))[0] == b"x"
        await good.aclose()
        assert server.query("GET", "w:{t}:n", db=3) == b"1"  # in the URL's database
        assert server.query("GET", "w:{t}:n") is None
    finally:
        server.stop()


async def test_a_unix_socket_url(tmp_path: Path) -> None:
    socket_path = tmp_path / "redis.sock"
    server = RedisServer(tmp_path, unix_socket=str(socket_path)).start()
    try:
        redis = Redis(endpoint_from_url(f"unix://{socket_path}?db=2"), 0.5, (ECHO,))
        assert (await redis.call(Command(ECHO, ("w:{t}:n",)), ("x",)))[0] == b"x"
        await redis.aclose()
        assert server.query("GET", "w:{t}:n", db=2) == b"1"
    finally:
        server.stop()


async def test_a_closed_client_holds_no_connection(client: Redis, redis_server: RedisServer) -> None:
    await client.call(Command(ECHO, ("w:{t}:n",)), ("x",))
    assert len(redis_server.clients("sidecar-test")) == 1
    await client.aclose()
    deadline = time.monotonic() + 5
    while redis_server.clients("sidecar-test"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_a_send_nobody_waits_for_reports_its_failure(client: Redis, redis_server: RedisServer) -> None:
    failures: list[BaseException] = []
    client.send(Command(FAIL, ("w:{t}:n",)), (), failures.append)
    client.send(Command(ECHO, ("w:{t}:n",)), ("fine",), failures.append)
    await client.call(Command(ECHO, ("w:{t}:n",)), ("after",))  # answered after both
    await asyncio.sleep(0.05)  # a send made while connecting runs in a task of its own
    assert len(failures) == 1 and isinstance(failures[0], ReplyError)
    assert int(redis_server.query("GET", "w:{t}:n")) == 2


async def test_a_send_without_a_reply_runs_and_leaves_the_replies_in_order(
    client: Redis, redis_server: RedisServer
) -> None:
    """CLIENT REPLY SKIP: nothing comes back for it, the calls around it still get their own
    replies, and it runs even after the script cache was flushed (it sends the whole script)."""
    echo = Command(ECHO, ("w:{t}:n",))
    failures: list[BaseException] = []
    assert (await client.call(echo, ("first",)))[0] == b"first"
    redis_server.query("SCRIPT", "FLUSH")
    client.send(echo, ("quiet",), failures.append, reply=False)
    after = await asyncio.gather(*(client.call(echo, (f"a{i}",)) for i in range(5)))
    assert [reply[0] for reply in after] == [f"a{i}".encode() for i in range(5)]
    assert int(redis_server.query("GET", "w:{t}:n")) == 7  # first, the quiet one, five after
    assert not failures


async def test_rediss_verifies_the_servers_certificate(tmp_path: Path) -> None:
    """rediss:// with the CA given in the URL: calls work over TLS; without it (the system's CAs)
    the handshake is refused, and nothing is sent in the clear."""
    from tests.support.redis import free_port
    from tests.support.tls import tls_files

    files = tls_files(tmp_path, "127.0.0.1")
    tls_port = free_port()
    server = RedisServer(tmp_path)
    server.extra_args = [
        "--tls-port", str(tls_port), "--tls-cert-file", str(files.cert_file),
        "--tls-key-file", str(files.key_file), "--tls-ca-cert-file", str(files.ca_file),
        "--tls-auth-clients", "no",
    ]  # fmt: skip
    try:
        server.start()
    except RuntimeError:
        if os.environ.get("SIDECAR_TEST_REDIS_SERVER"):  # another server binary, maybe built without TLS
            pytest.skip("the server under test has no TLS")
        raise
    try:
        echo = Command(ECHO, ("w:{t}:n",))
        good = Redis(endpoint_from_url(f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={files.ca_file}"), 2.0, (ECHO,))
        assert (await good.call(echo, ("tls",)))[0] == b"tls"
        await good.aclose()
        untrusted = Redis(endpoint_from_url(f"rediss://127.0.0.1:{tls_port}/0"), 2.0, (ECHO,))
        with pytest.raises(ConnectionDown):
            await untrusted.call(echo, ("tls",))
        await untrusted.aclose()
        assert server.query("GET", "w:{t}:n") == b"1"
    finally:
        server.stop()
