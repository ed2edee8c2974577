"""Shared test support: real servers, a raw client, the sidecar under test.

* :mod:`tests.support.upstreams` — every kind of upstream server a test talks to.
* :mod:`tests.support.wire` — a raw HTTP/1.1 client and parsers for raw bytes.
* :mod:`tests.support.sidecar` — the sidecar in-process or as a child process.
* :mod:`tests.support.tls` — throwaway CAs and certificates.
* :mod:`tests.support.yaml` — the one builder of ``upstreams.yaml`` text.
* :mod:`tests.support.rest` — "the pool is back at rest" and ``eventually``.
* :mod:`tests.support.metrics` — the admin ``/metrics`` page, parsed.
* :mod:`tests.support.fixtures` — pytest fixtures (registered in ``tests/conftest.py``).

Everything listens on 127.0.0.1, port 0.
"""

LOOPBACK = "127.0.0.1"
