"""sidecar/config: the schema, parsed once into typed objects (no sockets)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sidecar.config import (
    ConfigError,
    HostPort,
    HTTP2Mode,
    RateLimit,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
    public_view,
)


def parse(yaml_text: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return parse_config(textwrap.dedent(yaml_text), source="test.yaml", env=env or {})


def rejected(yaml_text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(yaml_text, env)
    return info.value


MINIMAL = """
upstreams:
  api:
    url: http://127.0.0.1:9000
"""


# ---------------------------------------------------------------- defaults


def test_minimal_config_gets_every_spec_default() -> None:
    config = parse(MINIMAL)
    assert config.listen == HostPort("127.0.0.1", 8088)
    assert config.admin.listen == HostPort("127.0.0.1", 8089)
    assert config.admin.token is None
    assert config.shutdown_timeout == 30.0
    assert config.workers == 1
    assert config.inbound.max_request_body is None
    assert config.inbound.header_timeout == 10.0
    assert config.inbound.body_idle_timeout == 30.0
    (api,) = config.upstreams
    assert api.http2 is HTTP2Mode.OFF
    assert api.limits.max_connections == 100
    assert api.limits.max_keepalive_connections == 100  # null = max_connections
    assert api.limits.keepalive_expiry == 5.0
    assert api.limits.max_concurrent_requests == 100  # HTTP/1.1: = max_connections
    assert api.limits.max_pending == 1000
    assert (api.timeouts.connect, api.timeouts.read, api.timeouts.write, api.timeouts.pool) == (5.0, 30.0, 5.0, 1.0)
    assert api.tls.verify is True
    assert (api.tls.ca_file, api.tls.client_cert, api.tls.client_key) == (None, None, None)
    assert api.route.path_prefix == "/api"
    assert api.route.strip_prefix is True
    assert api.route.hosts == ()
    assert api.headers.set == () and api.headers.remove == ()
    assert config.warnings == ()


def test_defaults_are_inherited_field_by_field() -> None:
    config = parse(
        """
        defaults:
          limits: { max_connections: 10, max_pending: 7 }
          timeouts: { connect: 2s, read: 20s }
        upstreams:
          a:
            url: http://a.internal
            limits: { max_pending: 3 }        # max_connections still from defaults
            timeouts: { read: 1s }            # connect still from defaults
          b:
            url: http://b.internal
        """
    )
    a, b = config.upstreams
    assert a.limits.max_connections == 10
    assert a.limits.max_pending == 3
    assert a.limits.keepalive_expiry == 5.0  # built-in, neither layer sets it
    assert a.timeouts.connect == 2.0
    assert a.timeouts.read == 1.0
    assert a.timeouts.write == 5.0 and a.timeouts.pool == 1.0
    assert b.limits.max_connections == 10 and b.limits.max_pending == 7
    assert b.timeouts.connect == 2.0 and b.timeouts.read == 20.0


def test_defaults_http2_and_tls_are_inherited_and_overridable() -> None:
    config = parse(
        """
        defaults:
          http2: true
          tls: { verify: false }
        upstreams:
          a: { url: "https://a.internal" }
          b: { url: "https://b.internal", http2: false, tls: { verify: true } }
        """
    )
    a, b = config.upstreams
    assert a.http2 is HTTP2Mode.ALPN and a.tls.verify is False
    assert b.http2 is HTTP2Mode.OFF and b.tls.verify is True
    # verify: false is allowed but always warned about, naming where it came from.
    assert any("defaults.tls.verify" in w and "'a'" in w for w in config.warnings)


def test_upstream_url_parts() -> None:
    config = parse(
        """
        upstreams:
          plain: { url: "http://plain.internal" }
          tls: { url: "https://secure.internal:8443/api/" }
          v6: { url: "http://[::1]:9000/x" }
        """
    )
    plain, secure, v6 = config.upstreams
    assert (plain.scheme, plain.host, plain.port, plain.base_path, plain.host_header) == (
        "http",
        "plain.internal",
        80,
        "",
        "plain.internal",
    )
    assert (secure.scheme, secure.port, secure.base_path, secure.host_header) == (
        "https",
        8443,
        "/api",  # trailing slash dropped
        "secure.internal:8443",
    )
    assert (v6.host, v6.host_header, v6.base_path) == ("::1", "[::1]:9000", "/x")


def test_route_settings() -> None:
    config = parse(
        """
        upstreams:
          payments:
            url: http://p.internal
            route: { path_prefix: /pay/, strip_prefix: false, hosts: [Payments.Internal, p2.internal] }
        """
    )
    route = config.upstreams[0].route
    assert route.path_prefix == "/pay"  # trailing slash normalised
    assert route.strip_prefix is False
    assert route.hosts == ("payments.internal", "p2.internal")  # host names are case-insensitive


def test_header_rules() -> None:
    config = parse(
        """
        upstreams:
          api:
            url: http://a.internal
            headers:
              set: { Authorization: "Bearer ${TOKEN}", X-Team: core }
              remove: [X-Debug, Cookie]
        """,
        env={"TOKEN": "s3cret-token"},
    )
    headers = config.upstreams[0].headers
    assert headers.set == (("Authorization", "Bearer s3cret-token"), ("X-Team", "core"))
    assert headers.remove == ("X-Debug", "Cookie")


def test_admin_forms() -> None:
    assert parse("admin: 'off'\n" + MINIMAL).admin.listen is None
    assert parse("admin: 127.0.0.1:0\n" + MINIMAL).admin.listen == HostPort("127.0.0.1", 0)
    config = parse(
        "admin: { listen: '[::1]:9999', token: '${ADMIN_TOKEN}' }\n" + MINIMAL, env={"ADMIN_TOKEN": "tok-123"}
    )
    assert config.admin.listen == HostPort("::1", 9999)
    assert config.admin.token == "tok-123"
    assert "tok-123" in config.secrets


def test_admin_per_worker_defaults_to_one_host_endpoint() -> None:
    assert parse(MINIMAL).admin.per_worker is False
    assert parse("admin: 127.0.0.1:0\n" + MINIMAL).admin.per_worker is False
    config = parse("admin: { listen: 127.0.0.1:9000, per_worker: true }\n" + MINIMAL)
    assert config.admin.per_worker is True
    assert config.admin.listen == HostPort("127.0.0.1", 9000)
    assert public_view(config)["admin"]["per_worker"] is True
    error = rejected("admin: { per_worker: sometimes }\n" + MINIMAL)
    assert error.path == "admin.per_worker"


def test_admin_off_loopback_without_token_is_warned() -> None:
    config = parse("admin: 0.0.0.0:8089\n" + MINIMAL)
    assert any("not on loopback" in warning for warning in config.warnings)


# ------------------------------------------------- durations and sizes


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("5s", 5.0), ("2m", 120.0), ("1h", 3600.0), (3, 3.0), (0.5, 0.5), ("1.5s", 1.5), ("7", 7.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5 minutes", "-1s", "abc", "", 0, -2, True, None, [1], "1d", ".nan", float("nan")])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [("512KiB", 512 * 1024), ("10MiB", 10 * 1024**2), ("1GiB", 1024**3), (4096, 4096), ("100", 100), ("1MB", 10**6)],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["10 mb", "-5", "big", 0, -1, 1.5, True, "1TiB"])
def test_bad_sizes(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_durations_and_sizes_in_the_file() -> None:
    config = parse(
        """
        shutdown_timeout: 2m
        inbound: { max_request_body: 10MiB, header_timeout: 250ms }
        defaults:
          limits: { keepalive_expiry: 90s }
          timeouts: { pool: 100ms, read: 1.5 }
        upstreams:
          api: { url: "http://a.internal" }
        """
    )
    assert config.shutdown_timeout == 120.0
    assert config.inbound.max_request_body == 10 * 1024**2
    assert config.inbound.header_timeout == 0.25
    api = config.upstreams[0]
    assert api.limits.keepalive_expiry == 90.0
    assert api.timeouts.pool == pytest.approx(0.1)
    assert api.timeouts.read == 1.5


# ------------------------------------------------------------ ${VAR}


def test_variables_are_substituted_from_the_environment() -> None:
    config = parse(
        """
        listen: "${HOST}:${PORT}"
        upstreams:
          api:
            url: "${API_URL}/v1"
        """,
        env={"HOST": "0.0.0.0", "PORT": "9000", "API_URL": "https://api.internal"},
    )
    assert config.listen == HostPort("0.0.0.0", 9000)
    assert config.upstreams[0].url == "https://api.internal/v1"
    assert config.upstreams[0].base_path == "/v1"


def test_variable_defaults_apply_only_when_unset() -> None:
    text = """
        upstreams:
          api:
            url: "${API_URL:-http://fallback.internal}"
            timeouts: { read: "${READ:-7s}" }
    """
    api = parse(text).upstreams[0]
    assert api.url == "http://fallback.internal" and api.timeouts.read == 7.0
    api = parse(text, env={"API_URL": "http://set.internal", "READ": "2s"}).upstreams[0]
    assert api.url == "http://set.internal" and api.timeouts.read == 2.0
    # An empty default is allowed and gives an empty string.
    config = parse(
        """
        upstreams:
          api:
            url: http://a.internal
            headers: { set: { X-Optional: "${OPTIONAL:-}" } }
        """
    )
    assert config.upstreams[0].headers.set == (("X-Optional", ""),)


def test_numbers_and_booleans_may_come_from_variables() -> None:
    config = parse(
        """
        workers: "${WORKERS:-2}"
        defaults:
          http2: "${H2:-true}"
          limits: { max_connections: "${MAXCONN}", max_pending: "${PENDING:-0}" }
          tls: { verify: "${VERIFY:-true}" }
        upstreams:
          api: { url: "https://a.internal", route: { strip_prefix: "${STRIP}" } }
        """,
        env={"MAXCONN": "12", "STRIP": "false"},
    )
    assert config.workers == 2
    api = config.upstreams[0]
    assert api.limits.max_connections == 12
    assert api.limits.max_pending == 0
    assert api.http2 is HTTP2Mode.ALPN
    assert api.tls.verify is True
    assert api.route.strip_prefix is False
    error = rejected("upstreams:\n  a: { url: 'http://a', limits: { max_connections: '${N}' } }\n", env={"N": "ten"})
    assert error.path == "upstreams.a.limits.max_connections" and "positive integer" in error.problem


def test_variable_values_are_secrets_and_redacted_in_public_view() -> None:
    config = parse(
        """
        upstreams:
          api:
            url: http://a.internal
            headers: { set: { Authorization: "Bearer ${TOKEN}" } }
        """,
        env={"TOKEN": "hunter2-token"},
    )
    assert "hunter2-token" in config.secrets
    view = public_view(config)
    assert "hunter2-token" not in repr(view)
    assert view["upstreams"]["api"]["headers"]["set"] == {"Authorization": "<redacted>"}
    assert view["upstreams"]["api"]["limits"]["max_connections"] == 100


def test_missing_variable_is_an_error_naming_the_path() -> None:
    error = rejected(
        """
        upstreams:
          api:
            url: http://a.internal
            headers: { set: { Authorization: "Bearer ${PAYMENTS_TOKEN}" } }
        """
    )
    assert error.path == "upstreams.api.headers.set.Authorization"
    assert "PAYMENTS_TOKEN" in error.problem
    assert str(error).startswith("test.yaml: upstreams.api.headers.set.Authorization: ")


# ------------------------------------------------------------- http2


@pytest.mark.parametrize(
    ("url", "value", "mode", "concurrent"),
    [
        ("http://a.internal", "false", HTTP2Mode.OFF, 10),
        ("https://a.internal", "true", HTTP2Mode.ALPN, 1000),  # h2 possible: x100
        ("http://a.internal", "true", HTTP2Mode.ALPN, 10),  # stays HTTP/1.1 on http://
        ("http://a.internal", "prior-knowledge", HTTP2Mode.PRIOR_KNOWLEDGE, 1000),
        ("https://a.internal", "prior-knowledge", HTTP2Mode.PRIOR_KNOWLEDGE, 1000),
    ],
)
def test_http2_modes_and_default_concurrency(url: str, value: str, mode: HTTP2Mode, concurrent: int) -> None:
    config = parse(
        f"""
        upstreams:
          api:
            url: "{url}"
            http2: {value}
            limits: {{ max_connections: 10 }}
        """
    )
    api = config.upstreams[0]
    assert api.http2 is mode
    assert api.limits.max_concurrent_requests == concurrent


def test_http2_true_on_plain_http_is_warned() -> None:
    config = parse("upstreams:\n  api: { url: 'http://a.internal', http2: true }\n")
    assert any("upstreams.api.http2" in w and "prior-knowledge" in w for w in config.warnings)


def test_explicit_concurrency_is_kept_and_capped_at_what_connections_carry() -> None:
    config = parse(
        """
        upstreams:
          low: { url: "http://a.internal", limits: { max_connections: 10, max_concurrent_requests: 4 } }
          high: { url: "http://b.internal", limits: { max_connections: 10, max_concurrent_requests: 50 } }
        """
    )
    low, high = config.upstreams
    assert low.limits.max_concurrent_requests == 4
    assert high.limits.max_concurrent_requests == 10
    assert any("upstreams.high.limits.max_concurrent_requests" in w for w in config.warnings)


def test_explicit_keepalive_limit() -> None:
    limits = "{ max_connections: 8, max_keepalive_connections: 2 }"
    api = parse(f"upstreams:\n  api: {{ url: 'http://a.internal', limits: {limits} }}\n").upstreams[0]
    assert api.limits.max_keepalive_connections == 2


# ---------------------------------------------------------- rejections


@pytest.mark.parametrize(
    ("yaml_text", "path", "words"),
    [
        pytest.param(
            "upstreams:\n  payments:\n    url: http://p\n    limits: { max_connections: -3 }\n",
            "upstreams.payments.limits.max_connections",
            "must be a positive integer, got -3",
            id="negative-limit",
        ),
        pytest.param(
            "defaults:\n  limits: { max_pending: -1 }\nupstreams:\n  a: { url: 'http://a' }\n",
            "defaults.limits.max_pending",
            "non-negative integer",
            id="negative-default-limit",
        ),
        pytest.param(
            "upstreams:\n  a:\n    url: http://a\n    limits: { max_conections: 5 }\n",
            "upstreams.a.limits.max_conections",
            "unknown key",
            id="unknown-key-typo",
        ),
        pytest.param("listn: 127.0.0.1:1\n" + MINIMAL, "listn", "unknown key", id="unknown-top-key"),
        pytest.param(
            "upstreams:\n  a:\n    url: http://a\n    route: { prefix: /a }\n",
            "upstreams.a.route.prefix",
            "unknown key",
            id="unknown-route-key",
        ),
        pytest.param(
            "upstreams:\n  a:\n    url: http://a\n    timeouts: { read: 5 minutes }\n",
            "upstreams.a.timeouts.read",
            "must be a duration",
            id="bad-duration",
        ),
        pytest.param(
            "defaults:\n  timeouts: { pool: 0s }\nupstreams:\n  a: { url: 'http://a' }\n",
            "defaults.timeouts.pool",
            "positive duration",
            id="zero-duration",
        ),
        pytest.param(
            "upstreams:\n  a: { url: 'ftp://a.internal' }\n",
            "upstreams.a.url",
            "http:// or https://",
            id="bad-url-scheme",
        ),
        pytest.param("upstreams:\n  a: { url: 'http://' }\n", "upstreams.a.url", "must name a host", id="no-host"),
        pytest.param(
            "upstreams:\n  a: { url: 'http://a:99999' }\n", "upstreams.a.url", "not a valid URL", id="bad-port"
        ),
        pytest.param(
            "upstreams:\n  a: { url: 'http://user:pw@a' }\n", "upstreams.a.url", "credentials", id="url-userinfo"
        ),
        pytest.param("upstreams:\n  a: { url: 'http://a/?x=1' }\n", "upstreams.a.url", "query", id="url-query"),
        pytest.param("upstreams:\n  a: { route: {} }\n", "upstreams.a.url", "is required", id="missing-url"),
        pytest.param("upstreams:\n  Bad_Name: { url: 'http://a' }\n", "upstreams.Bad_Name", "[a-z0-9]", id="name"),
        pytest.param("listen: 8088\n" + MINIMAL, "listen", "HOST:PORT", id="bad-listen"),
        pytest.param("workers: 0\n" + MINIMAL, "workers", "positive integer", id="zero-workers"),
        pytest.param(
            "upstreams:\n  a: { url: 'http://a', http2: yes-please }\n",
            "upstreams.a.http2",
            "prior-knowledge",
            id="bad-http2",
        ),
        pytest.param(
            "upstreams:\n  a: { url: 'http://a', tls: { verify: 'no' } }\n",
            "upstreams.a.tls.verify",
            "true or false",
            id="verify-string",
        ),
        pytest.param(
            "upstreams:\n  a: { url: 'http://a', tls: { ca_file: /nonexistent/ca.pem } }\n",
            "upstreams.a.tls.ca_file",
            "file not found",
            id="missing-ca-file",
        ),
        pytest.param(
            "upstreams:\n  a: { url: 'http://a', limits: { max_connections: 2, max_keepalive_connections: 3 } }\n",
            "upstreams.a.limits.max_keepalive_connections",
            "must not exceed",
            id="keepalive-over-max",
        ),
        pytest.param(
            "upstreams:\n  a: { url: 'http://a', route: { path_prefix: x } }\n",
            "upstreams.a.route.path_prefix",
            "must start with '/'",
            id="relative-prefix",
        ),
        pytest.param(
            "upstreams:\n  a: { url: 'http://a', route: { hosts: a.internal } }\n",
            "upstreams.a.route.hosts",
            "list",
            id="hosts-not-list",
        ),
        pytest.param(
            "upstreams:\n  a: { url: 'http://a' }\n  b: { url: 'http://b', route: { path_prefix: /a } }\n",
            "upstreams.b.route.path_prefix",
            "already the prefix",
            id="duplicate-prefix",
        ),
        pytest.param(
            "upstreams:\n  a: { url: 'http://a', route: { hosts: [x] } }\n"
            "  b: { url: 'http://b', route: { hosts: [X] } }\n",
            "upstreams.b.route.hosts",
            "already routed",
            id="duplicate-host",
        ),
        pytest.param(
            "upstreams:\n  a: { url: 'http://a', headers: { set: { 'Bad Header': x } } }\n",
            "upstreams.a.headers.set.Bad Header",
            "header name",
            id="bad-header-name",
        ),
        pytest.param(
            "upstreams:\n  a: { url: 'http://a', headers: { set: { X-A: \"a\\r\\nX-B: b\" } } }\n",
            "upstreams.a.headers.set.X-A",
            "CR, LF",
            id="header-injection",
        ),
        pytest.param("upstreams: {}\n", "upstreams", "at least one", id="no-upstreams"),
        pytest.param("upstreams: 5\n", "upstreams", "mapping", id="upstreams-not-mapping"),
        pytest.param("upstreams: [a, b]\n", "upstreams", "mapping", id="upstreams-list"),
        pytest.param("upstreams:\n  a: 5\n", "upstreams.a", "mapping", id="upstream-not-mapping"),
        pytest.param("- 1\n- 2\n", "(top level)", "mapping", id="top-level-list"),
        pytest.param("inbound: { max_request_body: lots }\n" + MINIMAL, "inbound.max_request_body", "size", id="size"),
        *(
            pytest.param(
                f"upstreams:\n  a: {{ url: 'http://a', rate_limit: {{ rate: {rate} }} }}\n",
                "upstreams.a.rate_limit.rate",
                words,
                id=f"rate-{rate}",
            )
            for rate, words in (
                ("10", "rate like 100/s"),
                ("10/d", "rate like 100/s"),
                ("-1/s", "rate like 100/s"),
                ("0/s", "positive rate"),
                ("'0.0/m'", "positive rate"),
                ("ten/s", "rate like 100/s"),
                ("true", "rate like 100/s"),
            )
        ),
        *(
            pytest.param(
                f"upstreams:\n  a: {{ url: 'http://a', rate_limit: {{ rate: 5/s, burst: {burst} }} }}\n",
                "upstreams.a.rate_limit.burst",
                "positive integer",
                id=f"burst-{burst}",
            )
            for burst in ("0", "-2", "1.5", "lots")
        ),
        pytest.param(
            "defaults:\n  rate_limit: { rate: 5 per second }\nupstreams:\n  a: { url: 'http://a' }\n",
            "defaults.rate_limit.rate",
            "rate like 100/s",
            id="default-rate",
        ),
        pytest.param(
            "upstreams:\n  a: { url: 'http://a', rate_limit: { burst: 3 } }\n",
            "upstreams.a.rate_limit.burst",
            "needs a rate",
            id="burst-without-rate",
        ),
        pytest.param(
            "upstreams:\n  a: { url: 'http://a', rate_limit: { rate: 5/s, brust: 3 } }\n",
            "upstreams.a.rate_limit.brust",
            "unknown key",
            id="rate-limit-typo",
        ),
        pytest.param(
            "upstreams:\n  a: { url: 'http://a', rate_limit: 5/s }\n",
            "upstreams.a.rate_limit",
            "mapping",
            id="rate-limit-not-mapping",
        ),
    ],
)
def test_rejections_name_the_yaml_path(yaml_text: str, path: str, words: str) -> None:
    error = rejected(yaml_text)
    assert error.path == path
    assert words in error.problem
    assert str(error) == f"test.yaml: {path}: {error.problem}"


def test_unknown_key_error_lists_the_allowed_keys() -> None:
    error = rejected("upstreams:\n  a:\n    url: http://a\n    timeouts: { raed: 5s }\n")
    assert "connect, read, write, pool" in error.problem


def test_malformed_yaml_names_line_and_column() -> None:
    error = rejected("upstreams:\n  a: { url: http://a\n  b: [\n")
    assert error.path == ""
    assert "malformed YAML" in error.problem
    assert "line " in error.problem and "column " in error.problem


def test_empty_file_needs_upstreams() -> None:
    assert rejected("").path == "upstreams"


def test_load_config_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value) and "file not found" in str(info.value)


def test_load_config_reads_the_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "upstreams.yaml"
    path.write_text("upstreams:\n  api: { url: '${U}' }\n")
    config = load_config(path, env={"U": "http://x.internal:81"})
    assert config.source == str(path)
    assert config.upstreams[0].port == 81


def test_shipped_config_is_valid() -> None:
    shipped = Path(__file__).resolve().parents[2] / "config" / "upstreams.yaml"
    config = load_config(shipped, env={})
    assert [u.name for u in config.upstreams] == ["demo"]
    assert config.upstreams[0].url == "http://127.0.0.1:8090"
    assert config.warnings == ()


def test_tls_files_are_loaded_at_validation(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "client.pem", tmp_path / "client.key"
    ca.cert_pem.write_to_path(str(ca_file))
    client = ca.issue_cert("client.internal")
    client.cert_chain_pems[0].write_to_path(str(cert_file))
    client.private_key_pem.write_to_path(str(key_file))
    text = f"""
        upstreams:
          a:
            url: https://a.internal
            tls: {{ ca_file: "{ca_file}", client_cert: "{cert_file}", client_key: "{key_file}" }}
    """
    tls = parse(text).upstreams[0].tls
    assert (tls.ca_file, tls.client_cert, tls.client_key) == (str(ca_file), str(cert_file), str(key_file))

    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    error = rejected(f"upstreams:\n  a: {{ url: 'https://a', tls: {{ ca_file: '{not_pem}' }} }}\n")
    assert error.path == "upstreams.a.tls.ca_file" and "no usable PEM" in error.problem
    error = rejected(f"defaults:\n  tls: {{ client_cert: '{not_pem}' }}\nupstreams:\n  a: {{ url: 'https://a' }}\n")
    assert error.path == "defaults.tls.client_cert"
    # A certificate with someone else's key.
    other_key = tmp_path / "other.key"
    ca.issue_cert("other.internal").private_key_pem.write_to_path(str(other_key))
    error = rejected(
        f"upstreams:\n  a: {{ url: 'https://a', tls: {{ client_cert: '{cert_file}', client_key: '{other_key}' }} }}\n"
    )
    assert error.path == "upstreams.a.tls.client_cert"


def test_duplicate_keys_are_rejected() -> None:
    error = rejected("upstreams:\n  a: { url: 'http://a' }\n  a: { url: 'http://b' }\n")
    assert "duplicate key 'a'" in error.problem and "line 3" in error.problem
    error = rejected("upstreams:\n  a: { url: 'http://a', url: 'http://b' }\n")
    assert "duplicate key 'url'" in error.problem


def test_yaml_merge_keys_may_be_overridden() -> None:
    config = parse(
        """
        upstreams:
          base: &common
            url: http://common
            limits: { max_connections: 3 }
          a:
            <<: *common
            url: http://a
        """
    )
    a = config.upstream("a")
    assert a is not None
    assert a.url == "http://a"
    assert a.limits.max_connections == 3


def test_python_tags_are_not_constructed() -> None:
    error = rejected("!!python/object/apply:os.system ['true']\n")
    assert "malformed YAML" in error.problem


# ------------------------------------------- every value where it is written


@pytest.mark.parametrize(
    ("defaults", "override", "path", "words"),
    [
        pytest.param(
            "limits: { max_connections: 0 }",
            "limits: { max_connections: 5 }",
            "defaults.limits.max_connections",
            "positive integer",
            id="limits",
        ),
        pytest.param(
            "limits: { max_pending: -1, keepalive_expiry: 5s }",
            "limits: { max_pending: 5 }",
            "defaults.limits.max_pending",
            "non-negative integer",
            id="limits-pending",
        ),
        pytest.param(
            "timeouts: { read: 0s }",
            "timeouts: { read: 5s }",
            "defaults.timeouts.read",
            "positive duration",
            id="timeouts",
        ),
        pytest.param(
            "tls: { verify: 'no' }",
            "tls: { verify: true }",
            "defaults.tls.verify",
            "true or false",
            id="tls-verify",
        ),
        pytest.param(
            "tls: { ca_file: /nonexistent/ca.pem }",
            "tls: { ca_file: null }",
            "defaults.tls.ca_file",
            "file not found",
            id="tls-ca-file",
        ),
        pytest.param(
            "http2: yes-please",
            "http2: false",
            "defaults.http2",
            "prior-knowledge",
            id="http2",
        ),
    ],
)
def test_a_bad_default_is_an_error_even_when_every_upstream_overrides_it(
    defaults: str, override: str, path: str, words: str
) -> None:
    error = rejected(
        f"defaults:\n  {defaults}\nupstreams:\n"
        f"  a: {{ url: 'http://a', {override} }}\n"
        f"  b: {{ url: 'http://b', {override} }}\n"
    )
    assert error.path == path
    assert words in error.problem
    assert str(error) == f"test.yaml: {path}: {error.problem}"


def test_a_good_default_overridden_everywhere_is_still_fine() -> None:
    config = parse(
        "defaults:\n  limits: { max_connections: 3 }\n  http2: prior-knowledge\n"
        "upstreams:\n  a: { url: 'http://a', http2: false, limits: { max_connections: 5 } }\n"
    )
    assert config.upstreams[0].limits.max_connections == 5
    assert config.upstreams[0].http2 is HTTP2Mode.OFF


# ------------------------------------------------------ documents too deep


def test_a_self_referencing_alias_is_an_error_not_a_recursion() -> None:
    # Validation goes no deeper than the schema, whatever an alias stands for.
    error = rejected("upstreams:\n  a: { url: 'http://a', route: { hosts: &loop [*loop] } }\n")
    assert error.path == "upstreams.a.route.hosts[0]" and "non-empty string" in error.problem


# ------------------------------------------------------------ upstream URLs


@pytest.mark.parametrize(
    ("url", "words"),
    [
        pytest.param("http://a:0", "port 1-65535", id="port-0"),
        pytest.param("http://a:0/x", "port 1-65535", id="port-0-path"),
        pytest.param("http://pay ments.internal", "spaces or control characters", id="space-in-host"),
        pytest.param("http://a/b c", "spaces or control characters", id="space-in-path"),
        pytest.param("http://a/b\\tc", "spaces or control characters", id="tab-in-path"),
        pytest.param("http://a\\x01b/", "spaces or control characters", id="control-in-host"),
        pytest.param("http://a/x\\x7f", "spaces or control characters", id="delete-in-path"),
        pytest.param("http://a<b>/", "invalid character in its host", id="angle-in-host"),
        pytest.param("http://a,b/", "invalid character in its host", id="comma-in-host"),
        pytest.param("http://a/b\\\\c", "invalid character in its path", id="backslash-in-path"),
        pytest.param("http://a/b<c>", "invalid character in its path", id="angle-in-path"),
        pytest.param("http://a/b%zz", "invalid character in its path", id="bad-escape"),
        pytest.param("http://[::1/x", "not a valid URL", id="bad-ipv6"),
    ],
)
def test_invalid_upstream_urls_are_rejected_at_the_url(url: str, words: str) -> None:
    error = rejected(f'upstreams:\n  a: {{ url: "{url}" }}\n')
    assert error.path == "upstreams.a.url"
    assert words in error.problem


def test_valid_upstream_urls_still_pass() -> None:
    for url, host, port, base in [
        ("http://api_v2.internal:8080/v1/%7Euser/a:b@c", "api_v2.internal", 8080, "/v1/%7Euser/a:b@c"),
        ("https://[fe80::1]/", "fe80::1", 443, ""),
        ("http://a:", "a", 80, ""),
        ("http://bücher.example/", "bücher.example", 80, ""),
    ]:
        upstream = parse(f'upstreams:\n  a: {{ url: "{url}" }}\n').upstreams[0]
        assert (upstream.host, upstream.port, upstream.base_path) == (host, port, base)


# ----------------------------------------------------------------- workers


def test_workers_beyond_what_the_limits_can_split_is_an_error() -> None:
    error = rejected("workers: 100000\n" + MINIMAL)
    assert error.path == "upstreams.api.limits.max_connections"
    assert "must be at least workers (100000)" in error.problem
    error = rejected(
        "workers: 3\nupstreams:\n  a: { url: 'http://a', limits: { max_connections: 8, max_concurrent_requests: 2 } }\n"
    )
    assert error.path == "upstreams.a.limits.max_concurrent_requests"
    assert parse("workers: 4\n" + MINIMAL).workers == 4


def test_a_bad_value_is_quoted_short_however_large_it_is() -> None:
    # Aliases let a few lines stand for a huge value; the message quotes its beginning.
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 5)]  # 10**5 values
    anchors = "\n      ".join(levels)
    error = rejected(
        f"defaults:\n  tls:\n    ca_file:\n      {anchors}\n"
        "upstreams:\n  a: { url: 'http://a', limits: { max_connections: *a4 } }\n"
    )
    assert error.path == "defaults.tls.ca_file" and "non-empty string, got {'a0': ['x'," in error.problem
    assert len(error.problem) < 200
    error = rejected("upstreams:\n  a: { url: [" + "x, " * 10000 + "] }\n")
    assert error.path == "upstreams.a.url" and len(error.problem) < 200


def test_the_first_problem_in_reading_order_is_the_one_reported() -> None:
    # A section's own keys are checked before what is under it, sections in file order.
    error = rejected("upstreams:\n  a: { url: 'http://a', limits: { max_connections: x }, bogus: 1 }\n")
    assert error.path == "upstreams.a.bogus"
    error = rejected("upstreams:\n  b: { url: 5 }\n  a: { url: 'http://a', bogus: 1 }\n")
    assert error.path == "upstreams.b.url"
    # An upstream may be named like a section key; its keys are still an upstream's.
    error = rejected("upstreams:\n  limits: { url: 'http://a', limits: { x: 1 } }\n")
    assert error.path == "upstreams.limits.limits.x" and "max_connections, max_keepalive" in error.problem


# ------------------------------------------- what validate used to let through


@pytest.mark.parametrize(
    ("document", "path"),
    [
        pytest.param("[" * 5000 + "]" * 5000, "[0]" * 64, id="top-level-sequences"),
        pytest.param("upstreams: " + "{a: " * 5000 + "1" + "}" * 5000, "upstreams" + ".a" * 63, id="mappings"),
        pytest.param(
            "upstreams:\n  a:\n    url: http://a\n    route:\n      hosts: " + "[" * 5000,
            "upstreams.a.route.hosts" + "[0]" * 60,
            id="unclosed",
        ),
    ],
)
def test_a_deeply_nested_document_is_a_config_error_naming_where(document: str, path: str) -> None:
    error = rejected(document)
    assert error.path == path
    assert "nested more than 64 levels deep" in error.problem
    assert "line 1, column " in error.problem or "line 5, column " in error.problem


def test_nesting_up_to_the_limit_is_only_judged_by_the_schema() -> None:
    # 64 levels are parsed; the schema then refuses the shape, as for any other value.
    error = rejected("upstreams: " + "[" * 63 + "]" * 63)
    assert error.path == "upstreams"
    assert "mapping" in error.problem


@pytest.mark.parametrize(
    ("url", "words"),
    [
        pytest.param("http://127.0.0.1:0", "port 0", id="port-0"),
        pytest.param("https://a.internal:0/api", "port 0", id="port-0-https"),
        pytest.param("http://bad host:8080", "host", id="space-in-host"),
        pytest.param("http://ex<ample:80", "host", id="angle-in-host"),
        pytest.param("http://a..b", "host", id="empty-label"),
        pytest.param("http://[::g]:80", "not a valid URL", id="bad-ipv6"),
        pytest.param("http://127.0.0.1:9000/a b", "path", id="space-in-path"),
        pytest.param("http://127.0.0.1:9000/caf\u00e9", "path", id="non-ascii-path"),
        pytest.param("http://127.0.0.1:9000/a%zz", "path", id="bad-percent"),
        pytest.param("http://127.0.0.1:9000/a\\b", "path", id="backslash-in-path"),
    ],
)
def test_upstream_url_that_could_never_be_requested_is_rejected(url: str, words: str) -> None:
    error = rejected(f"upstreams:\n  a:\n    url: {url!r}\n")
    assert error.path == "upstreams.a.url"
    assert words in error.problem
    assert str(error).startswith("test.yaml: upstreams.a.url: ")


@pytest.mark.parametrize(
    ("url", "host", "port", "base_path"),
    [
        ("http://my_service:8080", "my_service", 8080, ""),  # compose service names may have underscores
        ("http://[::1]:9000/v1", "::1", 9000, "/v1"),
        ("https://api.example.com./v1/%7Euser;x=1/", "api.example.com.", 443, "/v1/%7Euser;x=1"),
        ("http://10.0.0.1:65535/a-b_c.d~e!$&'()*+,=:@", "10.0.0.1", 65535, "/a-b_c.d~e!$&'()*+,=:@"),
    ],
)
def test_upstream_urls_that_stay_valid(url: str, host: str, port: int, base_path: str) -> None:
    upstream = parse(f"upstreams:\n  a:\n    url: {url!r}\n").upstreams[0]
    assert (upstream.host, upstream.port, upstream.base_path) == (host, port, base_path)


def test_workers_beyond_what_the_limits_can_share_are_rejected_at_load() -> None:
    # `run` refuses this (every worker needs one connection); validation must too.
    error = rejected("workers: 100000\n" + MINIMAL)
    assert error.path == "upstreams.api.limits.max_connections"
    assert "must be at least workers (100000)" in error.problem


def test_workers_whose_admin_ports_would_pass_65535_are_rejected() -> None:
    text = "workers: 100000\nadmin: 127.0.0.1:8089\nupstreams:\n  api:\n    url: http://a\n"
    text += "    limits: { max_connections: 100000, max_pending: 0 }\n"
    # One host-wide admin listener by default: no per-worker ports to run out of.
    assert parse(text).workers == 100000
    per_worker = text.replace("admin: 127.0.0.1:8089", "admin: { listen: 127.0.0.1:8089, per_worker: true }")
    error = rejected(per_worker)
    assert error.path == "workers"
    assert "65535" in error.problem
    # Per-worker admin on port 0 (each worker picks a free one) or off: no such bound.
    assert parse(per_worker.replace("127.0.0.1:8089", "127.0.0.1:0")).workers == 100000


def test_rate_limit_is_inherited_field_by_field_and_can_be_turned_off() -> None:
    config = parse(
        """
        defaults: { rate_limit: { rate: 600/m, burst: 3 } }
        upstreams:
          a: { url: 'http://a' }
          b: { url: 'http://b', rate_limit: { burst: 7 } }
          c: { url: 'http://c', rate_limit: { rate: 2.5/s } }
          d: { url: 'http://d', rate_limit: null }
          e: { url: 'http://e', rate_limit: off }
        """
    )
    limits = {u.name: u.rate_limit for u in config.upstreams}
    assert limits["a"] == RateLimit(rate=10.0, burst=3)
    assert limits["b"] == RateLimit(rate=10.0, burst=7)
    assert limits["c"] == RateLimit(rate=2.5, burst=3)
    assert limits["d"] is None and limits["e"] is None


def test_rate_limit_burst_defaults_to_one_second_of_rate_at_least_one() -> None:
    config = parse(
        """
        upstreams:
          a: { url: 'http://a', rate_limit: { rate: 100/s } }
          b: { url: 'http://b', rate_limit: { rate: 90/m } }
          c: { url: 'http://c', rate_limit: { rate: 1000/h } }
          d: { url: 'http://d' }
        """
    )
    limits = {u.name: u.rate_limit for u in config.upstreams}
    assert limits["a"] == RateLimit(rate=100.0, burst=100)
    assert limits["b"] == RateLimit(rate=1.5, burst=1)
    assert limits["c"] is not None and limits["c"].burst == 1
    assert limits["d"] is None


# ---------------------------------------------------------------- retries and circuit breaker


def test_retries_and_circuit_breaker_defaults() -> None:
    upstream = parse(MINIMAL).upstreams[0]
    retries, breaker = upstream.retries, upstream.circuit_breaker
    assert (retries.attempts, retries.retry_on, retries.max_body) == (1, ("connect_error",), 65536)
    assert (retries.backoff.base, retries.backoff.max) == (0.025, 0.25)
    assert (retries.budget.ratio, retries.budget.min_per_second) == (0.2, 10.0)
    assert breaker.failures == 0
    assert breaker.failure_on == ("connect_error", "timeout", 502, 503, 504)
    assert (breaker.open_for, breaker.max_open) == (5.0, 120.0)


def test_retries_and_circuit_breaker_inherit_field_by_field_nested_ones_too() -> None:
    config = parse(
        """
        defaults:
          retries: { attempts: 2, retry_on: [connect_error, 503], backoff: { max: 2s }, budget: { ratio: 0.5 } }
          circuit_breaker: { failures: 3, open_for: 1s }
        upstreams:
          a: { url: "http://a", retries: { backoff: { base: 10ms } }, circuit_breaker: { failure_on: [reset] } }
          b: { url: "http://b", retries: { attempts: 0, max_body: 1KiB } }
        """
    )
    a, b = config.upstreams
    assert a.retries.attempts == 2 and a.retries.retry_on == ("connect_error", 503)
    assert (a.retries.backoff.base, a.retries.backoff.max) == (0.01, 2.0)
    assert (a.retries.budget.ratio, a.retries.budget.min_per_second) == (0.5, 10.0)
    assert a.circuit_breaker.failures == 3 and a.circuit_breaker.failure_on == ("reset",)
    assert a.circuit_breaker.open_for == 1.0
    assert b.retries.attempts == 0 and b.retries.max_body == 1024
    assert b.retries.backoff.base == 0.025


@pytest.mark.parametrize(
    ("section", "path", "words"),
    [
        ("retries: { attempts: -1 }", "retries.attempts", "non-negative"),
        ("retries: { retry_on: connect_error }", "retries.retry_on", "list"),
        ("retries: { retry_on: [404] }", "retries.retry_on", "404"),
        ("retries: { retry_on: [on] }", "retries.retry_on", "True"),
        ("retries: { backoff: { base: soon } }", "retries.backoff.base", "duration"),
        ("retries: { backoff: { base: 1s, max: 10ms } }", "retries.backoff.max", "backoff.base"),
        ("retries: { budget: { ratio: -0.1 } }", "retries.budget.ratio", "≥ 0"),
        ("retries: { budget: { min_per_second: lots } }", "retries.budget.min_per_second", "≥ 0"),
        ("retries: { max_body: big }", "retries.max_body", "size"),
        ("retries: { on: [503] }", "retries", "keys must be strings"),  # YAML 1.1 reads a bare `on` as true
        ("circuit_breaker: { failures: x }", "circuit_breaker.failures", "non-negative"),
        ("circuit_breaker: { failure_on: [429] }", "circuit_breaker.failure_on", "429 never"),
        ("circuit_breaker: { open_for: 0s }", "circuit_breaker.open_for", "positive"),
        ("circuit_breaker: { open_for: 10s, max_open: 5s }", "circuit_breaker.max_open", "open_for"),
    ],
)
def test_retries_and_circuit_breaker_rejections_name_the_path(section: str, path: str, words: str) -> None:
    error = rejected(f"upstreams:\n  a: {{ url: 'http://a', {section} }}\n")
    assert error.path == f"upstreams.a.{path}"
    assert words in error.problem
    in_defaults = rejected(f"defaults: {{ {section} }}\n" + MINIMAL)
    assert in_defaults.path == f"defaults.{path}"


# ---------------------------------------------------------------- pacing


def test_pacing_defaults_and_inheritance_field_by_field() -> None:
    (api,) = parse(MINIMAL).upstreams
    assert (api.pacing.learn, api.pacing.max_pause, api.pacing.partition_by, api.pacing.spread) == (
        True,
        60.0,
        None,
        False,
    )
    a, b = parse(
        """
        defaults:
          pacing: { max_pause: 10s, spread: true }
        upstreams:
          a: { url: "http://a.internal", pacing: { partition_by: Authorization } }
          b: { url: "http://b.internal", pacing: { learn: false, spread: false } }
        """
    ).upstreams
    assert (a.pacing.max_pause, a.pacing.spread, a.pacing.partition_by) == (10.0, True, "Authorization")
    assert (b.pacing.learn, b.pacing.max_pause, b.pacing.spread) == (False, 10.0, False)


@pytest.mark.parametrize(
    ("section", "path", "problem"),
    [
        ("{ max_pause: 0 }", "max_pause", "must be a positive duration"),
        ("{ max_pause: soon }", "max_pause", "duration"),
        ("{ learn: maybe }", "learn", "true or false"),
        ('{ partition_by: "not a header" }', "partition_by", "not a valid header name"),
        ("{ spread: 3 }", "spread", "true or false"),
        ("{ burst: 1 }", "burst", "unknown key"),
    ],
)
def test_bad_pacing_values_name_their_path(section: str, path: str, problem: str) -> None:
    error = rejected(f"upstreams:\n  api:\n    url: http://a.internal\n    pacing: {section}\n")
    assert error.path == f"upstreams.api.pacing.{path}"
    assert problem in error.problem
    error = rejected(f"defaults:\n  pacing: {section}\nupstreams:\n  api: {{ url: http://a.internal }}\n")
    assert error.path == f"defaults.pacing.{path}"


# ---------------------------------------------------------------- shared limits (docs/shared-limits.md)


def test_shared_section_defaults_and_inherited_shared_fields() -> None:
    config = parse(
        """
        shared: { redis: "redis://:${P}@10.0.0.5:6379/0" }
        defaults:
          rate_limit: { rate: 10/s, shared: true }
          limits: { shared_max_concurrent_requests: 4 }
          pacing: { shared: true }
        upstreams:
          a: { url: 'http://a' }
          b: { url: 'http://b', rate_limit: { shared: false }, limits: { shared_max_concurrent_requests: null } }
        """,
        env={"P": "s3cret/x"},
    )
    shared = config.shared
    assert shared is not None
    assert (shared.key_prefix, shared.timeout, shared.on_error, shared.lease) == ("sidecar:", 0.05, "local", 10.0)
    a, b = config.upstreams
    assert a.rate_limit == RateLimit(rate=10.0, burst=10, shared=True) and a.pacing.shared
    assert a.limits.shared_max_concurrent_requests == 4
    assert b.rate_limit == RateLimit(rate=10.0, burst=10, shared=False)
    assert b.limits.shared_max_concurrent_requests is None and b.pacing.shared
    assert "s3cret/x" in config.secrets
    view = public_view(config)
    assert view["shared"]["redis"] == "redis://<redacted>@10.0.0.5:6379/0"
    assert "s3cret" not in str(view)


def test_a_literal_redis_password_is_a_secret_too() -> None:
    config = parse(
        """
        shared: { redis: "rediss://user:pw%40here@redis:6380/1", on_error: deny, lease: 3s, timeout: 20ms }
        upstreams: { a: { url: 'http://a' } }
        """
    )
    assert {"pw%40here", "pw@here"} <= config.secrets
    assert "pw" not in str(public_view(config)["shared"])


@pytest.mark.parametrize(
    ("setting", "wants"),
    [
        ("rate_limit: { rate: 5/s, shared: true }", "rate_limit.shared"),
        ("limits: { shared_max_concurrent_requests: 3 }", "limits.shared_max_concurrent_requests"),
        ("pacing: { shared: true }", "pacing.shared"),
    ],
)
def test_a_shared_limit_without_a_shared_section_names_shared_redis(setting: str, wants: str) -> None:
    error = rejected(f"upstreams:\n  a: {{ url: 'http://a', {setting} }}\n")
    assert error.path == "shared.redis" and wants in str(error)


@pytest.mark.parametrize(
    ("section", "path"),
    [
        ("{ redis: 'http://x' }", "shared.redis"),
        ("{ key_prefix: 'x' }", "shared.redis"),
        ("{ redis: 'redis://x', timeout: 0s }", "shared.timeout"),
        ("{ redis: 'redis://x', lease: -1s }", "shared.lease"),
        ("{ redis: 'redis://x', on_error: maybe }", "shared.on_error"),
        ("{ redis: 'redis://x', pool: 3 }", "shared"),
        ("{ redis: 'redis://x/0?socket_timeout=1' }", "shared.redis"),
    ],
)
def test_bad_shared_values_name_their_path(section: str, path: str) -> None:
    error = rejected(f"shared: {section}\nupstreams:\n  a: {{ url: 'http://a' }}\n")
    assert error.path.startswith(path), error


def test_a_redis_url_may_carry_its_tls_settings() -> None:
    config = parse_config(
        "shared: { redis: 'rediss://redis:6380/1?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=required' }\n"
        "upstreams:\n  a: { url: 'http://a' }\n"
    )
    assert config.shared is not None and config.shared.redis.startswith("rediss://")


def test_a_bad_shared_max_concurrent_requests_names_its_path() -> None:
    error = rejected(
        "shared: { redis: 'redis://x' }\n"
        "upstreams:\n  a: { url: 'http://a', limits: { shared_max_concurrent_requests: 0 } }\n"
    )
    assert error.path == "upstreams.a.limits.shared_max_concurrent_requests"
