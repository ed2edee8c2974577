"""pytest fixtures for the common set-ups (registered in ``tests/conftest.py``).

* ``upstream`` — a started :class:`~tests.support.upstreams.Upstream` answering
  ``ok``; set ``upstream.handler`` to answer otherwise.
* ``start_sidecar`` — ``await start_sidecar(yaml_text)`` runs the in-process
  sidecar on that config (in ``tmp_path``) until the test ends.
* ``api_sidecar`` — the in-process sidecar with one upstream, ``api``, at
  ``upstream.url + "/base"``, routed by the ``/api`` prefix and by the host
  ``api.internal`` (the forwarding tests' usual set-up).
* ``ca`` — a fresh trustme certificate authority.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trustme

from sidecar.server import Sidecar
from tests.support.sidecar import running_sidecar
from tests.support.upstreams import Upstream
from tests.support.yaml import API_INTERNAL, one_upstream

StartSidecar = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with Upstream() as server:
        yield server


@pytest.fixture
async def start_sidecar(tmp_path: Path) -> AsyncIterator[StartSidecar]:
    async with AsyncExitStack() as stack:

        async def start(yaml_text: str, *, admin: bool = True) -> Sidecar:
            return await stack.enter_async_context(running_sidecar(tmp_path, yaml_text, admin=admin))

        yield start


@pytest.fixture
async def api_sidecar(upstream: Upstream, start_sidecar: StartSidecar) -> Sidecar:
    return await start_sidecar(one_upstream(f"{upstream.url}/base", route=API_INTERNAL))


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()
