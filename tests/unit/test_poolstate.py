"""The pool's decisions, driven with fake connections and a fake clock: no sockets, no event loop."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from sidecar.upstream.poolstate import Connection, PoolState, Released, length_is_ambiguous, reusable


@dataclass
class FakeLink:
    """A connection as the pool state sees it; every read is a plain attribute."""

    available: bool = True
    idle: bool = True
    closed: bool = False
    expired: bool = False
    unread: bool = False
    speaks: str | None = None
    granted: int | None = None

    def is_available(self) -> bool:
        return self.available

    def is_idle(self) -> bool:
        return self.idle

    def is_closed(self) -> bool:
        return self.closed

    def has_expired(self) -> bool:
        return self.expired

    def has_unread_bytes(self) -> bool:
        return self.unread

    def protocol(self) -> str | None:
        return self.speaks

    def granted_streams(self) -> int | None:
        return self.granted

    async def aclose(self) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_state(
    *,
    max_connections: int = 2,
    max_idle: int = 2,
    http2: bool = False,
    prior_knowledge: bool = False,
    streams: int = 100,
    clock: Clock | None = None,
) -> PoolState[FakeLink]:
    return PoolState(
        max_connections=max_connections,
        max_idle=max_idle,
        keepalive_expiry=5.0,
        http2=http2,
        prior_knowledge=prior_knowledge,
        streams_per_connection=streams,
        clock=clock or Clock(),
    )


def take_new(state: PoolState[FakeLink], link: FakeLink | None = None) -> Connection[FakeLink]:
    choice = state.choose()
    assert choice.connection is None and choice.open, choice
    return state.opened(link or FakeLink())


# ------------------------------------------------------------ HTTP/1.1


def test_a_request_opens_a_connection_while_there_is_room_then_waits() -> None:
    state = make_state(max_connections=2)
    first, second = take_new(state), take_new(state)
    assert first.streams == second.streams == 1 and first.id != second.id
    choice = state.choose()
    assert choice.connection is None and not choice.open and not choice.warming
    assert state.stats(waiting=1).active == 2 and state.opened_total == 2


def test_a_clean_release_idles_the_connection_and_the_warmest_is_reused_first() -> None:
    state = make_state()
    first, second = take_new(state), take_new(state)
    assert state.release(first) is Released.IDLE
    assert state.release(second) is Released.IDLE
    assert state.stats(waiting=0).idle == 2
    choice = state.choose()
    assert choice.connection is second and second.streams == 1  # LIFO: the last one back
    assert state.choose().connection is first


def test_a_connection_with_unread_bytes_is_discarded_on_release() -> None:
    state = make_state()
    connection = take_new(state)
    connection.link.unread = True  # e.g. more than its Content-Length arrived
    assert state.release(connection) is Released.DISCARD
    assert connection.closed and state.closed_total == 1 and not state.all


def test_a_connection_whose_exchange_did_not_end_cleanly_is_discarded() -> None:
    state = make_state()
    connection = take_new(state)
    connection.link.idle = False  # the response was not read to its end
    assert state.release(connection) is Released.DISCARD


def test_the_reuse_rule() -> None:
    state = make_state()
    connection = take_new(state)
    assert reusable(connection)
    connection.link.unread = True
    assert not reusable(connection)
    connection.link.unread, connection.link.idle = False, False
    assert not reusable(connection)


def test_past_max_idle_a_released_connection_is_discarded() -> None:
    state = make_state(max_connections=3, max_idle=1)
    first, second = take_new(state), take_new(state)
    assert state.release(first) is Released.IDLE
    assert state.release(second) is Released.DISCARD


def test_an_upstream_closed_connection_is_discarded_on_release() -> None:
    state = make_state()
    connection = take_new(state)
    connection.link.closed = True
    assert state.release(connection) is Released.DISCARD


def test_stale_idle_connections_are_passed_over_and_handed_back_to_close() -> None:
    state = make_state(max_connections=3, max_idle=3)
    expired, unread, good = take_new(state), take_new(state), take_new(state)
    for connection in (good, unread, expired):
        assert state.release(connection) is Released.IDLE
    expired.link.expired = True
    unread.link.unread = True  # the upstream closed it (EOF) while it sat idle
    choice = state.choose()
    assert choice.connection is good and choice.discarded == (expired, unread)
    assert expired.closed and unread.closed and state.closed_total == 2


def test_an_ambiguous_length_retires_the_connection() -> None:
    assert length_is_ambiguous([(b"Content-Length", b"3"), (b"Transfer-Encoding", b"chunked")])
    assert not length_is_ambiguous([(b"content-length", b"3")])
    state = make_state()
    connection = take_new(state)
    headers = [(b"Content-Length", b"3"), (b"Transfer-Encoding", b"chunked")]
    assert state.response_head(connection, b"HTTP/1.1", headers) is None
    assert connection.retiring and connection.http_version == "HTTP/1.1"
    assert state.release(connection) is Released.DISCARD


def test_a_retired_connection_is_discarded_when_its_last_request_ends() -> None:
    state = make_state(http2=True, prior_knowledge=True)
    connection = take_new(state, FakeLink(speaks="HTTP/2", granted=10))
    assert state.choose().connection is connection
    state.retire(connection)
    assert state.release(connection) is Released.BUSY and not connection.closed
    choice = state.choose()
    assert choice.connection is not connection and choice.open  # takes no new requests
    assert state.release(connection) is Released.DISCARD and connection.closed
    assert state.release(connection) is Released.BUSY  # a late release of a closed one does nothing


def test_the_sweep_discards_connections_idle_past_keepalive_expiry() -> None:
    clock = Clock()
    state = make_state(clock=clock)
    idle, busy = take_new(state), take_new(state)
    state.release(idle)
    clock.now += 4.0
    assert state.expired() == []
    clock.now += 2.0
    assert state.expired() == [idle]
    assert busy.id in state.all and not state.idle


def test_closing_discards_everything_and_releases_are_not_kept() -> None:
    state = make_state()
    kept, busy = take_new(state), take_new(state)
    state.release(kept)
    assert state.close() == [kept, busy] and state.closing
    assert state.release(busy) is Released.BUSY  # already discarded by close()
    assert state.closed_total == 2 and state.stats(waiting=0).connections == 0


def test_while_closing_a_released_connection_is_not_idled() -> None:
    state = make_state()
    connection = take_new(state)
    state.closing = True
    assert state.release(connection) is Released.DISCARD


# ------------------------------------------------------------ HTTP/2


def test_a_multiplexed_connection_carries_what_it_grants_capped_by_streams_per_connection() -> None:
    state = make_state(max_connections=1, http2=True, prior_knowledge=True, streams=3)
    link = FakeLink(speaks="HTTP/2", granted=None)
    connection = take_new(state, link)
    assert state.stream_limit(connection) == 1  # until SETTINGS: one stream
    assert state.choose().connection is None
    link.granted = 10
    assert state.stream_limit(connection) == 3
    assert state.choose().connection is connection and state.choose().connection is connection
    assert connection.streams == 3 and state.choose().connection is None


def test_a_multiplexed_release_keeps_it_shared_unless_it_can_take_no_more() -> None:
    clock = Clock()
    state = make_state(http2=True, prior_knowledge=True, clock=clock)
    connection = take_new(state, FakeLink(speaks="HTTP/2", granted=10))
    state.choose()
    clock.now += 1
    assert state.release(connection) is Released.SHARED and connection.idle_since == 1000.0
    assert state.release(connection) is Released.SHARED and connection.idle_since == 1001.0
    state.choose()
    connection.link.available = False  # e.g. GOAWAY received
    assert state.release(connection) is Released.DISCARD


def test_a_new_alpn_connection_is_warming_until_it_says_what_it_speaks() -> None:
    state = make_state(max_connections=4, http2=True)
    link = FakeLink()
    take_new(state, link)
    choice = state.choose()
    assert choice.warming and not choice.open  # wait for it rather than open another
    link.speaks, link.granted = "HTTP/2", 1  # h2 chosen, SETTINGS not read yet
    choice = state.choose()
    assert choice.warming and not choice.open and choice.connection is None
    link.granted = 50
    choice = state.choose()
    assert choice.connection is not None and choice.connection.link is link  # now shared
    assert choice.connection.streams == 2


def test_once_alpn_chose_http1_connections_open_in_parallel() -> None:
    state = make_state(max_connections=4, http2=True)
    first = FakeLink()
    take_new(state, first)
    first.speaks = "HTTP/1.1"
    choice = state.choose()
    assert not choice.warming and choice.open
    state.opened(FakeLink())  # its protocol not known yet: the last answer was HTTP/1.1
    assert state.choose().open


def test_learning_reports_a_stream_limit_once() -> None:
    state = make_state(max_connections=2, http2=True)
    link = FakeLink(speaks="HTTP/2", granted=8)
    connection = take_new(state, link)
    assert state.learn() == 8
    assert connection.multiplexed and connection.id in state.shared
    assert state.learn() is None and not state.warming()


def test_the_first_response_head_teaches_the_protocol() -> None:
    state = make_state(max_connections=2, http2=True)
    h1_connection = take_new(state, FakeLink(speaks="HTTP/1.1"))
    h2_connection = take_new(state, FakeLink(granted=20))
    assert state.response_head(h2_connection, b"HTTP/2", []) == 20
    assert h2_connection.multiplexed and state.negotiated == "HTTP/2"
    assert state.response_head(h2_connection, b"HTTP/2", []) is None  # only the first one
    assert state.response_head(h1_connection, b"HTTP/1.1", []) == 1  # one request per connection
    assert not h1_connection.multiplexed and state.negotiated == "HTTP/1.1"
    stats = state.stats(waiting=0)
    assert stats.http_versions == {"HTTP/2": 1, "HTTP/1.1": 1} and stats.connecting == 0


def test_stats_count_connecting_active_and_idle() -> None:
    state = make_state(max_connections=3)
    connecting, answered, idle = take_new(state), take_new(state), take_new(state)
    state.response_head(answered, b"HTTP/1.1", [])
    state.response_head(idle, b"HTTP/1.1", [])
    state.release(idle)
    stats = state.stats(waiting=4)
    assert (stats.connections, stats.active, stats.idle, stats.connecting, stats.waiting) == (3, 2, 1, 1, 4)
    assert connecting.http_version is None


def test_the_core_imports_nothing_that_does_io() -> None:
    import sidecar.upstream.poolstate as core

    imported = {name for name, value in vars(core).items() if inspect.ismodule(value)}
    assert imported <= {"enum", "itertools", "time"}, imported
