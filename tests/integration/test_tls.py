"""TLS origination: verification on by default, our CA file, client certificates,
SNI, and 502s that say why a certificate was refused."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import aiohttp
import pytest
import trustme

from tests.support.sidecar import SidecarProcess, proxy_url, running_sidecar
from tests.support.tls import server_context
from tests.support.upstreams import TLSUpstream
from tests.support.yaml import one_upstream, write_config


def _config(url: str, **tls: object) -> str:
    return one_upstream(url, tls=tls)


async def _get(sidecar_url: str) -> tuple[int, dict[str, str], dict[str, object] | str]:
    async with aiohttp.ClientSession() as client, client.get(sidecar_url + "/api/x") as response:
        body: dict[str, object] | str = (
            await response.json() if "X-Sidecar-Error" in response.headers else await response.text()
        )
        return response.status, dict(response.headers), body


async def test_verified_with_ca_file_and_sni_from_the_upstream_host(tmp_path: Path, ca: trustme.CA) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with (
        TLSUpstream(server_context(ca.issue_cert("localhost"))) as upstream,
        running_sidecar(tmp_path, _config(upstream.url, ca_file=str(ca_file))) as sidecar,
    ):
        status, _, body = await _get(proxy_url(sidecar))
        assert (status, body) == (200, "ok")
        assert upstream.server_names == ["localhost"]
        assert upstream.requests[0].headers[0] == ("Host", f"localhost:{upstream.port}")


async def test_verification_is_on_by_default_with_the_system_store(tmp_path: Path, ca: trustme.CA) -> None:
    """No ca_file: a certificate from a private CA is refused (the system store does not know it)."""
    async with (
        TLSUpstream(server_context(ca.issue_cert("localhost"))) as upstream,
        running_sidecar(tmp_path, _config(upstream.url)) as sidecar,
    ):
        status, headers, body = await _get(proxy_url(sidecar))
        assert (status, headers["X-Sidecar-Error"]) == (502, "upstream_connect_error")
        assert isinstance(body, dict)
        assert "TLS certificate verification failed" in str(body["message"])
        assert upstream.requests == []


@pytest.mark.parametrize(
    ("issue", "why"),
    [
        (lambda ca: ca.issue_cert("other.example"), "Hostname mismatch"),
        (
            lambda ca: ca.issue_cert(
                "localhost",
                not_before=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30),
                not_after=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1),
            ),
            "certificate has expired",
        ),
    ],
    ids=["wrong-host", "expired"],
)
async def test_bad_certificate_is_a_502_saying_why(tmp_path: Path, ca: trustme.CA, issue: object, why: str) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert = issue(ca)  # type: ignore[operator]
    async with (
        TLSUpstream(server_context(cert)) as upstream,
        running_sidecar(tmp_path, _config(upstream.url, ca_file=str(ca_file))) as sidecar,
    ):
        status, headers, body = await _get(proxy_url(sidecar))
        assert (status, headers["X-Sidecar-Error"]) == (502, "upstream_connect_error")
        assert isinstance(body, dict)
        assert "TLS certificate verification failed" in str(body["message"])
        assert why in str(body["message"]), body["message"]
        assert upstream.requests == []
        pool = sidecar.generation().pools["api"]
        assert (pool.admission.in_flight, pool.stats().connections) == (0, 0)


async def test_client_certificate_for_mtls_upstream(tmp_path: Path, ca: trustme.CA) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    client_ca = trustme.CA()
    client = client_ca.issue_cert("sidecar.client.example", common_name="sidecar-client")
    cert_file, key_file = tmp_path / "client.pem", tmp_path / "client.key"
    with cert_file.open("wb") as out:
        for blob in client.cert_chain_pems:
            out.write(blob.bytes())
    client.private_key_pem.write_to_path(str(key_file))

    context = server_context(ca.issue_cert("localhost"))
    context.verify_mode = ssl.CERT_REQUIRED
    client_ca.configure_trust(context)
    async with TLSUpstream(context) as upstream:
        # Without a client certificate the upstream refuses the handshake.
        async with running_sidecar(tmp_path, _config(upstream.url, ca_file=str(ca_file))) as sidecar:
            status, headers, _ = await _get(proxy_url(sidecar))
            assert status == 502 and headers["X-Sidecar-Error"].startswith("upstream_")
            assert upstream.requests == []
        tls = {"ca_file": str(ca_file), "client_cert": str(cert_file), "client_key": str(key_file)}
        async with running_sidecar(tmp_path, _config(upstream.url, **tls)) as sidecar:
            status, _, body = await _get(proxy_url(sidecar))
            assert (status, body) == (200, "ok")
        peer = upstream.client_certs[-1]
        assert peer is not None
        subject = dict(item for rdn in peer["subject"] for item in rdn)
        assert subject["commonName"] == "sidecar-client"


async def test_verify_false_connects_and_warns_at_startup(tmp_path: Path, ca: trustme.CA) -> None:
    async with TLSUpstream(server_context(ca.issue_cert("other.example"))) as upstream:
        process = SidecarProcess(write_config(tmp_path, _config(upstream.url, verify=False)))
        await process.start()
        try:
            warnings = [e for e in process.events("config_warning") if "TLS verification is OFF" in e["message"]]
            assert warnings and warnings[0]["level"] == "warning"
            assert "upstreams.api.tls.verify" in warnings[0]["message"]
            status, _, body = await _get(process.url)
            assert (status, body) == (200, "ok")
        finally:
            await process.stop()
