"""The command line as users run it: real child processes, exit codes, stderr (docs/operations.md)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "config" / "upstreams.yaml"
# The console script installed next to this interpreter (pip install -e .).
CONSOLE_SCRIPT = Path(sys.executable).with_name("sidecar")

ENTRY_POINTS = {
    "module": [sys.executable, "-m", "sidecar"],
    "script": [str(CONSOLE_SCRIPT)],
}


def run_cli(
    entry: str, *args: str, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if key != "SIDECAR_CONFIG"}
    environment.update(env or {})
    return subprocess.run(
        [*ENTRY_POINTS[entry], *args],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        text=True,
        env=environment,
        cwd=cwd,
        timeout=60,
    )


@pytest.fixture(params=sorted(ENTRY_POINTS))
def entry(request: pytest.FixtureRequest) -> str:
    if request.param == "script" and not CONSOLE_SCRIPT.exists():
        pytest.fail(f"console script not installed at {CONSOLE_SCRIPT}: run scripts/setup")
    return str(request.param)


BAD_CONFIGS = {
    "negative-limit": (
        """
        upstreams:
          payments:
            url: http://127.0.0.1:9000
            limits: { max_connections: -3 }
        """,
        "upstreams.payments.limits.max_connections",
        "must be a positive integer, got -3",
    ),
    "unknown-key": (
        """
        upstreams:
          payments:
            url: http://127.0.0.1:9000
            timeouts: { raed: 5s }
        """,
        "upstreams.payments.timeouts.raed",
        "unknown key",
    ),
    "bad-duration": (
        """
        defaults:
          timeouts: { connect: soon }
        upstreams:
          payments: { url: "http://127.0.0.1:9000" }
        """,
        "defaults.timeouts.connect",
        "must be a duration",
    ),
    "missing-variable": (
        """
        upstreams:
          payments:
            url: http://127.0.0.1:9000
            headers: { set: { Authorization: "Bearer ${SIDECAR_TEST_UNSET_TOKEN}" } }
        """,
        "upstreams.payments.headers.set.Authorization",
        "SIDECAR_TEST_UNSET_TOKEN is not set",
    ),
    "bad-url": (
        """
        upstreams:
          payments: { url: "payments.internal:8443" }
        """,
        "upstreams.payments.url",
        "must start with http:// or https://",
    ),
    "bad-default-overridden": (
        """
        defaults:
          limits: { max_connections: 0 }
        upstreams:
          payments: { url: "http://127.0.0.1:9000", limits: { max_connections: 5 } }
        """,
        "defaults.limits.max_connections",
        "must be a positive integer, got 0",
    ),
    "url-port-0": (
        """
        upstreams:
          payments: { url: "http://127.0.0.1:0" }
        """,
        "upstreams.payments.url",
        "must have a port 1-65535",
    ),
    "workers-beyond-limits": (
        """
        workers: 100000
        upstreams:
          payments: { url: "http://127.0.0.1:9000" }
        """,
        "upstreams.payments.limits.max_connections",
        "must be at least workers (100000)",
    ),
    "malformed-yaml": (
        """
        upstreams:
          payments: { url: http://127.0.0.1:9000
          other: [
        """,
        "",
        "malformed YAML: line ",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_validate_rejects_bad_config_without_traceback(entry: str, case: str, tmp_path: Path) -> None:
    text, yaml_path, problem = BAD_CONFIGS[case]
    config = tmp_path / f"{case}.yaml"
    config.write_text(textwrap.dedent(text))
    result = run_cli(entry, "validate", "-c", str(config))
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    where = f"{config}: {yaml_path}: " if yaml_path else f"{config}: "
    assert result.stderr.startswith(f"sidecar: invalid config: {where}")
    assert problem in result.stderr
    assert result.stderr.count("\n") == 1, "one line, not a dump"


def test_run_rejects_bad_config_the_same_way(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(textwrap.dedent(BAD_CONFIGS["negative-limit"][0]))
    result = run_cli("module", "run", "-c", str(config), "--listen", "127.0.0.1:0", "--admin", "off")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{config}: upstreams.payments.limits.max_connections: must be a positive integer, got -3" in result.stderr


def test_run_exits_1_when_it_cannot_listen(tmp_path: Path) -> None:
    config = tmp_path / "ok.yaml"
    config.write_text("upstreams:\n  a: { url: 'http://127.0.0.1:9' }\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("module", "run", "-c", str(config), "--listen", f"127.0.0.1:{port}", "--admin", "off")
    assert result.returncode == 1
    assert "sidecar: cannot start:" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_exits_2(entry: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    result = run_cli(entry, "validate", "-c", str(missing))
    assert result.returncode == 2
    assert f"{missing}: file not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_shipped_config_prints_a_summary(entry: str) -> None:
    result = run_cli(entry, "validate", "-c", str(SHIPPED))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == f"{SHIPPED}: OK"
    assert "listen 127.0.0.1:8088" in lines
    assert "admin 127.0.0.1:8089" in lines
    (demo,) = [line for line in lines if line.startswith("upstream demo:")]
    assert "/demo -> http://127.0.0.1:8090" in demo
    assert "max_connections=20" in demo and "max_pending=200" in demo


def test_default_config_path_is_config_upstreams_yaml(tmp_path: Path) -> None:
    result = run_cli("module", "validate")  # cwd is the repository: config/upstreams.yaml
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config/upstreams.yaml: OK")
    result = run_cli("module", "validate", cwd=tmp_path)  # nothing there
    assert result.returncode == 2
    assert "config/upstreams.yaml: file not found" in result.stderr


def test_sidecar_config_environment_variable_is_honoured(entry: str, tmp_path: Path) -> None:
    good = tmp_path / "from-env.yaml"
    good.write_text("upstreams:\n  envonly: { url: 'http://127.0.0.1:9' }\n")
    result = run_cli(entry, "validate", env={"SIDECAR_CONFIG": str(good)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{good}: OK")
    assert "upstream envonly:" in result.stdout
    # -c wins over $SIDECAR_CONFIG.
    result = run_cli(entry, "validate", "-c", str(SHIPPED), env={"SIDECAR_CONFIG": str(good)})
    assert result.returncode == 0 and "upstream demo:" in result.stdout
    bad = tmp_path / "bad-from-env.yaml"
    bad.write_text("upstreams:\n  a: { url: 'http://a', bogus: 1 }\n")
    result = run_cli(entry, "validate", env={"SIDECAR_CONFIG": str(bad)})
    assert result.returncode == 2
    assert f"{bad}: upstreams.a.bogus: unknown key" in result.stderr


def test_empty_config_is_rejected(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    result = run_cli("module", "validate", "-c", str(empty))
    assert result.returncode == 2
    assert "upstreams: must define at least one upstream" in result.stderr


def test_validate_summary_includes_warnings(tmp_path: Path) -> None:
    config = tmp_path / "warn.yaml"
    config.write_text("upstreams:\n  a: { url: 'https://a.internal', tls: { verify: false } }\n")
    result = run_cli("module", "validate", "-c", str(config))
    assert result.returncode == 0
    assert "warning: upstreams.a.tls.verify: TLS verification is OFF for upstream 'a'" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        pytest.param([], id="no-command"),
        pytest.param(["frobnicate"], id="unknown-command"),
        pytest.param(["validate", "--bogus"], id="unknown-option"),
        pytest.param(["run", "--listen", "nonsense"], id="bad-listen"),
        pytest.param(["run", "--admin", "localhost"], id="bad-admin"),
        pytest.param(["run", "--log-format", "xml"], id="bad-log-format"),
        pytest.param(["validate", "-c"], id="missing-value"),
    ],
)
def test_usage_errors_exit_2(entry: str, args: list[str]) -> None:
    result = run_cli(entry, *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "usage: sidecar" in result.stderr
    assert "sidecar: error:" in result.stderr


def test_help_exits_0() -> None:
    result = run_cli("module", "--help")
    assert result.returncode == 0
    assert "validate" in result.stdout and "run" in result.stdout


def test_validate_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    """`sidecar validate | head -1`: the reader leaves early; no traceback."""
    upstreams = "".join(f"  u{index}:\n    url: http://127.0.0.1:{1000 + index}\n" for index in range(3000))
    config = tmp_path / "many.yaml"
    config.write_text("upstreams:\n" + upstreams)
    process = subprocess.Popen(
        [*ENTRY_POINTS["module"], "validate", "-c", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.readline()
    process.stdout.close()  # the summary is far larger than a pipe buffer: the writer hits EPIPE
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 0
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr


# Documents that `validate` used to accept (or crash on) and `run` then failed on.
UNSERVABLE_CONFIGS = {
    "deep-yaml": ("upstreams: " + "[" * 5000 + "]" * 5000 + "\n", "upstreams" + "[0]" * 63, "nested more than 64"),
    "url-port-0": ("upstreams:\n  api: { url: 'http://127.0.0.1:0' }\n", "upstreams.api.url", "port 0"),
    "url-space-in-host": ("upstreams:\n  api: { url: 'http://bad host:8080' }\n", "upstreams.api.url", "host"),
    "url-space-in-path": ("upstreams:\n  api: { url: 'http://127.0.0.1:9/a b' }\n", "upstreams.api.url", "path"),
    "workers-100000": (
        "workers: 100000\nupstreams:\n  api: { url: 'http://127.0.0.1:9' }\n",
        "upstreams.api.limits.max_connections",
        "must be at least workers (100000)",
    ),
}


@pytest.mark.parametrize("case", sorted(UNSERVABLE_CONFIGS))
def test_validate_rejects_what_run_could_not_serve(case: str, tmp_path: Path) -> None:
    text, yaml_path, problem = UNSERVABLE_CONFIGS[case]
    config = tmp_path / f"{case}.yaml"
    config.write_text(text)
    for command in ("validate", "run"):
        result = run_cli(
            "module", command, "-c", str(config), *(["--listen", "127.0.0.1:0"] if command == "run" else [])
        )
        assert result.returncode == 2, (command, result)
        assert "Traceback" not in result.stderr
        assert result.stderr.startswith(f"sidecar: invalid config: {config}: {yaml_path}: "), result.stderr
        assert problem in result.stderr
        assert result.stderr.count("\n") == 1, "one line, not a dump"
