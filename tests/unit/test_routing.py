"""routing.py: every SPEC §4 rule, on the pure Router (no sockets)."""

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
