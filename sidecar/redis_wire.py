"""The shared limits' Redis connections: pipelined, one per node, on the event loop's own transports.

Every shared limit is one Lua script call per request, so what a call costs
the sidecar is what the feature costs (docs/shared-limits.md, "What it
costs").  redis-py's asyncio client spends most of that on its own layers: a
connection taken from a pool and given back, several awaits per command,
and one write and one read per command; through a real sidecar at 50
callers it added ~150 µs of CPU per request (bench/results/shared.md).  Here
a node has **one** connection and every call is a future in a FIFO:

* commands issued in the same loop iteration go out in one write;
* replies are parsed as they arrive and resolve the futures in order;
* there is no timer per call: the connection has one deadline, the oldest
  unanswered command's ``timeout``.  When it passes, Redis is not answering:
  every pending call fails at once and the connection is dropped (replies
  come in order, so the later calls could not be answered sooner).

:class:`Redis` is the client: one :class:`Node` for a standalone server, or
with ``cluster: true`` one per primary, found from ``CLUSTER SLOTS`` and
updated on ``MOVED`` (``ASK`` is followed once).  Scripts are loaded on
every new connection and called by SHA; a ``NOSCRIPT`` (a ``SCRIPT FLUSH``,
a failover to a node that never loaded them) is answered with ``EVAL``.
:class:`Subscription` is a connection of its own in subscribe mode.

Why one module over 400 lines: the connection (RESP pipelining, deadline,
scripts), the cluster routing and the subscription share one reply parser and
one error path; the limits' decisions are elsewhere (policy/shared*.py).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from hiredis import Reader

__all__ = [
    "Command",
    "ConnectionDown",
    "Endpoint",
    "Redis",
    "ReplyError",
    "Script",
    "Subscription",
    "endpoint_from_url",
    "key_slot",
]

SLOTS = 16384
# The query options a shared.redis URL may carry (rediss:// TLS settings).
URL_OPTIONS = frozenset(("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname", "db"))


class ReplyError(Exception):
    """An error reply from Redis (``ERR ...``, ``NOSCRIPT ...``, ``MOVED ...``)."""


class ConnectionDown(Exception):
    """No answer: the connection could not be opened, broke, or a reply did not come in time."""


# ----------------------------------------------------------------- the wire


def _bulk(value: str | bytes | int) -> bytes:
    data = value if isinstance(value, bytes) else str(value).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def pack(*words: str | bytes | int) -> bytes:
    """One command in RESP (an array of bulk strings)."""
    return b"*%d\r\n%s" % (len(words), b"".join(_bulk(word) for word in words))


class Script:
    """A Lua script, called by its SHA once the connection has loaded it."""

    __slots__ = ("source", "sha")

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest()


class Command:
    """One script with its keys and leading arguments packed once; the remaining arguments per call."""

    __slots__ = ("script", "slot", "_fixed", "_evalsha", "_eval", "_body")

    def __init__(self, script: Script, keys: Sequence[str], fixed: Sequence[str | int] = ()) -> None:
        self.script = script
        self.slot = key_slot(keys[0].encode())
        self._fixed = 3 + len(keys) + len(fixed)  # EVALSHA sha numkeys keys... fixed...
        self._body = _bulk(len(keys)) + b"".join(_bulk(k) for k in keys) + b"".join(_bulk(a) for a in fixed)
        self._evalsha = _bulk("EVALSHA") + _bulk(script.sha)
        self._eval = _bulk("EVAL") + _bulk(script.source)

    def evalsha(self, args: Iterable[str | int]) -> bytes:
        tail = [_bulk(a) for a in args]
        return b"*%d\r\n%s%s%s" % (self._fixed + len(tail), self._evalsha, self._body, b"".join(tail))

    def eval(self, args: Iterable[str | int]) -> bytes:
        tail = [_bulk(a) for a in args]
        return b"*%d\r\n%s%s%s" % (self._fixed + len(tail), self._eval, self._body, b"".join(tail))


class Wire(asyncio.Protocol):
    """One connection: commands written once per loop iteration, replies matched in order.

    With ``on_push`` it is a subscriber's connection: every reply goes there.
    """

    def __init__(self, timeout: float, on_push: Callable[[Any], None] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.on_push = on_push
        self.transport: asyncio.Transport | None = None
        self.down: ConnectionDown | None = None  # set once the connection is unusable
        self._reader = Reader(replyError=ReplyError)
        self._pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._sent_at: collections.deque[float] = collections.deque()
        self._out: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self.lost = self.loop.create_future()  # resolved when the connection is gone

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport instances, but are one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self._pending
        while True:
            try:
                reply = reader.gets()
            except Exception as exc:  # a protocol error: nothing after it can be trusted
                self._fail(ConnectionDown(f"unreadable reply from Redis: {exc}"))
                return
            if reply is False:
                return
            if self.on_push is not None:
                self.on_push(reply)
                continue
            if not pending:
                self._fail(ConnectionDown("a reply from Redis to no command"))
                return
            future = pending.popleft()
            self._sent_at.popleft()
            if not future.done():  # its caller may have gone away
                if isinstance(reply, ReplyError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionDown(f"connection to Redis lost ({type(exc).__name__ if exc else 'closed'})"))
        if not self.lost.done():
            self.lost.set_result(None)

    # commands

    def request(self, command: bytes) -> asyncio.Future[Any]:
        """Queue one command; its future has the reply (a ReplyError or ConnectionDown as its exception)."""
        if self.down is not None:
            raise self.down
        future = self.loop.create_future()
        self._pending.append(future)
        self._sent_at.append(self.loop.time())
        if not self._out:
            self.loop.call_soon(self._flush)
        self._out.append(command)
        if self._timer is None:
            self._timer = self.loop.call_at(self.loop.time() + self.timeout, self._check)
        return future

    def post(self, command: bytes) -> None:
        """Queue a command whose reply the server will not send (after CLIENT REPLY SKIP)."""
        if self.down is not None:
            raise self.down
        if not self._out:
            self.loop.call_soon(self._flush)
        self._out.append(command)

    def write(self, command: bytes) -> None:
        """A command with no reply to wait for (a subscriber's SUBSCRIBE)."""
        if self.down is None and self.transport is not None:
            self.transport.write(command)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.down is None and self.transport is not None and out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _check(self) -> None:
        """The one deadline: the oldest unanswered command's."""
        self._timer = None
        if not self._sent_at:
            return
        deadline = self._sent_at[0] + self.timeout
        if self.loop.time() >= deadline:
            self._fail(ConnectionDown(f"no reply from Redis within {self.timeout * 1000:g} ms"))
        else:
            self._timer = self.loop.call_at(deadline, self._check)

    def _fail(self, error: ConnectionDown) -> None:
        if self.down is None:
            self.down = error
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, collections.deque()
        self._sent_at.clear()
        self._out.clear()
        for future in pending:
            if not future.done():
                future.set_exception(self.down)
        if self.transport is not None:
            self.transport.abort()

    @property
    def usable(self) -> bool:
        return self.down is None and self.transport is not None

    def close(self) -> None:
        """Close after what is queued is written (a release sent just before a shutdown still arrives)."""
        if self.down is None:
            self._flush()
            self.down = ConnectionDown("connection to Redis closed")
            for future in self._pending:
                if not future.done():
                    future.set_exception(self.down)
            self._pending.clear()
            self._sent_at.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self.transport is not None:
                self.transport.close()


# ----------------------------------------------------------- where to connect


@dataclass(frozen=True, slots=True)
class Endpoint:
    """How to reach and log in to one Redis server."""

    host: str | None  # None with a Unix socket
    port: int
    path: str | None = None  # unix://
    tls: ssl.SSLContext | None = None
    username: str | None = None
    password: str | None = None
    db: int = 0
    client_name: str | None = None

    def at(self, host: str, port: int) -> Endpoint:
        """The same login on another node of a cluster."""
        return Endpoint(host, port, None, self.tls, self.username, self.password, 0, self.client_name)


def _tls_context(options: dict[str, Any]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    reqs = str(options.get("ssl_cert_reqs", "required")).lower()
    if reqs in ("none", "cert_none"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif reqs in ("optional", "cert_optional"):
        context.verify_mode = ssl.CERT_OPTIONAL
    check = options.get("ssl_check_hostname")
    if check is not None and context.verify_mode != ssl.CERT_NONE:
        context.check_hostname = str(check).lower() not in ("false", "0", "no")
    if options.get("ssl_certfile"):
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    return context


def url_problem(url: str) -> str | None:
    """What is wrong with a shared.redis URL for this client, or None."""
    from urllib.parse import parse_qs, urlsplit

    unknown = sorted(set(parse_qs(urlsplit(url).query)) - URL_OPTIONS)
    if unknown:
        return f"unsupported URL option(s) {', '.join(unknown)}; supported: {', '.join(sorted(URL_OPTIONS))}"
    return None


def endpoint_from_url(url: str, client_name: str | None = None) -> Endpoint:
    """redis://[[user]:password@]host[:port][/db], rediss://… (TLS) or unix://[[user]:password@]/path[?db=N]."""
    from redis.connection import parse_url  # the URL rules every Redis client shares

    options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    tls = _tls_context(options) if url.startswith("rediss://") else None
    return Endpoint(
        host=options.get("host"),
        port=int(options.get("port") or 6379),
        path=options.get("path"),
        tls=tls,
        username=options.get("username"),
        password=options.get("password"),
        db=int(options.get("db") or 0),
        client_name=client_name,
    )


def key_slot(key: bytes) -> int:
    """Redis Cluster's hash slot of a key: CRC16 of its hash tag ({...}) or of the whole key."""
    from redis.crc import key_slot as crc_slot

    return int(crc_slot(key))


# ----------------------------------------------------------------- a node


class Node:
    """One Redis server and its one pipelined connection, opened when first needed."""

    def __init__(self, endpoint: Endpoint, timeout: float, scripts: Sequence[Script]) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.scripts = scripts
        self.wire: Wire | None = None
        self._opening: asyncio.Future[Wire] | None = None
        self.closed = False

    def ready(self) -> Wire | None:
        wire = self.wire
        return wire if wire is not None and wire.usable else None

    async def connect(self) -> Wire:
        """The open connection, or one opened now (callers arriving meanwhile share the attempt)."""
        wire = self.ready()
        if wire is not None:
            return wire
        if self.closed:
            raise ConnectionDown("the Redis client is closed")
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
            self._opening.add_done_callback(_retrieved)  # every waiter may have given up
        # Shielded: a caller that gives up does not cancel the attempt the others wait for.
        return await asyncio.shield(self._opening)

    async def _open(self) -> Wire:
        try:
            wire = await open_wire(self.endpoint, self.timeout, scripts=self.scripts)
            if self.closed:
                wire.close()
                raise ConnectionDown("the Redis client is closed")
            self.wire = wire
            return wire
        finally:
            self._opening = None

    def close(self) -> None:
        self.closed = True
        if self.wire is not None:
            self.wire.close()
        if self._opening is not None:
            self._opening.cancel()


async def open_wire(
    endpoint: Endpoint,
    timeout: float,
    *,
    scripts: Sequence[Script] = (),
    on_push: Callable[[Any], None] | None = None,
) -> Wire:
    """A connection, logged in, on the right database, named, with the scripts loaded; within ``timeout``."""
    loop = asyncio.get_running_loop()
    transport: asyncio.Transport | None = None
    try:
        async with asyncio.timeout(timeout):
            if endpoint.path is not None:
                transport, wire = await loop.create_unix_connection(
                    lambda: Wire(timeout), endpoint.path, ssl=endpoint.tls
                )
            else:
                transport, wire = await loop.create_connection(
                    lambda: Wire(timeout), endpoint.host or "localhost", endpoint.port, ssl=endpoint.tls
                )
            hello: list[bytes] = []
            if endpoint.password is not None:
                login = (endpoint.username, endpoint.password) if endpoint.username else (endpoint.password,)
                hello.append(pack("AUTH", *login))
            if endpoint.db:
                hello.append(pack("SELECT", endpoint.db))
            if endpoint.client_name:
                hello.append(pack("CLIENT", "SETNAME", endpoint.client_name))
            hello += [pack("SCRIPT", "LOAD", script.source) for script in scripts]
            replies = await asyncio.gather(*(wire.request(command) for command in hello), return_exceptions=True)
    except TimeoutError:
        if transport is not None:
            transport.abort()
        raise ConnectionDown(f"no connection to Redis within {timeout * 1000:g} ms") from None
    except OSError as exc:
        raise ConnectionDown(f"cannot connect to Redis: {type(exc).__name__}") from None
    except BaseException:
        if transport is not None:
            transport.abort()
        raise
    for reply in replies:
        if isinstance(reply, ReplyError):
            wire.close()
            # The server's own first word (WRONGPASS, NOAUTH...), never what we sent.
            raise ConnectionDown(f"Redis refused the connection: {str(reply).split(' ', 1)[0]}")
        if isinstance(reply, BaseException):
            wire.close()
            raise ConnectionDown(f"connection to Redis lost while logging in: {reply}")
    wire.on_push = on_push
    return wire


# ---------------------------------------------------------------- the client


class Redis:
    """The shared limits' Redis: one node, or a cluster's primaries by hash slot."""

    def __init__(self, endpoint: Endpoint, timeout: float, scripts: Sequence[Script], cluster: bool = False) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.scripts = tuple(scripts)
        self.cluster = cluster
        self.seed = Node(endpoint, timeout, self.scripts)
        self.nodes: dict[tuple[str | None, int], Node] = {(endpoint.host, endpoint.port): self.seed}
        self._slots: list[Node | None] = [None] * SLOTS if cluster else []
        self._mapping: asyncio.Future[None] | None = None
        self.closed = False

    # ----- calls

    async def call(self, command: Command, args: Sequence[str | int] = ()) -> Any:
        node = self._node(command.slot)
        wire = node.ready() if node is not None else None
        if wire is None:  # not connected yet (or again): connect within the timeout
            async with asyncio.timeout(self.timeout):
                if node is None:
                    node = await self._map(command.slot)
                wire = await node.connect()
        try:
            return await wire.request(command.evalsha(args))
        except ReplyError as error:
            return await self._recover(error, command, args)

    def send(
        self,
        command: Command,
        args: Sequence[str | int],
        on_failure: Callable[[BaseException], None],
        reply: bool = True,
    ) -> None:
        """A call nobody waits for (a release, a published pause); a failure goes to ``on_failure``.

        ``reply=False``: the server is told to send no reply (CLIENT REPLY
        SKIP), so a failure of the call itself goes unseen; one of the
        connection is still seen by the calls around it.
        """
        node = self._node(command.slot)
        wire = node.ready() if node is not None else None
        future: asyncio.Future[Any]
        if not reply and wire is not None and not self.cluster:
            # No reply at all: nothing comes back to wake the loop for.  The
            # whole script (EVAL), so that even a flushed script cache runs it.
            # Not on a cluster, where a slot that moved answers MOVED.
            wire.post(_NO_REPLY + command.eval(args))
            return
        if wire is None:
            future = asyncio.ensure_future(self.call(command, args))
        else:
            future = wire.request(command.evalsha(args))

        def done(future: asyncio.Future[Any]) -> None:
            if future.cancelled():
                return
            error = future.exception()
            if isinstance(error, ReplyError) and _is_redirect_or_noscript(error):
                # Rare: retried with the full call, in a task of its own.
                retry = asyncio.ensure_future(self._recover(error, command, args))
                retry.add_done_callback(done)
            elif error is not None:
                on_failure(error)

        future.add_done_callback(done)

    async def _recover(self, error: ReplyError, command: Command, args: Sequence[str | int]) -> Any:
        """NOSCRIPT: the full script.  MOVED: the slot lives elsewhere now.  ASK: once there."""
        text = str(error)
        if text.startswith("NOSCRIPT"):
            node = self._node(command.slot) or self.seed
            wire = await self._connected(node)
            return await wire.request(command.eval(args))
        if self.cluster and text.startswith(("MOVED ", "ASK ")):
            kind, slot, address = text.split()[:3]
            host, _, port = address.rpartition(":")
            node = self._node_at(host or self.endpoint.host or "", int(port))
            wire = await self._connected(node)
            if kind == "MOVED":
                self._slots[int(slot)] = node
                self._remap_soon()  # other slots may have moved with it
                return await wire.request(command.evalsha(args))
            wire.request(pack("ASKING")).add_done_callback(_retrieved)  # its +OK is matched in order, dropped
            return await wire.request(command.evalsha(args))
        if text.startswith(("MOVED ", "ASK ", "CLUSTERDOWN")):
            raise ReplyError(f"{text.split(' ', 1)[0]}: Redis is a cluster (set shared.cluster: true)")
        raise error

    async def _connected(self, node: Node) -> Wire:
        async with asyncio.timeout(self.timeout):
            return await node.connect()

    # ----- the cluster's slot map

    def _node(self, slot: int) -> Node | None:
        return self._slots[slot] if self.cluster else self.seed

    def _node_at(self, host: str, port: int) -> Node:
        node = self.nodes.get((host, port))
        if node is None:
            node = self.nodes[(host, port)] = Node(self.endpoint.at(host, port), self.timeout, self.scripts)
            if self.closed:
                node.close()
        return node

    async def _map(self, slot: int) -> Node:
        if self._mapping is None:
            self._mapping = asyncio.ensure_future(self._read_slots())
        await asyncio.shield(self._mapping)
        node = self._slots[slot]
        if node is None:
            raise ConnectionDown(f"no Redis Cluster node serves hash slot {slot}")
        return node

    def _remap_soon(self) -> None:
        if self._mapping is None:
            self._mapping = asyncio.ensure_future(self._read_slots())
            self._mapping.add_done_callback(_retrieved)

    async def _read_slots(self) -> None:
        """CLUSTER SLOTS from any node that answers: which primary serves which slots."""
        try:
            last: BaseException | None = None
            for node in [self.seed, *(n for n in self.nodes.values() if n is not self.seed)]:
                try:
                    wire = await node.connect()
                    ranges = await wire.request(pack("CLUSTER", "SLOTS"))
                except (ConnectionDown, ReplyError) as exc:
                    last = exc
                    continue
                slots: list[Node | None] = [None] * SLOTS
                for start, end, primary, *_replicas in ranges:
                    host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
                    if host in ("", "?"):  # the node does not know its own address: the one we used
                        host = self.endpoint.host or ""
                    owner = self._node_at(host, int(primary[1]))
                    for index in range(int(start), int(end) + 1):
                        slots[index] = owner
                self._slots = slots
                return
            raise ConnectionDown(f"no Redis Cluster node answered CLUSTER SLOTS ({last})")
        finally:
            self._mapping = None

    # ----- subscriptions and closing

    async def subscribe(self, channel: str, on_message: Callable[[], None]) -> Subscription:
        """A connection of its own that calls ``on_message`` for every message on ``channel``."""

        def pushed(reply: Any) -> None:
            if isinstance(reply, list) and reply and reply[0] == b"message":
                on_message()

        endpoint = self.endpoint
        if self.cluster:  # any node relays a cluster's messages; the one serving the channel's slot
            node = self._node(key_slot(channel.encode()))
            if node is not None:
                endpoint = node.endpoint
        wire = await open_wire(endpoint, self.timeout, on_push=pushed)
        wire.write(pack("SUBSCRIBE", channel))
        return Subscription(wire)

    async def aclose(self) -> None:
        self.closed = True
        if self._mapping is not None:
            self._mapping.cancel()
        wires = [node.wire for node in self.nodes.values() if node.wire is not None]
        for node in self.nodes.values():
            node.close()
        # Wait until the server side is gone too (bounded): a closed client holds no connection.
        if wires:
            await asyncio.wait([wire.lost for wire in wires], timeout=1.0)


_NO_REPLY = pack("CLIENT", "REPLY", "SKIP")


def _is_redirect_or_noscript(error: ReplyError) -> bool:
    return str(error).startswith(("NOSCRIPT", "MOVED ", "ASK "))


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class Subscription:
    """A subscriber's connection; :meth:`closed` resolves when it is gone (then subscribe again)."""

    def __init__(self, wire: Wire) -> None:
        self.wire = wire

    @property
    def closed(self) -> asyncio.Future[None]:
        return self.wire.lost

    async def aclose(self) -> None:
        self.wire.close()
        await asyncio.wait([self.wire.lost], timeout=1.0)
