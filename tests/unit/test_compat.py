"""The library self-checks: each passes on the installed versions and fails, naming
the library and version, when the internal it guards is missing."""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable
from typing import Any

import h11
import httpcore
import pytest
from httpcore import _synchronization
from httpcore._sync import http2 as sync_http2
from httpcore._sync import http11 as sync_http11

from sidecar import cli, compat
from sidecar.compat import h2 as h2_compat
from sidecar.compat import httpcore as httpcore_compat
from sidecar.config import HostPort, load_config
from tests.support.yaml import write_config

ORIGIN = httpcore.Origin(b"http", b"127.0.0.1", 1)


def failure_of(check: compat.SelfCheck) -> compat.Failure:
    failures = [failure for failure in compat.run_self_checks() if failure.check is check]
    assert len(failures) == 1, compat.run_self_checks()
    return failures[0]


def version(name: str) -> str:
    return f"{name} {importlib.metadata.version(name)}"


def drop_after_init(monkeypatch: pytest.MonkeyPatch, cls: type, attribute: str) -> None:
    """Instances of ``cls`` come without ``attribute`` (as if a release renamed it)."""
    original: Callable[..., None] = cls.__init__  # type: ignore[misc]

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        delattr(self, attribute)

    monkeypatch.setattr(cls, "__init__", init)


def test_every_check_passes_on_the_installed_versions() -> None:
    assert compat.run_self_checks() == []
    checks = {
        httpcore_compat.H11_BUFFER,
        httpcore_compat.HEADER_EVENTS,
        httpcore_compat.NETWORK_STREAM,
        httpcore_compat.FAST_LOCKS,
        h2_compat.STREAM_GRANT,
        h2_compat.STREAM_STATE,
        h2_compat.HEADER_EVENTS,
    }
    assert checks <= set(compat._registry)


# ------------------------------------------------------------ httpcore / h11


def test_h11_buffer_check_fails_without_trailing_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(h11.Connection, "trailing_data")
    failure = failure_of(httpcore_compat.H11_BUFFER)
    assert not failure.fatal
    assert f"{version('httpcore')}, {version('h11')}" in str(failure)
    assert "trailing_data" in str(failure) and "no HTTP/1.1 connection is reused" in str(failure)


def test_h11_buffer_check_fails_without_httpcores_parser_attribute(monkeypatch: pytest.MonkeyPatch) -> None:
    drop_after_init(monkeypatch, httpcore.AsyncHTTP11Connection, "_h11_state")
    assert "_h11_state" in failure_of(httpcore_compat.H11_BUFFER).problem


def test_checks_fail_without_the_inner_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    drop_after_init(monkeypatch, httpcore.AsyncHTTPConnection, "_connection")
    for check in (httpcore_compat.H11_BUFFER, httpcore_compat.NETWORK_STREAM, h2_compat.STREAM_GRANT):
        assert "_connection" in failure_of(check).problem


def test_header_events_check_fails_when_the_events_are_renamed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sync_http11, "logger", logging.getLogger("httpcore.renamed"))
    failure = failure_of(httpcore_compat.HEADER_EVENTS)
    assert failure.fatal and version("httpcore") in str(failure) and "no safe fallback" in str(failure)


def test_network_stream_check_fails_without_network_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    drop_after_init(monkeypatch, httpcore.AsyncHTTP2Connection, "_network_stream")
    failure = failure_of(httpcore_compat.NETWORK_STREAM)
    assert not failure.fatal and "_network_stream" in failure.problem


def test_fast_locks_check_fails_without_the_lock_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(_synchronization.AsyncLock, "setup")
    failure = failure_of(httpcore_compat.FAST_LOCKS)
    assert not failure.fatal and f"{version('httpcore')}, {version('anyio')}" in str(failure)


# ------------------------------------------------------------ h2


def test_stream_grant_check_fails_without_max_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(httpcore.AsyncHTTP2Connection, "_receive_remote_settings_change")
    failure = failure_of(h2_compat.STREAM_GRANT)
    assert not failure.fatal and f"{version('httpcore')}, {version('h2')}" in str(failure)
    assert "_max_streams" in failure.problem


def test_stream_state_check_fails_without_the_h2_state_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    drop_after_init(monkeypatch, httpcore.AsyncHTTP2Connection, "_h2_state")
    failure = failure_of(h2_compat.STREAM_STATE)
    assert not failure.fatal and "_h2_state" in failure.problem


def test_stream_state_check_fails_without_the_events_or_the_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        drop_after_init(patch, httpcore.AsyncHTTP2Connection, "_events")
        assert "_events" in failure_of(h2_compat.STREAM_STATE).problem
    monkeypatch.delattr(httpcore.AsyncHTTP2Connection, "_write_outgoing_data")
    assert "_write_outgoing_data" in failure_of(h2_compat.STREAM_STATE).problem


def test_h2_header_events_check_fails_when_the_events_are_renamed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sync_http2, "logger", logging.getLogger("httpcore.renamed"))
    failure = failure_of(h2_compat.HEADER_EVENTS)
    assert failure.fatal and f"{version('httpcore')}, {version('h2')}" in str(failure)


# ------------------------------------------------------------ at start-up


@pytest.fixture
def fresh_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """start_up() as in a new process; the fallback switches restored afterwards."""
    monkeypatch.setattr(compat, "_started", False)
    for module, switch in (
        (httpcore_compat, "_h11_buffer_visible"),
        (httpcore_compat, "_network_stream_visible"),
        (httpcore_compat, "_fast_locks_usable"),
        (h2_compat, "_grant_visible"),
        (h2_compat, "_state_visible"),
    ):
        monkeypatch.setattr(module, switch, True)


def connected(inner: object) -> httpcore.AsyncHTTPConnection:
    conn = httpcore.AsyncHTTPConnection(origin=ORIGIN)
    conn._connection = inner  # type: ignore[assignment]
    return conn


@pytest.mark.usefixtures("fresh_start")
def test_a_failed_check_with_a_fallback_logs_one_line_and_switches_to_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    h1 = connected(httpcore.AsyncHTTP11Connection(origin=ORIGIN, stream=httpcore.AsyncMockStream([])))
    assert httpcore_compat.has_unread_bytes(h1) is False
    with monkeypatch.context() as patch:
        drop_after_init(patch, httpcore.AsyncHTTP11Connection, "_h11_state")
        compat.start_up()
    lines = [line for line in capsys.readouterr().out.splitlines() if "library_fallback" in line]
    assert len(lines) == 1 and "no HTTP/1.1 connection is reused" in lines[0] and version("h11") in lines[0]
    assert httpcore_compat.has_unread_bytes(h1) is True  # the fallback holds once the internals are back


@pytest.mark.usefixtures("fresh_start")
def test_each_fallback_answers_unknown() -> None:
    h2_inner = httpcore.AsyncHTTP2Connection(origin=ORIGIN, stream=httpcore.AsyncMockStream([]))
    h2_inner._max_streams = 5
    conn = connected(h2_inner)
    assert h2_compat.granted_streams(conn) == 5 and h2_compat.h2_state_of(conn) is h2_inner
    assert httpcore_compat.network_stream_of(conn) is not None
    h2_compat._no_grant()
    h2_compat._no_state()
    httpcore_compat._no_network_stream()
    assert h2_compat.granted_streams(conn) is None  # one stream per connection
    assert h2_compat.h2_state_of(conn) is None  # abandoned streams retire the connection
    assert httpcore_compat.network_stream_of(conn) is None  # never presumed silent


@pytest.mark.usefixtures("fresh_start")
def test_a_failed_check_without_a_fallback_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sync_http11, "logger", logging.getLogger("httpcore.renamed"))
    with pytest.raises(compat.IncompatibleLibrary, match=version("httpcore")):
        compat.start_up()


@pytest.mark.usefixtures("fresh_start")
def test_the_sidecar_exits_1_naming_the_library(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sync_http11, "logger", logging.getLogger("httpcore.renamed"))
    config = load_config(write_config(tmp_path, "upstreams:\n  api:\n    url: http://127.0.0.1:9\n"))
    assert cli._serve(config, HostPort("127.0.0.1", 0), None, None) == 1
    stderr = capsys.readouterr().err
    assert stderr.startswith("sidecar: cannot start: ") and version("httpcore") in stderr
