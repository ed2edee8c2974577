"""The pool's decisions, as plain synchronous code: no I/O, no event loop.

:class:`PoolState` knows every connection of one upstream and decides:

* which connection takes a request (:meth:`~PoolState.choose`): a multiplexed
  (HTTP/2) connection with a free stream first, then the warmest idle
  HTTP/1.1 connection (a LIFO stack: the coldest expire), else a new
  connection if fewer than ``max_connections`` exist and none is still
  warming, else nothing (the caller waits);
* what a release does (:meth:`~PoolState.release`): idle, share, or discard;
* which HTTP/1.1 connection may carry another request (:func:`reusable`);
* what a new connection's handshake and first response teach the pool (the
  protocol chosen, the streams it grants: :meth:`~PoolState.learn`,
  :meth:`~PoolState.response_head`).

The shell around it (sidecar/upstream/pool.py) does the awaiting: it opens
and closes the connections the decisions name and wakes waiting requests.
A connection is seen through :class:`Link`, the few synchronous reads the
decisions need, so the rules can be driven with fake connections and a fake
clock.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

_ids = itertools.count(1)


class Link(Protocol):
    """What the decisions may ask of one upstream connection: synchronous reads."""

    def is_available(self) -> bool: ...  # can start a request now
    def is_idle(self) -> bool: ...  # HTTP/1.1: its last exchange ended cleanly
    def is_closed(self) -> bool: ...
    def has_expired(self) -> bool: ...  # idle past keepalive_expiry, or closed by the peer
    def has_unread_bytes(self) -> bool: ...  # received bytes past its last response
    def protocol(self) -> str | None: ...  # "HTTP/2" / "HTTP/1.1" once connected
    def granted_streams(self) -> int | None: ...  # streams it runs at once; None until set up
    async def aclose(self) -> None: ...


L = TypeVar("L", bound=Link)


class Connection(Generic[L]):
    """One upstream connection and what the pool knows about it."""

    __slots__ = ("link", "id", "streams", "multiplexed", "http_version", "idle_since", "closed", "retiring")

    def __init__(self, link: L, multiplexed: bool, now: float) -> None:
        self.link = link
        self.id = next(_ids)
        self.streams = 0  # requests in progress on it
        self.multiplexed = multiplexed  # known to be HTTP/2 (or will be: prior knowledge)
        self.http_version: str | None = None  # None until the first response
        self.idle_since = now
        self.closed = False
        self.retiring = False  # takes no new requests; closed when its last one ends


def reusable(connection: Connection[L]) -> bool:
    """May this HTTP/1.1 connection carry another request?

    Only when its last response ended cleanly *and* nothing beyond that
    response has been received: bytes past the end of a response (more than
    its Content-Length, a body on a 204, a second response nobody asked
    for) would otherwise be read as the answer to the next request, which
    may be another caller's.
    """
    link = connection.link
    return link.is_idle() and not link.has_unread_bytes()


def length_is_ambiguous(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Does an HTTP/1.1 response carry both Content-Length and Transfer-Encoding?"""
    names = {name.lower() for name, _ in headers}
    return b"transfer-encoding" in names and b"content-length" in names


class Released(enum.Enum):
    """What a release did with its connection."""

    BUSY = "busy"  # other requests are still on it (or it was already closed)
    IDLE = "idle"  # HTTP/1.1: on the idle stack, ready for the next request
    SHARED = "shared"  # multiplexed: stays open for further streams
    DISCARD = "discard"  # forgotten: the caller closes it


@dataclass(slots=True)
class Choice(Generic[L]):
    """Where a request goes: ``connection`` (counted), ``open`` a new one, or wait.

    While a new connection is ``warming`` a waiting request polls instead of
    waiting for a release: the connection learns its stream limit (its
    SETTINGS frame, read by httpcore while serving the first request) without
    any release to wake anyone.
    """

    connection: Connection[L] | None = None
    open: bool = False
    warming: bool = False
    discarded: tuple[Connection[L], ...] = ()  # passed over: close them
    stream_limit: int | None = None  # a new per-connection limit to report


@dataclass(slots=True)
class PoolStats:
    """A point-in-time view of one pool, read by /pools and the metrics."""

    connections: int
    active: int
    idle: int
    connecting: int
    http_versions: dict[str, int]
    opened_total: int
    closed_total: int
    waiting: int


class PoolState(Generic[L]):
    """Every connection of one upstream, and the rules for using them."""

    def __init__(
        self,
        *,
        max_connections: int,
        max_idle: int,
        keepalive_expiry: float,
        http2: bool,
        prior_knowledge: bool,
        streams_per_connection: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_connections = max_connections
        self.max_idle = max_idle
        self.keepalive_expiry = keepalive_expiry
        self.http2 = http2
        self.prior_knowledge = prior_knowledge
        self.streams = streams_per_connection
        self.clock = clock
        # What the upstream chose last time ALPN was asked: once it said
        # HTTP/1.1, new connections open in parallel like any HTTP/1.1 pool.
        self.negotiated: str | None = "HTTP/2" if prior_knowledge else None
        self.all: dict[int, Connection[L]] = {}
        self.idle: list[Connection[L]] = []  # HTTP/1.1 only; LIFO
        self.shared: dict[int, Connection[L]] = {}  # multiplexed, with stream capacity
        self.opened_total = 0
        self.closed_total = 0
        self.closing = False
        self._stream_limit_reported: int | None = None

    # ------------------------------------------------------------ choosing

    def choose(self) -> Choice[L]:
        """Where the next request goes: a connection that can take it now (its
        stream already counted), or ``open`` (the caller opens a connection and
        counts it in with :meth:`opened`), or neither: wait for a release."""
        choice: Choice[L] = Choice()
        for connection in self.shared.values():
            if connection.streams < self.stream_limit(connection) and connection.link.is_available():
                connection.streams += 1
                choice.connection = connection
                return choice
        while self.idle:
            connection = self.idle.pop()
            if connection.link.has_expired() or not reusable(connection):
                if self.discard(connection):
                    choice.discarded += (connection,)
                continue
            connection.streams = 1
            choice.connection = connection
            return choice
        if self.http2:
            choice.stream_limit = self.learn()
            choice.warming = self.warming()
        choice.open = len(self.all) < self.max_connections and not choice.warming
        return choice

    def opened(self, link: L) -> Connection[L]:
        """Count in a new connection (not yet connected) carrying one request."""
        connection = Connection(link, multiplexed=self.prior_knowledge, now=self.clock())
        connection.streams = 1
        self.all[connection.id] = connection
        if connection.multiplexed:
            self.shared[connection.id] = connection
        self.opened_total += 1
        return connection

    def stream_limit(self, connection: Connection[L]) -> int:
        """How many requests ``connection`` may carry at once.

        httpcore caps streams at min(server MAX_CONCURRENT_STREAMS, 100) and
        makes extra streams wait on a semaphore with no timeout: never ask for
        more than it will grant.  Until the connection is set up it grants one
        stream (so do we); it raises the limit when the server's SETTINGS
        arrive, which waiting requests notice by polling (see :meth:`warming`).
        """
        granted = connection.link.granted_streams()
        if granted is None or granted < 1:
            return 1
        return min(granted, self.streams)

    # ------------------------------------------------------------ learning

    def pending(self) -> Iterable[Connection[L]]:
        """Connections open and usable that have not had their first response yet."""
        for connection in self.all.values():
            if connection.http_version is None and not connection.closed and not connection.retiring:
                yield connection

    def learn(self) -> int | None:
        """Take in what new connections' handshakes said; a new stream limit to report.

        An ALPN connection whose handshake chose h2 is shared from here on,
        before its first response; one that says how many streams it grants
        tells the pool's per-connection limit.
        """
        limit = None
        for connection in self.pending():
            protocol = connection.link.protocol()
            if protocol is None:
                continue
            self.negotiated = protocol
            if protocol != "HTTP/2":
                continue
            if not connection.multiplexed:
                connection.multiplexed = True
                self.shared[connection.id] = connection
            granted = connection.link.granted_streams()
            if granted is not None and granted != 1:
                limit = self._report(min(granted, self.streams)) or limit
        return limit

    def warming(self) -> bool:
        """Is a new connection still learning whether (and how far) it multiplexes?

        Requests wait for a warming connection rather than open another one
        (HTTP/2 is there to need fewer connections), unless the upstream last
        negotiated HTTP/1.1.  Call :meth:`learn` first.
        """
        for connection in self.pending():
            protocol = connection.link.protocol()
            if protocol == "HTTP/1.1" or (protocol is None and self.negotiated == "HTTP/1.1"):
                continue
            if protocol is None or connection.link.granted_streams() in (None, 1):
                return True
        return False

    def response_head(
        self, connection: Connection[L], http_version: bytes, headers: Iterable[tuple[bytes, bytes]]
    ) -> int | None:
        """A final response head arrived on ``connection``; a new stream limit to report."""
        if not connection.multiplexed and length_is_ambiguous(headers):
            # Content-Length and Transfer-Encoding both: the body is framed by
            # the chunked coding, but the upstream's framing is not to be
            # trusted again on this connection (RFC 9112 §6.3).
            self.retire(connection)
        if connection.http_version is not None:
            return None
        connection.http_version = http_version.decode("ascii", "replace")
        self.negotiated = "HTTP/2" if http_version == b"HTTP/2" else "HTTP/1.1"
        if http_version == b"HTTP/2":
            if not connection.multiplexed:
                connection.multiplexed = True
                self.shared[connection.id] = connection
            return self._report(self.stream_limit(connection))  # SETTINGS precede responses
        if self.http2:
            return self._report(1)  # ALPN chose HTTP/1.1: one request per connection
        return None

    def _report(self, limit: int) -> int | None:
        if limit == self._stream_limit_reported:
            return None
        self._stream_limit_reported = limit
        return limit

    # ------------------------------------------------------------ giving back

    def retire(self, connection: Connection[L]) -> None:
        """Take no new requests on ``connection``; it is discarded when its last one ends."""
        connection.retiring = True
        self.shared.pop(connection.id, None)

    def release(self, connection: Connection[L]) -> Released:
        """The request on ``connection`` is over: idle it, share it or discard it."""
        connection.streams -= 1
        link = connection.link
        if connection.closed:
            return Released.BUSY
        if connection.retiring:
            if connection.streams == 0 and self.discard(connection):
                return Released.DISCARD
            return Released.BUSY
        if link.is_closed() or (not connection.multiplexed and not reusable(connection)):
            self.discard(connection)
            return Released.DISCARD
        if connection.multiplexed:
            if connection.streams == 0:
                connection.idle_since = self.clock()
                if not link.is_available():
                    self.discard(connection)
                    return Released.DISCARD
            return Released.SHARED
        if self.closing or len(self.idle) >= self.max_idle:
            self.discard(connection)
            return Released.DISCARD
        connection.idle_since = self.clock()
        self.idle.append(connection)
        return Released.IDLE

    def discard(self, connection: Connection[L]) -> bool:
        """Forget ``connection``; True if it was still open (the caller closes it)."""
        if connection.closed:
            return False
        connection.closed = True
        self.all.pop(connection.id, None)
        self.shared.pop(connection.id, None)
        if connection in self.idle:
            self.idle.remove(connection)
        self.closed_total += 1
        return True

    def expired(self) -> list[Connection[L]]:
        """Discard connections idle past keepalive_expiry or closed by the upstream; close them."""
        now = self.clock()
        gone = []
        for connection in list(self.all.values()):
            if connection.streams:
                continue
            if now - connection.idle_since > self.keepalive_expiry or connection.link.is_closed():
                self.discard(connection)
                gone.append(connection)
        return gone

    def close(self) -> list[Connection[L]]:
        """The pool closes: discard every connection; close them all."""
        self.closing = True
        gone = list(self.all.values())
        for connection in gone:
            self.discard(connection)
        return gone

    # ------------------------------------------------------------ stats

    def stats(self, waiting: int) -> PoolStats:
        active = idle = connecting = 0
        versions: dict[str, int] = {}
        for connection in self.all.values():
            if connection.http_version is None and connection.streams:
                connecting += 1
            if connection.streams:
                active += 1
            else:
                idle += 1
            if connection.http_version is not None:
                versions[connection.http_version] = versions.get(connection.http_version, 0) + 1
        return PoolStats(
            connections=len(self.all),
            active=active,
            idle=idle,
            connecting=connecting,
            http_versions=versions,
            opened_total=self.opened_total,
            closed_total=self.closed_total,
            waiting=waiting,
        )
