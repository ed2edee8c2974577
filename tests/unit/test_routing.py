"""routing.py: every routing rule, on the pure Router (no sockets)."""

from __future__ import annotations

import pytest

from sidecar.config import parse_config
from sidecar.errors import BadRequest, ConnectNotSupported, DestinationNotAllowed, NoRoute, SidecarError
from sidecar.routing import RouteMatch, Router

CONFIG = """
upstreams:
  payments:
    url: https://payments.internal:8443/api
    route:
      path_prefix: /payments
      hosts: [payments.internal, pay.example.com]
  payments-v2:
    url: http://p2.internal
    route: { path_prefix: /payments/v2 }
  keep:
    url: http://keep.internal/base/
    route: { path_prefix: /keep, strip_prefix: false }
  nobase:
    url: http://nobase.internal
  root:
    url: http://root.internal/catchall
    route: { path_prefix: /, hosts: ["[::1]", "root.internal:8080"] }
"""


@pytest.fixture(scope="module")
def router() -> Router:
    return Router(parse_config(CONFIG, env={}).upstreams)


@pytest.fixture(scope="module")
def router_without_root() -> Router:
    upstreams = parse_config(CONFIG, env={}).upstreams
    return Router(tuple(u for u in upstreams if u.name != "root"))


def route(router: Router, target: str, host: str | None = None, method: str = "GET") -> tuple[str, str]:
    match = router.resolve(method, target, host)
    assert isinstance(match, RouteMatch)
    return match.upstream.name, match.target


# ------------------------------------------------------ path prefix rules


@pytest.mark.parametrize(
    ("target", "upstream", "sent"),
    [
        ("/payments", "payments", "/api"),
        ("/payments/", "payments", "/api/"),
        ("/payments/v1/charges", "payments", "/api/v1/charges"),
        ("/payments/v1/charges?a=1", "payments", "/api/v1/charges?a=1"),
        ("/payments?a=1", "payments", "/api?a=1"),
        # Longest prefix wins, on segment boundaries.
        ("/payments/v2", "payments-v2", "/"),
        ("/payments/v2/x", "payments-v2", "/x"),
        ("/payments/v2x", "payments", "/api/v2x"),
        ("/payments/v20/x", "payments", "/api/v20/x"),
        # Not a segment boundary: /paymentsx is not under /payments.
        ("/paymentsx", "root", "/catchall/paymentsx"),
        ("/paymentsx/y", "root", "/catchall/paymentsx/y"),
        # strip_prefix: false keeps the prefix; base path still applies.
        ("/keep/a/b?c", "keep", "/base/keep/a/b?c"),
        ("/keep", "keep", "/base/keep"),
        # No base path.
        ("/nobase/x", "nobase", "/x"),
        ("/nobase", "nobase", "/"),
        ("/nobase?q=1", "nobase", "/?q=1"),
        # Root prefix catches everything else; nothing to strip.
        ("/", "root", "/catchall/"),
        ("/other/thing", "root", "/catchall/other/thing"),
    ],
)
def test_longest_prefix_on_segment_boundaries(router: Router, target: str, upstream: str, sent: str) -> None:
    assert route(router, target) == (upstream, sent)


def test_no_route_is_404(router_without_root: Router) -> None:
    for target in ("/paymentsx", "/", "/unknown/x", "/Payments/x"):
        with pytest.raises(NoRoute) as info:
            router_without_root.resolve("GET", target, None)
        assert info.value.status == 404 and info.value.code == "no_route"


@pytest.mark.parametrize(
    "query",
    [
        "?a=1&b=2",
        "?b=%20x&a=%2F",  # percent-escapes untouched, order kept
        "?x=a+b&x=c",  # repeated keys and '+' kept
        "?",  # an empty query is still a query
        "?a=/../b&c=%zz",  # not normalised, not validated
        "?q=caf%C3%A9&r=%7e",
        "?a=1?b=2",
    ],
)
def test_query_string_passes_byte_for_byte(router: Router, query: str) -> None:
    assert route(router, "/payments/v1/x" + query) == ("payments", "/api/v1/x" + query)


def test_path_is_not_normalised(router: Router) -> None:
    assert route(router, "/payments/a/../b/%2e%2E/./c") == ("payments", "/api/a/../b/%2e%2E/./c")
    assert route(router, "/payments//double") == ("payments", "/api//double")


# ----------------------------------------------------------- Host header


@pytest.mark.parametrize(
    ("host", "upstream", "sent"),
    [
        ("payments.internal", "payments", "/api/v1/charges?a=1"),
        ("PAYMENTS.Internal", "payments", "/api/v1/charges?a=1"),
        ("payments.internal:8088", "payments", "/api/v1/charges?a=1"),
        ("pay.example.com", "payments", "/api/v1/charges?a=1"),
        ("root.internal:8080", "root", "/catchall/v1/charges?a=1"),
        ("[::1]:8088", "root", "/catchall/v1/charges?a=1"),
    ],
)
def test_host_header_routes_without_a_prefix(router: Router, host: str, upstream: str, sent: str) -> None:
    # A Host match wins over path prefixes and sends the path whole (no prefix to strip).
    assert route(router, "/v1/charges?a=1", host) == (upstream, sent)


def test_host_header_match_wins_over_a_path_prefix(router: Router) -> None:
    assert route(router, "/nobase/x", "payments.internal") == ("payments", "/api/nobase/x")


def test_unknown_host_header_falls_back_to_the_path(router: Router) -> None:
    assert route(router, "/nobase/x", "localhost:8088") == ("nobase", "/x")
    assert route(router, "/nobase/x", "") == ("nobase", "/x")
    assert route(router, "/nobase/x", None) == ("nobase", "/x")


# ------------------------------------------------------ absolute-form


@pytest.mark.parametrize(
    ("target", "upstream", "sent"),
    [
        ("http://payments.internal/v1/charges?a=1", "payments", "/api/v1/charges?a=1"),
        ("http://payments.internal:80/v1", "payments", "/api/v1"),
        ("http://PAYMENTS.INTERNAL/v1", "payments", "/api/v1"),
        ("HTTP://payments.internal/v1", "payments", "/api/v1"),
        ("https://pay.example.com/v1", "payments", "/api/v1"),
        ("http://payments.internal", "payments", "/api/"),
        ("http://payments.internal?x=%20", "payments", "/api/?x=%20"),
        ("http://root.internal:8080/x", "root", "/catchall/x"),
        ("http://[::1]:9/x", "root", "/catchall/x"),
    ],
)
def test_absolute_form_to_a_configured_host(router: Router, target: str, upstream: str, sent: str) -> None:
    # The Host header a proxy client sends is ignored in favour of the target's authority.
    assert route(router, target, "evil.example") == (upstream, sent)


@pytest.mark.parametrize(
    "target",
    [
        "http://evil.example/x",
        "http://payments.internal.evil.example/x",
        "http://127.0.0.1:8088/payments/x",  # a path prefix does not open the door either
        "http://p2.internal/x",  # an upstream's URL host is not a route host unless listed
        "http://localhost/payments",
    ],
)
def test_absolute_form_to_an_unconfigured_host_is_403(router: Router, target: str) -> None:
    with pytest.raises(DestinationNotAllowed) as info:
        router.resolve("GET", target, "payments.internal")
    assert info.value.status == 403 and info.value.code == "destination_not_allowed"


@pytest.mark.parametrize(
    "target",
    [
        "http://user:pw@payments.internal/x",  # userinfo
        "http://payments.internal@evil.example/x",  # userinfo hiding the real host
        "http://payments.internal/x#frag",  # fragment
        "/payments/x#frag",  # fragment in origin-form
        "/payments/x?a=1#frag",
        "/payments#",
        "/x#/../../admin",
        "ftp://payments.internal/x",  # non-http scheme
        "ws://payments.internal/x",
        "http:///x",  # no host
        "payments.internal:443",  # authority-form outside CONNECT
        "*",  # asterisk-form
        "x",
    ],
)
def test_malformed_targets_are_400(router: Router, target: str) -> None:
    with pytest.raises(BadRequest) as info:
        router.resolve("GET", target, None)
    assert info.value.status == 400 and info.value.code == "bad_request"


# --------------------------------------------------------------- CONNECT


@pytest.mark.parametrize("target", ["payments.internal:443", "evil.example:443", "/payments"])
def test_connect_is_405_whatever_the_target(router: Router, target: str) -> None:
    with pytest.raises(ConnectNotSupported) as info:
        router.resolve("CONNECT", target, "payments.internal")
    assert info.value.status == 405 and info.value.code == "connect_not_supported"
    assert "http://" in info.value.message


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "PROPFIND"])
def test_every_other_method_is_routed(router: Router, method: str) -> None:
    assert route(router, "/nobase/x", method=method) == ("nobase", "/x")


def test_errors_carry_no_upstream_before_one_is_chosen(router_without_root: Router) -> None:
    for target in ("/nowhere", "http://evil.example/"):
        with pytest.raises(SidecarError) as info:
            router_without_root.resolve("GET", target, None)
        assert info.value.upstream is None


# ------------------------------------------------- dot-segments climbing out
#
# The fixed part of the path the upstream receives is its base path, plus the
# prefix when strip_prefix is false: the caller's dot-segments may move around
# below it, never above it (that would reach other paths of the same host, with
# the credentials headers.set injects).


@pytest.mark.parametrize(
    ("target", "host"),
    [
        # Raw dot-segments, stripped prefix: /api/.. is the host's root.
        ("/payments/..", None),
        ("/payments/../", None),
        ("/payments/../admin", None),
        ("/payments/../../admin", None),
        ("/payments/v1/../../admin", None),
        ("/payments/./../admin", None),
        ("/payments/v1/./.././../admin?a=1", None),
        # Percent-encoded dots, any case, any mix.
        ("/payments/%2e%2e/admin", None),
        ("/payments/%2E%2E/admin", None),
        ("/payments/.%2e/admin", None),
        ("/payments/%2e./admin", None),
        ("/payments/%2E./admin", None),
        ("/payments/.%2E/admin", None),
        ("/payments/v1/%2e%2e/%2e%2e/admin", None),
        # Encoded or backslash separators.
        ("/payments/..%2fadmin", None),
        ("/payments/..%2Fadmin", None),
        ("/payments/v1%2f..%2f..%2fadmin", None),
        ("/payments/%2e%2e%2fadmin", None),
        ("/payments/..\\admin", None),
        ("/payments/v1\\..\\..\\admin", None),
        ("/payments/..%5cadmin", None),
        ("/payments/%2e%2e%5Cadmin", None),
        # A path parameter does not hide a dot-segment from servers that drop it.
        ("/payments/..;/admin", None),
        ("/payments/..;x=1/admin", None),
        # Empty segments are not levels to climb back from (servers merging slashes).
        ("/payments/v1//../../admin", None),
        # Prefix kept (strip_prefix: false): /base/keep is fixed, /base is not reachable.
        ("/keep/..", None),
        ("/keep/../admin", None),
        ("/keep/%2e%2e/admin", None),
        ("/keep/a/../../admin", None),
        # Longest prefix wins, and its own fixed part counts (payments-v2 has no base path).
        ("/payments/v2/../x", None),
        # No base path: still refused, nothing above an upstream's root is a path.
        ("/nobase/../x", None),
        # The root prefix and Host-header routes: the base path is the fixed part.
        ("/..", None),
        ("/%2e%2e/etc/passwd", None),
        ("/x/../../etc", None),
        ("/../admin", "payments.internal"),
        ("/v1/%2e%2e/%2e%2e/admin", "pay.example.com"),
        # Absolute-form.
        ("http://payments.internal/../admin", None),
        ("http://payments.internal/v1/..%2f..%2fadmin?x=1", None),
        ("http://[::1]:9/%2e%2e", None),
    ],
)
def test_dot_segments_climbing_out_of_the_fixed_part_are_400(router: Router, target: str, host: str | None) -> None:
    with pytest.raises(BadRequest) as info:
        router.resolve("GET", target, host)
    assert info.value.status == 400 and info.value.code == "bad_request"
    assert info.value.upstream is None


@pytest.mark.parametrize(
    ("target", "host", "upstream", "sent"),
    [
        # Staying inside: forwarded byte for byte, never normalised.
        ("/payments/a/../b", None, "payments", "/api/a/../b"),
        ("/payments/a/b/../../c", None, "payments", "/api/a/b/../../c"),
        ("/payments/a/%2e%2e/b", None, "payments", "/api/a/%2e%2e/b"),
        ("/payments/a%2f..%2fb", None, "payments", "/api/a%2f..%2fb"),
        ("/payments/a/..", None, "payments", "/api/a/.."),
        ("/payments/./x/.", None, "payments", "/api/./x/."),
        ("/payments/%2e/x", None, "payments", "/api/%2e/x"),
        # Not dot-segments: more dots, dots within a name.
        ("/payments/.../x", None, "payments", "/api/.../x"),
        ("/payments/..a/x", None, "payments", "/api/..a/x"),
        ("/payments/a../x", None, "payments", "/api/a../x"),
        ("/payments/%2e%2e%2e/x", None, "payments", "/api/%2e%2e%2e/x"),
        ("/payments/.hidden/..x", None, "payments", "/api/.hidden/..x"),
        # Decoded once, as an upstream would: %252e is a literal "%2e", not a dot.
        ("/payments/%252e%252e/x", None, "payments", "/api/%252e%252e/x"),
        # The query is not a path: anything goes there.
        ("/payments/x?a=../..", None, "payments", "/api/x?a=../.."),
        ("/payments?../../admin", None, "payments", "/api?../../admin"),
        ("/payments/x?%2e%2e/%2e%2e/%2e%2e", None, "payments", "/api/x?%2e%2e/%2e%2e/%2e%2e"),
        ("/payments/x?a=1/../..\\..%2f..", None, "payments", "/api/x?a=1/../..\\..%2f.."),
        # Prefix kept: moving below it is fine.
        ("/keep/a/../b", None, "keep", "/base/keep/a/../b"),
        # Not under /payments at all: the root route's own base path is the limit.
        ("/payments%2f..%2fadmin", None, "root", "/catchall/payments%2f..%2fadmin"),
        ("/x/../y", None, "root", "/catchall/x/../y"),
        # Host-header and absolute-form routes.
        ("/v1/../v2", "payments.internal", "payments", "/api/v1/../v2"),
        ("http://payments.internal/v1/../v2?q=../..", None, "payments", "/api/v1/../v2?q=../.."),
    ],
)
def test_dot_segments_staying_inside_pass_byte_for_byte(
    router: Router, target: str, host: str | None, upstream: str, sent: str
) -> None:
    assert route(router, target, host) == (upstream, sent)


# ------------------------------------------------------- Host header syntax
#
# RFC 9112 §3.2: a Host that is not a valid host[:port] is 400, whatever the
# target form, even when routing does not need it.


@pytest.mark.parametrize(
    "host",
    [
        "a.test/evil",
        "a .test",
        "a@b",
        "user@payments.internal",
        "payments.internal/x",
        "payments.internal?x",
        "payments.internal#x",
        "payments.internal\\x",
        "a\tb",
        "a, b",
        "a:b:c",
        "a:80x",
        "a:-1",
        "a%zz",
        "a%2",
        "caf\u00e9.example",
        "[::1",
        "[::1]x",
        "[::1]:a",
        "[not-ipv6]",
        "[]",
        "[127.0.0.1]",
        "[::1]]",
        "::1",
        '"quoted"',
        "a<b>",
        "a{b}",
    ],
)
def test_invalid_host_header_is_400(router: Router, host: str) -> None:
    for target in ("/payments/x", "http://payments.internal/x"):
        with pytest.raises(BadRequest) as info:
            router.resolve("GET", target, host)
        assert info.value.status == 400 and info.value.code == "bad_request"
        assert host not in info.value.message


@pytest.mark.parametrize(
    "host",
    [
        "",  # an empty Host is valid (an empty reg-name)
        "payments.internal",
        "PAYMENTS.Internal:8088",
        "localhost:",  # an empty port is valid too
        "127.0.0.1",
        "127.0.0.1:1",
        "[::1]",
        "[::1]:8088",
        "[2001:db8::1]:443",
        "[::ffff:127.0.0.1]",
        "a-b_c~d.example",
        "xn--caf-dma.example",
        "pct%41encoded",
        "sub!$&'()*+,;=delims",
    ],
)
def test_valid_host_headers_are_accepted(router: Router, host: str) -> None:
    assert route(router, "/nobase/x", host)[1] in ("/x", "/api/nobase/x", "/catchall/nobase/x")


@pytest.mark.parametrize(
    ("path", "climbs"),
    [
        ("/a/b/c", False),
        ("/", False),
        ("//x\\y", False),
        ("/..", True),
        ("/a/../..", True),
        ("/a/%2e%2e/%2E%2e", True),
        ("/a%2f..%5c..", True),
        ("/..;p/x", True),
        ("/a/./b/..", False),
        ("/a/%41/..", False),
    ],
)
def test_dot_segments_are_found_with_or_without_a_dot_or_percent_to_look_for(path: str, climbs: bool) -> None:
    from sidecar.routing import climbs_out

    assert climbs_out(path) is climbs


def test_valid_hosts_are_remembered_up_to_a_bound_and_invalid_ones_never(monkeypatch: pytest.MonkeyPatch) -> None:
    from sidecar import routing

    monkeypatch.setattr(routing, "_VALID_HOSTS", set())
    monkeypatch.setattr(routing, "_VALID_HOSTS_KEPT", 2)
    assert routing.valid_host("a:1") and routing.valid_host("b") and routing.valid_host("c")
    assert sorted(routing._VALID_HOSTS) == ["a:1", "b"]
    assert not routing.valid_host("bad host") and not routing.valid_host("[::zz]")
    assert routing.valid_host("a:1") and sorted(routing._VALID_HOSTS) == ["a:1", "b"]
