from __future__ import annotations

import sys
from pathlib import Path

# Tests import their helpers as `tests.support.*`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.fixtures import api_sidecar, ca, start_sidecar, upstream  # noqa: F401  (fixtures)
