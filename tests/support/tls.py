"""Throwaway certificate authorities (trustme) for TLS upstreams."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

from tests.support import LOOPBACK


@dataclass
class TLSFiles:
    """A throwaway CA and a server certificate it signed (PEM files)."""

    ca_file: Path
    cert_file: Path  # certificate chain
    key_file: Path


def tls_files(directory: Path, *hostnames: str) -> TLSFiles:
    """A trustme CA in ``directory`` and a server certificate for ``hostnames``."""
    ca = trustme.CA()
    cert = ca.issue_cert(*(hostnames or (LOOPBACK,)))
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca.cert_pem.write_to_path(str(ca_file))
    for blob in cert.cert_chain_pems:
        blob.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    return TLSFiles(ca_file=ca_file, cert_file=cert_file, key_file=key_file)


def tls_server_context(directory: Path, *hostnames: str) -> tuple[ssl.SSLContext, Path]:
    """A server-side SSLContext for ``hostnames`` (default 127.0.0.1) signed by a
    fresh trustme CA, and the CA file a client needs to trust it."""
    files = tls_files(directory, *hostnames)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.cert_file, files.key_file)
    return context, files.ca_file


def server_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    """A server-side SSLContext presenting ``cert`` (for :class:`TLSUpstream`)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context
