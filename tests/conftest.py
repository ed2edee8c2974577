from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Tests import their helpers as `tests.support.*`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidecar import compat
from tests.support.fixtures import api_sidecar, ca, start_sidecar, upstream  # noqa: F401  (fixtures)


@pytest.fixture(scope="session", autouse=True)
def _process_set_up() -> None:
    """What the sidecar does once per process at start-up (library self-checks,
    fast httpcore locks), for tests that build pools without starting a Sidecar."""
    compat.start_up()
