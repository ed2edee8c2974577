"""The library self-checks at start-up: each passes on the installed versions; a
failed one logs one line and falls back, or, without a fallback, stops the
sidecar naming the library and its version."""

from __future__ import annotations

import importlib.metadata
from typing import Any

import aiohttp
import pytest
from aiohttp.web_protocol import RequestHandler

from sidecar import cli, compat
from sidecar.compat import checks
from sidecar.config import HostPort, load_config
from tests.support.yaml import write_config


def version(name: str) -> str:
    return f"{name} {importlib.metadata.version(name)}"


def without_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if aiohttp had renamed a handler attribute the sidecar cannot do without."""
    real_init = RequestHandler.__init__

    def init_then_drop(self: RequestHandler, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]
        delattr(self, "_messages")

    monkeypatch.setattr(RequestHandler, "__init__", init_then_drop)


def test_every_check_passes_on_the_installed_versions() -> None:
    assert compat.run_self_checks() == []
    assert {check.libraries for check in compat.registered()} == {("aiohttp",)}


@pytest.fixture
def fresh_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """start_up() as in a new process, with the registry restored afterwards."""
    monkeypatch.setattr(compat, "_started", False)
    monkeypatch.setattr(checks, "_registry", list(checks._registry))


@pytest.mark.usefixtures("fresh_start")
def test_a_failed_check_with_a_fallback_logs_one_line_and_switches_to_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    switched: list[bool] = []
    checks.register(
        checks.SelfCheck(
            ("aiohttp",),
            "an internal that moved",
            lambda: "it is gone",
            "doing without it",
            lambda: switched.append(True),
        )
    )
    compat.start_up()
    lines = [line for line in capsys.readouterr().out.splitlines() if "library_fallback" in line]
    assert len(lines) == 1 and "doing without it" in lines[0] and version("aiohttp") in lines[0], lines
    assert switched == [True]


@pytest.mark.usefixtures("fresh_start")
def test_a_failed_check_without_a_fallback_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    without_messages(monkeypatch)
    with pytest.raises(compat.IncompatibleLibrary, match=f"aiohttp {aiohttp.__version__}"):
        compat.start_up()


@pytest.mark.usefixtures("fresh_start")
def test_the_sidecar_exits_1_naming_the_library(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    without_messages(monkeypatch)
    config = load_config(write_config(tmp_path, "upstreams:\n  api:\n    url: http://127.0.0.1:9\n"))
    assert cli._serve(config, HostPort("127.0.0.1", 0), None, None) == 1
    stderr = capsys.readouterr().err
    assert stderr.startswith("sidecar: cannot start: ") and f"aiohttp {aiohttp.__version__}" in stderr
